//! W3C trace context in: a request's span continues the trace its caller
//! sent in `traceparent`/`tracestate` (gRPC metadata, NATS headers).

use opentelemetry::propagation::Extractor;
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
