//! What a half-precision KV cache (`--kv-cache-dtype float16` or
//! `bfloat16`) costs in quality: a text is fed one token a decode step
//! (teacher forcing, every position reading all earlier keys and values from
//! the cache), once with a float32 cache and once with the narrower one,
//! and the logits are compared position by position:
//!
//! ```sh
//! cargo run --release -p torchwire-server --example kv_eval -- models/torchwire-tiny [TEXT_FILE] [float16|bfloat16]
//! ```
//!
//! Prints the perplexity of the text under both, the mean KL divergence
//! of the narrow cache's next-token distribution from float32's, how often
//! their argmax agrees and the largest logit difference. Without a text file
//! a built-in paragraph is read (`eval_text`, shared with `quant_eval`).

mod eval_text;

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use torchwire_server::engine::kv_cache::KvCache;
use torchwire_server::model::quality::LogitComparison;
use torchwire_server::model::{kv_cache_kind, Llama, LoadOptions, Quantization};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("models/torchwire-tiny", String::as_str));
    let narrow = args.get(3).map_or("float16", String::as_str);
    let narrow_kind = kv_cache_kind(narrow, Kind::Float).expect("kv cache dtype");
    tch::set_num_threads(2);
    let ids = eval_text::token_ids(&dir, args.get(2));
    let model = Llama::load(
        &dir,
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            max_positions: 512,
            quantization: Quantization::None,
        },
    )
    .expect("load");
    let window = 512.min(model.config.max_position_embeddings);
    let cache = |kind| {
        let shape = (
            model.num_layers(),
            1,
            model.kv_heads(),
            window,
            model.head_dim(),
        );
        KvCache::stored_as(shape, Device::Cpu, Kind::Float, kind).expect("cache")
    };
    // Every position's logits, one decode step a token after the first.
    let run = |kind| {
        let mut cache = cache(kind);
        let mut all = Vec::new();
        for chunk in ids.chunks(window) {
            let mut rows = vec![model.prefill(&chunk[..1], &mut cache, 0, false).unwrap()];
            for (p, &t) in chunk.iter().enumerate().skip(1) {
                let logits = model.decode(&[t], &[p], &mut cache).expect("decode");
                rows.push(logits.squeeze_dim(0));
            }
            all.push(Tensor::stack(&rows, 0));
        }
        all
    };
    let (reference, other) = (run(Kind::Float), run(narrow_kind));
    let mut cmp = LogitComparison::default();
    for ((a, b), chunk) in reference.iter().zip(&other).zip(ids.chunks(window)) {
        cmp.add(a, b, chunk).expect("compare");
    }
    let (ppl_float, ppl_narrow) = cmp.perplexities();
    println!("model: {}", dir.display());
    println!("tokens: {} ({} scored)", cmp.positions, cmp.scored);
    println!(
        "perplexity: float32 cache {ppl_float:.4}, {narrow} cache {ppl_narrow:.4} ({:+.3} %)",
        (ppl_narrow / ppl_float - 1.0) * 100.0
    );
    println!("mean KL(float32 || {narrow}): {:.3e} nats", cmp.mean_kl());
    println!(
        "same argmax: {} of {} positions ({:.2} %)",
        cmp.same_top1,
        cmp.positions,
        cmp.top1_agreement() * 100.0
    );
    println!("largest |logit difference|: {:.5}", cmp.max_abs_diff);
}
