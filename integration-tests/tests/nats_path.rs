//! End-to-end tests of the server's NATS JetStream request path, against a
//! real nats-server: backlog, malformed messages, SIGKILL and SIGTERM of a
//! server mid-generation, and a broker restart. Nothing may be lost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use prost::Message as _;
use torchwire_integration_tests::{tagged_request as request, NatsServer, Server};
use torchwire_nats::{codec, headers, Encoding, NatsConfig};
use torchwire_proto::v1::{GenerateRequest, GenerateResponse};

/// Long enough for the slowest CI machine; conditions are polled, not slept on.
const WAIT: Duration = Duration::from_secs(180);

/// One response as the subscriber saw it.
#[derive(Clone, Debug)]
struct Seen {
    seq: u64,
    delivery: u64,
    last: bool,
    response: GenerateResponse,
}

/// Collects every response published under `replies.>`, by reply subject.
#[derive(Clone, Default)]
struct Replies(Arc<Mutex<BTreeMap<String, Vec<Seen>>>>);

impl Replies {
    async fn subscribe(client: &async_nats::Client) -> Self {
        let replies = Self::default();
        let mut sub = client.subscribe("replies.>").await.unwrap();
        client.flush().await.unwrap();
        let store = replies.0.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let h = msg.headers.clone().unwrap_or_default();
                let get = |name: &str| {
                    h.get(name)
                        .map(|v| v.as_str().to_string())
                        .unwrap_or_default()
                };
                let encoding = Encoding::from_headers(msg.headers.as_ref());
                let seen = Seen {
                    seq: get(headers::SEQUENCE).parse().unwrap(),
                    delivery: get("Torchwire-Delivery").parse().unwrap_or(1),
                    last: get(headers::FINAL) == headers::TRUE,
                    response: codec::decode_response(&msg.payload, encoding).unwrap(),
                };
                store
                    .lock()
                    .unwrap()
                    .entry(msg.subject.to_string())
                    .or_default()
                    .push(seen);
            }
        });
        replies
    }

    fn get(&self, reply: &str) -> Vec<Seen> {
        self.0
            .lock()
            .unwrap()
            .get(reply)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `cond` holds for the collected responses.
    async fn wait_for(&self, what: &str, cond: impl Fn(&BTreeMap<String, Vec<Seen>>) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if cond(&self.0.lock().unwrap()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The complete answer of one reply subject: the last delivery's messages
/// form the sequence 0..n ending in a final one. Returns its token count.
fn complete_tokens(seen: &[Seen]) -> Option<usize> {
    let delivery = seen.iter().map(|s| s.delivery).max()?;
    let mut msgs: Vec<&Seen> = seen.iter().filter(|s| s.delivery == delivery).collect();
    msgs.sort_by_key(|s| s.seq);
    let contiguous = msgs.iter().enumerate().all(|(i, s)| s.seq == i as u64);
    let final_ok = msgs
        .last()
        .is_some_and(|s| s.last && s.response.error.is_none());
    (contiguous && final_ok).then(|| msgs.iter().map(|s| s.response.token_ids.len()).sum())
}

fn finals(seen: &[Seen]) -> usize {
    seen.iter().filter(|s| s.last).count()
}

fn queue_config(nats: &NatsServer, ack_wait_secs: u64) -> NatsConfig {
    NatsConfig {
        url: Some(nats.url()),
        ack_wait_secs,
        ..NatsConfig::default()
    }
}

async fn publish(
    js: &jetstream::Context,
    subject: &str,
    req: &GenerateRequest,
    reply: &str,
    encoding: Encoding,
) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::REPLY_TO, reply);
    h.insert(headers::CONTENT_TYPE, encoding.content_type());
    h.insert("Nats-Msg-Id", reply);
    js.publish_with_headers(subject.to_string(), h, codec::encode_request(req, encoding))
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn consumer_info(js: &jetstream::Context, cfg: &NatsConfig) -> jetstream::consumer::Info {
    let stream = js.get_stream(&cfg.stream).await.unwrap();
    stream.consumer_info(&cfg.consumer).await.unwrap()
}

async fn consumer_counts(js: &jetstream::Context, cfg: &NatsConfig) -> (u64, usize) {
    let info = consumer_info(js, cfg).await;
    (info.num_pending, info.num_ack_pending)
}

/// Waits until the consumer's info satisfies `done`; `describe` says what
/// it was instead if it never does.
async fn wait_consumer(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    done: impl Fn(&jetstream::consumer::Info) -> bool,
    describe: impl Fn(&jetstream::consumer::Info) -> String,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = consumer_info(js, cfg).await;
        if done(&info) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            describe(&info)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_counts(js: &jetstream::Context, cfg: &NatsConfig, want: (u64, usize)) {
    let counts = |info: &jetstream::consumer::Info| (info.num_pending, info.num_ack_pending);
    wait_consumer(
        js,
        cfg,
        |info| counts(info) == want,
        |info| {
            format!(
                "consumer (pending, ack pending) = {:?}, want {want:?}",
                counts(info)
            )
        },
    )
    .await;
}

/// The queue as an operator would set it up before any server runs.
async fn setup(
    nats: &NatsServer,
    ack_wait_secs: u64,
) -> (async_nats::Client, jetstream::Context, NatsConfig, Replies) {
    let cfg = queue_config(nats, ack_wait_secs);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    torchwire_nats::ensure_work_queue(&js, &cfg).await.unwrap();
    let replies = Replies::subscribe(&client).await;
    (client, js, cfg, replies)
}

async fn start_server(nats: &NatsServer, ack_wait_secs: u64, extra: &[&str]) -> Server {
    start_server_with(nats, ack_wait_secs, extra, &[]).await
}

/// A server with extra flags and `TORCHWIRE_*` variables.
async fn start_server_with(
    nats: &NatsServer,
    ack_wait_secs: u64,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Server {
    let mut flags = vec!["--nats-url", nats.url().leak() as &str];
    flags.extend_from_slice(extra);
    let ack = ack_wait_secs.to_string();
    let mut all = vec![("TORCHWIRE_NATS_ACK_WAIT_SECS", ack.as_str())];
    all.extend_from_slice(env);
    Server::start_with_env(&Server::default_args(&flags), &all)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_backlog_is_served_once_a_server_starts() {
    let nats = NatsServer::start().unwrap();
    let (_client, js, cfg, replies) = setup(&nats, 30).await;
    for i in 0..6 {
        let encoding = if i % 2 == 0 {
            Encoding::Protobuf
        } else {
            Encoding::Json
        };
        publish(
            &js,
            &cfg.subject,
            &request(&format!("b{i}"), 12),
            &format!("replies.b{i}"),
            encoding,
        )
        .await;
    }
    assert_eq!(
        consumer_counts(&js, &cfg).await,
        (6, 0),
        "the backlog waits in the stream"
    );

    let _server = start_server(&nats, 30, &[]).await;
    replies
        .wait_for("six complete replies", |m| {
            m.len() == 6 && m.values().all(|s| complete_tokens(s) == Some(12))
        })
        .await;
    for i in 0..6 {
        let seen = replies.get(&format!("replies.b{i}"));
        assert_eq!(finals(&seen), 1);
        assert!(seen
            .iter()
            .all(|s| s.response.request_id == format!("b{i}")));
        assert!(seen.iter().all(|s| s.delivery == 1));
    }
    wait_counts(&js, &cfg, (0, 0)).await;
}

#[tokio::test]
async fn malformed_and_invalid_requests_get_an_error_reply_and_are_terminated() {
    let nats = NatsServer::start().unwrap();
    let (client, js, cfg, replies) = setup(&nats, 30).await;
    let _server = start_server(&nats, 30, &[]).await;

    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::REPLY_TO, "replies.garbage");
    h.insert(headers::CONTENT_TYPE, headers::JSON);
    js.publish_with_headers(cfg.subject.clone(), h, "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let bad = GenerateRequest {
        temperature: -1.0,
        ..request("bad", 4)
    };
    publish(&js, &cfg.subject, &bad, "replies.bad", Encoding::Protobuf).await;
    // A request with nowhere to reply to is terminated too.
    js.publish(
        cfg.subject.clone(),
        request("lost", 4).encode_to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    publish(
        &js,
        &cfg.subject,
        &request("good", 4),
        "replies.good",
        Encoding::Protobuf,
    )
    .await;

    replies
        .wait_for("error replies and the good one", |m| {
            ["replies.garbage", "replies.bad", "replies.good"]
                .iter()
                .all(|k| m.get(*k).is_some_and(|s| finals(s) == 1))
        })
        .await;
    let garbage = replies.get("replies.garbage");
    let err = garbage[0]
        .response
        .error
        .clone()
        .expect("an error response");
    assert_eq!(err.code, tonic::Code::InvalidArgument as i32);
    let bad = replies.get("replies.bad");
    let err = bad[0].response.error.clone().expect("an error response");
    assert_eq!(err.code, tonic::Code::InvalidArgument as i32);
    assert!(err.message.starts_with("temperature"), "{}", err.message);
    assert_eq!(complete_tokens(&replies.get("replies.good")), Some(4));
    wait_counts(&js, &cfg, (0, 0)).await;
    let info = js
        .get_stream(&cfg.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(info, 0, "terminated messages must not stay in the stream");
    drop(client);
}

#[tokio::test]
async fn sigkill_mid_generation_loses_nothing() {
    let nats = NatsServer::start().unwrap();
    let (_client, js, cfg, replies) = setup(&nats, 2).await;
    let first = start_server(&nats, 2, &["--max-batch-size", "4"]).await;
    for i in 0..4 {
        publish(
            &js,
            &cfg.subject,
            &request(&format!("k{i}"), 160),
            &format!("replies.k{i}"),
            Encoding::Protobuf,
        )
        .await;
    }
    replies
        .wait_for("every request started", |m| m.len() == 4)
        .await;
    first.signal(libc::SIGKILL);
    drop(first);
    // A second server picks them up after ack_wait (2 s).
    let _second = start_server(&nats, 2, &["--max-batch-size", "4"]).await;
    replies
        .wait_for("every request complete", |m| {
            m.len() == 4 && m.values().all(|s| complete_tokens(s) == Some(160))
        })
        .await;
    for i in 0..4 {
        let seen = replies.get(&format!("replies.k{i}"));
        assert_eq!(finals(&seen), 1, "k{i} answered more than once");
        assert!(
            seen.iter().any(|s| s.delivery >= 2 && s.last),
            "k{i}: the final answer comes from a redelivery"
        );
    }
    wait_counts(&js, &cfg, (0, 0)).await;
}

#[tokio::test]
async fn sigterm_finishes_or_gives_back_everything() {
    let nats = NatsServer::start().unwrap();
    let (_client, js, cfg, replies) = setup(&nats, 30).await;
    let mut server = start_server(
        &nats,
        30,
        // No grace: the long requests (0.8 s of work) cannot finish.
        &["--max-batch-size", "2", "--shutdown-grace", "0"],
    )
    .await;
    // Two long requests fill the batch; three short ones wait in the stream.
    for i in 0..2 {
        publish(
            &js,
            &cfg.subject,
            &request(&format!("long{i}"), 400),
            &format!("replies.long{i}"),
            Encoding::Protobuf,
        )
        .await;
    }
    replies
        .wait_for("both long requests started", |m| m.len() == 2)
        .await;
    for i in 0..3 {
        publish(
            &js,
            &cfg.subject,
            &request(&format!("short{i}"), 8),
            &format!("replies.short{i}"),
            Encoding::Protobuf,
        )
        .await;
    }
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status:?}");
    // What the server could not finish within the grace period was nak'ed,
    // so it can be pulled again at once, long before ack_wait (30 s) runs
    // out; with the requests never pulled, that is everything unanswered.
    let long_open = (0..2)
        .filter(|i| finals(&replies.get(&format!("replies.long{i}"))) == 0)
        .count();
    let short_open = (0..3)
        .filter(|i| finals(&replies.get(&format!("replies.short{i}"))) == 0)
        .count();
    let unanswered = long_open + short_open;
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(&cfg.stream)
        .await
        .unwrap()
        .get_consumer(&cfg.consumer)
        .await
        .unwrap();
    let mut available = consumer
        .batch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut taken = Vec::new();
    while let Some(msg) = available.next().await {
        taken.push(msg.unwrap());
    }
    assert_eq!(
        taken.len(),
        unanswered,
        "every unfinished request must be available again at once"
    );
    for msg in taken {
        msg.ack_with(jetstream::AckKind::Nak(None)).await.unwrap();
    }

    let _next = start_server(&nats, 30, &["--max-batch-size", "2"]).await;
    replies
        .wait_for("all five complete", |m| {
            m.len() == 5
                && m.iter().all(|(k, s)| {
                    complete_tokens(s) == Some(if k.contains("long") { 400 } else { 8 })
                })
        })
        .await;
    wait_counts(&js, &cfg, (0, 0)).await;
}

#[tokio::test]
async fn a_broker_restart_during_a_run_loses_no_request() {
    let mut nats = NatsServer::start().unwrap();
    let (client, js, cfg, replies) = setup(&nats, 3).await;
    let _server = start_server(&nats, 3, &["--max-batch-size", "4"]).await;
    for i in 0..6 {
        publish(
            &js,
            &cfg.subject,
            &request(&format!("r{i}"), 64),
            &format!("replies.r{i}"),
            Encoding::Protobuf,
        )
        .await;
    }
    replies.wait_for("work under way", |m| !m.is_empty()).await;
    nats.restart().unwrap();
    // Our own subscriber must be back before results can be seen again.
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.connection_state() != async_nats::connection::State::Connected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "test client did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every request is eventually acknowledged: none stays in the stream...
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = js
            .get_stream(&cfg.stream)
            .await
            .map(|mut s| async move { s.info().await.map(|i| i.state.messages) });
        if let Ok(fut) = info {
            if let Ok(0) = fut.await {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests left in the stream after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and each was answered in full at least once.
    for i in 0..6 {
        let seen = replies.get(&format!("replies.r{i}"));
        assert!(seen.iter().any(|s| s.last), "r{i} never got a final answer");
    }
}

/// Waits until the stream holds no message (each was acked or terminated).
async fn wait_stream_empty(js: &jetstream::Context, cfg: &NatsConfig) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = js.get_stream(&cfg.stream).await.unwrap();
        let left = stream.info().await.unwrap().state.messages;
        if left == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} messages left in the stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_poisoned_replica_leaves_and_a_healthy_one_answers_every_request() {
    let nats = NatsServer::start().unwrap();
    let (_client, js, cfg, replies) = setup(&nats, 30).await;
    let retry = [("TORCHWIRE_NATS_RETRY_DELAY_MS", "100")];
    let mut poisoned = start_server_with(
        &nats,
        30,
        &["--max-batch-size", "4"],
        &[
            ("TORCHWIRE_DEBUG_FAULT", "fail-generate"),
            ("TORCHWIRE_MAX_ENGINE_FAILURES", "3"),
            retry[0],
        ],
    )
    .await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(poisoned.channel().await.unwrap());
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Published while only the poisoned replica pulls: it takes them first.
    let n = 8;
    for i in 0..n {
        publish(
            &js,
            &cfg.subject,
            &request(&format!("p{i}"), 12),
            &format!("replies.p{i}"),
            Encoding::Protobuf,
        )
        .await;
    }
    let _healthy = start_server_with(&nats, 30, &["--max-batch-size", "4"], &retry).await;

    let status = tokio::task::spawn_blocking(move || {
        let status = poisoned.wait_exit(WAIT);
        (poisoned, status)
    })
    .await
    .unwrap()
    .1
    .unwrap();
    assert!(
        !status.success(),
        "a replica whose engine keeps failing must exit non-zero: {status:?}"
    );
    let mut statuses = Vec::new();
    while let Ok(Some(msg)) = watch.message().await {
        statuses.push(msg.status);
    }
    assert!(
        statuses
            .contains(&(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)),
        "health must turn NOT_SERVING before the exit: {statuses:?}"
    );

    replies
        .wait_for("every request complete", |m| {
            m.len() == n && m.values().all(|s| complete_tokens(s) == Some(12))
        })
        .await;
    let mut redelivered = 0;
    for i in 0..n {
        let seen = replies.get(&format!("replies.p{i}"));
        assert_eq!(finals(&seen), 1, "p{i}: exactly one final outcome");
        assert!(
            seen.iter().all(|s| s.response.error.is_none()),
            "p{i}: {seen:?}"
        );
        redelivered += usize::from(seen.iter().any(|s| s.delivery >= 2));
    }
    assert!(
        redelivered >= 3,
        "the poisoned replica's failures ({redelivered}) must be redelivered, not answered"
    );
    wait_counts(&js, &cfg, (0, 0)).await;
}

#[tokio::test]
async fn the_last_delivery_answers_with_the_error_and_a_model_is_left_for_its_replica() {
    // The order of events is fixed, not left to which replica's pull the
    // broker serves next (two replicas pulling side by side do not share
    // redeliveries fairly on a loaded machine): replica B, which serves the
    // bundled files as "other", takes the whole backlog first and gives back
    // what it does not serve; it scales down; replica A, which serves
    // torchwire-tiny, answers what was left for it.
    let nats = NatsServer::start().unwrap();
    let (_client, js, cfg, replies) = setup(&nats, 30).await;
    let env = [
        ("TORCHWIRE_NATS_MAX_DELIVER", "20"),
        ("TORCHWIRE_NATS_RETRY_DELAY_MS", "50"),
        ("TORCHWIRE_NATS_RETRY_DELAY_MAX_MS", "200"),
    ];
    let model = torchwire_integration_tests::bundled_model()
        .display()
        .to_string();
    let nats_url = nats.url();
    // B gives a request back for two seconds so it spends few of the 20
    // deliveries before it stops.
    let b_env = [
        ("TORCHWIRE_NATS_MAX_DELIVER", "20"),
        ("TORCHWIRE_NATS_RETRY_DELAY_MS", "2000"),
        ("TORCHWIRE_NATS_RETRY_DELAY_MAX_MS", "2000"),
        ("TORCHWIRE_NATS_ACK_WAIT_SECS", "30"),
        ("TORCHWIRE_MODELS__OTHER__PATH", model.as_str()),
    ];
    let mut b = Server::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--nats-url",
            nats_url.as_str(),
        ]
        .map(String::from),
        &b_env,
    )
    .await
    .unwrap();

    let n = 6;
    for i in 0..n {
        for model in ["other", "torchwire-tiny"] {
            let req = GenerateRequest {
                model: model.into(),
                ..request(&format!("{model}-{i}"), 6)
            };
            publish(
                &js,
                &cfg.subject,
                &req,
                &format!("replies.{model}-{i}"),
                Encoding::Protobuf,
            )
            .await;
        }
    }
    let ghost = GenerateRequest {
        model: "ghost".into(),
        ..request("ghost", 6)
    };
    publish(
        &js,
        &cfg.subject,
        &ghost,
        "replies.ghost",
        Encoding::Protobuf,
    )
    .await;

    // B answers its own model and gives back every other request, each of
    // which comes round again (is redelivered) at least once.
    replies
        .wait_for("B's answers", |m| {
            (0..n).all(|i| {
                m.get(&format!("replies.other-{i}"))
                    .is_some_and(|s| finals(s) >= 1)
            })
        })
        .await;
    wait_consumer(
        &js,
        &cfg,
        |info| info.num_redelivered > n,
        |info| format!("B gave back {} of {} requests", info.num_redelivered, n + 1),
    )
    .await;
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(WAIT).unwrap().success());
    assert!(
        replies.get("replies.ghost").is_empty()
            && (0..n).all(|i| replies
                .get(&format!("replies.torchwire-tiny-{i}"))
                .is_empty()),
        "B answered nothing it does not serve"
    );

    let _a = start_server_with(&nats, 30, &[], &env).await;
    replies
        .wait_for("every request answered", |m| {
            m.len() == 2 * n + 1 && m.values().all(|s| finals(s) >= 1)
        })
        .await;
    for i in 0..n {
        for model in ["other", "torchwire-tiny"] {
            let seen = replies.get(&format!("replies.{model}-{i}"));
            assert_eq!(finals(&seen), 1, "{model}-{i}");
            assert_eq!(complete_tokens(&seen), Some(6), "{model}-{i}: {seen:?}");
            assert!(
                seen.iter().all(|s| s.response.model == model),
                "{model}-{i}: {seen:?}"
            );
        }
        // Left by B, answered by A on a later delivery.
        let seen = replies.get(&format!("replies.torchwire-tiny-{i}"));
        assert!(seen.iter().all(|s| s.delivery >= 2), "{seen:?}");
    }
    // A model nobody serves ends, on the last delivery, with NOT_FOUND.
    let seen = replies.get("replies.ghost");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].last);
    assert_eq!(seen[0].delivery, 20);
    let err = seen[0].response.error.clone().expect("an error");
    assert_eq!(err.code, tonic::Code::NotFound as i32, "{err:?}");
    assert!(
        err.message.contains("ghost") && err.message.contains("max_deliver"),
        "{}",
        err.message
    );
    wait_stream_empty(&js, &cfg).await;
}

#[tokio::test]
async fn hostile_headers_get_no_reply_or_a_clean_error() {
    let nats = NatsServer::start().unwrap();
    let (client, js, cfg, replies) = setup(&nats, 30).await;
    // Every subject anything is published to, outside JetStream's own.
    let published = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut all = client.subscribe(">").await.unwrap();
    client.flush().await.unwrap();
    tokio::spawn({
        let published = published.clone();
        async move {
            while let Some(msg) = all.next().await {
                published.lock().unwrap().push(msg.subject.to_string());
            }
        }
    });
    let _server = start_server_with(
        &nats,
        30,
        &[],
        &[("TORCHWIRE_NATS_REPLY_PREFIX", "replies.")],
    )
    .await;

    let raw = |reply: Vec<&str>, id: Option<&str>, body: GenerateRequest| {
        let js = js.clone();
        let subject = cfg.subject.clone();
        let mut h = async_nats::HeaderMap::new();
        for r in reply {
            h.append(headers::REPLY_TO, r);
        }
        if let Some(id) = id {
            h.insert(headers::REQUEST_ID, id);
        }
        async move {
            js.publish_with_headers(subject, h, body.encode_to_vec().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let huge = format!("replies.{}", "x".repeat(400));
    // Nowhere safe to answer: terminated without any reply.
    for reply in [
        "replies.*",
        "replies.>",
        ">",
        "replies.a b",
        "replies..x",
        huge.as_str(),
        "$JS.API.STREAM.DELETE.TORCHWIRE",
        "torchwire.generate",
        "other.x",
    ] {
        raw(vec![reply], None, request("unanswerable", 4)).await;
    }
    raw(vec!["replies.one", "replies.two"], None, request("two", 4)).await;
    // Answerable, but the id would inject headers or flood logs: a clean error.
    raw(
        vec!["replies.crlf"],
        None,
        request("id\r\nTorchwire-Final: true", 4),
    )
    .await;
    raw(vec!["replies.nul"], None, request("id\0x", 4)).await;
    raw(vec!["replies.long"], None, request(&"i".repeat(10_000), 4)).await;
    raw(vec!["replies.esc"], Some("id\u{1b}[2J"), request("", 4)).await;
    raw(vec!["replies.good"], Some("good"), request("", 4)).await;

    replies
        .wait_for("the error replies and the good one", |m| {
            [
                "replies.crlf",
                "replies.nul",
                "replies.long",
                "replies.esc",
                "replies.good",
            ]
            .iter()
            .all(|k| m.get(*k).is_some_and(|s| finals(s) == 1))
        })
        .await;
    wait_stream_empty(&js, &cfg).await;
    for (reply, field) in [
        ("replies.crlf", "request_id"),
        ("replies.nul", "request_id"),
        ("replies.long", "request_id"),
        ("replies.esc", headers::REQUEST_ID),
    ] {
        let seen = replies.get(reply);
        assert_eq!(seen.len(), 1, "{reply}: {seen:?}");
        let err = seen[0].response.error.clone().expect("an error reply");
        assert_eq!(err.code, tonic::Code::InvalidArgument as i32, "{reply}");
        assert!(err.message.starts_with(field), "{reply}: {}", err.message);
        assert_eq!(
            seen[0].response.request_id, "",
            "{reply}: the bad id is not echoed"
        );
    }
    assert_eq!(complete_tokens(&replies.get("replies.good")), Some(4));
    assert!(seen_ids_are_clean(&replies));
    // The stream was not deleted through a reply subject...
    js.get_stream(&cfg.stream).await.unwrap();
    // ...and nothing was published anywhere but the accepted reply subjects.
    let mut subjects: Vec<String> = published
        .lock()
        .unwrap()
        .iter()
        .filter(|s| !s.starts_with('$') && !s.starts_with("_INBOX.") && *s != &cfg.subject)
        .cloned()
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(
        subjects,
        [
            "replies.crlf",
            "replies.esc",
            "replies.good",
            "replies.long",
            "replies.nul"
        ],
    );
}

/// No response carries a request id with a control character.
fn seen_ids_are_clean(replies: &Replies) -> bool {
    replies
        .0
        .lock()
        .unwrap()
        .values()
        .flatten()
        .all(|s| !s.response.request_id.chars().any(char::is_control))
}
