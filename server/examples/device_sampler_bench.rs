//! Times sampling a batch of logits on the host (copy the rows out, then
//! `Sampler` row by row, as the scheduler's host path does) against the
//! device sampler (`device_sampler::sample`) run on CPU tensors:
//!
//! ```sh
//! cargo run --release -p torchwire-server --example device_sampler_bench -- 128256 16 100 2
//! python scripts/make_random_checkpoint.py --preset vocab-128k --out /tmp/vocab-128k-random
//! cargo run --release -p torchwire-server --example device_sampler_bench -- 128256 16 20 2 /tmp/vocab-128k-random
//! ```
//!
//! Arguments: vocabulary size (128256, Llama 3's), rows per step (16), steps
//! per trial (100), torch threads (2), and optionally a checkpoint directory
//! whose decode step (as many sequences as rows, 32 tokens in) is timed in
//! the same run for comparison. The logits are Gaussian (std 3); trials of
//! the ways (and of the decode step) alternate and the median per step of 5
//! is printed.

mod common;

use tch::Tensor;
use torchwire_server::engine::device_sampler::{self, Row};
use torchwire_server::engine::kv_cache::KvCache;
use torchwire_server::engine::sampler::{Sampler, SamplingParams};
use torchwire_server::model::{Llama, LoadOptions};

use common::{gaussian_logits, median, settings, time};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: usize| args.get(i).map_or(default, |s| s.parse().unwrap());
    let (vocab, rows, steps, threads) = (arg(1, 128_256), arg(2, 16), arg(3, 100), arg(4, 2));
    tch::set_num_threads(threads as i32);
    let logits =
        Tensor::from_slice(&gaussian_logits(vocab * rows)).view([rows as i64, vocab as i64]);
    let history: Vec<u32> = (0..64).map(|i| i * 97 % vocab as u32).collect();
    let mut decode = args.get(5).map(|dir| DecodeStep::load(dir, rows, steps));
    println!(
        "vocabulary {vocab}, {rows} rows a step, {steps} steps a trial, {threads} torch threads, median of 5 trials"
    );
    let mut decode_times = Vec::new();
    println!("| settings | ms a step, host | ms a step, device sampler on CPU | device / host |");
    println!("|---|---|---|---|");
    for (name, p) in settings() {
        let mut samplers: Vec<Sampler> = (0..rows)
            .map(|b| {
                Sampler::new(SamplingParams {
                    seed: b as u64,
                    ..p.clone()
                })
            })
            .collect();
        let (mut on_host, mut on_device) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            if let Some(d) = &mut decode {
                decode_times.push(d.time());
            }
            on_host.push(time(steps, || {
                let mut all = Vec::<f32>::try_from(&logits.flatten(0, -1)).unwrap();
                for (row, s) in all.chunks_mut(vocab).zip(&mut samplers) {
                    std::hint::black_box(s.sample(row, &history));
                }
            }));
            on_device.push(time(steps, || {
                let uniforms: Vec<f32> = samplers.iter_mut().map(Sampler::next_uniform).collect();
                let batch: Vec<Row<'_>> = samplers
                    .iter()
                    .zip(uniforms)
                    .map(|(s, uniform)| Row {
                        params: s.params(),
                        history: &history,
                        uniform,
                    })
                    .collect();
                std::hint::black_box(device_sampler::sample(&logits, &batch).unwrap());
            }));
        }
        let (h, d) = (median(on_host), median(on_device));
        println!("| {name} | {h:.2} | {d:.2} | {:.2} |", d / h);
    }
    if !decode_times.is_empty() {
        println!(
            "decode step, batch {rows} (greedy argmax included): {:.2} ms",
            median(decode_times)
        );
    }
}

/// A model's decode step at batch `rows`, timed a trial of `steps` steps
/// at a time from the same positions.
struct DecodeStep {
    model: Llama,
    cache: KvCache,
    rows: usize,
    steps: usize,
}

const PROMPT: usize = 32;

impl DecodeStep {
    fn load(dir: &str, rows: usize, steps: usize) -> Self {
        let model = Llama::load(
            std::path::Path::new(dir),
            LoadOptions {
                device: tch::Device::Cpu,
                kind: tch::Kind::Float,
                max_positions: PROMPT + steps + 1,
                quantization: torchwire_server::model::Quantization::None,
            },
        )
        .expect("load");
        let mut cache = KvCache::new(
            model.num_layers(),
            rows,
            model.kv_heads(),
            PROMPT + steps + 1,
            model.head_dim(),
            tch::Device::Cpu,
            tch::Kind::Float,
        )
        .expect("cache");
        let ids: Vec<u32> = (0..PROMPT as u32).map(|i| 10 + i * 7 % 1000).collect();
        for slot in 0..rows {
            let _ = model.prefill(&ids, &mut cache, slot, false).unwrap();
        }
        Self {
            model,
            cache,
            rows,
            steps,
        }
    }

    /// Milliseconds per decode step (and its argmax) over one trial.
    fn time(&mut self) -> f64 {
        let tokens = vec![42u32; self.rows];
        let mut positions = vec![PROMPT; self.rows];
        time(self.steps, || {
            let logits = self
                .model
                .decode(&tokens, &positions, &mut self.cache)
                .unwrap();
            let _ = logits.argmax(-1, false).int64_value(&[0]);
            positions.iter_mut().for_each(|p| *p += 1);
        })
    }
}
