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
//! the paragraph `quant_eval` uses is read.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use torchwire_server::engine::kv_cache::KvCache;
use torchwire_server::model::quality::LogitComparison;
use torchwire_server::model::{kv_cache_kind, Llama, LoadOptions, Quantization};

const TEXT: &str = "The old lighthouse keeper climbed the winding stairs every evening to light \
the lamp. Ships passing in the night relied on its steady beam to find their way around the \
rocky coast. You will meet a stranger who changes your life. A journey of a thousand miles \
begins with a single step. Fortune favors the bold, but patience is a virtue too. Never put \
off until tomorrow what you can do today. The best way to predict the future is to invent it. \
He who laughs last laughs best, and she who reads the fine print laughs longest. Your hard \
work will soon pay off, so keep going even when the road is long and the night is dark.";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("models/torchwire-tiny", String::as_str));
    let text = args
        .get(2)
        .filter(|a| !a.is_empty())
        .map(|f| std::fs::read_to_string(f).expect("read the text file"))
        .unwrap_or_else(|| TEXT.to_string());
    let narrow = args.get(3).map_or("float16", String::as_str);
    let narrow_kind = kv_cache_kind(narrow, Kind::Float).expect("kv cache dtype");
    tch::set_num_threads(2);
    let tokenizer =
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    let ids = tokenizer
        .encode(text.as_str(), true)
        .expect("encode")
        .get_ids()
        .to_vec();
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
