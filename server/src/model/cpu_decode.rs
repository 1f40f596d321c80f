//! The decode step on the CPU in float32 without ATen: every layer's norms,
//! projections, rotary embedding, KV writes, attention and activation run as
//! torchwire's own loops over plain float32 rows, the projections and the
//! attention on libtorch's OpenMP threads.
//!
//! Why: at decode batch sizes a step through ATen pays dispatch, tensor
//! set-up and allocation for about 30 small ops a layer, which on a small
//! model costs more than the arithmetic (BENCHMARKS.md, "Against llama.cpp
//! on CPU"). Residual adds ride in the projections (`accumulate`). GPUs and
//! half precision keep the tensor-op step in `llama.rs`; prompts keep it
//! everywhere (their projections run on the same panel kernel through
//! `Projection`).

use tch::{Device, Kind, TchError, Tensor};

use super::cpu_attention::{decode_attention, AttentionShape};
use super::cpu_matmul::{product, WeightRows};
use super::cpu_ops::{rms_norm_rows, rope_rows, silu_mul_rows};
use super::embedding::EmbedRows;
use crate::engine::kv_cache::KvCache;

/// The model's sizes.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f32,
}

/// One layer's weights as float32 slices and weight rows.
pub struct LayerRows<'a> {
    pub input_norm: &'a [f32],
    pub qkv: WeightRows<'a>,
    pub qkv_bias: Option<&'a [f32]>,
    pub o: WeightRows<'a>,
    pub post_norm: &'a [f32],
    pub gate_up: WeightRows<'a>,
    pub down: WeightRows<'a>,
}

/// A model's weights, borrowed for one step.
pub struct ModelRows<'a> {
    pub dims: Dims,
    pub embed: EmbedRows<'a>,
    pub layers: Vec<LayerRows<'a>>,
    pub norm: &'a [f32],
    pub lm_head: WeightRows<'a>,
    /// Rotary tables `[positions, head_dim]`.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// The step's scratch rows.
struct Rows {
    h: Vec<f32>,
    x: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// One decode step for the sequences in slots `0..B`: `tokens[b]` is fed at
/// position `positions[b]`, its keys and values stored there, and it
/// attends to positions `0..=positions[b]` of its slot. Returns float32
/// logits `[B, vocab]`.
pub fn decode(
    model: &ModelRows,
    tokens: &[u32],
    positions: &[usize],
    cache: &mut KvCache,
) -> Result<Tensor, TchError> {
    let d = model.dims;
    let b = tokens.len();
    let context = cache.max_context();
    let rope_positions = model.cos.len() / d.head_dim.max(1);
    if positions.len() != b || b > cache.max_batch() {
        return Err(TchError::Shape(format!(
            "decode of {b} tokens at {} positions, {} slots",
            positions.len(),
            cache.max_batch()
        )));
    }
    if let Some(&p) = positions
        .iter()
        .find(|&&p| p >= context.min(rope_positions))
    {
        return Err(TchError::Shape(format!(
            "decode position {p} beyond the context of {context}"
        )));
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= d.vocab) {
        return Err(TchError::Shape(format!(
            "token id {t} beyond the vocabulary of {}",
            d.vocab
        )));
    }
    let threads = tch::get_num_threads().max(1) as usize;
    let (hidden, inter) = (d.hidden, d.intermediate);
    let attn_width = d.heads * d.head_dim;
    let qkv_width = attn_width + 2 * d.kv_heads * d.head_dim;
    let mut r = Rows {
        h: Vec::with_capacity(b * hidden),
        x: vec![0.0; b * hidden],
        qkv: vec![0.0; b * qkv_width],
        attn: vec![0.0; b * attn_width],
        gate_up: vec![0.0; b * 2 * inter],
        act: vec![0.0; b * inter],
    };
    for &t in tokens {
        model.embed.push_row(t as usize, hidden, &mut r.h);
    }
    let shape = AttentionShape {
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        context,
    };
    let project = |x: &[f32], w: WeightRows, (k, n): (usize, usize), out: &mut [f32], add| {
        if product(x, w, (b, k, n), out, add, threads) {
            Ok(())
        } else {
            Err(TchError::Shape(format!(
                "CPU decode: a [{n}, {k}] projection does not fit its weight"
            )))
        }
    };
    for (i, layer) in model.layers.iter().enumerate() {
        rms_norm_rows(&r.h, layer.input_norm, d.eps, &mut r.x);
        project(&r.x, layer.qkv, (hidden, qkv_width), &mut r.qkv, false)?;
        if let Some(bias) = layer.qkv_bias {
            for row in r.qkv.chunks_exact_mut(qkv_width) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        rope_rows(
            &mut r.qkv,
            qkv_width,
            d.heads + d.kv_heads,
            d.head_dim,
            positions,
            (model.cos, model.sin),
        );
        let (keys, values) = cache
            .cpu_layer_mut(i)
            .ok_or_else(|| TchError::Kind("the KV cache is not float32 on the CPU".into()))?;
        store_kv(
            &r.qkv,
            qkv_width,
            positions,
            shape,
            (&mut *keys, &mut *values),
        );
        decode_attention(
            &r.qkv,
            qkv_width,
            (&*keys, &*values),
            positions,
            shape,
            &mut r.attn,
            threads,
        );
        project(&r.attn, layer.o, (attn_width, hidden), &mut r.h, true)?;
        rms_norm_rows(&r.h, layer.post_norm, d.eps, &mut r.x);
        project(
            &r.x,
            layer.gate_up,
            (hidden, 2 * inter),
            &mut r.gate_up,
            false,
        )?;
        silu_mul_rows(&r.gate_up, inter, &mut r.act);
        project(&r.act, layer.down, (inter, hidden), &mut r.h, true)?;
    }
    rms_norm_rows(&r.h, model.norm, d.eps, &mut r.x);
    let logits = Tensor::f_empty([b as i64, d.vocab as i64], (Kind::Float, Device::Cpu))?;
    // SAFETY: a fresh contiguous float32 CPU tensor of b * vocab elements.
    let out = unsafe { std::slice::from_raw_parts_mut(logits.data_ptr() as *mut f32, b * d.vocab) };
    project(&r.x, model.lm_head, (hidden, d.vocab), out, false)?;
    Ok(logits)
}

/// Copies row `b`'s new keys and values (after the query heads in `qkv`)
/// into slot `b` at `positions[b]`.
fn store_kv(
    qkv: &[f32],
    qkv_width: usize,
    positions: &[usize],
    shape: AttentionShape,
    (keys, values): (&mut [f32], &mut [f32]),
) {
    let d = shape.head_dim;
    let kv_width = shape.kv_heads * d;
    for (b, (row, &p)) in qkv.chunks_exact(qkv_width).zip(positions).enumerate() {
        let new_keys = &row[shape.heads * d..][..kv_width];
        let new_values = &row[shape.heads * d + kv_width..][..kv_width];
        for g in 0..shape.kv_heads {
            let at = ((b * shape.kv_heads + g) * shape.context + p) * d;
            keys[at..at + d].copy_from_slice(&new_keys[g * d..][..d]);
            values[at..at + d].copy_from_slice(&new_values[g * d..][..d]);
        }
    }
}
