//! W3C trace context in: a request's span continues the trace its caller
//! sent in `traceparent`/`tracestate` (gRPC metadata, NATS headers).

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` (new, not yet entered) a child of the remote span that
/// `carrier` names; without a valid `traceparent` the span starts a new
/// trace. Does nothing unless spans are exported.
pub fn set_remote_parent(span: &tracing::Span, carrier: &dyn Extractor) {
    if !crate::exporting() {
        return;
    }
    // An empty base context: whatever span is current here is not the caller.
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract_with_context(&opentelemetry::Context::new(), carrier)
    });
    // Fails only when the span is disabled or already started: then it has
    // no trace to join.
    let _ = span.set_parent(parent);
}

/// The trace id to log with a request: its span's when spans are exported
/// (the caller's trace, or the new one it started), else the one the
/// caller's valid `traceparent` names, so logs still join the caller's trace.
pub fn trace_id(span: &tracing::Span, carrier: &dyn Extractor) -> Option<String> {
    let context = if crate::exporting() {
        span.context()
    } else {
        TraceContextPropagator::new().extract(carrier)
    };
    let id = context.span().span_context().trace_id();
    (id != TraceId::INVALID).then(|| id.to_string())
}

/// gRPC request metadata as a propagation carrier.
pub struct GrpcMetadata<'a>(pub &'a MetadataMap);

impl Extractor for GrpcMetadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(|k| match k {
                KeyRef::Ascii(k) => k.as_str(),
                KeyRef::Binary(k) => k.as_str(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn without_export_the_callers_trace_id_is_logged() {
        let span = tracing::Span::none();
        let mut carrier: HashMap<String, String> = HashMap::new();
        assert_eq!(trace_id(&span, &carrier), None);
        carrier.insert(
            "traceparent".to_string(),
            "00-xyz-00f067aa0ba902b7-01".into(),
        );
        assert_eq!(trace_id(&span, &carrier), None, "a malformed traceparent");
        carrier.insert(
            "traceparent".to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        assert_eq!(
            trace_id(&span, &carrier).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}
