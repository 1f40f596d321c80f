//! Request metrics and the request log line. The metrics are exported over
//! OTLP next to the spans when a collector is configured, and scraped from
//! the admin port's `/metrics` (no-op instruments without either). Names
//! follow the OpenTelemetry GenAI semantic conventions where they exist.
//! Both are written once per request, when it ends, where its span ends:
//! never per token and never on a model thread.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use torchwire_telemetry::opentelemetry::metrics::{Counter, Histogram, Meter};
use torchwire_telemetry::opentelemetry::{global, KeyValue};

use super::span::Transport;
use crate::engine::request::Finish;
use crate::error::ServerError;

pub const REQUEST_DURATION: &str = "gen_ai.server.request.duration";
pub const TIME_TO_FIRST_TOKEN: &str = "gen_ai.server.time_to_first_token";
pub const TIME_PER_OUTPUT_TOKEN: &str = "gen_ai.server.time_per_output_token";
pub const TOKENS: &str = "torchwire.tokens";
pub const REQUESTS: &str = "torchwire.requests";

pub(super) const MODEL: &str = "gen_ai.request.model";
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

pub(super) fn meter() -> Meter {
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

/// One request's metrics and log line, from its arrival to its end; written
/// once, by [`finished`](Self::finished), [`failed`](Self::failed) or
/// [`cancelled`](Self::cancelled).
#[derive(Debug)]
pub struct RequestMetrics {
    transport: &'static str,
    started: Instant,
    /// Known once the request is decoded.
    request_id: Option<String>,
    /// The W3C trace the request belongs to, if any (see
    /// `torchwire_telemetry::trace_id`).
    trace_id: Option<String>,
    /// Known once the model is found; never the name a caller asked for
    /// (unbounded), only a served model's.
    model: Option<String>,
    /// Known once the request is accepted.
    prompt_tokens: Option<usize>,
    /// Tokens streamed so far, counted per message.
    output_tokens: usize,
}

impl RequestMetrics {
    /// A request that just arrived, in trace `trace_id`.
    pub fn new(transport: Transport<'_>, trace_id: Option<String>) -> Self {
        Self {
            transport: transport.name(),
            started: Instant::now(),
            request_id: None,
            trace_id,
            model: None,
            prompt_tokens: None,
            output_tokens: 0,
        }
    }

    /// The request's id, given or made up. One longer than validation
    /// allows (the request is refused) is logged cut short.
    pub fn request_id(&mut self, id: &str) {
        let mut end = id.len().min(super::validate::MAX_REQUEST_ID_BYTES);
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        self.request_id = Some(id[..end].to_string());
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
        self.log(Ended {
            outcome: finish.reason.as_str(),
            finish_reason: Some(finish.reason.as_str()),
            error_code: None,
            prompt_tokens: Some(finish.prompt_tokens),
            output_tokens: finish.completion_tokens,
            queue: Some(finish.queue),
            time_to_first_token: Some(finish.time_to_first_token),
        });
    }

    /// The request was refused or failed; `error.type` is its gRPC code, as
    /// on the span.
    pub fn failed(&self, err: &ServerError) {
        let all = instruments();
        let code = format!("{:?}", err.code());
        let mut attrs = self.attributes("error");
        attrs.push(KeyValue::new(ERROR_TYPE, code.clone()));
        all.requests.add(1, &attrs);
        all.duration
            .record(self.started.elapsed().as_secs_f64(), &attrs);
        if let Some(prompt) = self.prompt_tokens {
            self.record_tokens(prompt, self.output_tokens);
        }
        self.log(Ended {
            outcome: "error",
            finish_reason: None,
            error_code: Some(code.as_str()),
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            queue: None,
            time_to_first_token: None,
        });
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
        self.log(Ended {
            outcome: "cancelled",
            finish_reason: None,
            error_code: None,
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            queue: None,
            time_to_first_token: None,
        });
    }

    /// The request's one line at info level: who, how much, how long, how it
    /// ended. Never the prompt or the output.
    fn log(&self, ended: Ended<'_>) {
        tracing::info!(
            request_id = self.request_id.as_deref(),
            model = self.model.as_deref(),
            transport = self.transport,
            prompt_tokens = ended.prompt_tokens.map(|n| n as u64),
            output_tokens = ended.output_tokens as u64,
            queue_ms = ended.queue.map(ms),
            ttft_ms = ended.time_to_first_token.map(ms),
            total_ms = ms(self.started.elapsed()),
            outcome = ended.outcome,
            finish_reason = ended.finish_reason,
            error_code = ended.error_code,
            trace_id = self.trace_id.as_deref(),
            "request ended"
        );
    }
}

/// How a request ended, for its log line.
struct Ended<'a> {
    outcome: &'static str,
    finish_reason: Option<&'static str>,
    error_code: Option<&'a str>,
    prompt_tokens: Option<usize>,
    output_tokens: usize,
    queue: Option<Duration>,
    time_to_first_token: Option<Duration>,
}

/// Milliseconds, to the hundredth.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// Seconds per output token after the first; none for fewer than two.
fn time_per_output_token(finish: &Finish) -> Option<f64> {
    let after_first = finish.completion_tokens.checked_sub(1).filter(|&n| n > 0)?;
    let decode = finish.total.saturating_sub(finish.time_to_first_token);
    Some(decode.as_secs_f64() / after_first as f64)
}

#[cfg(test)]
mod tests {
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
        let mut m = RequestMetrics::new(Transport::Grpc { method: "Generate" }, None);
        m.request_id("r-1");
        m.model("tiny");
        m.accepted(3);
        m.streamed(2);
        m.finished(&finish(2, 1, 2));
        m.failed(&ServerError::ShuttingDown);
        m.cancelled();
    }
}
