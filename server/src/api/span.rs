//! The span of one generation request, exported over OTLP when tracing is
//! on: a child of the caller's W3C trace context, with `gen_ai.*` attributes
//! recorded as the request is accepted and as it ends. Never prompt or text.

use torchwire_telemetry::opentelemetry::propagation::Extractor;
use torchwire_telemetry::opentelemetry::trace::Status;
use torchwire_telemetry::opentelemetry::{Array, StringValue, Value};
use torchwire_telemetry::tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing::field::Empty;
use tracing::Span;

use super::metrics::RequestMetrics;
use crate::engine::request::Finish;
use crate::error::ServerError;

/// Name of every request's span.
pub const SPAN_NAME: &str = "generate";

/// How a request reached the server.
#[derive(Debug, Clone, Copy)]
pub enum Transport<'a> {
    /// A `torchwire.v1.Inference` call; the method is `Generate` or `Complete`.
    Grpc { method: &'static str },
    /// A message of the NATS JetStream work queue.
    Nats { subject: &'a str },
}

impl Transport<'_> {
    /// `torchwire.transport` on spans and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Grpc { .. } => "grpc",
            Self::Nats { .. } => "nats",
        }
    }
}

/// Opens the span and the metrics of a request that just arrived; both
/// know the trace it belongs to (see [`request_span`]).
pub fn start_request(transport: Transport<'_>, carrier: &dyn Extractor) -> (Span, RequestMetrics) {
    let span = request_span(transport, carrier);
    let trace_id = torchwire_telemetry::trace_id(&span, carrier);
    (span, RequestMetrics::new(transport, trace_id))
}

/// Opens the span of a request that just arrived, parented by the trace
/// context in `carrier` (the gRPC metadata or the NATS headers).
pub fn request_span(transport: Transport<'_>, carrier: &dyn Extractor) -> Span {
    // A work-queue message is processed, not called: a consumer span.
    let kind = match transport {
        Transport::Grpc { .. } => "server",
        Transport::Nats { .. } => "consumer",
    };
    let name = transport.name();
    let span = tracing::info_span!(
        parent: None,
        "generate",
        otel.kind = kind,
        torchwire.transport = name,
        torchwire.request_id = Empty,
        rpc.system = Empty,
        rpc.service = Empty,
        rpc.method = Empty,
        messaging.system = Empty,
        messaging.operation.type = Empty,
        messaging.destination.name = Empty,
        gen_ai.operation.name = "text_completion",
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        torchwire.queue_ms = Empty,
        torchwire.time_to_first_token_ms = Empty,
        torchwire.cancelled = Empty,
        error.type = Empty,
    );
    match transport {
        Transport::Grpc { method } => {
            span.record("rpc.system", "grpc");
            span.record("rpc.service", "torchwire.v1.Inference");
            span.record("rpc.method", method);
        }
        Transport::Nats { subject } => {
            span.record("messaging.system", "nats");
            span.record("messaging.operation.type", "process");
            span.record("messaging.destination.name", subject);
        }
    }
    torchwire_telemetry::set_remote_parent(&span, carrier);
    span
}

/// The request passed validation and was queued.
pub fn record_accepted(
    span: &Span,
    request_id: &str,
    model: &str,
    prompt_tokens: usize,
    max_new_tokens: usize,
) {
    span.record("torchwire.request_id", request_id);
    span.record("gen_ai.request.model", model);
    span.record("gen_ai.usage.input_tokens", prompt_tokens as i64);
    span.record("gen_ai.request.max_tokens", max_new_tokens as i64);
}

/// The last response: why generation ended, tokens and timings.
pub fn record_finish(span: &Span, finish: &Finish) {
    // Integers must be recorded as i64: tracing-opentelemetry turns u64 and
    // usize values into strings.
    span.record("gen_ai.usage.input_tokens", finish.prompt_tokens as i64);
    span.record(
        "gen_ai.usage.output_tokens",
        finish.completion_tokens as i64,
    );
    span.record("torchwire.queue_ms", finish.queue.as_secs_f64() * 1e3);
    span.record(
        "torchwire.time_to_first_token_ms",
        finish.time_to_first_token.as_secs_f64() * 1e3,
    );
    // A string array by the semantic conventions: not expressible as a tracing field.
    let reasons = Array::String(vec![StringValue::from(finish.reason.as_str())]);
    span.set_attribute("gen_ai.response.finish_reasons", Value::Array(reasons));
}

/// The request failed: the span's status is an error with the message the
/// caller gets (which never quotes the prompt).
pub fn record_error(span: &Span, err: &ServerError) {
    span.record("error.type", tracing::field::debug(err.code()));
    span.set_status(Status::error(err.to_string()));
}

/// The caller went away (or the grace period ran out) before the end.
pub fn record_cancelled(span: &Span) {
    span.record("torchwire.cancelled", true);
}
