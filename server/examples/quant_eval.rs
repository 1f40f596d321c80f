//! What `--quantize int8` costs in quality: the same checkpoint loaded as
//! served (float32) and with int8 projections, run over a text (teacher
//! forcing, every position's logits), compared position by position:
//!
//! ```sh
//! cargo run --release -p torchwire-server --example quant_eval -- models/torchwire-tiny [TEXT_FILE] [THREADS]
//! ```
//!
//! Prints the perplexity of the text under both, the mean KL divergence of
//! int8's next-token distribution from float32's, how often their argmax
//! agrees, the largest logit difference, and the weight memory of each.
//! Without a text file a built-in English paragraph is used.

mod eval_text;

use std::path::PathBuf;

use tch::{Device, Kind};
use torchwire_server::engine::kv_cache::KvCache;
use torchwire_server::model::quality::LogitComparison;
use torchwire_server::model::{Llama, LoadOptions, Quantization};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("models/torchwire-tiny", String::as_str));
    let threads: i32 = args.get(3).map_or(2, |t| t.parse().expect("threads"));
    tch::set_num_threads(threads);
    let ids = eval_text::token_ids(&dir, args.get(2));
    let load = |quantization| {
        Llama::load(
            &dir,
            LoadOptions {
                device: Device::Cpu,
                kind: Kind::Float,
                max_positions: 512,
                quantization,
            },
        )
        .expect("load")
    };
    let (float, int8) = (load(Quantization::None), load(Quantization::Int8));
    let window = 512.min(float.config.max_position_embeddings);
    let mut cache = KvCache::new(
        float.num_layers(),
        1,
        float.kv_heads(),
        window,
        float.head_dim(),
        Device::Cpu,
        Kind::Float,
    )
    .expect("cache");
    let mut cmp = LogitComparison::default();
    for chunk in ids.chunks(window) {
        let a = float.prefill(chunk, &mut cache, 0, true).expect("float32");
        let b = int8.prefill(chunk, &mut cache, 0, true).expect("int8");
        cmp.add(&a, &b, chunk).expect("compare");
    }
    let (ppl_float, ppl_int8) = cmp.perplexities();
    let mib = |m: &Llama| m.weight_bytes as f64 / 1048576.0;
    println!("model: {}", dir.display());
    println!("tokens: {} ({} scored)", cmp.positions, cmp.scored);
    println!(
        "weights: float32 {:.1} MiB, int8 {:.1} MiB",
        mib(&float),
        mib(&int8)
    );
    println!(
        "perplexity: float32 {ppl_float:.4}, int8 {ppl_int8:.4} ({:+.2} %)",
        (ppl_int8 / ppl_float - 1.0) * 100.0
    );
    println!("mean KL(float32 || int8): {:.6} nats", cmp.mean_kl());
    println!(
        "same argmax: {} of {} positions ({:.2} %)",
        cmp.same_top1,
        cmp.positions,
        cmp.top1_agreement() * 100.0
    );
    println!("largest |logit difference|: {:.4}", cmp.max_abs_diff);
}
