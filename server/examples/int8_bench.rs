//! Times one projection alone: float32 (`x @ W`, column blocks per thread
//! as the server keeps them) against int8 weights (`--quantize int8`) on 1
//! and on all threads, for the shapes of a SmolLM-135M-sized decoder:
//!
//! ```sh
//! cargo run --release -p torchwire-server --example int8_bench -- 2 200
//! ```
//!
//! Arguments: torch threads (2), calls per trial (200). Trials of the ways
//! alternate; the median per call is printed with the weight bytes it read
//! per second.

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use torchwire_server::model::Projection;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: usize| args.get(i).map_or(default, |s| s.parse().unwrap());
    let (threads, calls) = (arg(1, 2), arg(2, 200));
    tch::set_num_threads(threads as i32);
    let _guard = tch::no_grad_guard();
    println!("{threads} threads, {calls} calls a trial, median of 5 trials");
    println!("in x out, rows: f32 ms (GB/s) | int8 1 thread ms (GB/s) | int8 {threads} threads ms (GB/s)");
    for (inner, out) in [
        (576, 960),
        (576, 576),
        (576, 3072),
        (1536, 576),
        (576, 49152),
    ] {
        let w = Tensor::randn([out, inner], (Kind::Float, Device::Cpu));
        let dense = Projection::new(w.tr().contiguous(), threads as i64);
        let one = Projection::int8(&w, Kind::Float, 1).unwrap();
        let all = Projection::int8(&w, Kind::Float, threads).unwrap();
        for rows in [1, 16, 256] {
            let x = Tensor::randn([rows, inner], (Kind::Float, Device::Cpu));
            let ways: [&Projection; 3] = [&dense, &one, &all];
            let mut times = vec![Vec::new(); 3];
            for _trial in 0..5 {
                for (i, p) in ways.iter().enumerate() {
                    let _ = p.mm(&x).unwrap();
                    let start = Instant::now();
                    for _ in 0..calls {
                        let _ = p.mm(&x).unwrap();
                    }
                    times[i].push(start.elapsed().as_secs_f64() / calls as f64);
                }
            }
            let line: Vec<String> = times
                .iter_mut()
                .zip(ways)
                .map(|(t, p)| {
                    t.sort_by(f64::total_cmp);
                    let s = t[t.len() / 2];
                    format!("{:.3} ({:.1})", s * 1e3, p.bytes() as f64 / s / 1e9)
                })
                .collect();
            println!("{inner} x {out}, {rows}: {}", line.join(" | "));
        }
    }
}
