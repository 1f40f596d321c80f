//! The NATS JetStream request path: a pull consumer on the work queue that
//! takes only as many requests as the engines have free slots, runs them
//! through the same [`Generator`] as gRPC, and publishes the responses.

mod worker;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use torchwire_nats::async_nats::jetstream;
use torchwire_nats::NatsConfig;

use crate::api::Generator;
use crate::error::ServerError;

/// How long one pull request waits for messages before the loop re-checks
/// free slots and shutdown.
const PULL_EXPIRES: Duration = Duration::from_millis(500);
/// Wait before pulling again when every slot is busy or NATS failed.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Phases of shutdown, broadcast to the consumer and its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Stop pulling; finish what is in flight.
    Draining,
    /// The grace period is over: nak whatever is unfinished.
    Abort,
}

/// A connected consumer, ready to [`run`](Consumer::run).
pub struct Consumer {
    client: torchwire_nats::async_nats::Client,
    consumer: jetstream::consumer::PullConsumer,
    config: Arc<NatsConfig>,
}

impl Consumer {
    /// Connects and creates (or checks) the stream and the durable consumer.
    pub async fn connect(config: &NatsConfig) -> Result<Self, ServerError> {
        let err = |e: torchwire_nats::NatsError| ServerError::config("nats", e.to_string());
        let client = config.connect_as("torchwire-server").await.map_err(err)?;
        let js = jetstream::new(client.clone());
        let consumer = torchwire_nats::ensure_work_queue(&js, config)
            .await
            .map_err(err)?;
        tracing::info!(url = config.url(), stream = %config.stream, subject = %config.subject, consumer = %config.consumer, "NATS work queue ready");
        Ok(Self {
            client,
            consumer,
            config: Arc::new(config.clone()),
        })
    }

    /// Pulls and serves requests until the phase leaves `Running` or the
    /// engine breaker trips, then waits for the workers (which nak their
    /// message on `Abort`).
    pub async fn run(self, generator: Generator, phase: watch::Receiver<Phase>) {
        // At most one message per batch slot of every model is held at once.
        let capacity: usize = generator
            .models()
            .iter()
            .map(|e| e.info.max_batch_size)
            .sum();
        let permits = Arc::new(Semaphore::new(capacity));
        let mut workers = JoinSet::new();
        let mut stop = phase.clone();
        let breaker = generator.clone();
        while *stop.borrow() == Phase::Running && !breaker.breaker().is_tripped() {
            while workers.try_join_next().is_some() {}
            let free = permits.available_permits().min(free_slots(&generator));
            if free == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    _ = stop.changed() => {}
                    _ = breaker.breaker().tripped() => {}
                }
                continue;
            }
            let batch = self
                .consumer
                .batch()
                .max_messages(free)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut messages = match batch {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "pulling from NATS failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE * 10).await;
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    _ = stop.changed() => break,
                };
                match next {
                    Some(Ok(msg)) => {
                        let Ok(permit) = permits.clone().try_acquire_owned() else {
                            // Cannot happen (we asked for `free` at most), but never hold
                            // a message we have no slot for: give it back at once.
                            let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
                            continue;
                        };
                        let worker = worker::Worker {
                            client: self.client.clone(),
                            generator: generator.clone(),
                            config: self.config.clone(),
                            phase: phase.clone(),
                        };
                        workers.spawn(async move {
                            worker.serve(msg).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "receiving from NATS failed");
                        break;
                    }
                    None => break,
                }
            }
        }
        tracing::info!(in_flight = workers.len(), "NATS: stopped pulling");
        while workers.join_next().await.is_some() {}
        if let Err(e) = self.client.flush().await {
            tracing::warn!(error = %e, "NATS flush on shutdown failed");
        }
    }
}

/// Batch slots free across every model: neither running nor claimed by a
/// queued request.
fn free_slots(generator: &Generator) -> usize {
    generator
        .models()
        .iter()
        .map(|e| {
            let busy = e.stats.slots_held() + e.waiting();
            e.info.max_batch_size.saturating_sub(busy)
        })
        .sum()
}
