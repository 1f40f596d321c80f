//! Logging, tracing and metrics shared by torchwire's server and scaler: log
//! lines to stderr filtered by `RUST_LOG`; when a collector is configured,
//! spans (with W3C trace-context propagation) and metrics exported over
//! OTLP/gRPC; and the same metrics in the Prometheus text format on the
//! admin HTTP port, with the liveness and readiness probes.

pub mod admin;
mod endpoint;
mod process;
pub mod prometheus;
mod propagation;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub use endpoint::{resolve_endpoint, EndpointError};
pub use propagation::{set_remote_parent, trace_id, GrpcMetadata};
/// The OpenTelemetry crates this one is built against, re-exported so that
/// users name the same types.
pub use {opentelemetry, tracing_opentelemetry};

/// How long shutdown waits for the last spans and metrics to reach the
/// collector: a collector that is down must not hold the process up.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Only torchwire's own spans (and the events inside them) are exported: the
/// exporter's transport (tonic, h2, hyper) must not trace its own exports.
const EXPORTED_TARGETS: &str = "torchwire";

/// Set once spans are exported; until then propagation does nothing.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("expected text or json, got {other:?}")),
        }
    }
}

/// The installed telemetry; [`shutdown`](Telemetry::shutdown) it before the
/// process exits, or the spans still batched and the metrics recorded since
/// the last export are lost.
#[must_use = "shut it down before exiting, or the last spans and metrics are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

/// Installs the global subscriber: log lines in `format`, and span and metric
/// export to `otlp_endpoint` when set (a URL [`resolve_endpoint`] accepted).
/// With `prometheus`, the same instruments are also read at each scrape of
/// [`prometheus::scrape`] (the admin port's `/metrics`), and the process
/// metrics are registered. Call once, early in `main`, inside a Tokio
/// runtime: the exporters' channels live on it. Without an endpoint and
/// without `prometheus` the global meter provider stays the no-op one, so
/// instruments cost next to nothing.
///
/// `service_name` is the `service.name` resource attribute unless
/// `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names one. The SDK reads
/// the other standard variables itself: `OTEL_TRACES_SAMPLER`(`_ARG`),
/// `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60 s),
/// `OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)TIMEOUT` and `_HEADERS`.
pub fn init(
    service_name: &'static str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    prometheus: bool,
) -> Telemetry {
    let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().with_filter(logs).boxed(),
        LogFormat::Text => fmt.with_filter(logs).boxed(),
    };
    // A collector that cannot be set up costs the traces, never the service.
    let built = otlp_endpoint.map(|url| tracer_provider(service_name, url));
    let (provider, setup_error) = match built {
        Some(Ok(provider)) => (Some(provider), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let spans = provider.as_ref().map(|p| {
        let scope = opentelemetry::InstrumentationScope::builder(service_name)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer_with_scope(scope))
            .with_filter(Targets::new().with_target(EXPORTED_TARGETS, tracing::Level::INFO))
    });
    tracing_subscriber::registry().with(fmt).with(spans).init();
    if let Some(e) = setup_error {
        tracing::error!(error = %e, "cannot set up the OTLP span exporter; spans are not exported");
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, Ordering::Release);
        tracing::info!(
            endpoint = otlp_endpoint.unwrap_or_default(),
            "exporting spans over OTLP/gRPC"
        );
    }
    let meters = meter_provider(service_name, otlp_endpoint, prometheus);
    if let Some(meters) = &meters {
        opentelemetry::global::set_meter_provider(meters.clone());
        process::observe(&opentelemetry::global::meter(service_name));
    }
    Telemetry { provider, meters }
}

/// True once spans are being exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

fn tracer_provider(
    service_name: &'static str,
    endpoint: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if endpoint.starts_with("https://") {
        exporter =
            exporter.with_tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter.build()?)
        .with_resource(resource(service_name))
        .build())
}

/// One meter provider, so one set of instruments, with up to two readers:
/// the OTLP export and the Prometheus scrape. None without either (or when
/// neither can be set up: metrics cost the service nothing then).
fn meter_provider(
    service_name: &'static str,
    otlp_endpoint: Option<&str>,
    prometheus: bool,
) -> Option<SdkMeterProvider> {
    let mut builder = SdkMeterProvider::builder().with_resource(resource(service_name));
    let mut readers = 0;
    if let Some(url) = otlp_endpoint {
        match otlp_reader(url) {
            Ok(reader) => {
                builder = builder.with_reader(reader);
                readers += 1;
                tracing::info!(endpoint = url, "exporting metrics over OTLP/gRPC");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the OTLP metric exporter; metrics are not exported");
            }
        }
    }
    if prometheus {
        match prometheus::reader() {
            Ok(reader) => {
                builder = builder.with_reader(reader);
                readers += 1;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the Prometheus metric reader; /metrics is empty");
            }
        }
    }
    (readers > 0).then(|| builder.build())
}

/// Cumulative metrics, collected and exported every
/// `OTEL_METRIC_EXPORT_INTERVAL` by the reader's own thread.
fn otlp_reader(
    endpoint: &str,
) -> Result<
    PeriodicReader<opentelemetry_otlp::MetricExporter>,
    opentelemetry_otlp::ExporterBuildError,
> {
    let mut exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if endpoint.starts_with("https://") {
        exporter =
            exporter.with_tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots());
    }
    // The builder reads OTEL_METRIC_EXPORT_INTERVAL (default 60 s).
    Ok(PeriodicReader::builder(exporter.build()?).build())
}

/// `service.name` is `service_name` unless the environment names one.
fn resource(service_name: &'static str) -> Resource {
    // The SDK's default resource reads OTEL_SERVICE_NAME and
    // OTEL_RESOURCE_ATTRIBUTES, and says `unknown_service` without them.
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder().with_service_name(service_name).build()
    }
}

impl Telemetry {
    /// Exports the spans still batched and the metrics recorded since the
    /// last export, and stops the exporters, waiting at most
    /// [`FLUSH_TIMEOUT`] for both together. Blocks: call it off the async
    /// runtime's workers, while the runtime `init` ran in is still alive.
    pub fn shutdown(self) {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        // The SDK's meter provider ignores the timeout it is given (its
        // reader waits up to 5 s of its own): it flushes on a thread of its
        // own, beside the spans, and is waited for only until the deadline.
        let metrics = self.meters.map(|meters| {
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let flush = std::thread::Builder::new()
                .name("otel-metrics-flush".into())
                .spawn(move || {
                    let _ = done_tx.send(meters.shutdown());
                });
            if let Err(e) = flush {
                tracing::warn!(error = %e, "cannot flush the last metrics");
            }
            done_rx
        });
        if let Some(provider) = self.provider {
            EXPORTING.store(false, Ordering::Release);
            if let Err(e) = provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
                tracing::warn!(error = %e, "the last spans may not have reached the collector");
            }
        }
        let Some(metrics) = metrics else {
            return;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match metrics.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the last metrics may not have reached the collector");
            }
            Err(_) => {
                tracing::warn!("the last metrics did not reach the collector in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_a_bad_one_says_what_is_expected() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(
            err.contains("text or json") && err.contains("yaml"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn exporters_build_for_http_and_https_collectors() {
        // Nothing listens there: building must not connect (a collector
        // that is down at start-up must not stop the service).
        for url in ["http://127.0.0.1:9", "https://collector.example:4317"] {
            let provider =
                tracer_provider("torchwire-test", url).unwrap_or_else(|e| panic!("{url}: {e}"));
            provider.shutdown_with_timeout(FLUSH_TIMEOUT).unwrap();
            let meters = meter_provider("torchwire-test", Some(url), false)
                .unwrap_or_else(|| panic!("{url}: no meter provider"));
            // Nothing was recorded: nothing to send, nothing to wait for.
            meters.shutdown().unwrap();
        }
    }

    #[test]
    fn without_a_reader_there_is_no_meter_provider() {
        assert!(meter_provider("torchwire-test", None, false).is_none());
    }

    #[test]
    fn without_an_endpoint_shutdown_returns_at_once() {
        let telemetry = Telemetry {
            provider: None,
            meters: None,
        };
        let started = Instant::now();
        telemetry.shutdown();
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
