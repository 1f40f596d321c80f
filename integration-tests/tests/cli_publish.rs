//! `torchwire publish` end to end: the CLI sends the request through a real
//! nats-server's JetStream work queue to the real server and prints the
//! streamed responses.

use std::process::Output;

use async_nats::jetstream;
use torchwire_integration_tests::{binary_path, NatsServer, Server};
use torchwire_nats::{Discard, NatsConfig};

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

#[tokio::test]
async fn publish_to_a_full_queue_is_refused_with_a_clear_error() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let cfg = NatsConfig {
        url: Some(url.clone()),
        max_msgs: 2,
        max_age_secs: 3600,
        ..NatsConfig::default()
    };
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    torchwire_nats::ensure_work_queue(&js, &cfg).await.unwrap();
    let mut stream = js.get_stream(&cfg.stream).await.unwrap();
    let created = stream.info().await.unwrap().config.clone();
    assert_eq!(created.max_messages, 2);
    assert_eq!(created.max_bytes, -1, "0 in the config is no limit");
    assert_eq!(created.max_age, std::time::Duration::from_secs(3600));
    assert_eq!(created.discard, jetstream::stream::DiscardPolicy::New);
    assert_eq!(cfg.discard, Discard::New);
    for body in ["first", "second"] {
        js.publish(cfg.subject.clone(), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let out = publish(&url, &["Hi", "--max-new-tokens", "2"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("work queue on torchwire.generate is full")
            && stderr.contains("maximum messages exceeded")
            && stderr.contains("nothing was queued"),
        "{stderr}"
    );
    // The requests already waiting were kept, not dropped for the new one.
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
}
