//! The server's admin HTTP port: Prometheus `/metrics` (the same instruments
//! as the OTLP export), `/livez` and `/readyz`, answered from [`Health`],
//! which also drives gRPC health. Bound before the models load, so that the
//! probes answer while they do.

mod health;

use std::io::Write;
use std::sync::Arc;

use torchwire_telemetry::admin::{AdminListener, AdminServer};

pub use health::{Health, Phase, Watchdog};

use crate::config::Config;
use crate::error::ServerError;

/// Binds `admin_listen` (nothing when it is `off`), prints its address on
/// stdout (`torchwire-server admin listening on ADDR`, before the gRPC
/// line) and serves the probes from `health`.
pub async fn start(config: &Config, health: &Health) -> Result<Option<AdminServer>, ServerError> {
    let Some(addr) = config.admin_addr()? else {
        tracing::info!("admin port off: no /metrics, /livez or /readyz");
        return Ok(None);
    };
    let listener = AdminListener::bind(addr).await.map_err(|e| {
        ServerError::config(
            "admin_listen",
            format!("cannot bind {}: {e}", config.admin_listen),
        )
    })?;
    let bound = listener.local_addr();
    println!("torchwire-server admin listening on {bound}");
    std::io::stdout()
        .flush()
        .map_err(|e| ServerError::config("admin_listen", format!("stdout: {e}")))?;
    tracing::info!(addr = %bound, "admin port: /metrics, /livez, /readyz");
    Ok(Some(listener.serve(Arc::new(health.clone()))))
}
