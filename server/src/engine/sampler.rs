//! Token sampling: repetition penalty, temperature, top-k, top-p, min-p, on
//! one row of logits, with a per-request seeded RNG, and log-probabilities.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Validated sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Top alternatives to report per token; 0 = no log-probabilities.
    pub logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy: temperature 0, or one so small that `1/t` overflows (a
    /// limit of sampling that is the argmax; dividing by it would turn the
    /// best logit into NaN and pick an arbitrary token).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || !(1.0 / self.temperature).is_finite()
    }

    /// True when the token can be chosen by a plain argmax of the raw logits
    /// (no penalty, greedy, no log-probabilities), which can run on the device.
    pub fn is_plain_argmax(&self) -> bool {
        self.is_greedy() && self.repetition_penalty == 1.0 && self.logprobs == 0
    }
}

/// The chosen token and, when asked, its log-probability and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

impl Sampled {
    /// A token chosen without log-probabilities.
    pub fn token(token: u32) -> Self {
        Self {
            token,
            logprob: None,
            top: Vec::new(),
        }
    }
}

/// Samples tokens for one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The uniform number in `[0, 1)` the next token's draw uses: one
    /// `random::<f32>()` of this request's RNG for a sampled token (drawn
    /// whatever the logits, so the stream never depends on them), none for a
    /// greedy one. The host draw and `device_sampler` both take it from here,
    /// so a seed picks the same tokens on either.
    pub fn next_uniform(&mut self) -> f32 {
        if self.params.is_greedy() {
            0.0
        } else {
            self.rng.random::<f32>()
        }
    }

    /// Picks the next token from `logits` (one row, float32), given the
    /// tokens seen so far (prompt and output) for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Sampled {
        let uniform = self.next_uniform();
        self.sample_with(logits, history, uniform)
    }

    /// `sample` with the draw's uniform number given (`next_uniform`).
    pub fn sample_with(&self, logits: &mut [f32], history: &[u32], uniform: f32) -> Sampled {
        let logprobs = (self.params.logprobs > 0).then(|| log_softmax(logits));
        if self.params.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, history, self.params.repetition_penalty);
        }
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits, uniform)
        };
        match logprobs {
            None => Sampled {
                token,
                logprob: None,
                top: Vec::new(),
            },
            Some(lp) => Sampled {
                token,
                logprob: Some(lp[token as usize]),
                top: top_n(&lp, self.params.logprobs),
            },
        }
    }

    /// Draws from the tempered distribution restricted by top-k, top-p and
    /// min-p. Only as many candidates as top-k or top-p keep are ever sorted:
    /// top-p grows a best-first prefix by partial selection until it holds
    /// the mass asked for, and plain temperature (or min-p) sampling sorts
    /// nothing, walking the vocabulary in id order. `uniform` picks the
    /// token by inverse CDF.
    fn draw(&self, logits: &[f32], uniform: f32) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .collect();
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, best_first);
            cand.truncate(p.top_k);
            cand.sort_unstable_by(best_first);
        }
        if p.top_p < 1.0 {
            let total: f32 = cand.iter().map(|c| c.1).sum();
            let keep = smallest_prefix_reaching(&mut cand, p.top_p * total);
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            // The best candidate's weight: exp(0) = 1 unless the logits are not finite.
            let best = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
            let threshold = best * p.min_p;
            cand.retain(|c| c.1 >= threshold);
        }
        let total: f32 = cand.iter().map(|c| c.1).sum();
        if !(total.is_finite() && total > 0.0) {
            // Non-finite logits leave no distribution to draw from.
            return argmax(logits);
        }
        let mut r = uniform * total;
        for &(id, w) in &cand {
            if r < w {
                return id;
            }
            r -= w;
        }
        cand.last().map_or(0, |c| c.0)
    }
}

/// Larger weight first; the lower id first on ties.
fn best_first(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Orders the front of `cand` best first until it holds at least `mass` of
/// weight, and returns how many candidates that takes (all of them if they
/// never do). Sorts a prefix that grows fourfold at a time, so a
/// distribution whose mass sits in a few hundred tokens costs a selection
/// over the vocabulary, not a sort of it.
fn smallest_prefix_reaching(cand: &mut [(u32, f32)], mass: f32) -> usize {
    let mut k = 64.min(cand.len());
    loop {
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, best_first);
        }
        cand[..k].sort_unstable_by(best_first);
        let mut cum = 0.0;
        if let Some(i) = cand[..k].iter().position(|c| {
            cum += c.1;
            cum >= mass
        }) {
            return i + 1;
        }
        if k == cand.len() {
            return k;
        }
        k = (k * 4).min(cand.len());
    }
}

/// transformers' RepetitionPenaltyLogitsProcessor: each seen token's logit
/// is divided by the penalty when positive, multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let Some(flag) = seen.get_mut(t as usize) else {
            continue;
        };
        if !*flag {
            *flag = true;
            let l = &mut logits[t as usize];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|l| l - log_z).collect()
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let n = n.min(all.len());
    if n == 0 {
        return Vec::new();
    }
    all.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    all.truncate(n);
    all.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 42,
            ..Default::default()
        }
    }

    fn counts(p: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(&mut logits.to_vec(), &[]).token as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_picks_the_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[]).token, 1);
    }

    #[test]
    fn a_temperature_whose_inverse_overflows_is_greedy() {
        // 1/1e-40 is infinite in f32: (best - best) * inf would be NaN.
        let tiny = 1e-40f32;
        assert!(!(1.0 / tiny).is_finite());
        let p = SamplingParams {
            top_k: 3,
            ..params(tiny)
        };
        assert!(p.is_greedy() && p.is_plain_argmax());
        let logits = [0.5, 4.0, 1.0, -2.0, 3.0];
        for seed in 0..20 {
            let mut s = Sampler::new(SamplingParams { seed, ..p.clone() });
            assert_eq!(s.sample(&mut logits.to_vec(), &[]).token, 1, "seed {seed}");
        }
        // The smallest normal temperature still samples, from the best token.
        let mut s = Sampler::new(params(f32::MIN_POSITIVE));
        assert_eq!(s.sample(&mut logits.to_vec(), &[]).token, 1);
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_id() {
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    }

    #[test]
    fn top_k_restricts_to_the_k_best() {
        let logits = [1.0, 2.0, 3.0, 4.0, 0.5];
        let c = counts(
            SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
            &logits,
            2000,
        );
        assert_eq!(c[0] + c[1] + c[4], 0, "{c:?}");
        assert!(c[2] > 0 && c[3] > c[2], "{c:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities ~ [0.643, 0.236, 0.087, 0.032]
        let logits = [3.0, 2.0, 1.0, 0.0];
        let c = counts(
            SamplingParams {
                top_p: 0.8,
                ..params(1.0)
            },
            &logits,
            2000,
        );
        assert_eq!(c[2] + c[3], 0, "{c:?}");
        assert!(c[0] > 0 && c[1] > 0, "{c:?}");
    }

    #[test]
    fn top_p_on_a_large_vocabulary_matches_a_full_sort() {
        // A flat-ish tail forces the prefix to grow past its first 64.
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 1000) as f32 / 300.0)
            .collect();
        for top_p in [0.05, 0.5, 0.95, 0.999] {
            let mut full: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, (l - 3.33).exp()))
                .collect();
            let total: f32 = full.iter().map(|c| c.1).sum();
            full.sort_unstable_by(best_first);
            let mut cum = 0.0;
            let want = full
                .iter()
                .position(|c| {
                    cum += c.1;
                    cum >= top_p * total
                })
                .map_or(full.len(), |i| i + 1);
            let mut partial = full.clone();
            partial.reverse();
            let got = smallest_prefix_reaching(&mut partial, top_p * total);
            assert!(got.abs_diff(want) <= 1, "top_p {top_p}: {got} vs {want}");
            assert_eq!(
                partial[..got.min(want)],
                full[..got.min(want)],
                "top_p {top_p}"
            );
        }
    }

    #[test]
    fn min_p_drops_tokens_below_the_threshold() {
        // relative to the best: [1, 0.37, 0.135, 0.05]
        let logits = [3.0, 2.0, 1.0, 0.0];
        let c = counts(
            SamplingParams {
                min_p: 0.2,
                ..params(1.0)
            },
            &logits,
            2000,
        );
        assert_eq!(c[2] + c[3], 0, "{c:?}");
        assert!(c[1] > 0, "{c:?}");
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let logits = [0.0, (3.0f32).ln()];
        let c = counts(params(1.0), &logits, 4000);
        let ratio = c[1] as f64 / c[0] as f64;
        assert!((2.5..3.6).contains(&ratio), "expected about 3:1, got {c:?}");
    }

    #[test]
    fn repetition_penalty_matches_transformers() {
        let mut logits = [2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 0], 2.0);
        assert_eq!(logits, [1.0, -4.0, 1.0]);
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 3.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [2.0, 1.0], &[0]).token, 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..40)
                .map(|_| s.sample(&mut logits.clone(), &[]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn each_sampled_token_takes_one_uniform_whatever_the_logits() {
        // Non-finite logits fall back to the argmax but still take their
        // uniform, so the stream does not depend on the logits (the device
        // sampler draws before it sees them).
        let p = SamplingParams {
            seed: 9,
            ..params(1.0)
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p.clone()));
        assert_eq!(a.sample(&mut [f32::NAN; 50], &[]).token, 0);
        let _ = b.next_uniform();
        for _ in 0..20 {
            let u = b.next_uniform();
            let want = b.sample_with(&mut logits.clone(), &[], u);
            assert_eq!(a.sample(&mut logits.clone(), &[]), want);
        }
        // A greedy token takes none.
        let mut greedy = Sampler::new(params(0.0));
        assert_eq!(greedy.next_uniform(), 0.0);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: 2,
            ..params(0.0)
        });
        let out = s.sample(&mut [0.0, 1.0, 2.0], &[]);
        assert_eq!(out.token, 2);
        let total: f32 = [0.0f32, 1.0, 2.0].iter().map(|l| (l - 2.0f32).exp()).sum();
        assert!((out.logprob.unwrap() + total.ln()).abs() < 1e-5);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }
}
