use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::engine::sampler::Sampler;

fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        ..Default::default()
    }
}

/// `rows` rows of `vocab` Gaussian logits (std 3, like a trained model's spread).
fn gaussian(rng: &mut StdRng, rows: usize, vocab: usize) -> Vec<Vec<f32>> {
    (0..rows)
        .map(|_| {
            (0..vocab)
                .map(|_| {
                    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-9), rng.random());
                    3.0 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                })
                .collect()
        })
        .collect()
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    let flat: Vec<f32> = rows.concat();
    Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
}

/// One step of a batch: the host samplers and their twins (same seeds)
/// feeding the device sampler's uniforms each sample every row.
fn step(
    host: &mut [Sampler],
    twins: &mut [Sampler],
    logits: &[Vec<f32>],
    history: &[Vec<u32>],
) -> (Vec<Sampled>, Vec<Sampled>) {
    let on_host = host
        .iter_mut()
        .zip(logits)
        .zip(history)
        .map(|((s, row), h)| s.sample(&mut row.clone(), h))
        .collect();
    let uniforms: Vec<f32> = twins.iter_mut().map(Sampler::next_uniform).collect();
    let rows: Vec<Row<'_>> = twins
        .iter()
        .zip(history)
        .zip(uniforms)
        .map(|((s, h), uniform)| Row {
            params: s.params(),
            history: h,
            uniform,
        })
        .collect();
    (on_host, sample(&tensor(logits), &rows).unwrap())
}

/// Runs `steps` steps of a batch with one row per settings (seeded by row)
/// over fresh Gaussian logits; returns (same tokens, draws).
fn agreement(settings: &[SamplingParams], vocab: usize, steps: usize) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(11);
    let with_seed = |b: usize| SamplingParams {
        seed: 1000 + b as u64,
        ..settings[b].clone()
    };
    let mut host: Vec<Sampler> = (0..settings.len())
        .map(|b| Sampler::new(with_seed(b)))
        .collect();
    let mut twins: Vec<Sampler> = (0..settings.len())
        .map(|b| Sampler::new(with_seed(b)))
        .collect();
    let mut history: Vec<Vec<u32>> = (0..settings.len())
        .map(|_| (0..40).map(|_| rng.random_range(0..vocab as u32)).collect())
        .collect();
    let mut same = 0;
    for _ in 0..steps {
        let logits = gaussian(&mut rng, settings.len(), vocab);
        let (h, d) = step(&mut host, &mut twins, &logits, &history);
        for (b, (h, d)) in h.iter().zip(&d).enumerate() {
            same += usize::from(h.token == d.token);
            // Both go on from the host's token, as a request would.
            history[b].push(h.token);
        }
    }
    (same, steps * settings.len())
}

#[test]
fn agrees_with_the_host_sampler_for_the_same_seeds() {
    let mut settings = vec![
        params(0.8, 0, 1.0, 0.0),
        params(1.2, 0, 1.0, 0.0),
        params(0.8, 50, 0.95, 0.0),
        params(0.8, 40, 1.0, 0.0),
        params(0.8, 0, 0.95, 0.0),
        params(1.0, 0, 0.5, 0.0),
        params(1.0, 0, 1.0, 0.05),
        params(0.7, 20, 0.8, 0.1),
        params(0.9, 0, 0.9, 0.02),
        // top-k as large as the vocabulary is off.
        params(0.8, 5000, 0.9, 0.0),
        params(1.5, 3, 1.0, 0.0),
    ];
    for (i, p) in [1.3f32, 0.8].into_iter().enumerate() {
        settings.push(SamplingParams {
            repetition_penalty: p,
            ..params(0.9, 30 * i, 1.0, 0.0)
        });
    }
    let (same, draws) = agreement(&settings, 2000, 250);
    eprintln!("{same} of {draws} draws picked the same token");
    assert!(draws >= 3000);
    assert!(
        same * 100 >= draws * 99,
        "{same} of {draws} draws picked the same token"
    );
}

#[test]
fn greedy_and_top_k_1_agree_exactly() {
    let settings = [
        params(0.0, 0, 1.0, 0.0),
        params(0.0, 5, 0.9, 0.0),
        params(0.9, 1, 1.0, 0.0),
        params(1.0, 1, 0.5, 0.3),
        SamplingParams {
            repetition_penalty: 1.5,
            ..params(0.0, 0, 1.0, 0.0)
        },
        SamplingParams {
            repetition_penalty: 1.5,
            ..params(0.7, 1, 1.0, 0.0)
        },
        // 1/t overflows: greedy.
        params(1e-40, 3, 1.0, 0.0),
    ];
    let (same, draws) = agreement(&settings, 3000, 100);
    assert_eq!(same, draws);
}

/// Frequencies of the tokens the device sampler draws from `logits` (one
/// row repeated) with uniforms from a seeded RNG.
fn frequencies(p: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(5);
    let batch = 100;
    let rows = vec![logits.to_vec(); batch];
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws / batch {
        let uniforms: Vec<f32> = (0..batch).map(|_| rng.random()).collect();
        let rows_in: Vec<Row<'_>> = uniforms
            .iter()
            .map(|&uniform| Row {
                params: &p,
                history: &[],
                uniform,
            })
            .collect();
        for s in sample(&tensor(&rows), &rows_in).unwrap() {
            counts[s.token as usize] += 1;
        }
    }
    counts.iter().map(|&c| c as f64 / draws as f64).collect()
}

fn assert_close(got: &[f64], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() < 0.02,
            "frequencies {got:?}, expected {want:?}"
        );
    }
}

#[test]
fn draws_follow_the_distribution() {
    let probs = [0.1f32, 0.2, 0.3, 0.4];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let n = 10_000;
    // Temperature 1 alone: the distribution itself.
    assert_close(
        &frequencies(params(1.0, 0, 1.0, 0.0), &logits, n),
        &[0.1, 0.2, 0.3, 0.4],
    );
    // Temperature 0.5 squares the probabilities: 1, 4, 9, 16 over 30.
    let squared = [1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0];
    assert_close(&frequencies(params(0.5, 0, 1.0, 0.0), &logits, n), &squared);
    // top-k 2, top-p 0.6 (0.4 + 0.3 reach it) and min-p 0.6 (0.3 / 0.4
    // passes, 0.2 / 0.4 does not) each keep the two best.
    let two_best = [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0];
    for p in [
        params(1.0, 2, 1.0, 0.0),
        params(1.0, 0, 0.6, 0.0),
        params(1.0, 0, 1.0, 0.6),
        params(1.0, 3, 0.6, 0.0),
    ] {
        assert_close(&frequencies(p, &logits, n), &two_best);
    }
}

#[test]
fn non_finite_rows_take_the_argmax() {
    let mut with_inf = vec![0.5f32; 50];
    with_inf[7] = f32::INFINITY;
    let rows = vec![with_inf.clone(), vec![f32::NEG_INFINITY; 50], with_inf];
    let settings = [
        params(1.0, 0, 1.0, 0.0),
        params(1.0, 10, 0.9, 0.0),
        params(1.0, 0, 0.9, 0.0),
    ];
    let in_rows: Vec<Row<'_>> = settings
        .iter()
        .map(|p| Row {
            params: p,
            history: &[],
            uniform: 0.5,
        })
        .collect();
    let got: Vec<u32> = sample(&tensor(&rows), &in_rows)
        .unwrap()
        .iter()
        .map(|s| s.token)
        .collect();
    let want: Vec<u32> = rows
        .iter()
        .zip(&settings)
        .map(|(row, p)| Sampler::new(p.clone()).sample(&mut row.clone(), &[]).token)
        .collect();
    assert_eq!(got, want);
    assert_eq!(got, [7, 0, 7]);
}

#[test]
fn logprobs_match_the_host_sampler() {
    let mut rng = StdRng::seed_from_u64(3);
    let logits = gaussian(&mut rng, 3, 500);
    let settings = [
        SamplingParams {
            logprobs: 5,
            repetition_penalty: 1.4,
            ..params(0.0, 0, 1.0, 0.0)
        },
        params(0.8, 0, 1.0, 0.0),
        SamplingParams {
            logprobs: 2,
            ..params(0.8, 20, 0.9, 0.0)
        },
    ];
    let history: Vec<Vec<u32>> = (0..3).map(|b| vec![b, 10, 20, 30, 10]).collect();
    let mut host: Vec<Sampler> = settings.iter().cloned().map(Sampler::new).collect();
    let mut twins: Vec<Sampler> = settings.iter().cloned().map(Sampler::new).collect();
    let (h, d) = step(&mut host, &mut twins, &logits, &history);
    for (h, d) in h.iter().zip(&d) {
        assert_eq!(h.token, d.token);
        assert_eq!(h.logprob.is_some(), d.logprob.is_some());
        if let (Some(a), Some(b)) = (h.logprob, d.logprob) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert_eq!(h.top.len(), d.top.len());
        for (a, b) in h.top.iter().zip(&d.top) {
            assert_eq!(a.0, b.0);
            assert!((a.1 - b.1).abs() < 1e-4, "{a:?} vs {b:?}");
        }
    }
}

#[test]
fn equal_logits_go_lowest_id_first() {
    // Ties everywhere: the host orders candidates lowest id first.
    let logits = vec![vec![1.0f32, 2.0, 2.0, 2.0, 0.0, 2.0]; 4];
    let settings = [
        params(1.0, 2, 1.0, 0.0),
        params(1.0, 0, 0.3, 0.0),
        params(0.0, 0, 1.0, 0.0),
        params(1.0, 0, 1.0, 0.0),
    ];
    for uniform in [0.0, 0.3, 0.6, 0.99] {
        let rows: Vec<Row<'_>> = settings
            .iter()
            .map(|p| Row {
                params: p,
                history: &[],
                uniform,
            })
            .collect();
        let got: Vec<u32> = sample(&tensor(&logits), &rows)
            .unwrap()
            .iter()
            .map(|s| s.token)
            .collect();
        let want: Vec<u32> = settings
            .iter()
            .map(|p| {
                Sampler::new(p.clone())
                    .sample_with(&mut logits[0].clone(), &[], uniform)
                    .token
            })
            .collect();
        assert_eq!(got, want, "uniform {uniform}");
    }
}

#[test]
fn a_row_count_that_does_not_match_is_an_error() {
    let p = params(1.0, 0, 1.0, 0.0);
    let row = Row {
        params: &p,
        history: &[],
        uniform: 0.5,
    };
    assert!(sample(&Tensor::zeros([2, 10], (Kind::Float, Device::Cpu)), &[row]).is_err());
    assert!(sample(&Tensor::zeros([10], (Kind::Float, Device::Cpu)), &[]).is_err());
}
