//! `--quantize int8` and `--kv-cache-dtype float16` end to end: the real
//! server with int8 weights or a half-precision cache reports them, holds
//! less, and serves greedy and sampled requests; a bad value stops it at
//! start-up naming the key.

use futures::StreamExt;
use torchwire_integration_tests::Server;
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{FinishReason, GenerateRequest, ListModelsRequest, ModelInfo};

async fn model_info(server: &Server) -> ModelInfo {
    let mut c = InferenceClient::new(server.channel().await.unwrap());
    let mut models = c
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    models.remove(0)
}

#[tokio::test]
async fn an_int8_server_reports_its_weights_and_serves() {
    let plain = Server::start(&[]).await.unwrap();
    let int8 = Server::start(&["--quantize", "int8"]).await.unwrap();
    let (p, q) = (model_info(&plain).await, model_info(&int8).await);
    assert_eq!(
        (p.quantization.as_str(), q.quantization.as_str()),
        ("none", "int8")
    );
    assert_eq!(p.parameters, q.parameters);
    assert!(
        q.weight_bytes > 0 && (q.weight_bytes as f64) < 0.5 * p.weight_bytes as f64,
        "int8 {} bytes, float32 {}",
        q.weight_bytes,
        p.weight_bytes
    );

    let mut c = InferenceClient::new(int8.channel().await.unwrap());
    for temperature in [0.0, 0.8] {
        let req = GenerateRequest {
            prompt: "The old lighthouse keeper".into(),
            max_new_tokens: Some(16),
            ignore_eos: true,
            temperature,
            seed: Some(3),
            ..Default::default()
        };
        let mut stream = c.generate(req).await.unwrap().into_inner();
        let (mut tokens, mut finish) = (0, None);
        while let Some(msg) = stream.next().await {
            let msg = msg.unwrap();
            tokens += msg.token_ids.len();
            if msg.finish_reason != FinishReason::Unspecified as i32 {
                finish = Some(msg.finish_reason);
            }
        }
        assert_eq!(tokens, 16, "temperature {temperature}");
        assert_eq!(finish, Some(FinishReason::Length as i32));
    }
}

#[tokio::test]
async fn an_unknown_quantization_stops_the_server_naming_the_key() {
    let out =
        std::process::Command::new(torchwire_integration_tests::binary_path("torchwire-server"))
            .args(["--listen", "127.0.0.1:0", "--quantize", "int4"])
            .current_dir(torchwire_integration_tests::repo_root())
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quantize") && err.contains("int4"), "{err}");
}

/// `--kv-cache-dtype float16`: the real server reports the narrower cache,
/// holds half the bytes for the same slots, and greedy text from it is the
/// float32 cache's (on the bundled model the two caches' logits differ by
/// at most 0.004, `examples/kv_eval.rs`).
#[tokio::test]
async fn a_float16_kv_cache_halves_the_cache_and_keeps_greedy_text() {
    let plain = Server::start(&["--max-batch-size", "4"]).await.unwrap();
    let half = Server::start(&["--max-batch-size", "4", "--kv-cache-dtype", "float16"])
        .await
        .unwrap();
    let (p, h) = (model_info(&plain).await, model_info(&half).await);
    assert_eq!(
        (p.kv_cache_dtype.as_str(), h.kv_cache_dtype.as_str()),
        ("float32", "float16")
    );
    assert_eq!(p.dtype, h.dtype);
    assert!(p.kv_cache_bytes > 0 && h.kv_cache_bytes * 2 == p.kv_cache_bytes);

    let mut texts = Vec::new();
    for server in [&plain, &half] {
        let mut c = InferenceClient::new(server.channel().await.unwrap());
        let req = GenerateRequest {
            prompt: "The old lighthouse keeper".into(),
            max_new_tokens: Some(48),
            ignore_eos: true,
            ..Default::default()
        };
        let mut stream = c.generate(req).await.unwrap().into_inner();
        let mut ids = Vec::new();
        while let Some(msg) = stream.next().await {
            ids.extend(msg.unwrap().token_ids);
        }
        assert_eq!(ids.len(), 48);
        texts.push(ids);
    }
    assert_eq!(texts[0], texts[1]);
}

#[tokio::test]
async fn an_unknown_kv_cache_dtype_stops_the_server_naming_the_key() {
    let out =
        std::process::Command::new(torchwire_integration_tests::binary_path("torchwire-server"))
            .args(["--listen", "127.0.0.1:0", "--kv-cache-dtype", "fp8"])
            .current_dir(torchwire_integration_tests::repo_root())
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kv_cache_dtype") && err.contains("fp8"),
        "{err}"
    );
}
