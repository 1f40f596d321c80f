//! `torchwire bench`: a load generator that streams Generate calls at a
//! sweep of closed-loop concurrencies or open-loop Poisson arrival rates and
//! measures every message as it arrives.

pub mod chart;
pub mod prompt;
pub mod report;
pub mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinSet;
use torchwire_proto::v1::GenerateRequest;

pub use report::BenchReport;
pub use stats::{LevelResult, Load, Percentiles, RequestRecord};

use crate::{Client, Error};

/// When a level ends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopAfter {
    /// After this many requests have finished.
    Requests(u64),
    /// No new request after this many seconds; those in flight finish.
    DurationS(f64),
    /// This many requests per unit of concurrency (or per request/s of rate),
    /// so every level of a sweep runs the same number of rounds.
    Rounds(u64),
}

impl StopAfter {
    /// The stop condition of one level, with rounds turned into a count.
    pub fn for_level(self, load: Load) -> StopAfter {
        match self {
            StopAfter::Rounds(rounds) => {
                StopAfter::Requests(rounds * u64::from(width(&load).max(1)))
            }
            other => other,
        }
    }
}

/// Everything that shapes a run; recorded in the JSON results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    /// Server address, as given.
    pub addr: String,
    /// Model name ("" = the server's default).
    pub model: String,
    /// Free-form name for this run, shown on the chart.
    pub label: Option<String>,
    /// The load levels, run in this order.
    pub levels: Vec<Load>,
    /// When each level ends.
    pub stop_after: StopAfter,
    /// Requests run (and not measured) before the first level.
    pub warmup: u32,
    /// Prompt length in tokens, as the server's tokenizer counts them.
    pub prompt_tokens: u32,
    /// Tokens generated per request (max_new_tokens, with ignore_eos).
    pub output_tokens: u32,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Seed of the Poisson arrival times.
    pub arrival_seed: u64,
}

/// Runs warm-up and then every level of `config`, showing progress on
/// stderr when `progress` is set.
pub async fn run(
    client: &Client,
    config: &BenchConfig,
    progress: bool,
) -> Result<BenchReport, Error> {
    let model_info = client.models().await?.models.into_iter().find(|m| {
        if config.model.is_empty() {
            m.is_default
        } else {
            m.name == config.model
        }
    });
    let (prompt, prompt_tokens) =
        prompt::build(client, &config.model, config.prompt_tokens).await?;
    let request = GenerateRequest {
        model: config.model.clone(),
        prompt,
        max_new_tokens: Some(config.output_tokens),
        temperature: config.temperature,
        ignore_eos: true,
        ..Default::default()
    };

    if config.warmup > 0 {
        let warmup_concurrency = config
            .levels
            .iter()
            .map(width)
            .max()
            .unwrap_or(1)
            .min(config.warmup);
        let bar = bar(progress, "warm-up", config.warmup as u64);
        let records = closed_loop(
            client,
            &request,
            warmup_concurrency,
            StopAfter::Requests(config.warmup.into()),
            &bar,
        )
        .await;
        bar.finish_and_clear();
        if let Some(code) = records.iter().find_map(|r| r.error) {
            let status =
                tonic::Status::new(code, "a warm-up request failed; is the server healthy?");
            return Err(status.into());
        }
    }

    let mut levels = Vec::with_capacity(config.levels.len());
    for &load in &config.levels {
        let stop = config.stop_after.for_level(load);
        let total = match stop {
            StopAfter::Requests(n) | StopAfter::Rounds(n) => n,
            StopAfter::DurationS(s) => (s * 10.0).ceil() as u64,
        };
        let bar = bar(progress, &load.to_string(), total);
        let start = Instant::now();
        let records = match load {
            Load::Concurrency(c) => closed_loop(client, &request, c, stop, &bar).await,
            Load::Rate(r) => open_loop(client, &request, r, stop, config.arrival_seed, &bar).await,
        };
        let wall = start.elapsed();
        bar.finish_and_clear();
        levels.push(LevelResult::summarize(load, &records, wall));
    }

    Ok(BenchReport {
        label: config.label.clone(),
        started_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        config: config.clone(),
        prompt_tokens_actual: prompt_tokens,
        model_info,
        levels,
    })
}

/// How many requests a level keeps in flight (on average, for a rate).
fn width(load: &Load) -> u32 {
    match *load {
        Load::Concurrency(c) => c,
        Load::Rate(r) => r.ceil() as u32,
    }
}

fn bar(visible: bool, name: &str, len: u64) -> ProgressBar {
    let target = if visible {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_string());
    bar
}

/// `concurrency` workers, each sending its next request as soon as the
/// previous one ends.
async fn closed_loop(
    client: &Client,
    request: &GenerateRequest,
    concurrency: u32,
    stop: StopAfter,
    bar: &ProgressBar,
) -> Vec<RequestRecord> {
    let started = Arc::new(AtomicU64::new(0));
    let deadline = deadline(stop);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, request, started, bar) = (
            client.clone(),
            request.clone(),
            started.clone(),
            bar.clone(),
        );
        workers.spawn(async move {
            let mut records = Vec::new();
            loop {
                let n = started.fetch_add(1, Ordering::Relaxed);
                let more = match (stop, deadline) {
                    (StopAfter::Requests(total), _) => n < total,
                    (_, Some(deadline)) => Instant::now() < deadline,
                    _ => false,
                };
                if !more {
                    break;
                }
                records.push(measure(&client, request.clone()).await);
                advance(&bar, stop, deadline);
            }
            records
        });
    }
    workers.join_all().await.into_iter().flatten().collect()
}

/// Requests sent at Poisson arrival times (`rate` per second on average),
/// whether or not earlier ones have finished.
async fn open_loop(
    client: &Client,
    request: &GenerateRequest,
    rate: f64,
    stop: StopAfter,
    seed: u64,
    bar: &ProgressBar,
) -> Vec<RequestRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = deadline(stop);
    let mut in_flight = JoinSet::new();
    let mut next = Instant::now();
    let mut sent = 0u64;
    loop {
        let more = match (stop, deadline) {
            (StopAfter::Requests(total), _) => sent < total,
            (_, Some(deadline)) => next < deadline,
            _ => false,
        };
        if !more {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        let (client, request, bar) = (client.clone(), request.clone(), bar.clone());
        in_flight.spawn(async move {
            let record = measure(&client, request).await;
            advance(&bar, stop, deadline);
            record
        });
        sent += 1;
        next += exponential(&mut rng, rate);
    }
    in_flight.join_all().await
}

/// An exponentially distributed gap with mean 1/rate.
fn exponential(rng: &mut impl Rng, rate: f64) -> Duration {
    let u: f64 = rng.random();
    Duration::from_secs_f64(-(1.0 - u).ln() / rate)
}

fn deadline(stop: StopAfter) -> Option<Instant> {
    match stop {
        StopAfter::DurationS(s) => Some(Instant::now() + Duration::from_secs_f64(s)),
        StopAfter::Requests(_) | StopAfter::Rounds(_) => None,
    }
}

/// Moves the bar: by request, or to the elapsed tenths of a second.
fn advance(bar: &ProgressBar, stop: StopAfter, deadline: Option<Instant>) {
    match (stop, deadline) {
        (StopAfter::DurationS(s), Some(deadline)) => {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            bar.set_position(((s - left) * 10.0) as u64);
        }
        _ => bar.inc(1),
    }
}

/// Sends one streamed request and times each message as it arrives.
async fn measure(client: &Client, request: GenerateRequest) -> RequestRecord {
    let start = Instant::now();
    let mut stream = match client.generate(request).await {
        Ok(stream) => stream,
        Err(err) => return RequestRecord::failed(err.code(), start.elapsed()),
    };
    let mut record = RequestRecord::default();
    let mut last_token_at: Option<Instant> = None;
    let mut counted = 0u64;
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let now = Instant::now();
                if !message.token_ids.is_empty() {
                    match last_token_at {
                        Some(previous) => record.inter_token.push(now - previous),
                        None => record.ttft = Some(now - start),
                    }
                    last_token_at = Some(now);
                    counted += message.token_ids.len() as u64;
                }
                if let Some(usage) = message.usage {
                    record.output_tokens = usage.completion_tokens.into();
                    record.prompt_tokens = usage.prompt_tokens.into();
                }
            }
            Ok(None) => break,
            Err(status) => return RequestRecord::failed(status.code(), start.elapsed()),
        }
    }
    record.e2e = start.elapsed();
    if record.output_tokens == 0 {
        record.output_tokens = counted;
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_gaps_average_one_over_the_rate() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 20_000;
        let total: f64 = (0..n)
            .map(|_| exponential(&mut rng, 4.0).as_secs_f64())
            .sum();
        let mean = total / n as f64;
        assert!((mean - 0.25).abs() < 0.01, "mean gap {mean}");
    }
}
