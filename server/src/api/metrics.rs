//! Request metrics, exported over OTLP next to the spans when a collector is
//! configured (no-op instruments otherwise). Names follow the OpenTelemetry
//! GenAI semantic conventions where they exist. Recorded once per request,
//! where its span is, never per token and never on a model thread.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use torchwire_telemetry::opentelemetry::metrics::{Counter, Histogram, Meter};
use torchwire_telemetry::opentelemetry::{global, KeyValue};

use super::models::Models;
use super::span::Transport;
use crate::engine::request::Finish;
use crate::engine::stats::Stats;
use crate::error::ServerError;

pub const REQUEST_DURATION: &str = "gen_ai.server.request.duration";
pub const TIME_TO_FIRST_TOKEN: &str = "gen_ai.server.time_to_first_token";
pub const TIME_PER_OUTPUT_TOKEN: &str = "gen_ai.server.time_per_output_token";
pub const TOKENS: &str = "torchwire.tokens";
pub const REQUESTS: &str = "torchwire.requests";
pub const BATCH_RUNNING: &str = "torchwire.batch.running";
pub const QUEUE_WAITING: &str = "torchwire.queue.waiting";
pub const PREFIX_CACHE_HITS: &str = "torchwire.prefix_cache.hits";
pub const PREFIX_CACHE_MISSES: &str = "torchwire.prefix_cache.misses";
pub const PREFIX_CACHE_TOKENS_REUSED: &str = "torchwire.prefix_cache.tokens_reused";
pub const PREFIX_CACHE_EVICTIONS: &str = "torchwire.prefix_cache.evictions";
pub const PREFIX_CACHE_MEMORY: &str = "torchwire.prefix_cache.memory";
pub const PREFIX_CACHE_ENTRIES: &str = "torchwire.prefix_cache.entries";

const MODEL: &str = "gen_ai.request.model";
const TRANSPORT: &str = "torchwire.transport";
const OUTCOME: &str = "torchwire.outcome";
const ERROR_TYPE: &str = "error.type";
const TOKEN_TYPE: &str = "gen_ai.token.type";

/// The instruments, made on first use from the global meter provider (which
/// `torchwire_telemetry::init` installed before any request arrives).
struct Instruments {
    duration: Histogram<f64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    tokens: Counter<u64>,
    requests: Counter<u64>,
}

fn meter() -> Meter {
    global::meter("torchwire-server")
}

fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| {
        let meter = meter();
        // Bucket boundaries: the semantic conventions' advice for each.
        Instruments {
            duration: meter
                .f64_histogram(REQUEST_DURATION)
                .with_unit("s")
                .with_description("Time from a request's arrival to its end")
                .with_boundaries(vec![
                    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92,
                ])
                .build(),
            time_to_first_token: meter
                .f64_histogram(TIME_TO_FIRST_TOKEN)
                .with_unit("s")
                .with_description("Time from queueing to the first output token")
                .with_boundaries(vec![
                    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0,
                ])
                .build(),
            time_per_output_token: meter
                .f64_histogram(TIME_PER_OUTPUT_TOKEN)
                .with_unit("s")
                .with_description("Time per output token after the first")
                .with_boundaries(vec![
                    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                ])
                .build(),
            tokens: meter
                .u64_counter(TOKENS)
                .with_unit("{token}")
                .with_description("Input and output tokens of ended requests")
                .build(),
            requests: meter
                .u64_counter(REQUESTS)
                .with_unit("{request}")
                .with_description("Ended requests, by outcome")
                .build(),
        }
    })
}

/// Reports each engine's running batch and queue length whenever metrics
/// are collected (by the exporter's thread; the counters are atomics).
/// Holds the models weakly: it never keeps a stopped engine alive.
pub fn observe_engines(models: &Arc<Models>) {
    let meter = meter();
    let running = Arc::downgrade(models);
    meter
        .u64_observable_gauge(BATCH_RUNNING)
        .with_unit("{request}")
        .with_description("Sequences in the running batch")
        .with_callback(move |gauge| {
            for engine in Weak::upgrade(&running).iter().flat_map(|m| m.iter()) {
                let running = engine
                    .stats
                    .running
                    .load(std::sync::atomic::Ordering::Relaxed);
                gauge.observe(
                    u64::from(running),
                    &[KeyValue::new(MODEL, engine.info.name.clone())],
                );
            }
        })
        .build();
    let waiting = Arc::downgrade(models);
    meter
        .u64_observable_gauge(QUEUE_WAITING)
        .with_unit("{request}")
        .with_description("Requests queued for the model, not yet running")
        .with_callback(move |gauge| {
            for engine in Weak::upgrade(&waiting).iter().flat_map(|m| m.iter()) {
                gauge.observe(
                    engine.waiting() as u64,
                    &[KeyValue::new(MODEL, engine.info.name.clone())],
                );
            }
        })
        .build();
    observe_prefix_caches(&meter, models);
}

/// How a prefix cache counter is read from an engine's stats.
type ReadStat = fn(&Stats) -> u64;

/// The engines' prefix cache counters (cumulative) and sizes (gauges).
fn observe_prefix_caches(meter: &Meter, models: &Arc<Models>) {
    let counters: [(&'static str, &'static str, &'static str, ReadStat); 4] = [
        (
            PREFIX_CACHE_HITS,
            "{request}",
            "Prompts that started with a cached prefix",
            |s| Stats::get(&s.prefix_hits),
        ),
        (
            PREFIX_CACHE_MISSES,
            "{request}",
            "Prompts that found no cached prefix (while the cache is on)",
            |s| Stats::get(&s.prefix_misses),
        ),
        (
            PREFIX_CACHE_TOKENS_REUSED,
            "{token}",
            "Prompt tokens copied from the prefix cache instead of being read",
            |s| Stats::get(&s.prefix_tokens_reused),
        ),
        (
            PREFIX_CACHE_EVICTIONS,
            "{entry}",
            "Prefix cache entries dropped to make room",
            |s| Stats::get(&s.prefix_evictions),
        ),
    ];
    for (name, unit, description, read) in counters {
        let models = Arc::downgrade(models);
        meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |counter| {
                for engine in Weak::upgrade(&models).iter().flat_map(|m| m.iter()) {
                    counter.observe(
                        read(&engine.stats),
                        &[KeyValue::new(MODEL, engine.info.name.clone())],
                    );
                }
            })
            .build();
    }
    let gauges: [(&'static str, &'static str, &'static str, ReadStat); 2] = [
        (
            PREFIX_CACHE_MEMORY,
            "By",
            "Bytes of keys and values the prefix cache holds",
            |s| Stats::get(&s.prefix_bytes),
        ),
        (
            PREFIX_CACHE_ENTRIES,
            "{entry}",
            "Finished sequences' prefixes the prefix cache holds",
            |s| Stats::get(&s.prefix_entries),
        ),
    ];
    for (name, unit, description, read) in gauges {
        let models = Arc::downgrade(models);
        meter
            .u64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |gauge| {
                for engine in Weak::upgrade(&models).iter().flat_map(|m| m.iter()) {
                    gauge.observe(
                        read(&engine.stats),
                        &[KeyValue::new(MODEL, engine.info.name.clone())],
                    );
                }
            })
            .build();
    }
}

/// One request's metrics, from its arrival to its end; recorded once, by
/// [`finished`](Self::finished), [`failed`](Self::failed) or
/// [`cancelled`](Self::cancelled).
#[derive(Debug)]
pub struct RequestMetrics {
    transport: &'static str,
    started: Instant,
    /// Known once the model is found; never the name a caller asked for
    /// (unbounded), only a served model's.
    model: Option<String>,
    /// Known once the request is accepted.
    prompt_tokens: Option<usize>,
    /// Tokens streamed so far, counted per message.
    output_tokens: usize,
}

impl RequestMetrics {
    /// A request that just arrived.
    pub fn new(transport: Transport<'_>) -> Self {
        Self {
            transport: transport.name(),
            started: Instant::now(),
            model: None,
            prompt_tokens: None,
            output_tokens: 0,
        }
    }

    /// The request is for this served model.
    pub fn model(&mut self, model: &str) {
        self.model = Some(model.to_string());
    }

    /// The request passed validation and was queued: its tokens count.
    pub fn accepted(&mut self, prompt_tokens: usize) {
        self.prompt_tokens = Some(prompt_tokens);
    }

    /// A message with `tokens` more output tokens was produced.
    pub fn streamed(&mut self, tokens: usize) {
        self.output_tokens += tokens;
    }

    fn attributes(&self, outcome: &'static str) -> Vec<KeyValue> {
        let mut attrs = Vec::with_capacity(4);
        if let Some(model) = &self.model {
            attrs.push(KeyValue::new(MODEL, model.clone()));
        }
        attrs.push(KeyValue::new(TRANSPORT, self.transport));
        attrs.push(KeyValue::new(OUTCOME, outcome));
        attrs
    }

    fn record_tokens(&self, input: usize, output: usize) {
        let counter = &instruments().tokens;
        for (kind, n) in [("input", input), ("output", output)] {
            let mut attrs = vec![KeyValue::new(TOKEN_TYPE, kind)];
            if let Some(model) = &self.model {
                attrs.push(KeyValue::new(MODEL, model.clone()));
            }
            counter.add(n as u64, &attrs);
        }
    }

    /// Generation ended normally.
    pub fn finished(&self, finish: &Finish) {
        let all = instruments();
        let attrs = self.attributes(finish.reason.as_str());
        all.requests.add(1, &attrs);
        all.duration
            .record(self.started.elapsed().as_secs_f64(), &attrs);
        let ttft = finish.time_to_first_token;
        all.time_to_first_token.record(ttft.as_secs_f64(), &attrs);
        if let Some(per_token) = time_per_output_token(finish) {
            all.time_per_output_token.record(per_token, &attrs);
        }
        self.record_tokens(finish.prompt_tokens, finish.completion_tokens);
    }

    /// The request was refused or failed; `error.type` is its gRPC code, as
    /// on the span.
    pub fn failed(&self, err: &ServerError) {
        let all = instruments();
        let mut attrs = self.attributes("error");
        attrs.push(KeyValue::new(ERROR_TYPE, format!("{:?}", err.code())));
        all.requests.add(1, &attrs);
        all.duration
            .record(self.started.elapsed().as_secs_f64(), &attrs);
        if let Some(prompt) = self.prompt_tokens {
            self.record_tokens(prompt, self.output_tokens);
        }
    }

    /// The caller went away (or the grace period ran out) before the end.
    pub fn cancelled(&self) {
        let all = instruments();
        let attrs = self.attributes("cancelled");
        all.requests.add(1, &attrs);
        all.duration
            .record(self.started.elapsed().as_secs_f64(), &attrs);
        if let Some(prompt) = self.prompt_tokens {
            self.record_tokens(prompt, self.output_tokens);
        }
    }
}

/// Seconds per output token after the first; none for fewer than two.
fn time_per_output_token(finish: &Finish) -> Option<f64> {
    let after_first = finish.completion_tokens.checked_sub(1).filter(|&n| n > 0)?;
    let decode = finish.total.saturating_sub(finish.time_to_first_token);
    Some(decode.as_secs_f64() / after_first as f64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::request::FinishReason;

    fn finish(tokens: usize, ttft_ms: u64, total_ms: u64) -> Finish {
        Finish {
            reason: FinishReason::Length,
            stop_sequence: None,
            prompt_tokens: 3,
            completion_tokens: tokens,
            queue: Duration::ZERO,
            time_to_first_token: Duration::from_millis(ttft_ms),
            total: Duration::from_millis(total_ms),
        }
    }

    #[test]
    fn time_per_output_token_spreads_the_time_after_the_first_token() {
        let per_token = time_per_output_token(&finish(5, 100, 500)).unwrap();
        assert!((per_token - 0.1).abs() < 1e-9, "{per_token}");
        assert_eq!(time_per_output_token(&finish(1, 100, 100)), None);
        assert_eq!(time_per_output_token(&finish(0, 0, 0)), None);
    }

    #[test]
    fn without_a_meter_provider_recording_is_a_no_op() {
        let mut m = RequestMetrics::new(Transport::Grpc { method: "Generate" });
        m.model("tiny");
        m.accepted(3);
        m.streamed(2);
        m.finished(&finish(2, 1, 2));
        m.failed(&ServerError::ShuttingDown);
        m.cancelled();
    }
}
