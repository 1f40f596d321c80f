//! KEDA's `externalscaler.ExternalScaler` service: the backlog metric and its
//! target for the HPA, activation for 0 <-> 1 replicas, and a push stream that
//! wakes KEDA as soon as requests arrive at an idle deployment.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use torchwire_proto::externalscaler::external_scaler_server::ExternalScaler;
use torchwire_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use torchwire_telemetry::GrpcMetadata;
use tracing::field::Empty;
use tracing::Instrument;

use crate::backlog::{Counts, Subscription, WatchKey, Watchers};
use crate::error::ScalerError;
use crate::trigger::{Trigger, TriggerDefaults};

/// The gRPC service name, as spans report it.
const SERVICE: &str = "externalscaler.ExternalScaler";

/// The metric the HPA scales on: requests waiting (+ in flight, by default).
pub const BACKLOG_METRIC: &str = "backlog";
/// Requests not yet delivered to a server (for GetMetrics queries only).
pub const PENDING_METRIC: &str = "pending";
/// Requests being generated (for GetMetrics queries only).
pub const IN_FLIGHT_METRIC: &str = "in_flight";

/// The ExternalScaler implementation.
pub struct ScalerService {
    watchers: Watchers,
    defaults: TriggerDefaults,
    heartbeat: Duration,
    shutdown: watch::Receiver<bool>,
}

impl ScalerService {
    /// A service reading backlogs through `watchers`; StreamIsActive streams
    /// repeat their state every `heartbeat` and end when `shutdown` turns true.
    pub fn new(
        watchers: Watchers,
        defaults: TriggerDefaults,
        heartbeat: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            watchers,
            defaults,
            heartbeat,
            shutdown,
        }
    }

    fn trigger(&self, object: &ScaledObjectRef) -> Result<(Trigger, WatchKey), ScalerError> {
        let trigger = Trigger::parse(&object.scaler_metadata, &self.defaults)?;
        let key = WatchKey {
            url: trigger.nats_url.clone(),
            stream: trigger.stream.clone(),
            consumer: trigger.consumer.clone(),
        };
        Ok((trigger, key))
    }

    async fn is_active_inner(&self, object: &ScaledObjectRef) -> Result<bool, ScalerError> {
        let (trigger, key) = self.trigger(object)?;
        let counts = self.watchers.counts(&key).await?;
        Ok(trigger.is_active(&counts))
    }

    fn metric_spec(&self, object: &ScaledObjectRef) -> Result<GetMetricSpecResponse, ScalerError> {
        let (trigger, _) = self.trigger(object)?;
        #[allow(deprecated)] // KEDA still reads the int field on older versions: fill both.
        let spec = MetricSpec {
            metric_name: BACKLOG_METRIC.into(),
            target_size: trigger.target_per_replica.ceil() as i64,
            target_size_float: trigger.target_per_replica,
        };
        Ok(GetMetricSpecResponse {
            metric_specs: vec![spec],
        })
    }

    async fn metrics(
        &self,
        request: &GetMetricsRequest,
    ) -> Result<GetMetricsResponse, ScalerError> {
        let object = request.scaled_object_ref.clone().unwrap_or_default();
        let (trigger, key) = self.trigger(&object)?;
        let name = metric_name(&request.metric_name);
        let value_of: fn(&Trigger, &Counts) -> u64 = match name {
            "" | BACKLOG_METRIC => |t, c| t.backlog(c),
            PENDING_METRIC => |_, c| c.pending,
            IN_FLIGHT_METRIC => |_, c| c.in_flight,
            _ => return Err(ScalerError::UnknownMetric(request.metric_name.clone())),
        };
        let counts = self.watchers.counts(&key).await?;
        let value = value_of(&trigger, &counts);
        #[allow(deprecated)] // KEDA still reads the int field on older versions: fill both.
        let metric = MetricValue {
            metric_name: if name.is_empty() {
                BACKLOG_METRIC.into()
            } else {
                name.into()
            },
            metric_value: i64::try_from(value).unwrap_or(i64::MAX),
            metric_value_float: value as f64,
        };
        Ok(GetMetricsResponse {
            metric_values: vec![metric],
        })
    }
}

/// The metric name without KEDA's `s<index>-` prefix, if it has one.
fn metric_name(name: &str) -> &str {
    if let Some(rest) = name.strip_prefix('s') {
        if let Some((index, metric)) = rest.split_once('-') {
            if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) {
                return metric;
            }
        }
    }
    name
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for ScalerService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let (metadata, _, object) = request.into_parts();
        let result = traced(
            "IsActive",
            &metadata,
            &object,
            self.is_active_inner(&object),
        )
        .await
        .inspect_err(|e| log_error("IsActive", &object, e))?;
        tracing::debug!(name = %object.name, namespace = %object.namespace, result, "IsActive");
        Ok(Response::new(IsActiveResponse { result }))
    }

    type StreamIsActiveStream = ActiveStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let object = request.into_inner();
        let (trigger, key) = self
            .trigger(&object)
            .inspect_err(|e| log_error("StreamIsActive", &object, e))?;
        let mut subscription = self.watchers.subscribe(&key);
        let counts = subscription
            .current()
            .await
            .inspect_err(|e| log_error("StreamIsActive", &object, e))?;
        let active = trigger.is_active(&counts);
        tracing::info!(name = %object.name, namespace = %object.namespace, active, "StreamIsActive opened");

        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(IsActiveResponse { result: active }))
            .expect("a new channel has room");
        let mut shutdown = self.shutdown.clone();
        let stopping = async move {
            let _stopped = shutdown.wait_for(|stop| *stop).await.is_ok();
        };
        let heartbeat = self.heartbeat;
        tokio::spawn(async move {
            push_activity(&trigger, subscription, active, heartbeat, &tx, stopping).await;
            tracing::debug!(name = %object.name, namespace = %object.namespace, "StreamIsActive closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let (metadata, _, object) = request.into_parts();
        let spec = traced("GetMetricSpec", &metadata, &object, async {
            self.metric_spec(&object)
        })
        .await
        .inspect_err(|e| log_error("GetMetricSpec", &object, e))?;
        Ok(Response::new(spec))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let object = request.scaled_object_ref.clone().unwrap_or_default();
        let metrics = traced("GetMetrics", &metadata, &object, self.metrics(&request))
            .await
            .inspect_err(|e| log_error("GetMetrics", &object, e))?;
        tracing::debug!(metric = %request.metric_name, values = ?metrics.metric_values, "GetMetrics");
        Ok(Response::new(metrics))
    }
}

/// Feeds one StreamIsActive stream after its first answer (`active`): a
/// message as soon as a reading changes the answer, and the answer again
/// every `heartbeat`, each time from a reading evaluated then. A reading
/// older than the staleness limit (or an error) sends nothing: repeating
/// the last answer would keep telling KEDA "inactive" about a queue nobody
/// can read, and scale to zero past KEDA's fallback; KEDA's polling
/// reports the error. Returns when the client or `stopping` ends it.
async fn push_activity(
    trigger: &Trigger,
    mut subscription: Subscription,
    mut active: bool,
    heartbeat: Duration,
    tx: &mpsc::Sender<Result<IsActiveResponse, Status>>,
    stopping: impl Future<Output = ()>,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    tokio::pin!(stopping);
    loop {
        let heartbeat = tokio::select! {
            () = tx.closed() => return,
            () = &mut stopping => return,
            alive = subscription.changed() => {
                if !alive {
                    return;
                }
                false
            }
            _ = ticker.tick() => true,
        };
        let Some(Ok(counts)) = subscription.latest() else {
            continue;
        };
        let now = trigger.is_active(&counts);
        if now == active && !heartbeat {
            continue;
        }
        if now != active {
            tracing::debug!(active = now, "StreamIsActive push");
        }
        active = now;
        if tx
            .send(Ok(IsActiveResponse { result: active }))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Runs one unary call in its span (exported when tracing is on), a child
/// of the caller's W3C trace context when the metadata carries one.
async fn traced<T>(
    method: &'static str,
    metadata: &MetadataMap,
    object: &ScaledObjectRef,
    call: impl Future<Output = Result<T, ScalerError>>,
) -> Result<T, ScalerError> {
    let name = format!("{SERVICE}/{method}");
    let span = tracing::info_span!(
        parent: None,
        "keda",
        otel.name = name.as_str(),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = SERVICE,
        rpc.method = method,
        k8s.namespace.name = object.namespace.as_str(),
        keda.scaled_object.name = object.name.as_str(),
        error.type = Empty,
    );
    torchwire_telemetry::set_remote_parent(&span, &GrpcMetadata(metadata));
    let result = call.instrument(span.clone()).await;
    if let Err(e) = &result {
        span.record("otel.status_code", "error");
        span.record("error.type", tracing::field::debug(e.code()));
    }
    result
}

fn log_error(rpc: &str, object: &ScaledObjectRef, err: &ScalerError) {
    tracing::warn!(rpc, name = %object.name, namespace = %object.namespace, code = ?err.code(), "{err}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backlog::test_feed;
    use std::collections::HashMap;

    fn trigger() -> Trigger {
        let defaults = TriggerDefaults {
            stream: "S".into(),
            consumer: "C".into(),
            nats_url: "nats://x:4222".into(),
            allowed_nats_urls: Vec::new(),
        };
        Trigger::parse(&HashMap::new(), &defaults).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_reading_is_never_repeated_as_inactive() {
        let (heartbeat, stale_after) = (Duration::from_secs(1), Duration::from_millis(5500));
        let (feed, subscription) = test_feed(stale_after);
        feed.record_counts(Counts::default());
        let (tx, mut rx) = mpsc::channel(64);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stream = tokio::spawn(async move {
            let trigger = trigger();
            let stopping = async move {
                let _ = stopped.await;
            };
            push_activity(&trigger, subscription, false, heartbeat, &tx, stopping).await;
        });

        // Fresh readings: the heartbeat repeats "inactive".
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let mut answers = Vec::new();
        while let Ok(answer) = rx.try_recv() {
            answers.push(answer.unwrap().result);
        }
        assert_eq!(answers, [false, false]);

        // NATS goes silent: no new reading for much longer than the limit.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let mut repeats = 0;
        while let Ok(answer) = rx.try_recv() {
            assert!(!answer.unwrap().result);
            repeats += 1;
        }
        // Heartbeats at 3, 4 and 5 s still have a reading within 5.5 s; none after.
        assert_eq!(repeats, 3, "a stale reading was repeated");

        // Readings come back, with work: the next one is pushed at once.
        feed.record_counts(Counts {
            pending: 2,
            ..Default::default()
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(rx.try_recv().unwrap().unwrap().result);
        stop.send(()).unwrap();
        stream.await.unwrap();
    }

    #[test]
    fn keda_prefixes_are_stripped() {
        assert_eq!(metric_name("s0-backlog"), "backlog");
        assert_eq!(metric_name("s12-in_flight"), "in_flight");
        assert_eq!(metric_name("backlog"), "backlog");
        assert_eq!(metric_name("sx-backlog"), "sx-backlog");
        assert_eq!(metric_name("s-backlog"), "s-backlog");
    }
}
