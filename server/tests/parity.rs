//! Parity with Hugging Face transformers on the bundled model: the prompt
//! logits of the Rust decoder match `LlamaForCausalLM` (float32, eager
//! attention) within a tight tolerance, and greedy generation through the
//! engine, with the prompts batched together, gives the same token ids.
//!
//! The reference comes from `scripts/hf_reference.py`, run with the `python`
//! on PATH (the venv that scripts/env.sh sets up).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc;
use torchwire_server::config::ModelConfig;
use torchwire_server::engine::kv_cache::KvCache;
use torchwire_server::engine::request::{Event, Job};
use torchwire_server::engine::sampler::SamplingParams;
use torchwire_server::engine::Engine;
use torchwire_server::model::{Llama, LoadOptions};

const PROMPTS: &[&str] = &[
    "The meaning of life is",
    "A wise man once said",
    "Q: Why did the chicken cross the road?\nA:",
    "You will",
];
const NEW_TOKENS: usize = 24;
/// Largest allowed |logit difference| (logits are O(10); float32 math in a
/// different op order differs by ~1e-5).
const LOGIT_TOLERANCE: f64 = 1e-3;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The bundled model, or another checkpoint named by TORCHWIRE_PARITY_MODEL.
fn model_dir() -> PathBuf {
    std::env::var_os("TORCHWIRE_PARITY_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/torchwire-tiny"))
}

fn reference(dir: &Path) -> Reference {
    let mut cmd = Command::new("python");
    cmd.arg(repo_root().join("scripts/hf_reference.py"))
        .arg("--model")
        .arg(dir)
        .arg("--max-new-tokens")
        .arg(NEW_TOKENS.to_string());
    for p in PROMPTS {
        cmd.arg("--prompt").arg(p);
    }
    let out = cmd
        .output()
        .expect("run python (source scripts/env.sh first)");
    assert!(
        out.status.success(),
        "hf_reference.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logits_and_greedy_tokens_match_transformers() {
    let dir = model_dir();
    let reference = reference(&dir);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let model = Llama::load(
        &dir,
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            max_positions: 256,
            quantization: torchwire_server::model::Quantization::None,
        },
    )
    .unwrap();
    let mut cache = KvCache::new(
        model.num_layers(),
        reference.cases.len(),
        model.kv_heads(),
        256,
        model.head_dim(),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();

    for case in &reference.cases {
        let ids = tokenizer
            .encode(case.prompt.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, case.input_ids, "tokenization of {:?}", case.prompt);
        let ours = model.prefill(&ids, &mut cache, 0, true).unwrap();
        let rows: Vec<f32> = case.logits.iter().flatten().copied().collect();
        let theirs = Tensor::from_slice(&rows).view([case.logits.len() as i64, -1]);
        assert_eq!(ours.size(), theirs.size());
        let diff = (&ours - &theirs).abs().max().double_value(&[]);
        assert!(
            diff < LOGIT_TOLERANCE,
            "{:?}: max |logit diff| = {diff}",
            case.prompt
        );
    }

    // One sequence alone, step by step (the decode path where every
    // sequence is at the same position).
    let case = &reference.cases[0];
    let mut next = model
        .prefill(&case.input_ids, &mut cache, 0, false)
        .unwrap()
        .argmax(-1, false)
        .int64_value(&[]) as u32;
    let mut alone = vec![next];
    while alone.len() < case.greedy_ids.len() {
        let position = case.input_ids.len() + alone.len() - 1;
        let logits = model.decode(&[next], &[position], &mut cache).unwrap();
        next = logits.argmax(-1, false).int64_value(&[0]) as u32;
        alone.push(next);
    }
    assert_eq!(
        alone, case.greedy_ids,
        "greedy decode of {:?} alone",
        case.prompt
    );

    // The longest prompt in chunks of 3 tokens: the same last logits.
    let longest = reference
        .cases
        .iter()
        .max_by_key(|c| c.input_ids.len())
        .unwrap();
    assert!(longest.input_ids.len() > 6, "too short to chunk");
    let mut last = None;
    for (i, chunk) in longest.input_ids.chunks(3).enumerate() {
        last = Some(model.prefill_chunk(chunk, &mut cache, 1, i * 3).unwrap());
    }
    let theirs = Tensor::from_slice(longest.logits.last().unwrap());
    let diff = (last.unwrap() - &theirs).abs().max().double_value(&[]);
    assert!(
        diff < LOGIT_TOLERANCE,
        "{:?} in chunks: max |logit diff| = {diff}",
        longest.prompt
    );

    // The prompts (of different lengths) as one right-padded batch: each
    // row is the logits of that prompt's last position.
    let prompts: Vec<&[u32]> = reference
        .cases
        .iter()
        .map(|c| c.input_ids.as_slice())
        .collect();
    assert!(prompts.iter().any(|p| p.len() != prompts[0].len()));
    let batched = model.prefill_batch(&prompts, &mut cache, 0).unwrap();
    for (i, case) in reference.cases.iter().enumerate() {
        let last = case.logits.last().unwrap();
        let theirs = Tensor::from_slice(last);
        let diff = (batched.get(i as i64) - &theirs)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff < LOGIT_TOLERANCE,
            "{:?} in a batched prefill: max |logit diff| = {diff}",
            case.prompt
        );
    }

    // Greedy through the engine, all prompts submitted at once so that they
    // are decoded as one batch.
    let config = ModelConfig {
        path: dir.clone(),
        device: "cpu".into(),
        max_batch_size: 8,
        ..Default::default()
    };
    let engine = Engine::start("parity", &config).await.unwrap();
    let mut streams = Vec::new();
    for case in &reference.cases {
        let (tx, rx) = mpsc::unbounded_channel();
        engine
            .submit(Job {
                request_id: case.prompt.clone(),
                prompt_ids: case.input_ids.clone(),
                params: SamplingParams::default(),
                max_new_tokens: NEW_TOKENS,
                stops: Vec::new(),
                ignore_eos: true,
                arrived: Instant::now(),
                events: tx,
            })
            .unwrap();
        streams.push(rx);
    }
    for (case, mut rx) in reference.cases.iter().zip(streams) {
        let mut ids = Vec::new();
        while let Some(event) = rx.recv().await {
            match event {
                Event::Step { chunk, finish } => {
                    ids.extend(chunk.token_ids);
                    if finish.is_some() {
                        break;
                    }
                }
                Event::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            ids, case.greedy_ids,
            "greedy continuation of {:?}",
            case.prompt
        );
    }
    assert!(
        engine
            .stats
            .peak_batch
            .load(std::sync::atomic::Ordering::Relaxed)
            > 1,
        "the prompts were not batched"
    );
}
