//! The scaler's admin HTTP port: `/metrics` with the JetStream backlog it
//! reads, as the server's queue gauge is named, so that a ScaledObject's
//! `prometheus` trigger on `inference_queue_length` works against either
//! (`inference_queue_length{stream,consumer}`: not yet delivered;
//! `inference_queue_in_flight{stream,consumer}`: delivered, not yet
//! acknowledged), plus `/livez` and `/readyz`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use torchwire_telemetry::admin::{AdminListener, AdminServer, Probes};
use torchwire_telemetry::opentelemetry::{global, KeyValue};

use crate::backlog::{Counts, Watchers};
use crate::config::Config;
use crate::error::ScalerError;

/// The gauge of requests not yet delivered to a server (`num_pending`).
pub const QUEUE_LENGTH: &str = "inference_queue_length";
/// The gauge of requests delivered and not acknowledged (`num_ack_pending`).
pub const QUEUE_IN_FLIGHT: &str = "inference_queue_in_flight";

/// Live while the process answers; ready while the gRPC server serves.
/// NATS being out of reach makes neither fail: a restart would not bring it
/// back, and KEDA hears of it from the calls themselves (UNAVAILABLE).
#[derive(Default)]
pub struct ScalerHealth {
    serving: AtomicBool,
}

impl ScalerHealth {
    /// Whether the gRPC server is serving (false before and while stopping).
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
    }
}

impl Probes for ScalerHealth {
    fn live(&self) -> Result<(), String> {
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        if self.serving.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("not serving gRPC (starting or shutting down)".into())
        }
    }
}

/// Binds `admin_listen` (nothing when it is `off`), prints its address on
/// stdout (`torchwire-scaler admin listening on ADDR`, before the gRPC
/// line) and serves the probes from `health`.
pub async fn start(
    config: &Config,
    health: Arc<ScalerHealth>,
) -> Result<Option<AdminServer>, ScalerError> {
    let Some(addr) = config.admin_addr()? else {
        tracing::info!("admin port off: no /metrics, /livez or /readyz");
        return Ok(None);
    };
    let listener = AdminListener::bind(addr).await.map_err(|e| {
        ScalerError::config(
            "admin_listen",
            format!("cannot bind {}: {e}", config.admin_listen),
        )
    })?;
    let bound = listener.local_addr();
    println!("torchwire-scaler admin listening on {bound}");
    let _ = std::io::stdout().flush();
    tracing::info!(addr = %bound, "admin port: /metrics, /livez, /readyz");
    Ok(Some(listener.serve(health)))
}

/// Reads one gauge's value from a consumer's counts.
type ReadCount = fn(&Counts) -> u64;

/// Reports the backlog of every consumer watched on the scaler's own NATS
/// server (`url`) at each collection, from the watchers' latest readings.
/// Consumers on the other servers triggers may name are not reported.
pub fn observe_backlog(watchers: &Watchers, url: &str) {
    let meter = global::meter("torchwire-scaler");
    let gauges: [(&str, &str, ReadCount); 2] = [
        (
            QUEUE_LENGTH,
            "Requests in the JetStream work queue not yet delivered to a server",
            |c| c.pending,
        ),
        (
            QUEUE_IN_FLIGHT,
            "Requests delivered to a server and not acknowledged yet (being generated)",
            |c| c.in_flight,
        ),
    ];
    for (name, description, read) in gauges {
        let (watchers, url) = (watchers.clone(), url.to_string());
        meter
            .u64_observable_gauge(name)
            .with_unit("{request}")
            .with_description(description)
            .with_callback(move |o| {
                for (key, counts) in watchers.latest_counts(&url) {
                    o.observe(
                        read(&counts),
                        &[
                            KeyValue::new("stream", key.stream),
                            KeyValue::new("consumer", key.consumer),
                        ],
                    );
                }
            })
            .build();
    }
}
