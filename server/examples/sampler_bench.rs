//! Times token sampling alone on a batch of logits rows of a large
//! vocabulary, for each kind of sampling settings, against the same work done
//! the way the sampler did it before (a sort of every candidate per row):
//!
//! ```sh
//! cargo run --release -p torchwire-server --example sampler_bench -- 128256 16 200
//! ```
//!
//! Arguments: vocabulary size (128256, Llama 3's), rows per step (16), steps
//! per trial (200). The logits are Gaussian (std 3), like a trained model's
//! spread; trials of the two ways alternate, and the median per step is
//! printed. Compare it with a decode step of the model (`step_bench`).

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchwire_server::engine::sampler::{Sampler, SamplingParams};

use common::{gaussian_logits, median, settings, time};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: usize| args.get(i).map_or(default, |s| s.parse().unwrap());
    let (vocab, rows, steps) = (arg(1, 128_256), arg(2, 16), arg(3, 200));
    let logits = gaussian_logits(vocab * rows);
    let mut rng = StdRng::seed_from_u64(8);
    println!("vocabulary {vocab}, {rows} rows a step, {steps} steps a trial, median of 5 trials");
    println!("| settings | ms a step, full sort (before) | ms a step, sampler | ratio |");
    println!("|---|---|---|---|");
    for (name, p) in settings() {
        let (mut before, mut now) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            before.push(time(steps, || {
                for row in logits.chunks(vocab) {
                    std::hint::black_box(full_sort_draw(&p, row, &mut rng));
                }
            }));
            let mut samplers: Vec<Sampler> = (0..rows).map(|_| Sampler::new(p.clone())).collect();
            now.push(time(steps, || {
                for (row, s) in logits.chunks(vocab).zip(&mut samplers) {
                    std::hint::black_box(s.sample(&mut row.to_vec(), &[]));
                }
            }));
        }
        let (b, n) = (median(before), median(now));
        println!("| {name} | {b:.2} | {n:.2} | {:.2} |", n / b);
    }
}

/// The previous draw: every candidate's weight, then a sort of all that
/// top-k left (the whole vocabulary without top-k), then top-p on the sorted
/// list. Greedy rows took the argmax as now.
fn full_sort_draw(p: &SamplingParams, logits: &[f32], rng: &mut StdRng) -> u32 {
    let row = logits.to_vec();
    if p.is_greedy() {
        return torchwire_server::engine::sampler::argmax(&row);
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut cand: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / p.temperature).exp()))
        .collect();
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(p.top_k);
    }
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f32 = cand.iter().map(|c| c.1).sum();
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let keep = cand
            .iter()
            .position(|c| {
                cum += c.1 / total;
                cum >= p.top_p
            })
            .map_or(cand.len(), |i| i + 1);
        cand.truncate(keep.max(1));
    }
    let total: f32 = cand.iter().map(|c| c.1).sum();
    let mut r = rng.random::<f32>() * total;
    for &(id, w) in &cand {
        if r < w {
            return id;
        }
        r -= w;
    }
    cand.last().map_or(0, |c| c.0)
}
