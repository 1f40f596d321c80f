//! A third-party publisher on the NATS path: `scripts/publish_json.py`
//! (nats-py, no torchwire code) sends a JSON GenerateRequest to the work
//! queue and prints the JSON responses. What it sees is all a non-Rust
//! client has to go on: headers, proto3 JSON bodies, a final message.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use torchwire_integration_tests::{repo_root, NatsServer, Server};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::GenerateRequest;

/// The script's own deadline for the final response, in seconds.
const SCRIPT_TIMEOUT_SECS: u64 = 120;

fn script() -> PathBuf {
    repo_root().join("integration-tests/scripts/publish_json.py")
}

/// Runs the publisher with the `python` on PATH (scripts/env.sh puts the
/// venv with nats-py there) and returns its output.
async fn publish_json(nats: &NatsServer, request: &Value) -> Output {
    let output = tokio::process::Command::new("python")
        .arg(script())
        .args(["--url", &nats.url()])
        .args(["--timeout", &SCRIPT_TIMEOUT_SECS.to_string()])
        .args(["--request", &request.to_string()])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(SCRIPT_TIMEOUT_SECS + 60), output)
        .await
        .expect("the publisher script outlived its own timeout")
        .expect("cannot run `python` (source scripts/env.sh: it installs nats-py)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "nats-py is missing; source scripts/env.sh to install scripts/requirements.txt:\n{stderr}"
    );
    output
}

/// The script's stdout, one JSON object per response; checks the envelope
/// every response shares: JSON content, contiguous sequence numbers from 0,
/// one delivery, the request id, and `final` on the last line only.
fn responses(output: &Output, request_id: &str) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        !lines.is_empty(),
        "no responses; stderr:\n{}",
        stderr(output)
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            line["seq"], i as u64,
            "sequence numbers are 0, 1, 2, ...: {stdout}"
        );
        assert_eq!(line["delivery"], 1, "{line}");
        assert_eq!(line["contentType"], "application/json", "{line}");
        assert_eq!(line["requestId"], request_id, "{line}");
        assert_eq!(line["response"]["requestId"], request_id, "{line}");
        assert_eq!(line["final"], i + 1 == lines.len(), "{line}");
    }
    lines
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The same greedy generation as gRPC gives it, for comparison.
async fn grpc_complete(server: &Server, prompt: &str, tokens: u32) -> (String, Vec<u32>) {
    let mut client = InferenceClient::new(server.channel().await.unwrap());
    let response = client
        .complete(GenerateRequest {
            prompt: prompt.into(),
            max_new_tokens: Some(tokens),
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (response.text, response.token_ids)
}

async fn start() -> (NatsServer, Server) {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let server = Server::start_with_env(&Server::default_args(&["--nats-url", &url]), &[])
        .await
        .unwrap();
    (nats, server)
}

#[tokio::test]
async fn a_python_publisher_gets_json_token_responses() {
    let (nats, server) = start().await;
    let prompt = "Once upon a time";
    let request = json!({
        "prompt": prompt,
        "requestId": "py-1",
        "maxNewTokens": 16,
        "temperature": 0,
        "ignoreEos": true,
    });
    let output = publish_json(&nats, &request).await;
    assert!(
        output.status.success(),
        "{:?}\n{}",
        output.status,
        stderr(&output)
    );
    let lines = responses(&output, "py-1");

    let mut text = String::new();
    let mut token_ids = Vec::new();
    for line in &lines {
        let response = &line["response"];
        assert!(response.get("error").is_none(), "{line}");
        text.push_str(response["text"].as_str().unwrap_or_default());
        let ids = response["tokenIds"].as_array().cloned().unwrap_or_default();
        if line["final"] == false {
            assert!(
                !ids.is_empty(),
                "every token message carries its ids: {line}"
            );
            assert!(response.get("finishReason").is_none(), "{line}");
        }
        token_ids.extend(ids.iter().map(|v| v.as_u64().unwrap() as u32));
    }
    assert!(!text.is_empty(), "no text in {lines:?}");
    assert_eq!(token_ids.len(), 16);

    let last = &lines.last().unwrap()["response"];
    assert_eq!(last["finishReason"], "FINISH_REASON_LENGTH", "{last}");
    assert_eq!(last["usage"]["completionTokens"], 16, "{last}");
    assert!(
        last["usage"]["promptTokens"].as_u64().unwrap() > 0,
        "{last}"
    );

    // Greedy decoding: the NATS/JSON path says exactly what gRPC says.
    assert_eq!(grpc_complete(&server, prompt, 16).await, (text, token_ids));
}

#[tokio::test]
async fn a_python_publisher_gets_an_error_for_an_invalid_request() {
    let (nats, _server) = start().await;
    let request = json!({
        "prompt": "Hello",
        "requestId": "py-bad",
        "maxNewTokens": 4,
        "temperature": -1,
    });
    let output = publish_json(&nats, &request).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "the script exits 1 on an error response\n{}",
        stderr(&output)
    );
    let lines = responses(&output, "py-bad");
    assert_eq!(lines.len(), 1, "one final error response: {lines:?}");
    let error = &lines[0]["response"]["error"];
    assert_eq!(
        error["code"],
        tonic::Code::InvalidArgument as i32,
        "{error}"
    );
    let message = error["message"].as_str().unwrap();
    assert!(message.starts_with("temperature"), "{message}");
    assert!(lines[0]["response"].get("tokenIds").is_none());
}
