//! End-to-end tests of metric export: the real server sends its metrics over
//! OTLP/gRPC to a collector in this process. Requests are counted by
//! outcome, tokens by type, timings land in histograms, the engines' batch
//! and queue are observed, and what was recorded just before SIGTERM still
//! arrives.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use tonic::service::Routes;
use torchwire_integration_tests::{
    tagged_request as request, BackgroundGrpc, Metrics, NatsServer, Server,
};
use torchwire_nats::{codec, headers, Encoding, NatsConfig};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{GenerateRequest, GenerateResponse};

/// Long enough for a slow machine; conditions are polled, not slept on.
const WAIT: Duration = Duration::from_secs(60);

/// A series: metric name and its attributes (values as strings), sorted.
type Series = (String, Vec<(String, String)>);

/// A series' latest point: a number's value, or a histogram's count.
#[derive(Clone, Copy, Debug)]
struct Point {
    value: f64,
    count: u64,
}

/// What the collector was sent. The SDK's metrics are cumulative, so each
/// series' latest point holds its total.
#[derive(Default)]
struct Received {
    services: Vec<String>,
    latest: BTreeMap<Series, Point>,
}

fn string(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(attrs: &[KeyValue]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = attrs
        .iter()
        .map(|kv| {
            let value = kv.value.as_ref().and_then(|v| v.value.as_ref());
            (kv.key.clone(), string(value))
        })
        .collect();
    out.sort();
    out
}

/// The OTLP metrics service: keeps the latest point of every series.
#[derive(Clone, Default)]
struct Store(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl MetricsService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut store = self.0.lock().unwrap();
        for resource_metrics in request.into_inner().resource_metrics {
            let resource = resource_metrics.resource.unwrap_or_default();
            let service = attributes(&resource.attributes)
                .into_iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v)
                .unwrap_or_default();
            if !store.services.contains(&service) {
                store.services.push(service);
            }
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    let mut points = Vec::new();
                    match metric.data {
                        Some(Data::Sum(s)) => points.extend(s.data_points.iter().map(number)),
                        Some(Data::Gauge(g)) => points.extend(g.data_points.iter().map(number)),
                        Some(Data::Histogram(h)) => points.extend(h.data_points.iter().map(|p| {
                            let point = Point {
                                value: p.sum.unwrap_or_default(),
                                count: p.count,
                            };
                            (attributes(&p.attributes), point)
                        })),
                        _ => {}
                    }
                    for (attrs, point) in points {
                        store.latest.insert((metric.name.clone(), attrs), point);
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn number(
    p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint,
) -> (Vec<(String, String)>, Point) {
    let value = match p.value {
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        Some(number_data_point::Value::AsDouble(d)) => d,
        None => f64::NAN,
    };
    (attributes(&p.attributes), Point { value, count: 1 })
}

/// An OTLP/gRPC collector on 127.0.0.1:0, on its own thread and runtime so
/// that it keeps answering while a test blocks (e.g. waiting for an exit).
struct Collector {
    store: Store,
    service: BackgroundGrpc,
}

impl Collector {
    fn start() -> Self {
        let store = Store::default();
        let service = BackgroundGrpc::start(Routes::new(MetricsServiceServer::new(store.clone())));
        Self { store, service }
    }

    fn url(&self) -> String {
        self.service.url()
    }

    /// The series of `name` whose attributes include all of `filter`.
    fn series(&self, name: &str, filter: &[(&str, &str)]) -> Vec<(Vec<(String, String)>, Point)> {
        let store = self.store.0.lock().unwrap();
        store
            .latest
            .iter()
            .filter(|((n, attrs), _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| attrs.iter().any(|(ak, av)| ak == k && av == v))
            })
            .map(|((_, attrs), point)| (attrs.clone(), *point))
            .collect()
    }

    /// Sum of the matching series' values (counters).
    fn total(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.series(name, filter).iter().map(|(_, p)| p.value).sum()
    }

    /// Sum of the matching series' counts (histograms).
    fn count(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        self.series(name, filter).iter().map(|(_, p)| p.count).sum()
    }

    /// Waits until `done` holds for what was received.
    async fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            if Instant::now() > deadline {
                let store = self.store.0.lock().unwrap();
                panic!("{what}: not within {WAIT:?}; received: {:#?}", store.latest);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A server exporting metrics to `collector` every `interval_ms`.
async fn metered_server(collector: &Collector, interval_ms: &str) -> Server {
    metered_server_with(collector, interval_ms, &[]).await
}

async fn metered_server_with(collector: &Collector, interval_ms: &str, extra: &[&str]) -> Server {
    let url = collector.url();
    let mut flags = vec!["--otlp-endpoint", url.as_str()];
    flags.extend_from_slice(extra);
    Server::start_with_env(
        &Server::default_args(&flags),
        &[("OTEL_METRIC_EXPORT_INTERVAL", interval_ms)],
    )
    .await
    .unwrap()
}

async fn generate_all(
    client: &mut InferenceClient<tonic::transport::Channel>,
    req: GenerateRequest,
) -> Vec<GenerateResponse> {
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        out.push(msg.unwrap());
    }
    out
}

#[tokio::test]
async fn grpc_requests_are_counted_timed_and_the_engine_is_observed() {
    let collector = Collector::start();
    let server = metered_server(&collector, "200").await;
    let mut client = InferenceClient::new(server.channel().await.unwrap());

    let mut prompt_tokens = 0;
    let mut model = String::new();
    for id in ["metered-1", "metered-2"] {
        let msgs = generate_all(&mut client, request(id, 5)).await;
        let last = msgs.last().unwrap();
        assert_eq!(last.usage.unwrap().completion_tokens, 5);
        prompt_tokens += last.usage.unwrap().prompt_tokens;
        model = last.model.clone();
    }
    let bad = GenerateRequest {
        temperature: -1.0,
        ..request("bad-1", 4)
    };
    let err = client.generate(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let m = model.as_str();
    let ok = [
        ("gen_ai.request.model", m),
        ("torchwire.transport", "grpc"),
        ("torchwire.outcome", "length"),
    ];
    let failed = [
        ("gen_ai.request.model", m),
        ("torchwire.transport", "grpc"),
        ("torchwire.outcome", "error"),
        ("error.type", "InvalidArgument"),
    ];
    let output = [("gen_ai.request.model", m), ("gen_ai.token.type", "output")];
    let input = [("gen_ai.request.model", m), ("gen_ai.token.type", "input")];
    collector
        .wait_until("every request's metrics", |c| {
            c.total("torchwire.requests", &ok) == 2.0
                && c.total("torchwire.requests", &failed) == 1.0
                && c.total("torchwire.tokens", &output) == 10.0
                && c.count("gen_ai.server.time_to_first_token", &ok) == 2
                && !c
                    .series("torchwire.batch.running", &[("gen_ai.request.model", m)])
                    .is_empty()
                // Two short prompts, nothing to reuse; the cache is observed.
                && c.total("torchwire.prefix_cache.misses", &[("gen_ai.request.model", m)]) == 2.0
                && !c
                    .series("torchwire.prefix_cache.memory", &[("gen_ai.request.model", m)])
                    .is_empty()
        })
        .await;

    assert_eq!(
        collector.total("torchwire.tokens", &input),
        f64::from(prompt_tokens)
    );
    assert_eq!(
        collector.count("gen_ai.server.request.duration", &ok),
        2,
        "finished requests' durations"
    );
    assert_eq!(
        collector.count("gen_ai.server.request.duration", &failed),
        1,
        "the refused request's duration"
    );
    // Five tokens: four gaps after the first, per request.
    assert_eq!(
        collector.count("gen_ai.server.time_per_output_token", &ok),
        2
    );
    assert!(
        collector
            .series("gen_ai.server.time_to_first_token", &failed)
            .is_empty(),
        "a refused request has no first token"
    );
    assert!(
        !collector
            .series("inference_queue_length", &[("gen_ai.request.model", m)])
            .is_empty(),
        "queue gauge"
    );
    let services = collector.store.0.lock().unwrap().services.clone();
    assert_eq!(services, vec!["torchwire-server".to_string()]);

    // The same instruments, scraped from the admin port in the Prometheus
    // format, hold the same totals.
    let scraped = Metrics::scrape(server.admin_addr()).await.unwrap();
    let prom = |labels: &[(&str, &str)]| {
        labels
            .iter()
            .map(|(k, v)| (k.replace('.', "_"), v.to_string()))
            .collect::<Vec<_>>()
    };
    for (name, labels, otlp) in [
        ("torchwire_requests_total", prom(&ok), 2.0),
        ("torchwire_requests_total", prom(&failed), 1.0),
        ("torchwire_tokens_total", prom(&output), 10.0),
        (
            "torchwire_tokens_total",
            prom(&input),
            f64::from(prompt_tokens),
        ),
    ] {
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            scraped.value(name, &labels),
            Some(otlp),
            "{name} {labels:?}"
        );
    }
}

#[tokio::test]
async fn nats_requests_are_counted_with_their_transport() {
    let nats = NatsServer::start().unwrap();
    let cfg = NatsConfig {
        url: Some(nats.url()),
        ..NatsConfig::default()
    };
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    torchwire_nats::ensure_work_queue(&js, &cfg).await.unwrap();
    let mut replies = client.subscribe("replies.metered").await.unwrap();
    client.flush().await.unwrap();

    let collector = Collector::start();
    let nats_url = nats.url();
    let _server = metered_server_with(&collector, "200", &["--nats-url", nats_url.as_str()]).await;

    let body = codec::encode_request(&request("nats-1", 5), Encoding::Protobuf);
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::REPLY_TO, "replies.metered");
    h.insert(headers::CONTENT_TYPE, Encoding::Protobuf.content_type());
    js.publish_with_headers(cfg.subject.clone(), h, body.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    // No reply subject: refused before its model is known.
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, Encoding::Protobuf.content_type());
    js.publish_with_headers(cfg.subject.clone(), h, body)
        .await
        .unwrap()
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + WAIT;
    let model = loop {
        let msg = tokio::time::timeout_at(deadline, replies.next())
            .await
            .expect("no final reply in time")
            .unwrap();
        let response = codec::decode_response(&msg.payload, Encoding::Protobuf).unwrap();
        assert!(response.error.is_none(), "{:?}", response.error);
        let last = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::FINAL))
            .is_some_and(|v| v.as_str() == headers::TRUE);
        if last {
            break response.model;
        }
    };
    let m = model.as_str();
    let ok = [
        ("gen_ai.request.model", m),
        ("torchwire.transport", "nats"),
        ("torchwire.outcome", "length"),
    ];
    let refused = [
        ("torchwire.transport", "nats"),
        ("torchwire.outcome", "error"),
        ("error.type", "InvalidArgument"),
    ];
    collector
        .wait_until("both NATS messages counted", |c| {
            c.total("torchwire.requests", &ok) == 1.0
                && c.total("torchwire.requests", &refused) == 1.0
        })
        .await;
    // The work-queue messages, by how they were settled.
    collector
        .wait_until("both NATS messages settled", |c| {
            let settled = |outcome| {
                c.total(
                    "torchwire.nats.messages",
                    &[("torchwire.nats.outcome", outcome)],
                )
            };
            settled("acked") == 1.0 && settled("unanswerable") == 1.0
        })
        .await;
    let output = [("gen_ai.request.model", m), ("gen_ai.token.type", "output")];
    assert_eq!(collector.total("torchwire.tokens", &output), 5.0);
    for (attrs, _) in collector.series("torchwire.requests", &refused) {
        assert!(
            attrs.iter().all(|(k, _)| k != "gen_ai.request.model"),
            "{attrs:?}"
        );
    }
}

#[tokio::test]
async fn a_stream_dropped_by_its_client_counts_as_cancelled() {
    let collector = Collector::start();
    let server = metered_server(&collector, "200").await;
    let mut client = InferenceClient::new(server.channel().await.unwrap());
    let mut stream = client
        .generate(request("dropped-1", 240))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    drop(stream);
    let cancelled = [
        ("gen_ai.request.model", first.model.as_str()),
        ("torchwire.transport", "grpc"),
        ("torchwire.outcome", "cancelled"),
    ];
    collector
        .wait_until("the dropped stream counted as cancelled", |c| {
            c.total("torchwire.requests", &cancelled) == 1.0
        })
        .await;
    assert_eq!(
        collector.count("gen_ai.server.request.duration", &cancelled),
        1
    );
    assert!(
        collector
            .series("torchwire.requests", &[("torchwire.outcome", "length")])
            .is_empty(),
        "the dropped request ran to the end"
    );
}

#[tokio::test]
async fn metrics_recorded_just_before_sigterm_are_flushed() {
    let collector = Collector::start();
    // Ten minutes between exports: only the flush at shutdown can send it.
    let mut server = metered_server(&collector, "600000").await;
    let mut client = InferenceClient::new(server.channel().await.unwrap());
    let msgs = generate_all(&mut client, request("flushed-1", 3)).await;
    let last = msgs.last().unwrap();
    assert_eq!(last.usage.unwrap().completion_tokens, 3);
    let done = [
        ("gen_ai.request.model", last.model.as_str()),
        ("torchwire.outcome", "length"),
    ];
    assert_eq!(
        collector.total("torchwire.requests", &done),
        0.0,
        "exported before shutdown: this test proves nothing"
    );

    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "exit status {status:?}");
    collector
        .wait_until("the request counted at shutdown", |c| {
            c.total("torchwire.requests", &done) == 1.0
        })
        .await;
    let output = [
        ("gen_ai.request.model", last.model.as_str()),
        ("gen_ai.token.type", "output"),
    ];
    assert_eq!(collector.total("torchwire.tokens", &output), 3.0);
}
