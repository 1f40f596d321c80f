//! Times one projection alone: float32 through MKL (`x @ W`, `W` `[in, out]`),
//! float32 as the server keeps it (packed panels, torchwire's kernel), and
//! int8 weights (`--quantize int8`), for the shapes of a SmolLM-135M-sized
//! decoder:
//!
//! ```sh
//! cargo run --release -p torchwire-server --example int8_bench -- 2 200
//! ```
//!
//! Arguments: torch threads (2), calls per trial (200), then optionally the
//! shapes as `INxOUT` separated by commas (the SmolLM-135M ones) and the
//! row counts (1,16,256). Trials of the ways alternate; the median per call
//! is printed with the weight bytes it read per second, and for float32
//! panels the multiply-adds per second as well (GFLOP/s, two flops each).

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
    println!("in x out, rows: MKL f32 ms (GB/s) | f32 panels ms (GB/s) | int8 ms (GB/s)");
    let shapes: Vec<(i64, i64)> = args.get(3).map_or(
        vec![
            (576, 960),
            (576, 576),
            (576, 3072),
            (1536, 576),
            (576, 49152),
        ],
        |s| {
            s.split(',')
                .map(|shape| {
                    let (i, o) = shape.split_once('x').expect("shape INxOUT");
                    (i.parse().expect("IN"), o.parse().expect("OUT"))
                })
                .collect()
        },
    );
    let row_counts: Vec<i64> = args.get(4).map_or(vec![1, 16, 256], |s| {
        s.split(',').map(|r| r.parse().expect("rows")).collect()
    });
    for (inner, out) in shapes {
        let w = Tensor::randn([out, inner], (Kind::Float, Device::Cpu));
        let in_out = w.tr().contiguous();
        let rows = Projection::new(&w).unwrap();
        let int8 = Projection::int8(&w, Kind::Float, threads).unwrap();
        let bytes = [rows.bytes(), rows.bytes(), int8.bytes()];
        let ways: [&dyn Fn(&Tensor) -> Tensor; 3] =
            [&|x| x.mm(&in_out), &|x| rows.mm(x).unwrap(), &|x| {
                int8.mm(x).unwrap()
            }];
        for &rows in &row_counts {
            let x = Tensor::randn([rows, inner], (Kind::Float, Device::Cpu));
            let mut times = vec![Vec::new(); 3];
            for _trial in 0..5 {
                for (i, way) in ways.iter().enumerate() {
                    let _ = way(&x);
                    let start = Instant::now();
                    for _ in 0..calls {
                        let _ = way(&x);
                    }
                    times[i].push(start.elapsed().as_secs_f64() / calls as f64);
                }
            }
            let medians: Vec<f64> = times
                .iter_mut()
                .map(|t| {
                    t.sort_by(f64::total_cmp);
                    t[t.len() / 2]
                })
                .collect();
            let line: Vec<String> = medians
                .iter()
                .zip(bytes)
                .map(|(s, bytes)| format!("{:.3} ({:.1})", s * 1e3, bytes as f64 / s / 1e9))
                .collect();
            // The float32 panels are the second way.
            let flops = 2.0 * (inner * out * rows) as f64 / medians[1];
            println!(
                "{inner} x {out}, {rows}: {} | panels {:.1} GFLOP/s",
                line.join(" | "),
                flops / 1e9
            );
        }
    }
}
