//! The Prometheus side of the metrics: a pull reader on the same meter
//! provider as the OTLP export, so one set of instruments feeds both, and
//! the text exposition `/metrics` serves (encoded by the `prometheus` crate).

use std::sync::OnceLock;

use opentelemetry_prometheus::PrometheusExporter;
use prometheus::TextEncoder;

/// The registry the reader fills at each scrape; set once by `init`.
static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// The reader to add to the meter provider. OpenTelemetry names become
/// Prometheus ones the standard way: dots become underscores, the unit is
/// appended (`s` → `_seconds`, `By` → `_bytes`) and counters end in
/// `_total`; `{request}`-style units add nothing.
pub(crate) fn reader() -> Result<PrometheusExporter, opentelemetry_sdk::error::OTelSdkError> {
    let registry = REGISTRY.get_or_init(prometheus::Registry::new).clone();
    opentelemetry_prometheus::exporter()
        .with_registry(registry)
        // One meter per program: scope labels on every series would only
        // repeat its name.
        .scope_info_enabled(false)
        .build()
}

/// Whether a Prometheus reader is installed.
pub fn enabled() -> bool {
    REGISTRY.get().is_some()
}

/// The current value of every instrument in the Prometheus text format
/// (collected now, observable callbacks included), and its content type.
/// `None` when `init` installed no Prometheus reader.
pub fn scrape() -> Option<Result<(String, &'static str), String>> {
    let registry = REGISTRY.get()?;
    let encoder = TextEncoder::new();
    Some(
        encoder
            .encode_to_string(&registry.gather())
            .map(|text| (text, TEXT_CONTENT_TYPE))
            .map_err(|e| e.to_string()),
    )
}

/// The text format's content type, with its version and charset.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    use super::*;

    #[test]
    fn instruments_are_exposed_with_prometheus_names() {
        let provider = SdkMeterProvider::builder()
            .with_reader(reader().unwrap())
            .build();
        let meter = provider.meter("test");
        meter
            .u64_counter("torchwire.test.requests")
            .with_unit("{request}")
            .build()
            .add(2, &[KeyValue::new("gen_ai.request.model", "m")]);
        meter
            .f64_histogram("torchwire.test.duration")
            .with_unit("s")
            .with_boundaries(vec![0.5, 1.0])
            .build()
            .record(0.7, &[]);
        let (text, content_type) = scrape().unwrap().unwrap();
        assert!(content_type.starts_with("text/plain; version=0.0.4"));
        assert!(
            text.contains("torchwire_test_requests_total{gen_ai_request_model=\"m\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("torchwire_test_duration_seconds_bucket{le=\"1\"} 1"),
            "{text}"
        );
        assert!(!text.contains("otel_scope_name"), "{text}");
    }
}
