//! Wiring: connect to NATS, bind, serve the scaler with health and
//! reflection (optionally over TLS), and on shutdown report NOT_SERVING, end
//! the StreamIsActive streams and stop within the grace period.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use async_nats::ConnectErrorKind;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use torchwire_nats::NatsError;
use torchwire_proto::externalscaler::external_scaler_server::ExternalScalerServer;

use crate::admin::{self, ScalerHealth};
use crate::backlog::{WatchKey, WatchSettings, Watchers};
use crate::config::{Config, TlsConfig};
use crate::connections::{Connections, CONNECTION_NAME};
use crate::error::ScalerError;
use crate::service::ScalerService;
use crate::trigger::TriggerDefaults;

/// The gRPC name of KEDA's service, for health and reflection.
pub const SCALER_SERVICE: &str = "externalscaler.ExternalScaler";

/// Runs the scaler until `shutdown` resolves, then stops and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ScalerError> {
    let tls = server_tls(&config.tls).await?;
    let connections = Connections::new(config.nats.clone());
    connect_at_start(&config, &connections).await?;

    let listener = TcpListener::bind(config.listen_addr()?)
        .await
        .map_err(|e| {
            ScalerError::config("listen", format!("cannot bind {}: {e}", config.listen))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ScalerError::config("listen", e.to_string()))?;

    let watchers = Watchers::new(
        connections,
        WatchSettings {
            refresh_interval: config.refresh_interval(),
            stale_after: config.stale_after(),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
        },
    );
    // /metrics always reports the configured consumer: keep it watched.
    admin::observe_backlog(&watchers, config.nats.url());
    let _default_watch = config.admin_addr()?.map(|_| {
        watchers.subscribe(&WatchKey {
            url: config.nats.url().to_string(),
            stream: config.nats.stream.clone(),
            consumer: config.nats.consumer.clone(),
        })
    });
    let probes = std::sync::Arc::new(ScalerHealth::default());
    let _admin = admin::start(&config, probes.clone()).await?;
    let defaults = TriggerDefaults {
        stream: config.nats.stream.clone(),
        consumer: config.nats.consumer.clone(),
        nats_url: config.nats.url().to_string(),
        allowed_nats_urls: config.allowed_nats_urls.clone(),
    };
    let (stop_streams, streams_stopped) = tokio::sync::watch::channel(false);
    let service = ScalerService::new(
        watchers,
        defaults,
        Duration::from_secs(config.heartbeat_secs),
        streams_stopped,
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SCALER_SERVICE, ServingStatus::Serving)
        .await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .add_service(health_service)
        .add_service(reflection_builder().build_v1().map_err(reflection_error)?)
        .add_service(
            reflection_builder()
                .build_v1alpha()
                .map_err(reflection_error)?,
        )
        .add_service(ExternalScalerServer::new(service))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stop_rx.await;
            },
        );
    let mut server = tokio::spawn(server);

    probes.set_serving(true);
    // Tests and scripts read the bound address here.
    println!("torchwire-scaler listening on {addr}");
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, tls = config.tls.cert.is_some(), nats = %config.nats.url(), "serving");

    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(ScalerError::config("listen", format!("the gRPC server task failed: {e}"))),
            };
        }
    }
    tracing::info!(grace_secs = config.shutdown_grace_secs, "shutting down");
    probes.set_serving(false);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SCALER_SERVICE, ServingStatus::NotServing)
        .await;
    let _ = stop_streams.send(true);
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(config.shutdown_grace_secs), server).await {
        Ok(_) => tracing::info!("stopped"),
        Err(_) => tracing::warn!("calls still open after the grace period; stopping anyway"),
    }
    Ok(())
}

/// Connects to the configured NATS server once before serving, so that wrong
/// credentials or TLS settings stop the scaler with a clear error. A server
/// that is merely unreachable is retried in the background.
async fn connect_at_start(config: &Config, connections: &Connections) -> Result<(), ScalerError> {
    let url = config.nats.url();
    match config.nats.connect_as(CONNECTION_NAME).await {
        Ok(client) => {
            tracing::info!(%url, "connected to NATS");
            connections.insert(url, client);
            Ok(())
        }
        Err(NatsError::Connect { source, .. })
            if !matches!(
                source.kind(),
                ConnectErrorKind::AuthorizationViolation
                    | ConnectErrorKind::Authentication
                    | ConnectErrorKind::Tls
            ) =>
        {
            tracing::warn!(%url, error = %source, "NATS is not reachable yet; serving and retrying in the background");
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

async fn server_tls(tls: &TlsConfig) -> Result<Option<ServerTlsConfig>, ScalerError> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Ok(None);
    };
    let read = |key: &'static str, path: std::path::PathBuf| async move {
        tokio::fs::read(&path)
            .await
            .map_err(|e| ScalerError::config(key, format!("cannot read {}: {e}", path.display())))
    };
    let identity = Identity::from_pem(
        read("tls.cert", cert.clone()).await?,
        read("tls.key", key.clone()).await?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(
            read("tls.client_ca", ca.clone()).await?,
        ));
    }
    Ok(Some(config))
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(torchwire_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(SCALER_SERVICE)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

fn reflection_error(err: tonic_reflection::server::Error) -> ScalerError {
    ScalerError::config("(reflection)", err.to_string())
}
