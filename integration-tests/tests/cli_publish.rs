//! `torchwire publish` end to end: the CLI sends the request through a real
//! nats-server's JetStream work queue to the real server and prints the
//! streamed responses.

use std::process::Output;

use torchwire_integration_tests::{binary_path, NatsServer, Server};

async fn publish(nats_url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(binary_path("torchwire"))
        .arg("publish")
        .args(args)
        .args(["--nats-url", nats_url, "--timeout", "120"])
        .env_remove("TORCHWIRE_NATS_URL")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn publish_streams_the_reply_and_reports_errors() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let _server = Server::start_with_env(&Server::default_args(&["--nats-url", url.as_str()]), &[])
        .await
        .unwrap();

    let out = publish(
        &url,
        &[
            "Once upon a time",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
            "--request-id",
            "pub-1",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().expect("responses");
    assert_eq!(last["finishReason"], "FINISH_REASON_LENGTH");
    assert_eq!(last["usage"]["completionTokens"], 8);
    let tokens: usize = lines
        .iter()
        .map(|l| l["tokenIds"].as_array().map_or(0, |a| a.len()))
        .sum();
    assert_eq!(tokens, 8);
    assert!(lines.iter().all(|l| l["requestId"] == "pub-1"));
    assert!(stderr.contains("completion tokens: 8"), "{stderr}");

    let out = publish(&url, &["Hi", "--temperature", "-1"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("temperature"), "{stderr}");
    assert!(stderr.to_ascii_lowercase().contains("invalid"), "{stderr}");
}
