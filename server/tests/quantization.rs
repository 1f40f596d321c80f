//! `--quantize int8` on the bundled model: what it costs in quality against
//! float32 (teacher-forced logits over a text), the memory it saves, and
//! the int8 decode path agreeing with the int8 prompt path.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use torchwire_server::engine::kv_cache::KvCache;
use torchwire_server::model::quality::LogitComparison;
use torchwire_server::model::{Llama, LoadOptions, Quantization};

const TEXT: &str = "The old lighthouse keeper climbed the winding stairs every evening to light \
the lamp. Ships passing in the night relied on its steady beam to find their way around the \
rocky coast. You will meet a stranger who changes your life. A journey of a thousand miles \
begins with a single step. Fortune favors the bold, but patience is a virtue too.";

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("models/torchwire-tiny")
}

fn load(quantization: Quantization) -> Llama {
    Llama::load(
        &model_dir(),
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            max_positions: 256,
            quantization,
        },
    )
    .unwrap()
}

fn cache(model: &Llama) -> KvCache {
    KvCache::new(
        model.num_layers(),
        2,
        model.kv_heads(),
        256,
        model.head_dim(),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap()
}

fn tokens() -> Vec<u32> {
    let tokenizer = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    tokenizer.encode(TEXT, true).unwrap().get_ids().to_vec()
}

#[test]
fn int8_logits_stay_close_to_float32_and_the_weights_shrink() {
    tch::set_num_threads(2);
    let (float, int8) = (load(Quantization::None), load(Quantization::Int8));
    let ids = tokens();
    assert!(ids.len() > 50, "{} tokens", ids.len());
    let mut kv = cache(&float);
    let a = float.prefill(&ids, &mut kv, 0, true).unwrap();
    let b = int8.prefill(&ids, &mut kv, 0, true).unwrap();
    let mut cmp = LogitComparison::default();
    cmp.add(&a, &b, &ids).unwrap();
    let (ppl_float, ppl_int8) = cmp.perplexities();
    // Measured on this text: KL ~1e-4 nats, every argmax the same,
    // perplexity +0.5 %. The bounds leave room for other CPUs' rounding,
    // and fail on any real fault (a wrong scale or row is KL >> 0.1).
    assert!(cmp.mean_kl() < 0.002, "mean KL {}", cmp.mean_kl());
    assert!(
        cmp.top1_agreement() >= 0.97,
        "top-1 {}",
        cmp.top1_agreement()
    );
    assert!(ppl_int8 / ppl_float < 1.02, "{ppl_float} -> {ppl_int8}");
    assert!(
        cmp.max_abs_diff > 0.0,
        "int8 changed nothing: not quantized?"
    );
    // The projections (most of the weights) take a quarter of the bytes.
    assert!(
        (int8.weight_bytes as f64) < 0.5 * float.weight_bytes as f64,
        "{} vs {}",
        int8.weight_bytes,
        float.weight_bytes
    );
    assert_eq!(int8.parameters, float.parameters);
}

#[test]
fn int8_decode_steps_match_the_int8_prompt_path() {
    tch::set_num_threads(2);
    let model = load(Quantization::Int8);
    let ids = tokens();
    let (n, steps) = (20, 6);
    // The prompt path reads all n + steps tokens at once; the decode path
    // reads n, then one token a step (batch 1: one-row int8 products).
    let whole = model
        .prefill(&ids[..n + steps], &mut cache(&model), 0, true)
        .unwrap();
    let mut kv = cache(&model);
    let _ = model.prefill(&ids[..n], &mut kv, 0, false).unwrap();
    for i in 0..steps {
        let step = model.decode(&[ids[n + i]], &[n + i], &mut kv).unwrap();
        let want: Tensor = whole.get((n + i) as i64);
        let diff = (&step.squeeze_dim(0) - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-3, "step {i}: |logit diff| {diff}");
    }
}
