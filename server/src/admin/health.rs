//! The server's liveness and readiness, one verdict for the admin probes
//! and gRPC health alike.
//!
//! - Live: every model thread runs and makes progress. Loading counts as
//!   live (the startup probe, on `/readyz`, covers it); a thread that is
//!   gone, or one that has work and completed no step for the stall limit,
//!   does not: Kubernetes restarts the process.
//! - Ready: live, the models loaded and warmed up, and not draining. A full
//!   queue stays ready: its requests get RESOURCE_EXHAUSTED at once, which
//!   clients retry, and the queue gauge tells the autoscaler.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use torchwire_telemetry::admin::Probes;

use crate::api::Models;
use crate::app::INFERENCE_SERVICE;
use crate::engine::liveness::Progress;

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading and warming up the models.
    Loading,
    /// Serving requests.
    Serving,
    /// Shutting down: finishing the streams in flight, refusing new ones.
    Draining,
}

/// The server's health; cheap to clone.
#[derive(Clone)]
pub struct Health(Arc<Inner>);

struct Inner {
    phase: Mutex<Phase>,
    models: OnceLock<Weak<Models>>,
    stall_limit: Duration,
    reporter: HealthReporter,
    /// The gRPC status last set, so each change is set (and logged) once and
    /// in order.
    published: tokio::sync::Mutex<Option<ServingStatus>>,
}

impl Health {
    /// Loading, with gRPC health `reporter` to keep in step; a model thread
    /// with work may go `stall_limit` without completing a step.
    pub fn new(reporter: HealthReporter, stall_limit: Duration) -> Self {
        Self(Arc::new(Inner {
            phase: Mutex::new(Phase::Loading),
            models: OnceLock::new(),
            stall_limit,
            reporter,
            published: tokio::sync::Mutex::new(None),
        }))
    }

    /// The loaded models, whose threads liveness watches from now on.
    pub fn watch_models(&self, models: &Arc<Models>) {
        let _ = self.0.models.set(Arc::downgrade(models));
    }

    /// Moves to `phase` and updates gRPC health before returning.
    pub async fn set_phase(&self, phase: Phase) {
        *self.0.phase.lock().expect("phase lock") = phase;
        self.publish().await;
    }

    fn phase(&self) -> Phase {
        *self.0.phase.lock().expect("phase lock")
    }

    /// Sets gRPC health (the whole server and the inference service) to
    /// the current readiness, if it changed.
    pub async fn publish(&self) {
        let mut published = self.0.published.lock().await;
        let verdict = self.live().and_then(|()| self.ready());
        let status = match verdict {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        };
        if *published == Some(status) {
            return;
        }
        match (&verdict, self.live()) {
            (Ok(()), _) if published.is_some() => tracing::info!("ready"),
            (Err(why), Err(_)) => tracing::error!(reason = %why, "not live"),
            (Err(why), Ok(())) if published.is_some() => {
                tracing::info!(reason = %why, "not ready")
            }
            _ => {}
        }
        for service in ["", INFERENCE_SERVICE] {
            self.0.reporter.set_service_status(service, status).await;
        }
        *published = Some(status);
    }

    /// Re-checks every second, so that gRPC health follows a model thread
    /// that stalls, dies or recovers. Stops when the handle is dropped.
    pub fn keep_publishing(&self) -> Watchdog {
        let health = self.clone();
        Watchdog(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                health.publish().await;
            }
        }))
    }
}

/// The task behind [`Health::keep_publishing`]; dropping it stops it.
pub struct Watchdog(tokio::task::JoinHandle<()>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Probes for Health {
    fn live(&self) -> Result<(), String> {
        let Some(models) = self.0.models.get().and_then(Weak::upgrade) else {
            // Loading, or stopped at the very end.
            return Ok(());
        };
        let limit = self.0.stall_limit;
        for engine in models.iter() {
            match engine.progress(limit) {
                Progress::Running => {}
                Progress::Exited => {
                    return Err(format!(
                        "model {}: the model thread has ended",
                        engine.info.name
                    ))
                }
                Progress::Stalled(quiet) => {
                    return Err(format!(
                        "model {}: no step completed for {:.1} s with work in hand (liveness_stall_secs = {})",
                        engine.info.name,
                        quiet.as_secs_f64(),
                        limit.as_secs()
                    ))
                }
            }
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        match self.phase() {
            Phase::Loading => Err("loading the models".into()),
            Phase::Draining => Err("shutting down".into()),
            Phase::Serving => self.live(),
        }
    }
}
