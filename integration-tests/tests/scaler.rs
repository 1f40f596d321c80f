//! End-to-end tests of torchwire-scaler: the real binary, called the way KEDA
//! calls it (generated from KEDA's proto), against a real nats-server whose
//! work queue the tests fill and drain themselves.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status};
use torchwire_integration_tests::{
    binary_path, http_status, until, Metrics, NatsServer, Pki, Scaler,
};
use torchwire_nats::{codec, ensure_work_queue, headers, Encoding, NatsConfig};
use torchwire_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use torchwire_proto::externalscaler::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};
use torchwire_proto::v1::GenerateRequest;

/// Upper bound for conditions that are polled (never slept on).
const WAIT: Duration = Duration::from_secs(30);
/// The spec: StreamIsActive says `true` this soon after work arrives.
const PUSH_DEADLINE: Duration = Duration::from_millis(500);

type Scale = ExternalScalerClient<Channel>;

/// A trigger's metadata, as a ScaledObject would carry it.
fn object(pairs: &[(&str, &str)]) -> ScaledObjectRef {
    let mut metadata: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // KEDA passes its own keys along with the scaler's.
    metadata.insert("scalerAddress".into(), "torchwire-scaler:50052".into());
    ScaledObjectRef {
        name: "torchwire".into(),
        namespace: "default".into(),
        scaler_metadata: metadata,
    }
}

async fn client(scaler: &Scaler) -> Scale {
    ExternalScalerClient::new(scaler.channel().await.expect("channel to the scaler"))
}

/// GetMetrics for `metric` (with KEDA's `s0-` prefix); checks that the int
/// and float fields agree and returns the value.
async fn metric(scale: &mut Scale, object: &ScaledObjectRef, metric: &str) -> Result<f64, Status> {
    let response = scale
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object.clone()),
            metric_name: format!("s0-{metric}"),
        })
        .await?
        .into_inner();
    assert_eq!(response.metric_values.len(), 1, "{response:?}");
    let value = &response.metric_values[0];
    assert_eq!(value.metric_name, metric);
    #[allow(deprecated)]
    let int_value = value.metric_value;
    assert_eq!(
        int_value as f64,
        value.metric_value_float.ceil(),
        "{value:?}"
    );
    Ok(value.metric_value_float)
}

async fn is_active(scale: &mut Scale, object: &ScaledObjectRef) -> Result<bool, Status> {
    Ok(scale.is_active(object.clone()).await?.into_inner().result)
}

/// One KEDA polling round: GetMetrics then IsActive; with the HPA's rule,
/// the replicas it would ask for (0 when inactive).
async fn keda_round(
    scale: &mut Scale,
    object: &ScaledObjectRef,
    target: f64,
) -> Result<(f64, bool, u64), Status> {
    let value = metric(scale, object, "backlog").await?;
    let active = is_active(scale, object).await?;
    let replicas = if active {
        (value / target).ceil() as u64
    } else {
        0
    };
    Ok((value, active, replicas))
}

/// Connects with `config` and creates the work queue (stream + consumer).
async fn work_queue(config: &NatsConfig) -> (jetstream::Context, PullConsumer) {
    let client = config
        .connect_as("scaler-test")
        .await
        .expect("connect to nats-server");
    let js = jetstream::new(client);
    let consumer = ensure_work_queue(&js, config).await.expect("work queue");
    (js, consumer)
}

fn nats_config(url: &str) -> NatsConfig {
    NatsConfig {
        url: Some(url.to_string()),
        ..Default::default()
    }
}

/// Publishes `n` generate requests, as the CLI would, and waits for JetStream's acks.
async fn publish(js: &jetstream::Context, config: &NatsConfig, n: usize) {
    for i in 0..n {
        let request = GenerateRequest {
            prompt: format!("request {i}"),
            request_id: format!("r{i}"),
            ..Default::default()
        };
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::REPLY_TO, format!("replies.r{i}").as_str());
        h.insert(headers::REQUEST_ID, format!("r{i}").as_str());
        h.insert(headers::CONTENT_TYPE, Encoding::Protobuf.content_type());
        js.publish_with_headers(
            config.subject.clone(),
            h,
            codec::encode_request(&request, Encoding::Protobuf),
        )
        .await
        .expect("publish")
        .await
        .expect("JetStream ack");
    }
}

/// Pulls `n` messages as a torchwire server would, without acknowledging them.
async fn pull(consumer: &PullConsumer, n: usize) -> Vec<jetstream::Message> {
    let mut batch = consumer
        .batch()
        .max_messages(n)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("pull");
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        messages.push(message.expect("message"));
    }
    assert_eq!(messages.len(), n, "pulled fewer messages than asked for");
    messages
}

async fn ack_all(messages: Vec<jetstream::Message>) {
    for message in messages {
        message.double_ack().await.expect("ack");
    }
}

/// Reads StreamIsActive messages until one says `true`; returns when it came.
async fn next_true(
    stream: &mut tonic::Streaming<IsActiveResponse>,
    deadline: Duration,
) -> Option<Instant> {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(end, stream.message()).await {
            Ok(Ok(Some(IsActiveResponse { result: true }))) => return Some(Instant::now()),
            Ok(Ok(Some(_))) => continue,
            Ok(other) => panic!("StreamIsActive ended: {other:?}"),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn keda_polling_and_push_follow_the_backlog() {
    let nats = NatsServer::start().unwrap();
    let config = nats_config(&nats.url());
    let (js, consumer) = work_queue(&config).await;
    let scaler = Scaler::start(&["--nats-url", &nats.url()]).await.unwrap();
    let mut scale = client(&scaler).await;
    let target = 2.0;
    let trigger = object(&[("targetPerReplica", "2")]);

    // KEDA builds the HPA from GetMetricSpec first.
    let spec = scale
        .get_metric_spec(trigger.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1, "{spec:?}");
    assert_eq!(spec.metric_specs[0].metric_name, "backlog");
    assert_eq!(spec.metric_specs[0].target_size_float, target);
    #[allow(deprecated)]
    let target_size = spec.metric_specs[0].target_size;
    assert_eq!(target_size, 2);
    let fractional = scale
        .get_metric_spec(object(&[("targetPerReplica", "2.5")]))
        .await
        .unwrap()
        .into_inner();
    #[allow(deprecated)]
    let rounded_up = fractional.metric_specs[0].target_size;
    assert_eq!(
        (rounded_up, fractional.metric_specs[0].target_size_float),
        (3, 2.5)
    );

    // Empty queue: nothing to do, zero replicas.
    assert_eq!(
        keda_round(&mut scale, &trigger, target).await.unwrap(),
        (0.0, false, 0)
    );

    // A push subscriber (type: external-push) opened while the queue is empty
    // hears the current state at once.
    let mut push = scale
        .stream_is_active(trigger.clone())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), push.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!first.result, "the queue is empty");

    // The first request must wake KEDA within 500 ms.
    let published = Instant::now();
    publish(&js, &config, 1).await;
    let woke = next_true(&mut push, WAIT)
        .await
        .expect("StreamIsActive never said true");
    let latency = woke - published;
    println!("StreamIsActive pushed true {latency:?} after the first publish");
    assert!(
        latency < PUSH_DEADLINE,
        "push took {latency:?}, more than {PUSH_DEADLINE:?}"
    );

    publish(&js, &config, 4).await;
    let round = until("backlog 5", WAIT, async || {
        let round = keda_round(&mut scale, &trigger, target).await.unwrap();
        (round.0 == 5.0).then_some(round)
    })
    .await;
    assert_eq!(
        round,
        (5.0, true, 3),
        "5 requests at 2 per replica = 3 replicas"
    );
    assert_eq!(metric(&mut scale, &trigger, "pending").await.unwrap(), 5.0);
    assert_eq!(
        metric(&mut scale, &trigger, "in_flight").await.unwrap(),
        0.0
    );

    // Two requests being generated (delivered, not acked) still count, unless
    // includeInFlight is false.
    let taken = pull(&consumer, 2).await;
    until("2 in flight", WAIT, async || {
        (metric(&mut scale, &trigger, "in_flight").await.unwrap() == 2.0).then_some(())
    })
    .await;
    assert_eq!(metric(&mut scale, &trigger, "backlog").await.unwrap(), 5.0);
    assert_eq!(metric(&mut scale, &trigger, "pending").await.unwrap(), 3.0);
    let waiting_only = object(&[("targetPerReplica", "2"), ("includeInFlight", "false")]);
    assert_eq!(
        keda_round(&mut scale, &waiting_only, target).await.unwrap(),
        (3.0, true, 2)
    );

    // The servers finish: the backlog drains to zero and the deployment goes idle.
    ack_all(taken).await;
    ack_all(pull(&consumer, 3).await).await;
    let round = until("empty backlog", WAIT, async || {
        let round = keda_round(&mut scale, &trigger, target).await.unwrap();
        (round.0 == 0.0).then_some(round)
    })
    .await;
    assert_eq!(round, (0.0, false, 0));
    assert_eq!(
        keda_round(&mut scale, &waiting_only, target).await.unwrap(),
        (0.0, false, 0)
    );

    // Activation threshold: 2 requests are not enough to wake a deployment
    // that needs more than 2.
    publish(&js, &config, 2).await;
    let lazy = object(&[("activationThreshold", "2")]);
    until("backlog 2", WAIT, async || {
        (metric(&mut scale, &lazy, "backlog").await.unwrap() == 2.0).then_some(())
    })
    .await;
    assert!(!is_active(&mut scale, &lazy).await.unwrap());
    assert!(is_active(&mut scale, &trigger).await.unwrap());
}

#[tokio::test]
async fn bad_metadata_is_invalid_argument_and_a_missing_queue_is_not_found() {
    let nats = NatsServer::start().unwrap();
    let config = nats_config(&nats.url());
    let _queue = work_queue(&config).await;
    let scaler = Scaler::start(&["--nats-url", &nats.url()]).await.unwrap();
    let mut scale = client(&scaler).await;

    for (pairs, key) in [
        (&[("targetPerReplica", "0")][..], "targetPerReplica"),
        (&[("targetPerReplica", "many")][..], "targetPerReplica"),
        (&[("activationThreshold", "-1")][..], "activationThreshold"),
        (&[("includeInFlight", "sometimes")][..], "includeInFlight"),
        (&[("stream", "has.dots")][..], "stream"),
        (&[("consumr", "x")][..], "consumr"),
        (&[("natsUrl", "nats://somewhere-else:4222")][..], "natsUrl"),
    ] {
        let trigger = object(pairs);
        let errors = [
            scale.get_metric_spec(trigger.clone()).await.unwrap_err(),
            metric(&mut scale, &trigger, "backlog").await.unwrap_err(),
            is_active(&mut scale, &trigger).await.unwrap_err(),
            scale.stream_is_active(trigger.clone()).await.unwrap_err(),
        ];
        for status in errors {
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{pairs:?}: {status:?}"
            );
            assert!(
                status.message().contains(key),
                "{pairs:?}: message does not name {key}: {}",
                status.message()
            );
        }
    }
    let unknown_metric = scale
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&[])),
            metric_name: "s0-queue".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        unknown_metric.code(),
        Code::InvalidArgument,
        "{unknown_metric:?}"
    );

    // A missing stream or consumer is an error KEDA counts towards its
    // fallback, never a made-up zero.
    for (pairs, what) in [
        (&[("stream", "NOPE")][..], "NOPE"),
        (&[("consumer", "nobody")][..], "nobody"),
    ] {
        let trigger = object(pairs);
        let errors = [
            metric(&mut scale, &trigger, "backlog").await.unwrap_err(),
            is_active(&mut scale, &trigger).await.unwrap_err(),
            scale.stream_is_active(trigger.clone()).await.unwrap_err(),
        ];
        for status in errors {
            assert_eq!(status.code(), Code::NotFound, "{pairs:?}: {status:?}");
            assert!(status.message().contains(what), "{status:?}");
        }
    }
}

#[tokio::test]
async fn a_nats_outage_is_unavailable_and_metrics_recover_after_restart() {
    let mut nats = NatsServer::start().unwrap();
    let config = nats_config(&nats.url());
    let (js, _consumer) = work_queue(&config).await;
    publish(&js, &config, 3).await;
    let scaler = Scaler::start(&[
        "--nats-url",
        &nats.url(),
        "--stale-after-ms",
        "1000",
        "--refresh-interval-ms",
        "100",
    ])
    .await
    .unwrap();
    let mut scale = client(&scaler).await;
    let trigger = object(&[]);
    until("backlog 3", WAIT, async || {
        (metric(&mut scale, &trigger, "backlog").await.unwrap() == 3.0).then_some(())
    })
    .await;

    nats.kill();
    let killed = Instant::now();
    // Until the limit the last reading stands; after it, UNAVAILABLE. Never zero.
    let status = until("UNAVAILABLE", WAIT, async || {
        match metric(&mut scale, &trigger, "backlog").await {
            Ok(value) => {
                assert_eq!(value, 3.0, "a NATS outage must not read as an empty queue");
                None
            }
            Err(status) => Some(status),
        }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        killed.elapsed() >= Duration::from_millis(900),
        "UNAVAILABLE before the staleness limit"
    );
    assert_eq!(
        is_active(&mut scale, &trigger).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(
        scale
            .stream_is_active(trigger.clone())
            .await
            .unwrap_err()
            .code(),
        Code::Unavailable
    );

    // The broker comes back with its store: the scaler reconnects on its own.
    nats.restart().unwrap();
    let recovered = until("metrics after the restart", WAIT, async || {
        match metric(&mut scale, &trigger, "backlog").await {
            Ok(value) => Some(value),
            Err(status) if status.code() == Code::Unavailable => None,
            Err(status) => panic!("unexpected error after restart: {status:?}"),
        }
    })
    .await;
    assert_eq!(recovered, 3.0, "the queue survived the restart");
    assert!(is_active(&mut scale, &trigger).await.unwrap());
}

#[tokio::test]
async fn nats_credentials_are_used_and_wrong_ones_stop_the_scaler() {
    let nats = NatsServer::start_with_args(&["--user", "keda", "--pass", "s3cret"]).unwrap();
    let config = NatsConfig {
        url: Some(nats.url()),
        user: Some("keda".into()),
        password: Some("s3cret".into()),
        ..Default::default()
    };
    let (js, _consumer) = work_queue(&config).await;
    publish(&js, &config, 2).await;

    let scaler = Scaler::start(&[
        "--nats-url",
        &nats.url(),
        "--nats-user",
        "keda",
        "--nats-password",
        "s3cret",
    ])
    .await
    .unwrap();
    let mut scale = client(&scaler).await;
    let trigger = object(&[]);
    until("backlog 2", WAIT, async || {
        (metric(&mut scale, &trigger, "backlog").await.unwrap() == 2.0).then_some(())
    })
    .await;

    let (status, stderr) = run_to_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--nats-url",
        &nats.url(),
        "--nats-user",
        "keda",
        "--nats-password",
        "wrong",
    ]);
    assert!(!status.success(), "the scaler ran with wrong credentials");
    assert!(
        stderr.to_lowercase().contains("authorization"),
        "stderr does not say why: {stderr}"
    );

    let (status, stderr) = run_to_exit(&["--listen", "127.0.0.1:0", "--nats-url", &nats.url()]);
    assert!(!status.success(), "the scaler ran without credentials");
    assert!(
        stderr.to_lowercase().contains("authorization"),
        "stderr does not say why: {stderr}"
    );
}

#[tokio::test]
async fn bad_config_exits_naming_the_key() {
    for (args, key) in [
        (&["--nats-user", "only-a-user"][..], "nats.user"),
        (&["--nats-url", "nats://host:notaport"][..], "nats.url"),
        (&["--tls-cert", "missing.pem"][..], "tls.cert"),
        (&["--stale-after-ms", "1"][..], "stale_after_ms"),
        (&["--listen", "nowhere"][..], "listen"),
    ] {
        let (status, stderr) = run_to_exit(args);
        assert_eq!(status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{args:?}: stderr does not name {key}: {stderr}"
        );
    }
}

#[tokio::test]
async fn allowed_nats_url_overrides_reach_another_server() {
    let home = NatsServer::start().unwrap();
    let other = NatsServer::start().unwrap();
    let config = nats_config(&other.url());
    let (js, _consumer) = work_queue(&config).await;
    publish(&js, &config, 4).await;
    let scaler = Scaler::start(&["--nats-url", &home.url(), "--allow-nats-url", &other.url()])
        .await
        .unwrap();
    let mut scale = client(&scaler).await;

    // The scaler's own server has no work queue at all.
    let home_status = metric(&mut scale, &object(&[]), "backlog")
        .await
        .unwrap_err();
    assert_eq!(home_status.code(), Code::NotFound, "{home_status:?}");
    let trigger = object(&[("natsUrl", &other.url())]);
    until("backlog 4 on the other server", WAIT, async || {
        (metric(&mut scale, &trigger, "backlog").await.unwrap() == 4.0).then_some(())
    })
    .await;
}

// Multi-threaded: the clients' connections must keep running (and answer
// the scaler's GOAWAY) while the test thread waits for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_health_and_graceful_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let nats = NatsServer::start().unwrap();
    let _queue = work_queue(&nats_config(&nats.url())).await;
    let mut scaler = Scaler::start(&["--nats-url", &nats.url()]).await.unwrap();

    let mut reflection = ServerReflectionClient::new(scaler.channel().await.unwrap());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses
        .message()
        .await
        .unwrap()
        .expect("a reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "externalscaler.ExternalScaler"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "grpc.health.v1.Health"),
        "{names:?}"
    );

    let mut health = HealthClient::new(scaler.channel().await.unwrap());
    let check = health
        .check(HealthCheckRequest {
            service: "externalscaler.ExternalScaler".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.status, ServingStatus::Serving as i32);

    // An open push stream ends on SIGTERM instead of holding the shutdown
    // up for the whole grace period (5 s).
    let mut scale = client(&scaler).await;
    let mut push = scale
        .stream_is_active(object(&[]))
        .await
        .unwrap()
        .into_inner();
    assert!(push.message().await.unwrap().is_some());
    let signalled = Instant::now();
    scaler.signal(libc::SIGTERM);
    let ended = tokio::time::timeout(WAIT, push.message())
        .await
        .expect("StreamIsActive still open after SIGTERM");
    assert!(
        !matches!(ended, Ok(Some(_))),
        "StreamIsActive kept sending after SIGTERM: {ended:?}"
    );
    let status = tokio::task::block_in_place(|| scaler.0.wait_exit(WAIT)).unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?}: something held it for the grace period"
    );
}

/// A gRPC call over TLS to `addr`, optionally with the client certificate.
async fn tls_call(
    pki: &Pki,
    addr: std::net::SocketAddr,
    with_identity: bool,
) -> Result<(), String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.pem")))
        .domain_name("localhost");
    if with_identity {
        tls = tls.identity(Identity::from_pem(
            pki.read("client.pem"),
            pki.read("client.key"),
        ));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let spec = ExternalScalerClient::new(channel)
        .get_metric_spec(object(&[]))
        .await
        .map_err(|e| format!("{e:?}"))?;
    assert_eq!(spec.into_inner().metric_specs[0].metric_name, "backlog");
    Ok(())
}

#[tokio::test]
async fn grpc_tls_and_client_certificates() {
    use torchwire_integration_tests::ChildProcess;
    let pki = Pki::new("keda-operator");
    let nats = NatsServer::start().unwrap();
    let tls_args = |client_ca: bool| {
        let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--nats-url", &nats.url()]
            .map(String::from)
            .to_vec();
        args.extend([
            "--tls-cert".into(),
            pki.path("server.pem"),
            "--tls-key".into(),
            pki.path("server.key"),
        ]);
        if client_ca {
            args.extend(["--tls-client-ca".into(), pki.path("ca.pem")]);
        }
        args
    };

    // Server TLS only (KEDA's `enableTLS` + `caCert`).
    let scaler = ChildProcess::spawn("torchwire-scaler", &tls_args(false), &[]).unwrap();
    tls_call(&pki, scaler.addr, false).await.expect("TLS call");
    let plaintext = async {
        let channel = scaler.channel().await.map_err(|e| e.to_string())?;
        ExternalScalerClient::new(channel)
            .get_metric_spec(object(&[]))
            .await
            .map_err(|e| e.to_string())
    };
    assert!(
        plaintext.await.is_err(),
        "a plaintext call reached a TLS-only scaler"
    );
    drop(scaler);

    // Mutual TLS (TriggerAuthentication `tlsClientCert` / `tlsClientKey`).
    let scaler = ChildProcess::spawn("torchwire-scaler", &tls_args(true), &[]).unwrap();
    tls_call(&pki, scaler.addr, true)
        .await
        .expect("mTLS call with a client certificate");
    let refused = tls_call(&pki, scaler.addr, false).await;
    assert!(
        refused.is_err(),
        "a call without a client certificate was served"
    );
}

/// Runs torchwire-scaler with `args` until it exits (at most `WAIT`, then
/// it is killed); returns its exit status and stderr.
fn run_to_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(binary_path("torchwire-scaler"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn torchwire-scaler");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("torchwire-scaler {args:?} still running after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped stderr"), &mut stderr)
        .expect("stderr");
    (status, stderr)
}

#[tokio::test]
async fn metrics_show_the_backlog_the_scaler_reads() {
    let nats = NatsServer::start().unwrap();
    let config = nats_config(&nats.url());
    let (js, consumer) = work_queue(&config).await;
    let scaler = Scaler::start(&["--nats-url", &nats.url()]).await.unwrap();
    let admin = scaler.admin_addr();
    assert_eq!(http_status(admin, "/livez").await, 200);
    assert_eq!(http_status(admin, "/readyz").await, 200);
    let queue = [
        ("stream", config.stream.as_str()),
        ("consumer", config.consumer.as_str()),
    ];
    let reading = async |pending: f64, in_flight: f64| {
        until("the backlog on /metrics", WAIT, async || {
            let m = Metrics::scrape(admin).await.unwrap();
            (m.value("inference_queue_length", &queue) == Some(pending)
                && m.value("inference_queue_in_flight", &queue) == Some(in_flight))
            .then_some(m)
        })
        .await
    };
    // The configured consumer is reported before any trigger asks for it.
    let empty = reading(0.0, 0.0).await;
    assert!(
        empty.has_type("inference_queue_length", "gauge"),
        "{}",
        empty.text
    );
    assert!(empty.value("process_resident_memory_bytes", &[]).unwrap() > 0.0);

    // Published and not consumed: waiting.
    publish(&js, &config, 5).await;
    reading(5.0, 0.0).await;
    // Pulled, not acknowledged: in flight.
    let pulled = pull(&consumer, 2).await;
    reading(3.0, 2.0).await;
    ack_all(pulled).await;
    reading(3.0, 0.0).await;
}
