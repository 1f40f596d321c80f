//! Wiring: bind the admin port and gRPC, serve health and reflection at once
//! (NOT_SERVING), load the models, report SERVING (kept in step with
//! liveness from then on), then on shutdown drain within the grace period.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use torchwire_proto::v1::inference_server::{Inference, InferenceServer};

use crate::admin::{self, Phase};
use crate::api::{gauges, Generator, InferenceService, Models};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::ServerError;
use crate::{nats, security, session};

pub(crate) const INFERENCE_SERVICE: &str = "torchwire.v1.Inference";

/// Runs the server until `shutdown` resolves, then drains and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let health = admin::Health::new(health, Duration::from_secs(config.liveness_stall_secs));
    health.set_phase(Phase::Loading).await;
    let _admin = admin::start(&config, &health).await?;
    let listener = TcpListener::bind(config.listen_addr()?)
        .await
        .map_err(|e| {
            ServerError::config("listen", format!("cannot bind {}: {e}", config.listen))
        })?;
    let addr = listener.local_addr()?;
    // The one line on stdout: tests and scripts read the bound address here.
    println!("torchwire-server listening on {addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, "listening; loading models");

    let (models_tx, models_rx) = tokio::sync::watch::channel(None::<Generator>);
    let max_message = config.limits.max_message_bytes;
    let inference = InferenceServer::new(LateInference(models_rx))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let port = security::Port::new(&config)?;
    let server = port
        .server()
        .add_service(health_service)
        .add_service(reflection_builder().build_v1()?)
        .add_service(reflection_builder().build_v1alpha()?)
        .add_service(inference)
        .serve_with_incoming_shutdown(port.incoming(listener), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);

    tokio::pin!(shutdown);
    let generator = tokio::select! {
        loaded = load_models(&config) => {
            let models = Arc::new(loaded?);
            gauges::observe_engines(&models);
            health.watch_models(&models);
            Generator::new(models)
                .with_limits(&config.limits)
                .with_failure_limit(config.max_engine_failures)
        }
        () = &mut shutdown => {
            tracing::info!("shutdown requested while loading");
            return Ok(());
        }
    };
    let generator = generator.with_sessions(session::connect(&config).await?);
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(nats::Phase::Running);
    let consumer = if config.nats_enabled() {
        let consumer = nats::Consumer::connect(&config.nats).await?;
        Some(tokio::spawn(consumer.run(generator.clone(), phase_rx)))
    } else {
        None
    };
    let _ = models_tx.send(Some(generator.clone()));
    health.set_phase(Phase::Serving).await;
    let _watchdog = health.keep_publishing();
    tracing::info!(%addr, "serving");

    // An engine that keeps failing takes the replica out of service: the
    // same drain as on SIGTERM, then a non-zero exit so that it is restarted.
    let broken = tokio::select! {
        () = &mut shutdown => None,
        reason = generator.breaker().tripped() => Some(reason),
    };
    tracing::info!(
        in_flight = generator.in_flight(),
        grace_secs = config.shutdown_grace_secs,
        "shutting down: draining"
    );
    // New work is refused before health says NOT_SERVING: a client that
    // saw the change is never served by this replica.
    generator.start_draining();
    health.set_phase(Phase::Draining).await;
    let _ = phase_tx.send(nats::Phase::Draining);
    let left = generator
        .drain(Duration::from_secs(config.shutdown_grace_secs))
        .await;
    if left > 0 {
        tracing::warn!(
            in_flight = left,
            "grace period over; cancelling the streams left"
        );
    }
    let _ = phase_tx.send(nats::Phase::Abort);
    if let Some(consumer) = consumer {
        // Workers nak what they could not finish, then the consumer returns.
        if tokio::time::timeout(Duration::from_secs(10), consumer)
            .await
            .is_err()
        {
            tracing::warn!("NATS consumer did not stop in time");
        }
    }
    // Streams still running past the grace period end with UNAVAILABLE, so
    // their clients can retry elsewhere; the model threads free their models.
    if !generator.models().stop(Duration::from_secs(10)).await {
        tracing::warn!("a model thread did not stop in time");
    }
    let _ = stop_tx.send(());
    // Streams cut by the grace period may keep connections open: do not wait long.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    tracing::info!("stopped");
    match broken {
        Some(reason) => Err(anyhow::anyhow!("stopped: {reason}")),
        None => Ok(()),
    }
}

/// Loads every configured model, each on its own thread, concurrently.
async fn load_models(config: &Config) -> Result<Models, ServerError> {
    let starts = config
        .models
        .iter()
        .map(|(name, m)| async move { (name.clone(), Engine::start(name, m).await) });
    let mut engines = BTreeMap::new();
    for (name, engine) in futures::future::join_all(starts).await {
        engines.insert(name, engine?);
    }
    Ok(Models::new(engines, config.default_model_name()))
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(torchwire_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(INFERENCE_SERVICE)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

/// The Inference service before the models are loaded answers UNAVAILABLE;
/// afterwards it delegates to the real service.
struct LateInference(tokio::sync::watch::Receiver<Option<Generator>>);

impl LateInference {
    fn service(&self) -> Result<InferenceService, tonic::Status> {
        match self.0.borrow().as_ref() {
            Some(g) => Ok(InferenceService::new(g.clone())),
            None => Err(tonic::Status::unavailable(
                "the models are still loading; watch grpc.health.v1.Health",
            )),
        }
    }
}

#[tonic::async_trait]
impl Inference for LateInference {
    type GenerateStream = <InferenceService as Inference>::GenerateStream;

    async fn generate(
        &self,
        r: tonic::Request<torchwire_proto::v1::GenerateRequest>,
    ) -> Result<tonic::Response<Self::GenerateStream>, tonic::Status> {
        self.service()?.generate(r).await
    }
    async fn complete(
        &self,
        r: tonic::Request<torchwire_proto::v1::GenerateRequest>,
    ) -> Result<tonic::Response<torchwire_proto::v1::GenerateResponse>, tonic::Status> {
        self.service()?.complete(r).await
    }
    async fn list_models(
        &self,
        r: tonic::Request<torchwire_proto::v1::ListModelsRequest>,
    ) -> Result<tonic::Response<torchwire_proto::v1::ListModelsResponse>, tonic::Status> {
        self.service()?.list_models(r).await
    }
    async fn tokenize(
        &self,
        r: tonic::Request<torchwire_proto::v1::TokenizeRequest>,
    ) -> Result<tonic::Response<torchwire_proto::v1::TokenizeResponse>, tonic::Status> {
        self.service()?.tokenize(r).await
    }
    async fn get_stats(
        &self,
        r: tonic::Request<torchwire_proto::v1::GetStatsRequest>,
    ) -> Result<tonic::Response<torchwire_proto::v1::GetStatsResponse>, tonic::Status> {
        self.service()?.get_stats(r).await
    }
    type ChatStream = <InferenceService as Inference>::ChatStream;
    async fn chat(
        &self,
        r: tonic::Request<torchwire_proto::v1::ChatRequest>,
    ) -> Result<tonic::Response<Self::ChatStream>, tonic::Status> {
        self.service()?.chat(r).await
    }
    async fn chat_complete(
        &self,
        r: tonic::Request<torchwire_proto::v1::ChatRequest>,
    ) -> Result<tonic::Response<torchwire_proto::v1::GenerateResponse>, tonic::Status> {
        self.service()?.chat_complete(r).await
    }
    async fn render_chat(
        &self,
        r: tonic::Request<torchwire_proto::v1::RenderChatRequest>,
    ) -> Result<tonic::Response<torchwire_proto::v1::RenderChatResponse>, tonic::Status> {
        self.service()?.render_chat(r).await
    }
    async fn get_session(
        &self,
        r: tonic::Request<torchwire_proto::v1::GetSessionRequest>,
    ) -> Result<tonic::Response<torchwire_proto::v1::GetSessionResponse>, tonic::Status> {
        self.service()?.get_session(r).await
    }
    async fn delete_session(
        &self,
        r: tonic::Request<torchwire_proto::v1::DeleteSessionRequest>,
    ) -> Result<tonic::Response<torchwire_proto::v1::DeleteSessionResponse>, tonic::Status> {
        self.service()?.delete_session(r).await
    }
}
