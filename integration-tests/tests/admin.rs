//! End-to-end tests of torchwire-server's admin port and request log: the
//! real binary with the bundled model. `/metrics` is read with a Prometheus
//! text-format parser while a real backlog builds up and drains; `/livez`
//! and `/readyz` are checked while the model loads, while the server is
//! saturated, and after the model thread stalls or dies (debug builds'
//! fault switch, `TORCHWIRE_DEBUG_FAULT`); every request ends with one JSON
//! log line.

use std::time::Duration;

use futures::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use torchwire_integration_tests::{
    http_get, http_status, tagged_request, until, ChildProcess, Metrics, Server,
};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::GenerateRequest;

/// Upper bound for conditions that are polled (never slept on).
const WAIT: Duration = Duration::from_secs(60);

type Client = InferenceClient<tonic::transport::Channel>;

async fn client(server: &ChildProcess) -> Client {
    InferenceClient::new(server.channel().await.unwrap())
}

/// A request that keeps the model busy: most of the bundled model's
/// 512-token context.
fn long_request(id: &str) -> GenerateRequest {
    tagged_request(id, 480)
}

async fn grpc_health(server: &ChildProcess) -> i32 {
    let mut health = HealthClient::new(server.channel().await.unwrap());
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn scrape(server: &ChildProcess) -> Metrics {
    Metrics::scrape(server.admin_addr()).await.unwrap()
}

#[tokio::test]
async fn metrics_follow_a_real_backlog_and_the_probes_answer() {
    let server = Server::start(&["--max-batch-size", "1", "--queue-size", "8"])
        .await
        .unwrap();
    let admin = server.admin_addr();
    assert_eq!(http_status(admin, "/livez").await, 200);
    assert_eq!(http_status(admin, "/readyz").await, 200);
    assert_eq!(http_status(admin, "/nothing-here").await, 404);

    let idle = scrape(&server).await;
    let model_name = idle
        .samples("torchwire_kv_cache_slots", &[])
        .next()
        .and_then(|s| s.labels.get("gen_ai_request_model"))
        .expect("the KV cache gauge names its model")
        .to_string();
    let model = [("gen_ai_request_model", model_name.as_str())];
    assert!(
        idle.has_type("inference_queue_length", "gauge"),
        "{}",
        idle.text
    );
    assert_eq!(idle.value("inference_queue_length", &model), Some(0.0));
    assert_eq!(idle.value("torchwire_kv_cache_slots", &model), Some(1.0));
    assert_eq!(
        idle.value("torchwire_kv_cache_slots_used", &model),
        Some(0.0)
    );
    assert!(
        idle.value("torchwire_kv_cache_memory_bytes", &model)
            .unwrap()
            > 0.0
    );
    assert!(
        idle.value("torchwire_model_load_duration_seconds", &model)
            .unwrap()
            > 0.0
    );
    assert!(
        idle.value("torchwire_model_warmup_duration_seconds", &model)
            .unwrap()
            > 0.0
    );
    // The prefix cache's counters and sizes, beside the KV cache's.
    for (name, kind) in [
        ("torchwire_prefix_cache_hits_total", "counter"),
        ("torchwire_prefix_cache_misses_total", "counter"),
        ("torchwire_prefix_cache_tokens_reused_total", "counter"),
        ("torchwire_prefix_cache_evictions_total", "counter"),
        ("torchwire_prefix_cache_memory_bytes", "gauge"),
        ("torchwire_prefix_cache_entries", "gauge"),
    ] {
        assert!(idle.has_type(name, kind), "{name}: {}", idle.text);
        assert!(idle.value(name, &model).is_some(), "{name}: {}", idle.text);
    }
    // Process metrics under the client libraries' names.
    assert!(
        idle.has_type("process_cpu_seconds_total", "counter"),
        "{}",
        idle.text
    );
    assert!(idle.value("process_cpu_seconds_total", &[]).unwrap() > 0.0);
    assert!(idle.value("process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(idle.value("process_open_fds", &[]).unwrap() >= 3.0);
    let started = idle.value("process_start_time_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now && started > now - 3600.0,
        "{started} vs {now}"
    );

    // Five long requests, one batch slot: one runs, four wait.
    let mut c = client(&server).await;
    let mut streams = Vec::new();
    for i in 0..5 {
        let stream = c
            .generate(long_request(&format!("backlog-{i}")))
            .await
            .unwrap()
            .into_inner();
        streams.push(stream);
    }
    let busy = until("four requests queued, one running", WAIT, async || {
        let m = scrape(&server).await;
        (m.value("inference_queue_length", &model) == Some(4.0)
            && m.value("torchwire_batch_running", &model) == Some(1.0))
        .then_some(m)
    })
    .await;
    assert_eq!(
        busy.value("torchwire_kv_cache_slots_used", &model),
        Some(1.0)
    );
    // Decoding, not being read: the waiting four are still in the queue.
    assert_eq!(busy.value("torchwire_batch_prefilling", &model), Some(0.0));
    assert!(
        busy.value("torchwire_kv_cache_memory_used_bytes", &model)
            .unwrap()
            > 0.0
    );
    assert!(busy.value("torchwire_decode_steps_total", &model).unwrap() > 0.0);

    // Gone clients leave the queue; the ended requests are counted where
    // the OTLP export counts them.
    drop(streams);
    let cancelled = [
        ("gen_ai_request_model", model_name.as_str()),
        ("torchwire_outcome", "cancelled"),
    ];
    let drained = until("the queue to drain", WAIT, async || {
        let m = scrape(&server).await;
        (m.value("inference_queue_length", &model) == Some(0.0)
            && m.value("torchwire_requests_total", &cancelled) == Some(5.0))
        .then_some(m)
    })
    .await;
    assert!(
        drained.has_type("gen_ai_server_request_duration_seconds", "histogram"),
        "{}",
        drained.text
    );
    assert_eq!(http_status(admin, "/readyz").await, 200);
}

#[tokio::test]
async fn a_saturated_server_stays_live_and_ready() {
    // One slot, one queue place, and a stall limit the saturation outlasts.
    let server = Server::start(&[
        "--max-batch-size",
        "1",
        "--queue-size",
        "1",
        "--liveness-stall-secs",
        "2",
    ])
    .await
    .unwrap();
    let admin = server.admin_addr();
    let window = Duration::from_secs(6);
    let end = tokio::time::Instant::now() + window;
    // Three clients keep sending long requests: one runs, one waits, the
    // third is mostly refused.
    let mut load = Vec::new();
    for i in 0..3 {
        let mut c = client(&server).await;
        load.push(tokio::spawn(async move {
            let mut refused = 0;
            while tokio::time::Instant::now() < end {
                match c.generate(long_request(&format!("load-{i}"))).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        while let Ok(Some(Ok(_))) =
                            tokio::time::timeout_at(end, stream.next()).await
                        {
                        }
                    }
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
            refused
        }));
    }
    let mut probes = 0;
    let mut saw_full_queue = false;
    while tokio::time::Instant::now() < end {
        let live = http_get(admin, "/livez").await.unwrap();
        assert_eq!(live.status, 200, "a busy server is live: {}", live.body);
        let ready = http_get(admin, "/readyz").await.unwrap();
        assert_eq!(
            ready.status, 200,
            "a full queue stays ready: {}",
            ready.body
        );
        let m = scrape(&server).await;
        saw_full_queue |= m
            .samples("inference_queue_length", &[])
            .any(|s| s.value == prometheus_parse::Value::Gauge(1.0));
        probes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut refused = 0;
    for task in load {
        refused += task.await.unwrap();
    }
    assert!(refused > 0, "the server was never saturated");
    assert!(saw_full_queue, "the queue never filled");
    assert!(probes > 10, "{probes} probes in {window:?}");
    assert_eq!(grpc_health(&server).await, ServingStatus::Serving as i32);
}

/// Starts the server with a debug fault and a one-second stall limit.
async fn faulty_server(fault: &str) -> Server {
    Server::start_with_env(
        &Server::default_args(&["--liveness-stall-secs", "1"]),
        &[("TORCHWIRE_DEBUG_FAULT", fault)],
    )
    .await
    .unwrap()
}

/// Waits until `/livez` and `/readyz` answer 503 and gRPC health says
/// NOT_SERVING; returns the `/livez` body.
async fn until_not_live(server: &ChildProcess) -> String {
    let admin = server.admin_addr();
    let body = until("/livez to fail", WAIT, async || {
        let live = http_get(admin, "/livez").await.unwrap();
        (live.status == 503).then_some(live.body)
    })
    .await;
    let ready = http_get(admin, "/readyz").await.unwrap();
    assert_eq!(ready.status, 503, "not live is not ready: {}", ready.body);
    until("gRPC health NOT_SERVING", WAIT, async || {
        (grpc_health(server).await == ServingStatus::NotServing as i32).then_some(())
    })
    .await;
    // The metrics still answer, for the post-mortem.
    assert!(scrape(server)
        .await
        .value("process_open_fds", &[])
        .is_some());
    body
}

#[tokio::test]
async fn a_stalled_model_thread_is_neither_live_nor_ready() {
    let server = faulty_server("stall-on-prompt:HANG-THE-ENGINE").await;
    let admin = server.admin_addr();
    let mut c = client(&server).await;
    // Other prompts are served; the probes pass.
    let mut ok = c
        .generate(tagged_request("fine", 4))
        .await
        .unwrap()
        .into_inner();
    while let Some(msg) = ok.next().await {
        msg.unwrap();
    }
    assert_eq!(http_status(admin, "/livez").await, 200);
    assert_eq!(http_status(admin, "/readyz").await, 200);

    let stuck = GenerateRequest {
        prompt: "Please HANG-THE-ENGINE now".into(),
        max_new_tokens: Some(4),
        ..Default::default()
    };
    let _stuck = c.generate(stuck).await.unwrap().into_inner();
    let body = until_not_live(&server).await;
    assert!(body.contains("no step completed"), "{body}");
    assert!(body.contains("liveness_stall_secs = 1"), "{body}");
}

#[tokio::test]
async fn a_model_thread_that_panicked_is_neither_live_nor_ready() {
    // With the engine breaker on (the default) the replica would exit at
    // once; off, it stays up and its probes report the ended thread.
    let server = Server::start_with_env(
        &Server::default_args(&["--liveness-stall-secs", "1"]),
        &[
            ("TORCHWIRE_DEBUG_FAULT", "panic-on-prompt:CRASH-THE-ENGINE"),
            ("TORCHWIRE_MAX_ENGINE_FAILURES", "0"),
        ],
    )
    .await
    .unwrap();
    let mut c = client(&server).await;
    let crash = GenerateRequest {
        prompt: "Please CRASH-THE-ENGINE now".into(),
        max_new_tokens: Some(4),
        ..Default::default()
    };
    let mut stream = c.generate(crash).await.unwrap().into_inner();
    let err = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stream ended without an error"),
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    until_not_live(&server).await;
    // The thread may look stalled while its panic is reported; then it is gone.
    let admin = server.admin_addr();
    until("/livez to say the thread ended", WAIT, async || {
        let live = http_get(admin, "/livez").await.unwrap();
        (live.status == 503 && live.body.contains("model thread has ended")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn while_the_model_loads_the_server_is_live_but_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let fault = format!("hold-load-until:{}", go.display());
    let process = ChildProcess::spawn(
        "torchwire-server",
        &Server::default_args(&[]),
        &[("RUST_LOG", "info"), ("TORCHWIRE_DEBUG_FAULT", &fault)],
    )
    .unwrap();
    let admin = process.admin_addr();
    assert_eq!(http_status(admin, "/livez").await, 200);
    let ready = http_get(admin, "/readyz").await.unwrap();
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("loading"), "{}", ready.body);
    assert_eq!(
        grpc_health(&process).await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(http_status(admin, "/metrics").await, 200);

    std::fs::write(&go, b"").unwrap();
    process.wait_serving("").await.unwrap();
    assert_eq!(http_status(admin, "/readyz").await, 200);
    assert_eq!(http_status(admin, "/livez").await, 200);
    let loaded = process
        .stderr_lines()
        .into_iter()
        .find(|l| l.contains("model loaded"))
        .expect("a model loaded line");
    assert!(
        loaded.contains("load_ms") && loaded.contains("warmup_ms"),
        "{loaded}"
    );
}

#[tokio::test]
async fn the_admin_port_can_be_turned_off() {
    let process = ChildProcess::spawn(
        "torchwire-server",
        &Server::default_args(&["--admin-listen", "off"]),
        &[],
    )
    .unwrap();
    assert_eq!(process.admin, None);
    process.wait_serving("").await.unwrap();
}

/// The JSON log lines of `server` whose message is `request ended` and
/// whose request id is `id`.
fn request_lines(server: &ChildProcess, id: &str) -> Vec<serde_json::Value> {
    server
        .stderr_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request ended" && v["fields"]["request_id"] == id)
        .collect()
}

#[tokio::test]
async fn every_request_ends_with_one_json_log_line() {
    let server = Server::start(&["--log-format", "json"]).await.unwrap();
    let mut c = client(&server).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(tagged_request("logged-1", 12));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let mut text = String::new();
    let mut usage = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        text.push_str(&msg.text);
        usage = msg.usage.or(usage);
    }
    let usage = usage.unwrap();
    let bad = GenerateRequest {
        temperature: -1.0,
        ..tagged_request("logged-bad", 4)
    };
    assert_eq!(
        c.generate(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let line = until("the request's log line", WAIT, async || {
        request_lines(&server, "logged-1").pop()
    })
    .await;
    let f = &line["fields"];
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(f["transport"], "grpc", "{line}");
    assert!(f["model"].as_str().is_some_and(|m| !m.is_empty()), "{line}");
    assert_eq!(f["prompt_tokens"], usage.prompt_tokens, "{line}");
    assert_eq!(f["output_tokens"], 12, "{line}");
    assert_eq!(f["outcome"], "length", "{line}");
    assert_eq!(f["finish_reason"], "length", "{line}");
    assert_eq!(f["trace_id"], trace, "{line}");
    for key in ["queue_ms", "ttft_ms", "total_ms"] {
        assert!(f[key].as_f64().is_some_and(|v| v >= 0.0), "{key}: {line}");
    }
    assert!(f["ttft_ms"].as_f64() <= f["total_ms"].as_f64(), "{line}");

    let bad = until("the refused request's log line", WAIT, async || {
        request_lines(&server, "logged-bad").pop()
    })
    .await;
    assert_eq!(bad["fields"]["outcome"], "error", "{bad}");
    assert_eq!(bad["fields"]["error_code"], "InvalidArgument", "{bad}");
    assert!(
        bad["fields"]["trace_id"].is_null(),
        "no trace was sent: {bad}"
    );

    // One line each, and never the prompt or the output.
    assert_eq!(request_lines(&server, "logged-1").len(), 1);
    assert_eq!(request_lines(&server, "logged-bad").len(), 1);
    let prompt = tagged_request("logged-1", 12).prompt;
    let logs = server.stderr_lines().join("\n");
    assert!(!logs.contains(&prompt), "the prompt was logged");
    if text.trim().len() >= 12 {
        assert!(!logs.contains(text.trim()), "the output was logged");
    }
}
