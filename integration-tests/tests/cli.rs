//! End-to-end tests of the `torchwire` command line: the real CLI binary
//! against the real server on port 0 with the bundled model.

use std::process::Output;

use torchwire_integration_tests::{torchwire, Server};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{FinishReason, GenerateResponse, ListModelsRequest, TokenizeRequest};

/// Exit codes documented in `torchwire --help`.
const EXIT_UNAVAILABLE: i32 = 3;
const EXIT_INVALID: i32 = 4;

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

#[tokio::test]
async fn generate_streams_text_and_reports_a_summary() {
    let server = Server::start(&[]).await.unwrap();
    let out = torchwire(
        &server.url(),
        &[
            "generate",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
        ],
        None,
    )
    .await;
    assert_success(&out);
    assert!(!stdout(&out).is_empty(), "no text streamed");
    let summary = stderr(&out);
    assert!(summary.contains("completion tokens: 12"), "{summary}");
    assert!(summary.contains("time to first token: "), "{summary}");
    assert!(summary.contains("finish reason: length"), "{summary}");
}

#[tokio::test]
async fn generate_json_prints_one_response_per_line() {
    let server = Server::start(&[]).await.unwrap();
    let out = torchwire(
        &server.url(),
        &[
            "generate",
            "The sea",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
            "--request-id",
            "cli-json",
        ],
        None,
    )
    .await;
    assert_success(&out);
    let messages: Vec<GenerateResponse> = stdout(&out)
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a GenerateResponse: {e}: {line}"))
        })
        .collect();
    assert!(
        messages.len() >= 2,
        "expected several streamed messages, got {}",
        messages.len()
    );
    assert!(messages.iter().all(|m| m.request_id == "cli-json"));
    let last = messages.last().unwrap();
    assert_eq!(last.finish_reason(), FinishReason::Length);
    let usage = last.usage.expect("the last message carries usage");
    assert_eq!(usage.completion_tokens, 8);
    assert!(usage.prompt_tokens > 0);
    let streamed: usize = messages.iter().map(|m| m.token_ids.len()).sum();
    assert_eq!(streamed, 8);
    assert!(
        messages[..messages.len() - 1]
            .iter()
            .all(|m| m.usage.is_none()),
        "usage only on the last message"
    );
}

#[tokio::test]
async fn the_same_seed_gives_the_same_sampled_text() {
    let server = Server::start(&[]).await.unwrap();
    let args = [
        "generate",
        "In the morning",
        "--max-new-tokens",
        "24",
        "--ignore-eos",
        "--temperature",
        "0.9",
        "--seed",
        "1234",
        "--quiet",
    ];
    let first = torchwire(&server.url(), &args, None).await;
    let second = torchwire(&server.url(), &args, None).await;
    assert_success(&first);
    assert_success(&second);
    assert!(!stdout(&first).is_empty());
    assert_eq!(stdout(&first), stdout(&second));
    assert!(
        stderr(&first).is_empty(),
        "--quiet prints no summary: {}",
        stderr(&first)
    );
}

#[tokio::test]
async fn models_tokenize_stats_and_health() {
    let server = Server::start(&[]).await.unwrap();
    let mut grpc = InferenceClient::new(server.channel().await.unwrap());
    let served = grpc
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();

    let out = torchwire(&server.url(), &["models", "--json"], None).await;
    assert_success(&out);
    let listed: torchwire_proto::v1::ListModelsResponse =
        serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed, served);
    let out = torchwire(&server.url(), &["models"], None).await;
    assert_success(&out);
    assert!(
        stdout(&out).contains(&served.models[0].name),
        "{}",
        stdout(&out)
    );

    let text = "Hello there, general";
    let expected = grpc
        .tokenize(TokenizeRequest {
            text: text.into(),
            add_special_tokens: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let out = torchwire(&server.url(), &["tokenize", text, "--json"], None).await;
    assert_success(&out);
    let tokenized: torchwire_proto::v1::TokenizeResponse =
        serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(tokenized.token_ids, expected.token_ids);
    assert_eq!(tokenized.count as usize, tokenized.token_ids.len());
    let out = torchwire(&server.url(), &["tokenize", "-", "--json"], Some(text)).await;
    assert_success(&out);
    let from_stdin: torchwire_proto::v1::TokenizeResponse =
        serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        from_stdin.token_ids, expected.token_ids,
        "`-` reads the text from stdin"
    );
    let out = torchwire(&server.url(), &["tokenize", text], None).await;
    assert_success(&out);
    let ids: Vec<String> = expected.token_ids.iter().map(u32::to_string).collect();
    assert_eq!(
        stdout(&out),
        format!("count: {}\nids: {}\n", expected.count, ids.join(" "))
    );

    let out = torchwire(&server.url(), &["stats", "--json"], None).await;
    assert_success(&out);
    let stats: torchwire_proto::v1::GetStatsResponse = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(stats.models.len(), served.models.len());

    let out = torchwire(&server.url(), &["health"], None).await;
    assert_success(&out);
    assert_eq!(stdout(&out).trim(), "SERVING");
}

#[tokio::test]
async fn an_invalid_request_names_the_field_and_fails() {
    let server = Server::start(&[]).await.unwrap();
    let out = torchwire(
        &server.url(),
        &["generate", "hi", "--temperature", "-1"],
        None,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(EXIT_INVALID),
        "stderr: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(err.starts_with("error: INVALID_ARGUMENT: "), "{err}");
    assert!(err.contains("temperature"), "{err}");
    assert!(stdout(&out).is_empty());
}

#[tokio::test]
async fn an_unreachable_server_is_an_error() {
    // A port that was free a moment ago and that nothing listens on now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("http://127.0.0.1:{port}");
    for args in [&["health"][..], &["generate", "hi"][..]] {
        let out = torchwire(&addr, args, None).await;
        assert_eq!(
            out.status.code(),
            Some(EXIT_UNAVAILABLE),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).starts_with("error: UNAVAILABLE: "),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn bench_writes_json_results_and_a_chart() {
    let server = Server::start(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let chart_path = dir.path().join("bench.svg");
    let out = torchwire(
        &server.url(),
        &[
            "bench",
            "--concurrency",
            "1,2",
            "--requests",
            "2",
            "--warmup",
            "1",
            "--prompt-tokens",
            "8",
            "--output-tokens",
            "4",
            "--label",
            "cli-test",
            "--no-progress",
            "--json",
            json_path.to_str().unwrap(),
            "--chart",
            chart_path.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert_success(&out);

    let table = stdout(&out);
    assert!(table.lines().any(|l| l.starts_with("c=1 ")), "{table}");
    assert!(table.lines().any(|l| l.starts_with("c=2 ")), "{table}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["label"], "cli-test");
    assert_eq!(report["config"]["output_tokens"], 4);
    assert_eq!(
        report["prompt_tokens_actual"], 8,
        "the prompt is built to the exact token count"
    );
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (level, concurrency) in levels.iter().zip([1, 2]) {
        assert_eq!(level["load"]["concurrency"], concurrency);
        assert_eq!(level["requests"], 2, "{level}");
        assert_eq!(level["failed"], 0, "{level}");
        assert_eq!(level["output_tokens"], 8, "{level}");
        assert_eq!(level["prompt_tokens"], 16, "{level}");
        assert!(level["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        for metric in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
            assert!(
                level[metric]["p50"].as_f64().unwrap() > 0.0,
                "{metric}: {level}"
            );
            assert!(
                level[metric]["p99"].as_f64().unwrap() >= level[metric]["p50"].as_f64().unwrap()
            );
        }
    }

    let chart = std::fs::read_to_string(&chart_path).unwrap();
    assert!(
        chart.starts_with("<svg") && chart.len() > 1000,
        "chart: {} bytes",
        chart.len()
    );
}

/// The TLS flags against a real TLS gRPC server: torchwire-scaler, which
/// serves gRPC health over TLS and, with a client CA, requires mutual TLS.
#[tokio::test]
async fn tls_flags_reach_a_mutual_tls_server() {
    use torchwire_integration_tests::{ChildProcess, NatsServer, Pki};
    let pki = Pki::new("torchwire-cli");
    let path = |name: &str| pki.path(name);
    let nats = NatsServer::start().unwrap();
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--nats-url",
        &nats.url(),
        "--tls-cert",
        &path("server.pem"),
        "--tls-key",
        &path("server.key"),
        "--tls-client-ca",
        &path("ca.pem"),
    ]
    .map(String::from)
    .to_vec();
    let scaler = ChildProcess::spawn("torchwire-scaler", &args, &[]).unwrap();
    let addr = format!("https://{}", scaler.addr);
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));

    let out = torchwire(
        &addr,
        &[
            "--tls-ca",
            &ca,
            "--tls-domain",
            "localhost",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "health",
            "--wait",
            "60",
        ],
        None,
    )
    .await;
    assert_success(&out);
    assert_eq!(stdout(&out).trim(), "SERVING");

    // Without the client certificate the server refuses the handshake.
    let out = torchwire(
        &addr,
        &["--tls-ca", &ca, "--tls-domain", "localhost", "health"],
        None,
    )
    .await;
    assert!(!out.status.success(), "served without a client certificate");
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));

    // A certificate file that does not exist is a bad option, not a network error.
    let out = torchwire(&addr, &["--tls-ca", &path("missing.pem"), "health"], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("missing.pem"), "{}", stderr(&out));
}
