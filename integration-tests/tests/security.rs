//! End-to-end tests of the inference port's security and limits: TLS with
//! certificate rotation and mutual TLS, bearer tokens, deadlines, the queue
//! wait limit, the idle timeout and the richer error details, against the
//! real server binary and the bundled model.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt;
use torchwire_integration_tests::{binary_path, model_stats, ChildProcess, Pki, Server};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{GenerateRequest, GetStatsRequest, ListModelsRequest, TokenizeRequest};

/// How long a reload or a server state change may take to show.
const WAIT: Duration = Duration::from_secs(60);

const TOKEN: &str = "test-token-0123456789abcdef";
const ENV_TOKEN: &str = "env-token-fedcba9876543210";

fn request(prompt: &str, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens: Some(max_new_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Starts the server with `args` after the defaults, without waiting.
fn spawn(args: &[&str], envs: &[(&str, &str)]) -> ChildProcess {
    let mut all = vec![("RUST_LOG", "info")];
    all.extend_from_slice(envs);
    ChildProcess::spawn("torchwire-server", &Server::default_args(args), &all).unwrap()
}

/// A TLS channel trusting `ca`, with a client certificate when given.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &[u8],
    identity: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// Waits until the server behind `channel` reports SERVING.
async fn wait_serving(channel: Channel) {
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let serving = async {
        while let Some(resp) = watch.message().await.unwrap() {
            if resp.status == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("health watch ended");
    };
    tokio::time::timeout(WAIT, serving)
        .await
        .expect("not SERVING in time");
}

/// The certificate the server presents to a client trusting `ca` (with
/// `client` as its certificate), or the handshake's error.
async fn presented_certificate(
    addr: std::net::SocketAddr,
    ca: &[u8],
    client: (&[u8], &[u8]),
) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &*ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = rustls_pemfile::certs(&mut &*client.0)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &*client.1)
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    Ok(session.peer_certificates().unwrap()[0].to_vec())
}

/// Polls `check` until it returns true, at most [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn mutual_tls_serves_rotated_certificates_after_sighup_and_refuses_bad_clients() {
    let pki = Pki::new("client");
    let other = Pki::new("client");
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    // No polling: only SIGHUP rereads the files here.
    let server = spawn(
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
        &[("TORCHWIRE_RELOAD_INTERVAL_SECS", "0")],
    );
    let ca = pki.read("ca.pem");
    let identity = || Some((pki.read("client.pem"), pki.read("client.key")));
    let channel = tls_channel(server.addr, &ca, identity()).await.unwrap();
    wait_serving(channel.clone()).await;

    // A client with a certificate from the right CA is served.
    let mut c = InferenceClient::new(channel);
    let done = c.complete(request("Hello", 2)).await.unwrap().into_inner();
    assert_eq!(done.token_ids.len(), 2);

    // Plaintext gets nothing.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        let err = HealthClient::new(plain)
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Ok);
    }
    // Without a client certificate the handshake or the first call fails.
    if let Ok(anonymous) = tls_channel(server.addr, &ca, None).await {
        let err = HealthClient::new(anonymous)
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Ok, "{err:?}");
    }
    // A client that trusts another CA refuses the server.
    let wrong = tls_channel(
        server.addr,
        &other.read("ca.pem"),
        Some((other.read("client.pem"), other.read("client.key"))),
    )
    .await;
    assert!(wrong.is_err(), "a client trusting another CA connected");

    // Rotation: new files are served after SIGHUP, to new connections.
    let (client_pem, client_key) = (pki.read("client.pem"), pki.read("client.key"));
    let client = (client_pem.as_slice(), client_key.as_slice());
    let before = presented_certificate(server.addr, &ca, client)
        .await
        .unwrap();
    let rotated = pki.reissue_server("rotated", false);
    assert_ne!(before, rotated);
    assert_eq!(
        presented_certificate(server.addr, &ca, client)
            .await
            .unwrap(),
        before,
        "reloaded without SIGHUP although polling is off"
    );
    server.signal(libc::SIGHUP);
    eventually("the rotated certificate is served", || async {
        presented_certificate(server.addr, &ca, client).await.ok() == Some(rotated.clone())
    })
    .await;
    // The connection opened before the rotation still works.
    let done = c.complete(request("Again", 2)).await.unwrap().into_inner();
    assert_eq!(done.token_ids.len(), 2);

    // An expired certificate is refused by clients.
    pki.reissue_server("expired", true);
    server.signal(libc::SIGHUP);
    eventually("the expired certificate is served", || async {
        match presented_certificate(server.addr, &ca, client).await {
            Err(e) => e.to_lowercase().contains("expired"),
            Ok(_) => false,
        }
    })
    .await;
    let refused = tls_channel(server.addr, &ca, identity()).await;
    assert!(refused.is_err(), "a client accepted an expired certificate");
}

#[tokio::test]
async fn a_tls_certificate_change_is_picked_up_without_a_signal() {
    let pki = Pki::new("client");
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let server = spawn(
        &["--tls-cert", &cert, "--tls-key", &key],
        &[("TORCHWIRE_RELOAD_INTERVAL_SECS", "1")],
    );
    let ca = pki.read("ca.pem");
    wait_serving(tls_channel(server.addr, &ca, None).await.unwrap()).await;
    let (client_pem, client_key) = (pki.read("client.pem"), pki.read("client.key"));
    let client = (client_pem.as_slice(), client_key.as_slice());
    let rotated = pki.reissue_server("rotated", false);
    eventually("the changed certificate is served", || async {
        presented_certificate(server.addr, &ca, client).await.ok() == Some(rotated.clone())
    })
    .await;
}

/// `message` with `authorization: <value>`.
fn with_auth<T>(message: T, value: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", value.parse().unwrap());
    r
}

#[tokio::test]
async fn tokens_guard_every_inference_call_but_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("# clients\n{TOKEN}\n")).unwrap();
    let tokens_path = tokens.display().to_string();
    let server = spawn(
        &["--auth-tokens-file", &tokens_path],
        &[
            ("TORCHWIRE_AUTH_TOKEN", ENV_TOKEN),
            ("TORCHWIRE_RELOAD_INTERVAL_SECS", "0"),
        ],
    );
    // Health is open: the harness's own wait works without a token.
    server.wait_serving("").await.unwrap();
    let mut c = InferenceClient::new(server.channel().await.unwrap());

    let bearer = |t: &str| format!("Bearer {t}");
    for (what, value) in [
        ("no token", None),
        (
            "a wrong token",
            Some(bearer("wrong-token-0123456789abcdef")),
        ),
        ("another scheme", Some(format!("Basic {TOKEN}"))),
        ("a token prefix", Some(bearer(&TOKEN[..TOKEN.len() - 1]))),
    ] {
        fn req<T>(m: T, value: &Option<String>) -> tonic::Request<T> {
            match value {
                Some(v) => with_auth(m, v),
                None => tonic::Request::new(m),
            }
        }
        let statuses = [
            c.generate(req(request("Hi", 2), &value)).await.err(),
            c.complete(req(request("Hi", 2), &value)).await.err(),
            c.list_models(req(ListModelsRequest {}, &value)).await.err(),
            c.tokenize(req(
                TokenizeRequest {
                    text: "hi".into(),
                    ..Default::default()
                },
                &value,
            ))
            .await
            .err(),
            c.get_stats(req(GetStatsRequest::default(), &value))
                .await
                .err(),
        ];
        for status in statuses {
            let status = status.unwrap_or_else(|| panic!("{what}: a call went through"));
            assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
            assert!(
                !status.message().contains(TOKEN) && !status.message().contains("0123456789"),
                "{what}: the token is echoed: {status:?}"
            );
        }
    }

    // Nothing was queued or generated for the refused calls.
    let stats = c
        .get_stats(with_auth(GetStatsRequest::default(), &bearer(TOKEN)))
        .await
        .unwrap()
        .into_inner()
        .models
        .remove(0);
    assert_eq!(
        (
            stats.tokens_generated,
            stats.prefills,
            stats.requests_finished
        ),
        (0, 0, 0),
        "{stats:?}"
    );

    // The file's token and the variable's token both work.
    for token in [TOKEN, ENV_TOKEN] {
        let mut stream = c
            .generate(with_auth(request("Hi", 3), &bearer(token)))
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(m) = stream.next().await {
            n += m.unwrap().token_ids.len();
        }
        assert_eq!(n, 3);
    }

    // Reflection is not open by default.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            server.channel().await.unwrap(),
        );
    let list = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let err = reflection
        .server_reflection_info(futures::stream::iter([list]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The CLI sends the token from --token, TORCHWIRE_TOKEN or --token-file.
    let token_file = dir.path().join("cli-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let addr = server.url();
    let cli = |args: Vec<String>, env: Option<&str>| {
        let mut cmd = std::process::Command::new(binary_path("torchwire"));
        cmd.arg("--addr")
            .arg(&addr)
            .args(args)
            .env_remove("TORCHWIRE_TOKEN");
        if let Some(token) = env {
            cmd.env("TORCHWIRE_TOKEN", token);
        }
        cmd.output().unwrap()
    };
    let models = || vec!["models".to_string()];
    let denied = cli(models(), None);
    assert_eq!(denied.status.code(), Some(7), "{denied:?}");
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
    let mut flag = models();
    flag.extend(["--token".to_string(), TOKEN.to_string()]);
    let mut file = models();
    file.extend(["--token-file".to_string(), token_file.display().to_string()]);
    for (args, env) in [(flag, None), (models(), Some(ENV_TOKEN)), (file, None)] {
        let out = cli(args.clone(), env);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !all.contains(TOKEN) && !all.contains(ENV_TOKEN),
            "echoed: {all}"
        );
    }

    // SIGHUP rereads the token file: the old token stops working.
    let rotated = "rotated-token-0123456789abcdef";
    std::fs::write(&tokens, format!("{rotated}\n")).unwrap();
    server.signal(libc::SIGHUP);
    eventually("the rotated token is accepted", || {
        let mut c = c.clone();
        async move {
            c.list_models(with_auth(
                ListModelsRequest {},
                &format!("Bearer {rotated}"),
            ))
            .await
            .is_ok()
        }
    })
    .await;
    let err = c
        .list_models(with_auth(ListModelsRequest {}, &bearer(TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_passed_deadline_ends_the_call_and_frees_its_slot() {
    let server = Server::start(&["--max-batch-size", "1"]).await.unwrap();
    let mut c = InferenceClient::new(server.channel().await.unwrap());
    let context = 512u32;

    // A stream: the deadline passes long before 500 tokens are generated.
    let mut req = tonic::Request::new(request("Once upon a time", context - 12));
    req.set_timeout(Duration::from_millis(300));
    let ended = match c.generate(req).await {
        Err(status) => status,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => break status,
                    None => panic!("the stream ended without an error"),
                }
            }
        }
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");

    // A unary call the same way. The server answers DEADLINE_EXCEEDED; a
    // tonic client also runs the deadline itself and may give up first
    // with its own CANCELLED ("Timeout expired"): either way the
    // generation must stop.
    let mut req = tonic::Request::new(request("Once upon a time", context - 12));
    req.set_timeout(Duration::from_millis(300));
    let err = c.complete(req).await.unwrap_err();
    assert!(
        err.code() == Code::DeadlineExceeded
            || (err.code() == Code::Cancelled && err.message().contains("Timeout expired")),
        "{err:?}"
    );

    // The engine dropped both at its next step: nothing runs, both count
    // as cancelled, none finished.
    eventually("the slot is free", || {
        let mut c = c.clone();
        async move {
            let s = model_stats(&mut c).await;
            s.running == 0 && s.requests_cancelled == 2
        }
    })
    .await;
    let s = model_stats(&mut c).await;
    assert_eq!(s.requests_finished, 0, "{s:?}");
    // And the slot serves the next request.
    let done = c.complete(request("Next", 4)).await.unwrap().into_inner();
    assert_eq!(done.token_ids.len(), 4);
}

#[tokio::test]
async fn limits_refuse_long_waits_big_prompts_and_big_messages_with_field_details() {
    let server = spawn(
        &["--max-batch-size", "1"],
        &[
            ("TORCHWIRE_LIMITS_MAX_QUEUE_WAIT_SECS", "1"),
            ("TORCHWIRE_LIMITS_MAX_PROMPT_BYTES", "1000"),
            ("TORCHWIRE_LIMITS_MAX_MESSAGE_BYTES", "65536"),
        ],
    );
    server.wait_serving("").await.unwrap();
    let c = InferenceClient::new(server.channel().await.unwrap());

    // One slot, twelve long generations: the last ones cannot start within
    // a second and end with RESOURCE_EXHAUSTED, never hanging.
    let calls = (0..12).map(|i| {
        let mut c = c.clone();
        async move {
            let mut stream = c
                .generate(request(&format!("Story {i}:"), 480))
                .await?
                .into_inner();
            while let Some(m) = stream.next().await {
                m?;
            }
            Ok::<(), tonic::Status>(())
        }
    });
    let results = futures::future::join_all(calls).await;
    let waited_too_long: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!waited_too_long.is_empty(), "every request was served");
    assert!(results.iter().any(|r| r.is_ok()), "none was served");
    for status in waited_too_long {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("queue"), "{status:?}");
    }
    let mut c2 = c.clone();
    eventually("the engine is idle", || {
        let mut c = c2.clone();
        async move { model_stats(&mut c).await.running == 0 }
    })
    .await;

    // Several bad fields: each is a google.rpc.BadRequest field violation.
    let mut c = c2.clone();
    let bad = GenerateRequest {
        top_p: 2.0,
        min_p: -1.0,
        ..request("Hi", 2)
    };
    let err = c.generate(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("top_p") && err.message().contains("min_p"));
    let details = err.get_details_bad_request().expect("BadRequest details");
    let fields: Vec<_> = details
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["top_p", "min_p"], "{details:?}");

    // A prompt over max_prompt_bytes is refused before tokenizing.
    let err = c.generate(request(&"a".repeat(1001), 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let details = err.get_details_bad_request().expect("BadRequest details");
    assert_eq!(details.field_violations[0].field, "prompt", "{err:?}");
    assert!(err.message().contains("1001 bytes"), "{err:?}");
    let err = c
        .tokenize(TokenizeRequest {
            text: "a".repeat(1001),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "text"
    );

    // A message over max_message_bytes is refused by the transport.
    let err = c
        .tokenize(TokenizeRequest {
            text: "a".repeat(70_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    // The server keeps serving, tokenizing off the async workers.
    let tokens = c2
        .tokenize(TokenizeRequest {
            text: "a".repeat(900),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tokens.count > 0);
    let mut c = c2;
    let done = c
        .complete(request("Still here", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.token_ids.len(), 3);
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_a_busy_one_is_not() {
    use tokio::io::AsyncReadExt;
    let server = spawn(
        &["--max-batch-size", "1"],
        &[("TORCHWIRE_LIMITS_IDLE_TIMEOUT_SECS", "1")],
    );
    server.wait_serving("").await.unwrap();
    // A call in progress keeps its connection however long it runs (a
    // long generation outlasts the 1 s timeout on a CPU).
    let mut c = InferenceClient::new(server.channel().await.unwrap());
    let mut stream = c
        .generate(request("A long story", 480))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = stream.next().await {
        n += m.unwrap().token_ids.len();
    }
    assert_eq!(n, 480);
    // A connection that sends nothing is closed after the timeout.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection stayed open");
}
