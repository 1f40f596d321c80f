//! End-to-end tests of prefix reuse: conversations whose next turn starts
//! with the previous turn's prompt and answer, clients sharing a long system
//! prompt, cancelled streams and retries give the same greedy tokens as a
//! server without the prefix cache; a full cache evicts; each model has its
//! own cache.

use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use torchwire_integration_tests::{bundled_model, Server};
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{GenerateRequest, GetStatsRequest, ModelStats};

type Client = InferenceClient<tonic::transport::Channel>;

/// Long enough to fill several 16-token blocks of the bundled model.
const SYSTEM: &str = "You are a patient storyteller. You tell short, gentle stories \
about animals who live in the forest, and you always answer the question you \
were asked before you add anything else. Keep every answer kind and simple.\n";

const QUESTIONS: [&str; 4] = [
    "Who lived in the old oak tree?",
    "Why was the little rabbit sad?",
    "Where did the fox go at night?",
    "What did the owl find by the river?",
];

async fn client(server: &Server) -> Client {
    InferenceClient::new(server.channel().await.unwrap())
}

fn request(prompt: &str, tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens: Some(tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// The token ids and text of a whole greedy stream.
async fn generate(client: &mut Client, prompt: &str, tokens: u32) -> (Vec<u32>, String) {
    let mut stream = client
        .generate(request(prompt, tokens))
        .await
        .unwrap()
        .into_inner();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        ids.extend(msg.token_ids);
        text.push_str(&msg.text);
    }
    (ids, text)
}

/// Starts a stream and drops it after its first `after` tokens.
async fn cancel_after(client: &mut Client, prompt: &str, after: usize) {
    let mut stream = client
        .generate(request(prompt, 200))
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    while seen < after {
        seen += stream.next().await.unwrap().unwrap().token_ids.len();
    }
}

/// The model's stats once its batch is empty: a sequence is offered to the
/// prefix cache as it leaves the batch, just after its last token is sent.
async fn stats(client: &mut Client, model: &str) -> ModelStats {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = client
            .get_stats(GetStatsRequest {
                model: model.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .models
            .remove(0);
        if s.running == 0 || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One conversation of `turns` turns on `server`; turn N+1's prompt is turn
/// N's prompt, its answer and the next question. A stream of the second
/// turn is cancelled first and the turn is sent again (a retry). Returns
/// every completed (prompt, token ids).
async fn converse(server: &Server, id: usize, turns: usize) -> Vec<(String, Vec<u32>)> {
    let mut c = client(server).await;
    let mut prompt = SYSTEM.to_string();
    let mut done = Vec::new();
    for turn in 0..turns {
        prompt.push_str(&format!(
            "User: {} (turn {})\nAssistant:",
            QUESTIONS[(id + turn) % QUESTIONS.len()],
            turn + 1
        ));
        if turn == 1 {
            cancel_after(&mut c, &prompt, 3).await;
        }
        let (ids, text) = generate(&mut c, &prompt, 12).await;
        done.push((prompt.clone(), ids));
        prompt.push_str(&text);
        prompt.push('\n');
    }
    done
}

#[tokio::test]
async fn greedy_tokens_are_the_same_with_and_without_prefix_reuse() {
    let reusing = Server::start(&["--prefix-cache-mib", "64"]).await.unwrap();
    let plain = Server::start(&["--prefix-cache-mib", "0"]).await.unwrap();

    // Four conversations at once, sharing the system prompt, while other
    // clients with the same system prompt cancel their streams.
    let server = &reusing;
    let conversations = join_all((0..4).map(|id| converse(server, id, 3)));
    let cancelled = join_all((0..3).map(|i| async move {
        let mut c = client(server).await;
        let prompt = format!("{SYSTEM}User: Tell me story number {i}.\nAssistant:");
        cancel_after(&mut c, &prompt, 2 + i).await;
    }));
    let (conversations, _) = tokio::join!(conversations, cancelled);
    let served: Vec<(String, Vec<u32>)> = conversations.into_iter().flatten().collect();
    assert_eq!(served.len(), 12);

    let mut c = client(&reusing).await;
    let s = stats(&mut c, "").await;
    // Every later turn starts with its previous turn's prompt and answer.
    assert!(s.prefix_cache_hits >= 8, "{s:?}");
    assert!(s.prefix_cache_tokens_reused >= 8 * 40, "{s:?}");
    assert!(
        s.prefix_cache_entries > 0 && s.prefix_cache_bytes > 0,
        "{s:?}"
    );

    // The same prompts, all at once, on the server that reads every prompt
    // in full: the same tokens.
    let expected = join_all(served.iter().map(|(prompt, _)| async {
        let mut p = client(&plain).await;
        generate(&mut p, prompt, 12).await.0
    }))
    .await;
    for ((prompt, got), want) in served.iter().zip(&expected) {
        assert_eq!(got, want, "prompt {prompt:?}");
    }
    let s = stats(&mut client(&plain).await, "").await;
    assert_eq!(
        (
            s.prefix_cache_hits,
            s.prefix_cache_misses,
            s.prefix_cache_entries
        ),
        (0, 0, 0),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_prefix_cache_at_its_budget_evicts_rather_than_grows() {
    // 1 MiB holds two or three of these sequences of the bundled model
    // (5 KiB of keys and values a token).
    let server = Server::start(&["--prefix-cache-mib", "1"]).await.unwrap();
    let mut c = client(&server).await;
    let budget = 1024 * 1024;
    let prompts: Vec<String> = (0..10).map(|i| format!("Story {i}. {SYSTEM}")).collect();
    let mut first = Vec::new();
    for prompt in &prompts {
        first.push(generate(&mut c, prompt, 8).await.0);
        let s = stats(&mut c, "").await;
        assert!(s.prefix_cache_bytes <= budget, "{s:?}");
        assert!(s.prefix_cache_entries >= 1, "{s:?}");
    }
    let s = stats(&mut c, "").await;
    assert!(s.prefix_cache_evictions >= 7, "{s:?}");
    assert!((2..=3).contains(&s.prefix_cache_entries), "{s:?}");
    assert_eq!(
        s.prefix_cache_hits, 0,
        "the prompts differ from the first block: {s:?}"
    );

    // The newest prompt is still cached, the oldest is not; both give the
    // tokens they gave the first time.
    let newest = generate(&mut c, &prompts[9], 8).await.0;
    let hits = stats(&mut c, "").await.prefix_cache_hits;
    assert_eq!(hits, 1);
    assert_eq!(newest, first[9]);
    let oldest = generate(&mut c, &prompts[0], 8).await.0;
    let s = stats(&mut c, "").await;
    assert_eq!(s.prefix_cache_hits, 1, "{s:?}");
    assert_eq!(oldest, first[0]);
    assert!(s.prefix_cache_bytes <= budget, "{s:?}");
}

#[tokio::test]
async fn each_model_has_its_own_prefix_cache() {
    let model = bundled_model().display().to_string();
    let args: Vec<String> = ["--listen", "127.0.0.1:0", "--threads", "1"]
        .map(String::from)
        .to_vec();
    let server = Server::start_with_env(
        &args,
        &[
            ("TORCHWIRE_MODELS__A__PATH", &model),
            ("TORCHWIRE_MODELS__B__PATH", &model),
        ],
    )
    .await
    .unwrap();
    let mut c = client(&server).await;
    let prompt = format!("{SYSTEM}User: {}\nAssistant:", QUESTIONS[0]);
    let on = |model: &str, prompt: &str| GenerateRequest {
        model: model.into(),
        ..request(prompt, 6)
    };
    let run = |c: &mut Client, req: GenerateRequest| {
        let mut c = c.clone();
        async move {
            let mut stream = c.generate(req).await.unwrap().into_inner();
            while let Some(msg) = stream.next().await {
                msg.unwrap();
            }
        }
    };
    run(&mut c, on("a", &prompt)).await;
    let longer = format!("{prompt} Once upon a time");
    run(&mut c, on("b", &longer)).await;
    let (a, b) = (stats(&mut c, "a").await, stats(&mut c, "b").await);
    assert_eq!(
        (a.prefix_cache_hits, a.prefix_cache_entries),
        (0, 1),
        "{a:?}"
    );
    assert_eq!(
        (b.prefix_cache_hits, b.prefix_cache_misses),
        (0, 1),
        "{b:?}"
    );
    // Model a's own cache serves it.
    run(&mut c, on("a", &longer)).await;
    assert_eq!(stats(&mut c, "a").await.prefix_cache_hits, 1);
}
