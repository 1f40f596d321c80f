//! What the sampling benchmarks share: their logits, their settings and how
//! they time and summarise trials.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use torchwire_server::engine::sampler::SamplingParams;

/// `count` Gaussian logits (std 3, like a trained model's spread), from a
/// fixed seed so every run times the same rows.
pub fn gaussian_logits(count: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..count)
        .map(|_| {
            // Box-Muller: a normal sample with std 3.
            let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-9), rng.random());
            3.0 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

/// The sampling settings both benchmarks time, by name.
pub fn settings() -> [(&'static str, SamplingParams); 4] {
    [
        ("greedy", SamplingParams::default()),
        ("t=0.8", params(0.8, 0, 1.0)),
        ("t=0.8 top_k=50 top_p=0.95", params(0.8, 50, 0.95)),
        ("t=0.8 top_p=0.95", params(0.8, 0, 0.95)),
    ]
}

fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        ..Default::default()
    }
}

/// Milliseconds per step of `f` over `steps` steps.
pub fn time(steps: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..steps {
        f();
    }
    start.elapsed().as_secs_f64() * 1000.0 / steps as f64
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
