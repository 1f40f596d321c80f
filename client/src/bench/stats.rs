//! Per-request measurements and the per-level summary computed from them:
//! throughput, and TTFT / TPOT / inter-token latency / end-to-end
//! percentiles, with failures counted by gRPC code.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::code_name;

/// What one streamed request measured, on the client's clock.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    /// Request sent → first message carrying a token.
    pub ttft: Option<Duration>,
    /// Request sent → end of the stream.
    pub e2e: Duration,
    /// Gaps between consecutive messages that carry tokens.
    pub inter_token: Vec<Duration>,
    /// Generated tokens (the server's usage count when it sent one).
    pub output_tokens: u64,
    /// Prompt tokens as the server counted them (0 if it did not say).
    pub prompt_tokens: u64,
    /// The gRPC code of a failed request; `None` on success.
    pub error: Option<tonic::Code>,
}

impl RequestRecord {
    /// A request that failed with `code` after `elapsed`.
    pub fn failed(code: tonic::Code, elapsed: Duration) -> Self {
        Self {
            e2e: elapsed,
            error: Some(code),
            ..Default::default()
        }
    }

    /// Time per output token after the first: (e2e - ttft) / (tokens - 1).
    pub fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        if self.output_tokens < 2 {
            return None;
        }
        Some(self.e2e.saturating_sub(ttft) / (self.output_tokens - 1) as u32)
    }
}

/// Distribution of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Summarizes `values` (any order); `None` when there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let count = values.len();
        Some(Self {
            count,
            mean: values.iter().sum::<f64>() / count as f64,
            p50: quantile(&values, 0.50),
            p90: quantile(&values, 0.90),
            p99: quantile(&values, 0.99),
            max: values[count - 1],
        })
    }

    fn of_durations(values: impl Iterator<Item = Duration>) -> Option<Self> {
        Self::of(values.map(ms).collect())
    }
}

/// Linear interpolation between closest ranks (numpy's default), on sorted data.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How one level loaded the server.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Closed loop: this many requests in flight at all times.
    Concurrency(u32),
    /// Open loop: Poisson arrivals at this many requests per second.
    Rate(f64),
}

impl Load {
    /// The number the charts put on the x axis.
    pub fn x(&self) -> f64 {
        match *self {
            Load::Concurrency(c) => c as f64,
            Load::Rate(r) => r,
        }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Load::Concurrency(c) => write!(f, "c={c}"),
            Load::Rate(r) => write!(f, "rate={r}/s"),
        }
    }
}

/// Results of one load level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    pub load: Load,
    /// Requests that finished without error.
    pub requests: u64,
    /// Requests that failed, whatever the code.
    pub failed: u64,
    /// Failed requests by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// Wall time from the first request sent to the last stream ended.
    pub duration_s: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Option<Percentiles>,
    pub tpot_ms: Option<Percentiles>,
    pub itl_ms: Option<Percentiles>,
    pub e2e_ms: Option<Percentiles>,
}

impl LevelResult {
    /// Summarizes the records of one level that took `wall` in total.
    pub fn summarize(load: Load, records: &[RequestRecord], wall: Duration) -> Self {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
        let mut errors = BTreeMap::new();
        for code in records.iter().filter_map(|r| r.error) {
            *errors.entry(code_name(code).to_string()).or_insert(0) += 1;
        }
        let secs = wall.as_secs_f64();
        let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let output_tokens = ok.iter().map(|r| r.output_tokens).sum();
        Self {
            load,
            requests: ok.len() as u64,
            failed: (records.len() - ok.len()) as u64,
            errors,
            duration_s: secs,
            prompt_tokens: ok.iter().map(|r| r.prompt_tokens).sum(),
            output_tokens,
            output_tokens_per_s: per_s(output_tokens),
            requests_per_s: per_s(ok.len() as u64),
            ttft_ms: Percentiles::of_durations(ok.iter().filter_map(|r| r.ttft)),
            tpot_ms: Percentiles::of_durations(ok.iter().filter_map(|r| r.tpot())),
            itl_ms: Percentiles::of_durations(
                ok.iter().flat_map(|r| r.inter_token.iter().copied()),
            ),
            e2e_ms: Percentiles::of_durations(ok.iter().map(|r| r.e2e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let p = Percentiles::of((1..=101).rev().map(f64::from).collect()).unwrap();
        assert_eq!(p.count, 101);
        assert_eq!(p.p50, 51.0);
        assert_eq!(p.p90, 91.0);
        assert_eq!(p.p99, 100.0);
        assert_eq!(p.max, 101.0);
        assert_eq!(p.mean, 51.0);
        let p = Percentiles::of(vec![10.0, 20.0]).unwrap();
        assert_eq!(p.p50, 15.0);
        assert!((p.p90 - 19.0).abs() < 1e-9);
        assert!(Percentiles::of(vec![]).is_none());
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        let r = RequestRecord {
            ttft: Some(ms(100)),
            e2e: ms(190),
            output_tokens: 10,
            ..Default::default()
        };
        assert_eq!(r.tpot(), Some(ms(10)));
        let single = RequestRecord {
            ttft: Some(ms(5)),
            e2e: ms(5),
            output_tokens: 1,
            ..Default::default()
        };
        assert_eq!(single.tpot(), None);
    }

    #[test]
    fn a_level_counts_throughput_and_errors() {
        let ok = |ttft: u64, gaps: &[u64]| RequestRecord {
            ttft: Some(ms(ttft)),
            e2e: ms(ttft + gaps.iter().sum::<u64>()),
            inter_token: gaps.iter().map(|&g| ms(g)).collect(),
            output_tokens: gaps.len() as u64 + 1,
            prompt_tokens: 32,
            error: None,
        };
        let records = vec![
            ok(50, &[10, 10, 10]),
            ok(70, &[20, 20, 20]),
            RequestRecord::failed(tonic::Code::ResourceExhausted, ms(1)),
            RequestRecord::failed(tonic::Code::ResourceExhausted, ms(1)),
            RequestRecord::failed(tonic::Code::Internal, ms(1)),
        ];
        let level = LevelResult::summarize(Load::Concurrency(4), &records, Duration::from_secs(2));
        assert_eq!(level.requests, 2);
        assert_eq!(level.failed, 3);
        assert_eq!(level.errors["RESOURCE_EXHAUSTED"], 2);
        assert_eq!(level.errors["INTERNAL"], 1);
        assert_eq!(level.output_tokens, 8);
        assert_eq!(level.prompt_tokens, 64);
        assert_eq!(level.output_tokens_per_s, 4.0);
        assert_eq!(level.requests_per_s, 1.0);
        assert_eq!(level.ttft_ms.unwrap().p50, 60.0);
        assert_eq!(level.tpot_ms.unwrap().p50, 15.0);
        let itl = level.itl_ms.unwrap();
        assert_eq!((itl.count, itl.p50, itl.max), (6, 15.0, 20.0));
        assert_eq!(level.e2e_ms.unwrap().max, 130.0);
    }

    #[test]
    fn a_level_with_only_failures_has_no_latencies() {
        let records = vec![RequestRecord::failed(tonic::Code::Unavailable, ms(3))];
        let level = LevelResult::summarize(Load::Rate(2.0), &records, ms(10));
        assert_eq!(level.requests, 0);
        assert!(level.ttft_ms.is_none() && level.itl_ms.is_none());
        assert_eq!(level.load.to_string(), "rate=2/s");
    }
}
