//! End-to-end tests of torchwire-server: the real binary on port 0 with the
//! bundled model, driven through gRPC.

use std::time::Duration;

use futures::StreamExt;
use tonic::Code;
use torchwire_integration_tests::{model_stats, Server};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{
    FinishReason, GenerateRequest, GenerateResponse, ListModelsRequest, TokenizeRequest,
};

type Client = InferenceClient<tonic::transport::Channel>;

async fn client(server: &Server) -> Client {
    InferenceClient::new(server.channel().await.unwrap())
}

fn request(prompt: &str, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens: Some(max_new_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Reads a whole stream; returns its messages.
async fn collect(
    client: &mut Client,
    req: GenerateRequest,
) -> Result<Vec<GenerateResponse>, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        out.push(msg?);
    }
    Ok(out)
}

fn text(msgs: &[GenerateResponse]) -> String {
    msgs.iter().map(|m| m.text.as_str()).collect()
}

fn token_count(msgs: &[GenerateResponse]) -> usize {
    msgs.iter().map(|m| m.token_ids.len()).sum()
}

#[tokio::test]
async fn generate_streams_tokens_before_generation_ends() {
    let server = Server::start(&[]).await.unwrap();
    let mut c = client(&server).await;
    let mut stream = c
        .generate(request("Once upon a time", 48))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    // Events ready together are merged into one message, so a first message
    // without a finish reason was sent while the engine was still generating.
    assert_eq!(
        first.finish_reason,
        FinishReason::Unspecified as i32,
        "first message already final"
    );
    assert!(!first.token_ids.is_empty());
    assert!(
        !first.request_id.is_empty(),
        "a request id is generated when none is given"
    );
    let mut msgs = vec![first];
    while let Some(m) = stream.next().await {
        msgs.push(m.unwrap());
    }
    assert!(msgs.len() > 1);
    let last = msgs.last().unwrap();
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(token_count(&msgs), 48);
    let usage = last.usage.unwrap();
    assert_eq!(usage.completion_tokens, 48);
    assert!(usage.prompt_tokens > 0);
    let timings = last.timings.unwrap();
    assert!(timings.time_to_first_token_ms <= timings.total_ms);
    assert!(msgs.iter().all(|m| m.request_id == msgs[0].request_id));
    assert!(!text(&msgs).is_empty());
}

#[tokio::test]
async fn complete_returns_the_same_text_as_the_stream() {
    let server = Server::start(&[]).await.unwrap();
    let mut c = client(&server).await;
    let req = GenerateRequest {
        request_id: "abc-1".into(),
        ..request("The weather today", 20)
    };
    let streamed = collect(&mut c, req.clone()).await.unwrap();
    let whole = c.complete(req).await.unwrap().into_inner();
    assert_eq!(whole.text, text(&streamed));
    assert_eq!(whole.token_ids.len(), 20);
    assert_eq!(whole.request_id, "abc-1");
    assert_eq!(whole.finish_reason, FinishReason::Length as i32);
}

#[tokio::test]
async fn sixteen_concurrent_streams_complete_in_one_batch() {
    let server = Server::start(&["--max-batch-size", "16"]).await.unwrap();
    let c = client(&server).await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                collect(&mut c, request(&format!("Story number {i}:"), 96)).await
            })
        })
        .collect();
    for t in tasks {
        let msgs = t.await.unwrap().unwrap();
        assert_eq!(token_count(&msgs), 96);
        assert_eq!(
            msgs.last().unwrap().finish_reason,
            FinishReason::Length as i32
        );
    }
    // A sequence leaves the batch (and the counters) just after its last
    // message is sent, when its KV rows go to the prefix cache: wait for it.
    let mut s = model_stats(&mut c.clone()).await;
    for _ in 0..200 {
        if s.running == 0 && s.requests_finished == 16 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        s = model_stats(&mut c.clone()).await;
    }
    assert_eq!(s.requests_finished, 16);
    assert_eq!(
        s.peak_batch_size, 16,
        "the 16 streams were not decoded as one batch: {s:?}"
    );
    assert_eq!(s.running, 0);
}

#[tokio::test]
async fn a_cancelled_stream_frees_its_slot_for_the_next_request() {
    let server = Server::start(&["--max-batch-size", "1"]).await.unwrap();
    let mut c = client(&server).await;
    let mut first = c
        .generate(request("Long story:", 240))
        .await
        .unwrap()
        .into_inner();
    first.next().await.unwrap().unwrap();
    drop(first);
    // The only slot was taken; this completes only if the cancelled one left.
    let msgs = collect(&mut c, request("Short:", 8)).await.unwrap();
    assert_eq!(token_count(&msgs), 8);
    let s = model_stats(&mut c).await;
    assert_eq!(s.requests_cancelled, 1, "{s:?}");
    assert!(
        s.tokens_generated < 240,
        "the cancelled request ran to the end: {s:?}"
    );
}

#[tokio::test]
async fn a_full_queue_refuses_with_resource_exhausted() {
    let server = Server::start(&["--max-batch-size", "1", "--queue-size", "1"])
        .await
        .unwrap();
    let mut c = client(&server).await;
    let mut running = c
        .generate(request("Long story:", 240))
        .await
        .unwrap()
        .into_inner();
    running.next().await.unwrap().unwrap(); // admitted: the batch is full now
    let mut queued = c
        .generate(request("Queued:", 4))
        .await
        .unwrap()
        .into_inner();
    let Err(refused) = c.generate(request("Refused:", 4)).await else {
        panic!("third request must be refused")
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop(running);
    let mut n = 0;
    while let Some(m) = queued.next().await {
        n += m.unwrap().token_ids.len();
    }
    assert_eq!(n, 4, "the queued request is served once the slot frees");
    assert_eq!(model_stats(&mut c).await.requests_rejected, 1);
}

#[tokio::test]
async fn bad_input_gets_its_status_and_the_server_keeps_serving() {
    let server = Server::start(&[]).await.unwrap();
    let mut c = client(&server).await;
    let ok = request("Hello", 4);
    let long_prompt = "word ".repeat(4000);
    let cases: Vec<(GenerateRequest, Code, &str)> = vec![
        (
            GenerateRequest {
                prompt: String::new(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "prompt",
        ),
        (
            GenerateRequest {
                prompt: long_prompt,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "prompt",
        ),
        (
            GenerateRequest {
                max_new_tokens: Some(0),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            GenerateRequest {
                max_new_tokens: Some(1_000_000),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "max_new_tokens",
        ),
        (
            GenerateRequest {
                temperature: -1.0,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            GenerateRequest {
                top_p: 1.5,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "top_p",
        ),
        (
            GenerateRequest {
                min_p: -0.5,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "min_p",
        ),
        (
            GenerateRequest {
                logprobs: 21,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "logprobs",
        ),
        (
            GenerateRequest {
                repetition_penalty: -2.0,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "repetition_penalty",
        ),
        (
            GenerateRequest {
                stop: vec!["s".into(); 9],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "stop",
        ),
        (
            GenerateRequest {
                stop: vec!["x".repeat(200)],
                ..ok.clone()
            },
            Code::InvalidArgument,
            "stop",
        ),
        (
            GenerateRequest {
                model: "no-such-model".into(),
                ..ok.clone()
            },
            Code::NotFound,
            "model",
        ),
    ];
    for (req, code, field) in cases {
        for unary in [false, true] {
            let status = if unary {
                c.complete(req.clone()).await.err()
            } else {
                collect(&mut c, req.clone()).await.err()
            }
            .unwrap_or_else(|| panic!("{field}: accepted"));
            assert_eq!(status.code(), code, "{field}: {status:?}");
            assert!(
                status.message().starts_with(field),
                "{field}: message {:?} does not name the field",
                status.message()
            );
        }
    }
    // Still serving.
    let msgs = collect(&mut c, ok).await.unwrap();
    assert_eq!(token_count(&msgs), 4);
}

#[tokio::test]
async fn seed_and_stop_sequences_and_logprobs() {
    let server = Server::start(&[]).await.unwrap();
    let mut c = client(&server).await;
    let sampled = GenerateRequest {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: Some(1234),
        ..request("It was a dark and stormy night", 32)
    };
    let a = text(&collect(&mut c, sampled.clone()).await.unwrap());
    let b = text(&collect(&mut c, sampled.clone()).await.unwrap());
    assert_eq!(a, b, "same seed, same request, same output");
    let other = text(
        &collect(
            &mut c,
            GenerateRequest {
                seed: Some(99),
                ..sampled
            },
        )
        .await
        .unwrap(),
    );
    assert_ne!(a, other, "another seed should give another sample");

    // Greedy text, then stop at a piece of it taken from its middle.
    let greedy = request("The best thing about", 40);
    let full = text(&collect(&mut c, greedy.clone()).await.unwrap());
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "greedy output too short: {full:?}");
    let stop: String = chars[8..11].iter().collect();
    let cut = full.find(&stop).unwrap();
    let msgs = collect(
        &mut c,
        GenerateRequest {
            stop: vec![stop.clone()],
            ..greedy
        },
    )
    .await
    .unwrap();
    let last = msgs.last().unwrap();
    assert_eq!(text(&msgs), full[..cut]);
    assert_eq!(last.finish_reason, FinishReason::StopSequence as i32);
    assert_eq!(last.stop_sequence, stop);

    let msgs = collect(
        &mut c,
        GenerateRequest {
            logprobs: 3,
            ..request("Hello", 5)
        },
    )
    .await
    .unwrap();
    let lps: Vec<_> = msgs.iter().flat_map(|m| m.logprobs.clone()).collect();
    assert_eq!(lps.len(), 5);
    for lp in lps {
        assert_eq!(lp.top.len(), 3);
        assert!(lp.logprob <= 0.0);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.top[0].token_id, lp.token_id);
    }
}

#[tokio::test]
async fn list_models_and_tokenize() {
    let server = Server::start(&["--model-name", "tiny"]).await.unwrap();
    let mut c = client(&server).await;
    let models = c
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].name, "tiny");
    assert!(models[0].is_default && models[0].context_length > 0 && models[0].parameters > 0);
    assert_eq!(models[0].device, "cpu");
    let t = c
        .tokenize(TokenizeRequest {
            text: "hello world".into(),
            add_special_tokens: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.count as usize, t.token_ids.len());
    assert_eq!(t.tokens.len(), t.token_ids.len());
    assert!(t.count > 0);
    let with_bos = c
        .tokenize(TokenizeRequest {
            text: "hello world".into(),
            add_special_tokens: true,
            model: "tiny".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(with_bos.count, t.count + 1);
    let err = c
        .tokenize(TokenizeRequest {
            model: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = Server::start(&[]).await.unwrap();
    let channel = server.channel().await.unwrap();

    let mut v1c = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut resp = v1c
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a list response")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "torchwire.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("externalscaler")),
        "the server does not serve KEDA's API: {names:?}"
    );

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "torchwire.v1.Inference".into(),
            ),
        ),
    };
    let mut resp = alpha
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    match resp.next().await.unwrap().unwrap().message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(fd)) => {
            assert!(!fd.file_descriptor_proto.is_empty())
        }
        other => panic!("unexpected v1alpha response {other:?}"),
    }
}

#[tokio::test]
async fn sigterm_drains_the_stream_in_flight_then_exits_zero() {
    let mut server = Server::start(&["--shutdown-grace", "60"]).await.unwrap();
    let mut c = client(&server).await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(server.channel().await.unwrap());
    let mut stream = c
        .generate(request("A long time ago", 200))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = stream.next().await.unwrap().unwrap().token_ids.len();
    server.signal(libc::SIGTERM);

    // Health turns NOT_SERVING and new work is refused while the stream goes on.
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let status = watch.next().await.unwrap().unwrap().status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
    }
    let refused = collect(&mut c, request("new", 2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    let mut last = None;
    while let Some(m) = stream.next().await {
        let m = m.unwrap();
        tokens += m.token_ids.len();
        last = Some(m);
    }
    assert_eq!(tokens, 200, "the stream in flight was cut");
    assert_eq!(last.unwrap().finish_reason, FinishReason::Length as i32);
    let status = server.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn streams_past_the_grace_period_end_with_unavailable_and_the_model_stops() {
    // One slot: the second request waits in the engine's queue.
    let mut server = Server::start(&["--shutdown-grace", "0", "--max-batch-size", "1"])
        .await
        .unwrap();
    let mut c = client(&server).await;
    let mut running = c
        .generate(request("A long time ago", 400))
        .await
        .unwrap()
        .into_inner();
    running.next().await.unwrap().unwrap();
    let mut queued = c
        .generate(request("Meanwhile", 400))
        .await
        .unwrap()
        .into_inner();
    server.signal(libc::SIGTERM);

    for (name, stream) in [("running", &mut running), ("queued", &mut queued)] {
        let mut ended = None;
        while let Some(m) = stream.next().await {
            if let Err(status) = m {
                ended = Some(status);
                break;
            }
        }
        let status = ended.unwrap_or_else(|| panic!("the {name} stream ended without an error"));
        assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
        assert!(
            status.message().contains("shutting down"),
            "{name}: {status:?}"
        );
    }
    let status = server.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_long_prompt_is_read_in_chunks_between_decode_steps() {
    // Chunks of 4 tokens: the long prompt takes dozens of steps, during
    // which the two running streams go on and the short one finishes.
    let chunked = Server::start(&["--max-prefill-tokens", "4"]).await.unwrap();
    let plain = Server::start(&[]).await.unwrap();
    let long_prompt = "The quick brown fox jumps over the lazy dog. ".repeat(12);
    let requests = [
        request("Once upon a time", 80),
        request("A wise man once said", 16),
        request(&long_prompt, 16),
    ];

    let mut c = client(&chunked).await;
    let mut streams = Vec::new();
    for req in &requests {
        let mut stream = c.generate(req.clone()).await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        streams.push((vec![first], stream));
    }
    let mut texts = Vec::new();
    for (mut msgs, mut stream) in streams {
        while let Some(m) = stream.next().await {
            msgs.push(m.unwrap());
        }
        texts.push(text(&msgs));
    }

    // Greedy: each text is what the request gives alone, without chunks.
    let mut p = client(&plain).await;
    for (req, got) in requests.iter().zip(&texts) {
        let alone = text(&collect(&mut p, req.clone()).await.unwrap());
        assert_eq!(got, &alone, "prompt {:?}", &req.prompt[..20]);
    }
    let tokens = c
        .tokenize(torchwire_proto::v1::TokenizeRequest {
            text: long_prompt.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tokens.token_ids.len() > 40, "the long prompt is not long");
}

#[tokio::test]
async fn a_bad_config_fails_at_startup_naming_the_key() {
    let bin = torchwire_integration_tests::binary_path("torchwire-server");
    let out = std::process::Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--max-batch-size", "0"])
        .current_dir(torchwire_integration_tests::repo_root())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_batch_size"), "{err}");
    let out =
        std::process::Command::new(torchwire_integration_tests::binary_path("torchwire-server"))
            .args(["--listen", "127.0.0.1:0"])
            .env("TORCHWIRE_LISTEN", "x")
            .env("TORCHWIRE_MODELS__X__DEVICE", "tpu")
            .output()
            .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn a_failed_kv_slot_move_fails_the_moved_request_and_the_server_serves_on() {
    // Debug builds' fault switch: moving the KV rows of a sequence whose
    // prompt holds the marker fails.
    let server = Server::start_with_env(
        &Server::default_args(&[]),
        &[("TORCHWIRE_DEBUG_FAULT", "fail-slot-move:MOVE-ME")],
    )
    .await
    .unwrap();
    let mut c = client(&server).await;
    // In the batch first (slot 0), then the marked one (slot 1).
    let mut first = c
        .generate(request("Once upon a time", 400))
        .await
        .unwrap()
        .into_inner();
    first.next().await.unwrap().unwrap();
    let mut moved = c
        .generate(request("MOVE-ME once more", 400))
        .await
        .unwrap()
        .into_inner();
    moved.next().await.unwrap().unwrap();
    // The first leaves (cancelled): the marked one's rows move into its slot.
    drop(first);
    let status = loop {
        match moved.next().await {
            Some(Ok(msg)) => assert_eq!(msg.finish_reason, 0, "finished: {msg:?}"),
            Some(Err(status)) => break status,
            None => panic!("the stream ended without an error"),
        }
    };
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("KV cache slot"), "{status:?}");

    // The engine serves on, and its batch is empty again.
    let msgs = collect(&mut c, request("And then", 8)).await.unwrap();
    assert_eq!(token_count(&msgs), 8);
    // It leaves the batch just after its last message: wait for that.
    let mut s = model_stats(&mut c).await;
    for _ in 0..200 {
        if s.running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = model_stats(&mut c).await;
    }
    assert_eq!((s.running, s.prefilling), (0, 0), "{s:?}");
}

#[tokio::test]
async fn a_seed_gives_the_same_tokens_sampled_on_the_device() {
    let host = Server::start(&["--sampler", "host"]).await.unwrap();
    let device = Server::start(&["--sampler", "device"]).await.unwrap();
    let (mut h, mut d) = (client(&host).await, client(&device).await);
    for (seed, top_k, top_p) in [(1234, 50, 0.95), (7, 0, 1.0), (8, 0, 0.9)] {
        let sampled = GenerateRequest {
            temperature: 0.9,
            top_p,
            top_k,
            repetition_penalty: 1.1,
            seed: Some(seed),
            ..request("It was a dark and stormy night", 24)
        };
        let on_host = collect(&mut h, sampled.clone()).await.unwrap();
        let on_device = collect(&mut d, sampled).await.unwrap();
        assert_eq!(token_count(&on_device), 24);
        assert_eq!(text(&on_host), text(&on_device), "seed {seed}");
    }
}
