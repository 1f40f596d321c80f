//! End-to-end tests of span export: the real server sends its spans over
//! OTLP/gRPC to a collector in this process. A request's span must continue
//! the W3C trace context its caller sent (gRPC metadata, NATS headers), carry
//! the gen_ai attributes, and reach the collector even when SIGTERM follows
//! at once; a collector that is down or hung costs the spans, not the service.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::service::Routes;
use torchwire_integration_tests::{tagged_request as request, BackgroundGrpc, NatsServer, Server};
use torchwire_nats::{codec, headers, Encoding, NatsConfig};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{GenerateRequest, GenerateResponse};

/// Long enough for a slow machine; conditions are polled, not slept on.
const WAIT: Duration = Duration::from_secs(60);

/// The caller's trace and span, as a W3C `traceparent` names them.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn traceparent(trace_id: &str, parent_id: &str) -> String {
    format!("00-{trace_id}-{parent_id}-01")
}

/// A span as the collector received it, with its resource's service.name.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    fn attr(&self, key: &str) -> Option<&Value> {
        attr(&self.span.attributes, key)
    }

    fn string(&self, key: &str) -> Option<&str> {
        match self.attr(key) {
            Some(Value::StringValue(s)) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attr(key) {
            Some(Value::IntValue(i)) => Some(*i),
            _ => None,
        }
    }

    fn status(&self) -> StatusCode {
        let code = self.span.status.as_ref().map_or(0, |s| s.code);
        StatusCode::try_from(code).unwrap_or(StatusCode::Unset)
    }
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The OTLP trace service: stores every span it is sent.
#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut store = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| match attr(&r.attributes, "service.name") {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    store.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
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
        let service = BackgroundGrpc::start(Routes::new(TraceServiceServer::new(store.clone())));
        Self { store, service }
    }

    fn url(&self) -> String {
        self.service.url()
    }

    fn find(&self, pred: impl Fn(&Received) -> bool) -> Option<Received> {
        self.store
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|r| pred(r))
            .cloned()
    }

    /// Waits until a span matching `pred` has arrived.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Received) -> bool) -> Received {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(found) = self.find(&pred) {
                return found;
            }
            if Instant::now() > deadline {
                let names: Vec<String> = self
                    .store
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|r| format!("{} {:?}", r.span.name, r.span.attributes))
                    .collect();
                panic!("no span for {what} within {WAIT:?}; received: {names:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The `generate` span of the request with this id.
fn generate_span(request_id: &str) -> impl Fn(&Received) -> bool + '_ {
    move |r| r.span.name == "generate" && r.string("torchwire.request_id") == Some(request_id)
}

/// A server exporting to `collector`, with a batch delay of `delay_ms`.
async fn traced_server(collector: &Collector, delay_ms: &str, extra: &[&str]) -> Server {
    let url = collector.url();
    let mut flags = vec!["--otlp-endpoint", url.as_str()];
    flags.extend_from_slice(extra);
    Server::start_with_env(
        &Server::default_args(&flags),
        &[("OTEL_BSP_SCHEDULE_DELAY", delay_ms)],
    )
    .await
    .unwrap()
}

/// `req` as a tonic request carrying `traceparent` (and a `tracestate`).
fn with_trace(
    req: GenerateRequest,
    trace_id: &str,
    parent_id: &str,
) -> tonic::Request<GenerateRequest> {
    let mut req = tonic::Request::new(req);
    let md = req.metadata_mut();
    md.insert(
        "traceparent",
        traceparent(trace_id, parent_id).parse().unwrap(),
    );
    md.insert("tracestate", "torchwire=test".parse().unwrap());
    req
}

async fn generate_all(
    client: &mut InferenceClient<tonic::transport::Channel>,
    req: impl tonic::IntoRequest<GenerateRequest>,
) -> Vec<GenerateResponse> {
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        out.push(msg.unwrap());
    }
    out
}

#[tokio::test]
async fn grpc_spans_continue_the_callers_trace() {
    let collector = Collector::start();
    let server = traced_server(&collector, "100", &[]).await;
    let mut client = InferenceClient::new(server.channel().await.unwrap());

    // Generate with a traceparent: a child of the caller's span.
    let msgs = generate_all(
        &mut client,
        with_trace(request("traced-1", 8), TRACE_ID, PARENT_ID),
    )
    .await;
    let last = msgs.last().unwrap();
    let usage = last.usage.unwrap();
    assert_eq!(usage.completion_tokens, 8);
    let span = collector
        .wait_for("the Generate span", generate_span("traced-1"))
        .await;
    assert_eq!(span.trace_id(), TRACE_ID, "not in the caller's trace");
    assert_eq!(
        span.parent_id(),
        PARENT_ID,
        "not a child of the caller's span"
    );
    assert_ne!(hex(&span.span.span_id), PARENT_ID);
    assert_eq!(span.span.trace_state, "torchwire=test", "tracestate lost");
    assert_eq!(span.span.kind, SpanKind::Server as i32);
    assert_eq!(span.service, "torchwire-server");
    assert_eq!(
        span.string("gen_ai.request.model"),
        Some(last.model.as_str())
    );
    assert_eq!(span.int("gen_ai.usage.output_tokens"), Some(8));
    assert_eq!(
        span.int("gen_ai.usage.input_tokens"),
        Some(usage.prompt_tokens as i64)
    );
    match span.attr("gen_ai.response.finish_reasons") {
        Some(Value::ArrayValue(a)) => assert_eq!(
            a.values.iter().map(|v| v.value.clone()).collect::<Vec<_>>(),
            vec![Some(Value::StringValue("length".into()))]
        ),
        other => panic!("finish_reasons: {other:?}"),
    }
    assert_eq!(span.string("rpc.system"), Some("grpc"));
    assert_eq!(span.string("rpc.method"), Some("Generate"));
    assert_eq!(span.string("torchwire.transport"), Some("grpc"));
    match span.attr("torchwire.time_to_first_token_ms") {
        Some(Value::DoubleValue(ms)) => assert!(*ms >= 0.0, "{ms}"),
        other => panic!("time_to_first_token_ms: {other:?}"),
    }
    assert_ne!(span.status(), StatusCode::Error);
    assert!(
        span.span
            .attributes
            .iter()
            .all(|kv| !format!("{:?}", kv.value).contains("Request traced-1 says")),
        "the prompt leaked into the span"
    );

    // Complete without a traceparent: the root of a new trace.
    let whole = client
        .complete(request("root-1", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.token_ids.len(), 4);
    let root = collector
        .wait_for("the Complete span", generate_span("root-1"))
        .await;
    assert!(
        root.span.parent_span_id.is_empty(),
        "{:?}",
        root.parent_id()
    );
    assert_ne!(root.trace_id(), TRACE_ID);
    assert_ne!(root.trace_id(), "0".repeat(32));
    assert_eq!(root.string("rpc.method"), Some("Complete"));
    assert_eq!(root.int("gen_ai.usage.output_tokens"), Some(4));

    // A refused request: an error span, still in the caller's trace.
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    let bad = GenerateRequest {
        temperature: -1.0,
        ..request("bad-1", 4)
    };
    let err = client
        .generate(with_trace(bad, other_trace, PARENT_ID))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let failed = collector
        .wait_for("the refused request's span", generate_span("bad-1"))
        .await;
    assert_eq!(failed.trace_id(), other_trace);
    assert_eq!(failed.status(), StatusCode::Error);
    assert_eq!(failed.string("error.type"), Some("InvalidArgument"));
    let message = &failed.span.status.as_ref().unwrap().message;
    assert!(message.starts_with("temperature"), "{message}");
}

#[tokio::test]
async fn spans_still_batched_are_flushed_on_sigterm() {
    let collector = Collector::start();
    // Ten minutes between batches: only the flush at shutdown can send it.
    let mut server = traced_server(&collector, "600000", &[]).await;
    let mut client = InferenceClient::new(server.channel().await.unwrap());
    let msgs = generate_all(
        &mut client,
        with_trace(request("flushed-1", 6), TRACE_ID, PARENT_ID),
    )
    .await;
    assert_eq!(msgs.last().unwrap().usage.unwrap().completion_tokens, 6);
    assert!(
        collector.find(generate_span("flushed-1")).is_none(),
        "exported before shutdown: this test proves nothing"
    );

    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "exit status {status:?}");
    let span = collector
        .wait_for("the span flushed at shutdown", generate_span("flushed-1"))
        .await;
    assert_eq!(span.trace_id(), TRACE_ID);
    assert_eq!(span.int("gen_ai.usage.output_tokens"), Some(6));
}

#[tokio::test]
async fn nats_requests_continue_the_publishers_trace() {
    let nats = NatsServer::start().unwrap();
    let cfg = NatsConfig {
        url: Some(nats.url()),
        ..NatsConfig::default()
    };
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    torchwire_nats::ensure_work_queue(&js, &cfg).await.unwrap();
    let mut replies = client.subscribe("replies.traced").await.unwrap();
    client.flush().await.unwrap();

    let collector = Collector::start();
    let nats_url = nats.url();
    let _server = traced_server(&collector, "100", &["--nats-url", nats_url.as_str()]).await;

    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::REPLY_TO, "replies.traced");
    h.insert(headers::CONTENT_TYPE, Encoding::Protobuf.content_type());
    h.insert("traceparent", traceparent(TRACE_ID, PARENT_ID).as_str());
    let body = codec::encode_request(&request("nats-1", 5), Encoding::Protobuf);
    js.publish_with_headers(cfg.subject.clone(), h, body)
        .await
        .unwrap()
        .await
        .unwrap();

    // The final reply, then the span.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut tokens = 0;
    loop {
        let msg = tokio::time::timeout_at(deadline, replies.next())
            .await
            .expect("no final reply in time")
            .unwrap();
        let response = codec::decode_response(&msg.payload, Encoding::Protobuf).unwrap();
        assert!(response.error.is_none(), "{:?}", response.error);
        tokens += response.token_ids.len();
        let last = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::FINAL))
            .is_some_and(|v| v.as_str() == headers::TRUE);
        if last {
            break;
        }
    }
    assert_eq!(tokens, 5);
    let span = collector
        .wait_for("the NATS request's span", generate_span("nats-1"))
        .await;
    assert_eq!(span.trace_id(), TRACE_ID, "not in the publisher's trace");
    assert_eq!(span.parent_id(), PARENT_ID);
    assert_eq!(span.span.kind, SpanKind::Consumer as i32);
    assert_eq!(span.string("torchwire.transport"), Some("nats"));
    assert_eq!(span.string("messaging.system"), Some("nats"));
    assert_eq!(
        span.string("messaging.destination.name"),
        Some(cfg.subject.as_str())
    );
    assert_eq!(span.int("gen_ai.usage.output_tokens"), Some(5));
}

#[tokio::test]
async fn the_cli_header_flag_joins_the_callers_trace_over_grpc_and_nats() {
    let nats = NatsServer::start().unwrap();
    let collector = Collector::start();
    let nats_url = nats.url();
    let server = traced_server(&collector, "100", &["--nats-url", nats_url.as_str()]).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(torchwire_integration_tests::binary_path("torchwire"))
            .args(["--addr", server.url().as_str()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let parent = format!("traceparent: {}", traceparent(TRACE_ID, PARENT_ID));
    let options = ["--max-new-tokens", "4", "--ignore-eos"];
    cli(&[
        &[
            "-H",
            parent.as_str(),
            "generate",
            "--request-id",
            "cli-grpc",
        ][..],
        &options[..],
        &["Hello"][..],
    ]
    .concat());
    cli(&[
        &[
            "--header",
            parent.as_str(),
            "publish",
            "--request-id",
            "cli-nats",
        ][..],
        &options[..],
        &["--nats-url", nats_url.as_str(), "--timeout", "120", "Hello"][..],
    ]
    .concat());
    for (id, kind) in [
        ("cli-grpc", SpanKind::Server),
        ("cli-nats", SpanKind::Consumer),
    ] {
        let span = collector.wait_for(id, generate_span(id)).await;
        assert_eq!(span.trace_id(), TRACE_ID, "{id}: not in the caller's trace");
        assert_eq!(span.parent_id(), PARENT_ID, "{id}");
        assert_eq!(span.span.kind, kind as i32, "{id}");
    }

    // A header that cannot be sent is a usage error naming the flag.
    let out = std::process::Command::new(torchwire_integration_tests::binary_path("torchwire"))
        .args([
            "--addr",
            server.url().as_str(),
            "-H",
            "no separator",
            "models",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--header") && err.contains("NAME: VALUE"),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_otlp_endpoint_exits_64_naming_the_key() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(torchwire_integration_tests::binary_path(
            "torchwire-server",
        ));
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(torchwire_integration_tests::repo_root());
        for (k, _) in std::env::vars() {
            if k.starts_with("OTEL_") || k.starts_with("TORCHWIRE_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied()).output().unwrap()
    };
    for (args, env, key) in [
        (
            &["--otlp-endpoint", "collector:4317"][..],
            &[][..],
            "otlp_endpoint",
        ),
        (
            &["--otlp-endpoint", "ftp://collector:21"],
            &[],
            "otlp_endpoint",
        ),
        (
            &[],
            &[("TORCHWIRE_OTLP_ENDPOINT", "not a url")],
            "otlp_endpoint",
        ),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    ] {
        let out = run(args, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {err}");
        assert!(err.contains(key), "{args:?} {env:?}: {err}");
    }
}

/// Serves a request with spans going to `endpoint`, then stops it with
/// SIGTERM; returns how long the exit took.
async fn serve_then_stop(endpoint: &str, env: &[(&str, &str)]) -> Duration {
    let mut all = vec![("OTEL_BSP_SCHEDULE_DELAY", "100")];
    all.extend_from_slice(env);
    let mut server =
        Server::start_with_env(&Server::default_args(&["--otlp-endpoint", endpoint]), &all)
            .await
            .unwrap();
    let mut client = InferenceClient::new(server.channel().await.unwrap());
    let msgs = generate_all(&mut client, request("unexported", 4)).await;
    assert_eq!(msgs.last().unwrap().usage.unwrap().completion_tokens, 4);
    let stopping = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "exit status {status:?}");
    stopping.elapsed()
}

#[tokio::test]
async fn a_collector_that_is_down_costs_the_spans_not_the_service() {
    // A port nothing listens on: every export is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    serve_then_stop(&url, &[]).await;
}

#[tokio::test]
async fn a_hung_collector_cannot_hold_shutdown() {
    // Connections are accepted by the kernel and never answered: an export
    // waits for its own timeout (a minute here), unless shutdown gives up.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", hung.local_addr().unwrap());
    let took = serve_then_stop(&url, &[("OTEL_EXPORTER_OTLP_TIMEOUT", "60000")]).await;
    assert!(
        took < Duration::from_secs(30),
        "shutdown waited {took:?} for a hung collector"
    );
    drop(hung);
}
