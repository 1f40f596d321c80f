//! Times the model alone, without gRPC or the scheduler: prefill of one
//! prompt, prefill of several prompts together, and decode steps at a few
//! batch sizes. For profiling the engine's hot path:
//!
//! ```sh
//! cargo run --release -p torchwire-server --example step_bench -- models/torchwire-tiny
//! ```
//!
//! Arguments: checkpoint directory, then optionally the torch threads (2),
//! prompt tokens (32), decode steps per batch size (256), the batch sizes
//! (1,16,64), the weight quantization (none; or int8) and the KV cache
//! dtype (auto; or float16, bfloat16, float32).

use std::path::PathBuf;
use std::time::Instant;

use torchwire_server::engine::kv_cache::KvCache;
use torchwire_server::model::{Llama, LoadOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("models/torchwire-tiny", String::as_str));
    let arg = |i: usize, default: usize| args.get(i).map_or(default, |s| s.parse().unwrap());
    let (threads, prompt, steps) = (arg(2, 2), arg(3, 32), arg(4, 256));
    let batches: Vec<usize> = args
        .get(5)
        .map_or("1,16,64", String::as_str)
        .split(',')
        .map(|b| b.parse().unwrap())
        .collect();
    let quantization =
        torchwire_server::model::Quantization::parse(args.get(6).map_or("none", String::as_str))
            .expect("quantization");
    let kv_dtype = args.get(7).map_or("auto", String::as_str);
    let kv_kind =
        torchwire_server::model::kv_cache_kind(kv_dtype, tch::Kind::Float).expect("kv cache dtype");
    tch::set_num_threads(threads as i32);
    let context = prompt + steps + 1;
    let model = Llama::load(
        &dir,
        LoadOptions {
            device: tch::Device::Cpu,
            kind: tch::Kind::Float,
            max_positions: context,
            quantization,
        },
    )
    .expect("load");
    let max_batch = batches.iter().copied().max().unwrap().max(16);
    let mut cache = KvCache::stored_as(
        (
            model.num_layers(),
            max_batch,
            model.kv_heads(),
            context,
            model.head_dim(),
        ),
        tch::Device::Cpu,
        tch::Kind::Float,
        kv_kind,
    )
    .expect("cache");
    let ids: Vec<u32> = (0..prompt as u32).map(|i| 10 + i * 7 % 1000).collect();
    println!(
        "{} threads, {prompt} prompt tokens, {steps} decode steps, quantization {}, KV cache {kv_dtype}",
        threads,
        quantization.name()
    );

    // Prefill: one prompt at a time into 16 slots, then the same 16 at once.
    for _ in 0..3 {
        let _ = model.prefill(&ids, &mut cache, 0, false).unwrap();
    }
    let n = 16;
    let t0 = Instant::now();
    for slot in 0..n {
        let _ = model.prefill(&ids, &mut cache, slot, false).unwrap();
    }
    let one_by_one = t0.elapsed().as_secs_f64() * 1e3;
    let prompts: Vec<&[u32]> = (0..n).map(|_| ids.as_slice()).collect();
    let _ = model.prefill_batch(&prompts, &mut cache, 0).unwrap();
    let t0 = Instant::now();
    let _ = model.prefill_batch(&prompts, &mut cache, 0).unwrap();
    let together = t0.elapsed().as_secs_f64() * 1e3;
    println!("prefill x{n}: one by one {one_by_one:.2} ms, together {together:.2} ms");

    for &b in &batches {
        for slot in 0..b {
            let _ = model.prefill(&ids, &mut cache, slot, false).unwrap();
        }
        let tokens = vec![42u32; b];
        let mut positions = vec![prompt; b];
        // Warm-up steps, then timed ones; positions move on as in serving.
        let mut times = Vec::with_capacity(steps);
        for i in 0..steps {
            let t0 = Instant::now();
            let logits = model.decode(&tokens, &positions, &mut cache).unwrap();
            let _ = logits.argmax(-1, false).int64_value(&[0]);
            if i >= 8 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            positions.iter_mut().for_each(|p| *p += 1);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "decode B={b:>2}: median {median:.3} ms/step, p10 {:.3}, p90 {:.3}, {:.0} tok/s",
            times[times.len() / 10],
            times[times.len() * 9 / 10],
            b as f64 * 1e3 / median
        );
    }
}
