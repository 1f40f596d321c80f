//! The CPU decode step against the op step on random checkpoints of shapes
//! the bundled model does not have: head sizes of 64, 80 and 128, one and
//! several key/value heads, a hidden size that is not a multiple of 16 and
//! differs from heads x head size, odd intermediate and vocabulary sizes,
//! untied output weights, Qwen2's q/k/v biases and scaled rotary tables.

use std::path::Path;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::tests::cpu_step_matches_op_step;
use super::Quantization;

/// A Llama-family shape and the config fields that go with it.
struct Shape {
    name: &'static str,
    hidden: i64,
    layers: i64,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    intermediate: i64,
    vocab: i64,
    tied: bool,
    qkv_bias: bool,
    /// Extra `config.json` fields (model type, rope scaling).
    config: Value,
}

fn shapes() -> Vec<Shape> {
    vec![
        Shape {
            name: "one kv head, head size 64, llama3 rope",
            hidden: 192,
            layers: 2,
            heads: 3,
            kv_heads: 1,
            head_dim: 64,
            intermediate: 520,
            vocab: 1000,
            tied: false,
            qkv_bias: false,
            config: json!({"model_type": "llama", "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
        },
        Shape {
            name: "all kv heads, head size 128, hidden 200, linear rope",
            hidden: 200,
            layers: 2,
            heads: 4,
            kv_heads: 4,
            head_dim: 128,
            intermediate: 344,
            vocab: 517,
            tied: true,
            qkv_bias: false,
            config: json!({"model_type": "llama", "head_dim": 128,
                "rope_scaling": {"type": "linear", "factor": 2.0}}),
        },
        Shape {
            name: "qwen2 with q/k/v biases, head size 80",
            hidden: 240,
            layers: 3,
            heads: 6,
            kv_heads: 2,
            head_dim: 80,
            intermediate: 600,
            vocab: 803,
            tied: true,
            qkv_bias: true,
            config: json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                "head_dim": 80, "rope_theta": 1000000.0, "use_sliding_window": false,
                "sliding_window": 4096}),
        },
    ]
}

/// Weights drawn with a scale of 1/sqrt(fan-in), so activations and logits
/// stay of order one through the layers.
fn weight(out: i64, inp: i64) -> Tensor {
    Tensor::randn([out, inp], (Kind::Float, Device::Cpu)) / (inp as f64).sqrt()
}

fn norm(n: i64) -> Tensor {
    Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.1 + 1.0
}

fn write_checkpoint(dir: &Path, s: &Shape) {
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": s.vocab,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": s.tied,
        "bos_token_id": 0,
        "eos_token_id": 1,
    });
    for (key, value) in s.config.as_object().unwrap() {
        config[key] = value.clone();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let (h, hd) = (s.hidden, s.head_dim);
    let mut tensors: Vec<(String, Tensor)> = vec![
        // Scaled as the projections: tied, it gives logits of order one too
        // (the first RMSNorm undoes the scale on the way in).
        ("model.embed_tokens.weight".into(), weight(s.vocab, h)),
        ("model.norm.weight".into(), norm(h)),
    ];
    if !s.tied {
        tensors.push(("lm_head.weight".into(), weight(s.vocab, h)));
    }
    for i in 0..s.layers {
        let p = |name: &str| format!("model.layers.{i}.{name}");
        let attn = s.heads * hd;
        let kv = s.kv_heads * hd;
        tensors.extend([
            (p("input_layernorm.weight"), norm(h)),
            (p("post_attention_layernorm.weight"), norm(h)),
            (p("self_attn.q_proj.weight"), weight(attn, h)),
            (p("self_attn.k_proj.weight"), weight(kv, h)),
            (p("self_attn.v_proj.weight"), weight(kv, h)),
            (p("self_attn.o_proj.weight"), weight(h, attn)),
            (p("mlp.gate_proj.weight"), weight(s.intermediate, h)),
            (p("mlp.up_proj.weight"), weight(s.intermediate, h)),
            (p("mlp.down_proj.weight"), weight(h, s.intermediate)),
        ]);
        if s.qkv_bias {
            for (name, n) in [("q", attn), ("k", kv), ("v", kv)] {
                let bias = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.1;
                tensors.push((p(&format!("self_attn.{name}_proj.bias")), bias));
            }
        }
    }
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
}

#[test]
fn the_cpu_step_matches_the_op_step_on_other_shapes() {
    tch::manual_seed(7);
    for shape in shapes() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &shape);
        for threads in [1, 2, 3] {
            for quantization in [Quantization::None, Quantization::Int8] {
                cpu_step_matches_op_step(
                    dir.path(),
                    quantization,
                    threads,
                    Kind::Float,
                    shape.name,
                );
            }
        }
        // A half-precision cache: its loads at every head size's tiles.
        for kv in [Kind::Half, Kind::BFloat16] {
            cpu_step_matches_op_step(dir.path(), Quantization::None, 2, kv, shape.name);
        }
    }
}
