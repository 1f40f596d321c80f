//! Security of the gRPC port: TLS (optionally mutual), bearer tokens, and
//! rereading their files on SIGHUP or when they change, without a restart.

pub mod auth;
pub mod listener;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use auth::{AuthConfig, AuthLayer, Tokens};
pub use tls::{Tls, TlsConfig};

use tokio::net::TcpListener;
use tonic::transport::Server;
use tower_layer::{Identity, Stack};

use crate::api::limits::{LimitsConfig, LimitsLayer};
use crate::config::Config;
use crate::error::ServerError;

/// The gRPC server builder every service of the port is added to.
pub type PortServer = Server<Stack<LimitsLayer, Stack<AuthLayer, Identity>>>;

/// The gRPC port's TLS, tokens and limits, loaded from the config.
pub struct Port {
    tls: Option<Arc<Tls>>,
    auth: AuthLayer,
    limits: LimitsConfig,
}

impl Port {
    /// Loads the certificates and tokens and starts rereading them on
    /// SIGHUP and when their files change.
    pub fn new(config: &Config) -> Result<Self, ServerError> {
        let tls = Tls::new(&config.tls)?;
        let tokens = Tokens::new(&config.auth)?;
        let interval = (config.reload_interval_secs > 0)
            .then(|| Duration::from_secs(config.reload_interval_secs));
        spawn_reloader(tls.clone(), tokens.clone(), interval);
        tracing::info!(
            tls = tls.is_some(),
            mutual_tls = config.tls.client_ca.is_some(),
            auth = tokens.is_some(),
            "gRPC port security"
        );
        Ok(Self {
            auth: AuthLayer::new(tokens, &config.auth),
            tls,
            limits: config.limits.clone(),
        })
    }

    /// A server builder with the limits and the authentication layer:
    /// every service added to it, present or future, is behind both.
    pub fn server(&self) -> PortServer {
        let l = &self.limits;
        Server::builder()
            .max_concurrent_streams(Some(l.max_concurrent_streams))
            .http2_keepalive_interval(l.keepalive_interval())
            .http2_keepalive_timeout(l.keepalive_timeout())
            .layer(self.auth.clone())
            .layer(LimitsLayer)
    }

    /// The connections of `listener`, through TLS when it is on.
    pub fn incoming(
        &self,
        socket: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<listener::Conn>> {
        listener::incoming(socket, self.tls.clone(), self.limits.idle_timeout())
    }
}

/// Rereads the TLS files and the token file on SIGHUP and, when
/// `interval` is set, whenever one of them changes (checked that often).
/// A reload that fails keeps the previous certificates or tokens.
pub fn spawn_reloader(
    tls: Option<Arc<Tls>>,
    tokens: Option<Arc<Tokens>>,
    interval: Option<Duration>,
) {
    if tls.is_none() && tokens.is_none() {
        return;
    }
    let files: Vec<PathBuf> = tls
        .iter()
        .flat_map(|t| t.files())
        .chain(tokens.iter().flat_map(|t| t.files()))
        .collect();
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGHUP, certificates reload only on change: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        let mut seen = fingerprint(&files);
        let mut tick = tokio::time::interval(interval.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let why = tokio::select! {
                got = hangup.recv() => match got {
                    Some(()) => "SIGHUP",
                    None => return,
                },
                _ = tick.tick(), if interval.is_some() => {
                    let now = fingerprint(&files);
                    if now == seen {
                        continue;
                    }
                    "a file changed"
                }
            };
            seen = fingerprint(&files);
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(()) => tracing::info!(reason = why, "TLS certificates reloaded"),
                    Err(e) => {
                        tracing::error!(
                            reason = why,
                            "TLS reload failed, keeping the previous certificates: {e}"
                        )
                    }
                }
            }
            if let Some(tokens) = &tokens {
                match tokens.reload() {
                    Ok(()) => tracing::info!(reason = why, "auth tokens reloaded"),
                    Err(e) => {
                        tracing::error!(
                            reason = why,
                            "auth token reload failed, keeping the previous tokens: {e}"
                        )
                    }
                }
            }
        }
    });
}

/// What identifies a version of each file (mtime and length, following
/// symlinks, as Kubernetes swaps mounted secrets).
fn fingerprint(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}
