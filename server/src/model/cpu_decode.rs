//! The decode step on the CPU in float32 without ATen: every layer's norms,
//! projections, rotary embedding, KV writes, attention and activation run as
//! torchwire's own loops over plain float32 rows, the projections and the
//! attention on libtorch's OpenMP threads. The KV cache is read and written
//! in place in its own dtype (float32, or float16/bfloat16 widened as it is
//! loaded: `kv_element.rs`).
//!
//! Why: at decode batch sizes a step through ATen pays dispatch, tensor
//! set-up and allocation for about 30 small ops a layer, which on a small
//! model costs more than the arithmetic (BENCHMARKS.md, "Against llama.cpp
//! on CPU"). Residual adds ride in the projections (`accumulate`). GPUs and
//! half precision keep the tensor-op step in `llama.rs`; prompts keep it
//! everywhere (their projections run on the same panel kernel through
//! `Projection`).

use std::ops::Range;

use tch::{Device, Kind, TchError, Tensor};

use super::cpu_attention::{decode_attention, AttentionShape};
use super::cpu_matmul::{run_team, Chunks, Job, Member, WeightRows};
use super::cpu_ops::{rms_norm_rows, rope_rows, silu_mul_rows};
use super::embedding::EmbedRows;
use super::kv_element::{bf16, f16, KvElement};
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

impl Dims {
    /// Floats of the query heads (and of attention's output) in a row.
    fn attn_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Floats of a row of the fused q/k/v projection.
    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
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

/// A buffer the members of the step's team share (floats unless said).
/// Between two barriers each part of it is either only read or written by
/// one member.
struct Shared<T = f32> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Shared<T> {}

// SAFETY: members touch a `Shared` only as its methods' contracts allow.
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn of(buffer: &mut [T]) -> Self {
        Self {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
        }
    }

    /// The whole buffer.
    ///
    /// # Safety
    /// No member writes any of it until the next barrier.
    unsafe fn read(&self) -> &[T] {
        // SAFETY: a live buffer of `len` floats, per the caller unwritten.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Floats `range` of the buffer.
    ///
    /// # Safety
    /// No other member reads or writes any of `range` until the next barrier.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: inside the buffer (checked), owned by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// The step's scratch rows, shared by the team.
#[derive(Clone, Copy)]
struct Rows {
    h: Shared,
    x: Shared,
    qkv: Shared,
    attn: Shared,
    gate_up: Shared,
    act: Shared,
    logits: Shared,
    /// Each row's highest-scoring token, where the caller asked for it.
    argmax: Option<Shared<u32>>,
}

/// What a step needs besides the weights, for a cache of `E`.
struct Step<'a, E> {
    model: &'a ModelRows<'a>,
    positions: &'a [usize],
    rows: Rows,
    /// Each layer's keys and values.
    cache: Vec<(Shared<E>, Shared<E>)>,
    shape: AttentionShape,
}

/// One decode step for the sequences in slots `0..B`: `tokens[b]` is fed at
/// position `positions[b]`, its keys and values stored there, and it
/// attends to positions `0..=positions[b]` of its slot. Returns float32
/// logits `[B, vocab]`, and with `argmax` (`B` long) each row's
/// highest-scoring token id in it, found by the team too (greedy decoding
/// then needs nothing after the step). The whole step is one parallel
/// region on libtorch's threads (`cpu_matmul::run_team`). The cache is
/// read and written in place in the dtype it is stored in: float32,
/// float16 or bfloat16.
pub fn decode(
    model: &ModelRows,
    tokens: &[u32],
    positions: &[usize],
    cache: &mut KvCache,
    argmax: Option<&mut [u32]>,
) -> Result<Tensor, TchError> {
    match cache.storage_kind() {
        Kind::Half => decode_in::<f16>(model, tokens, positions, cache, argmax),
        Kind::BFloat16 => decode_in::<bf16>(model, tokens, positions, cache, argmax),
        _ => decode_in::<f32>(model, tokens, positions, cache, argmax),
    }
}

/// [`decode`] with the cache's elements of type `E`.
fn decode_in<E: KvElement>(
    model: &ModelRows,
    tokens: &[u32],
    positions: &[usize],
    cache: &mut KvCache,
    argmax: Option<&mut [u32]>,
) -> Result<Tensor, TchError> {
    let d = model.dims;
    let b = tokens.len();
    let context = cache.max_context();
    let rope_positions = model.cos.len() / d.head_dim.max(1);
    if positions.len() != b
        || b > cache.max_batch()
        || argmax.as_ref().is_some_and(|a| a.len() != b)
    {
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
    check_weights(model)?;
    let shape = AttentionShape {
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        context,
    };
    let slot_floats = d.kv_heads * context * d.head_dim;
    let layers = cache
        .cpu_layers_mut::<E>()
        .filter(|layers| {
            layers.len() == model.layers.len()
                && layers
                    .iter()
                    .all(|(k, v)| k.len() >= b * slot_floats && v.len() >= b * slot_floats)
        })
        .ok_or_else(|| {
            TchError::Kind(
                "the KV cache is not on the CPU in float32, float16 or bfloat16, or not of this model's layers and batch"
                    .into(),
            )
        })?;
    let (hidden, inter, qkv_width) = (d.hidden, d.intermediate, d.qkv_width());
    let mut h = Vec::with_capacity(b * hidden);
    for &t in tokens {
        model.embed.push_row(t as usize, hidden, &mut h);
    }
    let mut x = vec![0.0; b * hidden];
    let mut qkv = vec![0.0; b * qkv_width];
    let mut attn = vec![0.0; b * d.attn_width()];
    let mut gate_up = vec![0.0; b * 2 * inter];
    let mut act = vec![0.0; b * inter];
    let logits = Tensor::f_empty([b as i64, d.vocab as i64], (Kind::Float, Device::Cpu))?;
    // SAFETY: a fresh contiguous float32 CPU tensor of b * vocab elements.
    let out = unsafe { std::slice::from_raw_parts_mut(logits.data_ptr() as *mut f32, b * d.vocab) };
    let step = Step {
        model,
        positions,
        rows: Rows {
            h: Shared::of(&mut h),
            x: Shared::of(&mut x),
            qkv: Shared::of(&mut qkv),
            attn: Shared::of(&mut attn),
            gate_up: Shared::of(&mut gate_up),
            act: Shared::of(&mut act),
            logits: Shared::of(out),
            argmax: argmax.map(Shared::of),
        },
        cache: layers
            .into_iter()
            .map(|(k, v)| (Shared::of(k), Shared::of(v)))
            .collect(),
        shape,
    };
    let threads = tch::get_num_threads().max(1) as usize;
    run_team(threads, &|member| run_step(member, &step));
    Ok(logits)
}

/// Every projection's weight against the sizes the step gives it, so that
/// nothing inside the parallel region can fail.
fn check_weights(model: &ModelRows) -> Result<(), TchError> {
    let d = model.dims;
    let (attn_width, qkv_width) = (d.attn_width(), d.qkv_width());
    let fits = model.layers.iter().all(|l| {
        l.qkv.fits(qkv_width, d.hidden)
            && l.o.fits(d.hidden, attn_width)
            && l.gate_up.fits(2 * d.intermediate, d.hidden)
            && l.down.fits(d.hidden, d.intermediate)
            && l.input_norm.len() == d.hidden
            && l.post_norm.len() == d.hidden
            && l.qkv_bias.is_none_or(|bias| bias.len() == qkv_width)
    }) && model.lm_head.fits(d.vocab, d.hidden)
        && model.norm.len() == d.hidden
        && d.head_dim.is_multiple_of(2);
    if fits {
        Ok(())
    } else {
        Err(TchError::Shape(
            "CPU decode: a weight does not fit the model's sizes".into(),
        ))
    }
}

/// What every member of the team runs: each loop's work shared out, a
/// barrier between loops (in `for_each_chunk`).
fn run_step<E: KvElement>(m: &Member, s: &Step<E>) {
    let d = s.model.dims;
    let b = s.positions.len();
    let r = s.rows;
    let (hidden, inter) = (d.hidden, d.intermediate);
    let (attn_width, qkv_width) = (d.attn_width(), d.qkv_width());
    // Each loop below reads buffers no member writes in it and writes
    // disjoint rows or columns of one other; every member ends each loop at
    // the same barrier.
    for (layer, &(keys, values)) in s.model.layers.iter().zip(&s.cache) {
        norm(m, r.h, layer.input_norm, d, r.x, b);
        project(m, r.x, layer.qkv, (b, hidden, qkv_width), r.qkv, false);
        m.for_each_chunk(b, 1, &|rows| {
            // SAFETY: these rows of qkv and their slots are this member's.
            let qkv = unsafe { r.qkv.part(rows.start * qkv_width..rows.end * qkv_width) };
            if let Some(bias) = layer.qkv_bias {
                for row in qkv.chunks_exact_mut(qkv_width) {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
            }
            let positions = &s.positions[rows.clone()];
            let heads = d.heads + d.kv_heads;
            rope_rows(
                qkv,
                qkv_width,
                heads,
                d.head_dim,
                positions,
                (s.model.cos, s.model.sin),
            );
            store_kv(qkv, qkv_width, rows, s.positions, s.shape, (keys, values));
        });
        // SAFETY: the loop reads qkv and the cache; each task writes its own
        // heads of attn.
        unsafe {
            decode_attention(
                r.qkv.read(),
                qkv_width,
                (keys.read(), values.read()),
                s.positions,
                s.shape,
                r.attn.ptr,
                m,
            )
        };
        project(m, r.attn, layer.o, (b, attn_width, hidden), r.h, true);
        norm(m, r.h, layer.post_norm, d, r.x, b);
        project(
            m,
            r.x,
            layer.gate_up,
            (b, hidden, 2 * inter),
            r.gate_up,
            false,
        );
        m.for_each_chunk(b, 1, &|rows| {
            // SAFETY: gate_up is only read; these rows of act are this member's.
            let (gate_up, act) = unsafe {
                (
                    r.gate_up.read(),
                    r.act.part(rows.start * inter..rows.end * inter),
                )
            };
            let src = &gate_up[rows.start * 2 * inter..rows.end * 2 * inter];
            silu_mul_rows(src, inter, act);
        });
        project(m, r.act, layer.down, (b, inter, hidden), r.h, true);
    }
    norm(m, r.h, s.model.norm, d, r.x, b);
    project(
        m,
        r.x,
        s.model.lm_head,
        (b, hidden, d.vocab),
        r.logits,
        false,
    );
    if let Some(ids) = r.argmax {
        m.for_each_chunk(b, 1, &|rows| {
            // SAFETY: logits are only read; these rows of ids are this member's.
            let (logits, ids) = unsafe { (r.logits.read(), ids.part(rows.clone())) };
            for (id, row) in ids.iter_mut().zip(rows) {
                *id = argmax(&logits[row * d.vocab..][..d.vocab]);
            }
        });
    }
}

/// The index of the highest value, the first of equals, as ATen's argmax
/// picks it (a NaN counts as highest).
fn argmax(row: &[f32]) -> u32 {
    let Some((&first, rest)) = row.split_first() else {
        return 0;
    };
    let (mut best, mut max) = (0, first);
    for (i, &v) in rest.iter().enumerate() {
        if v > max || (v.is_nan() && !max.is_nan()) {
            (best, max) = (i + 1, v);
        }
    }
    best as u32
}

/// RMSNorm of the rows of `src` into `dst`, rows shared out.
fn norm(m: &Member, src: Shared, weight: &[f32], d: Dims, dst: Shared, b: usize) {
    let h = d.hidden;
    m.for_each_chunk(b, 1, &|rows| {
        // SAFETY: src is only read; these rows of dst are this member's.
        let (src, dst) = unsafe { (src.read(), dst.part(rows.start * h..rows.end * h)) };
        rms_norm_rows(&src[rows.start * h..rows.end * h], weight, d.eps, dst);
    });
}

/// `out (+)= x @ w.T` for `x` `[m, k]`, columns shared out.
fn project(
    member: &Member,
    x: Shared,
    w: WeightRows,
    (m, k, n): (usize, usize, usize),
    out: Shared,
    accumulate: bool,
) {
    // SAFETY: no member writes x in this loop.
    let x = unsafe { x.read() }.get(..m * k);
    // SAFETY: the job writes disjoint columns of out, which nothing else
    // touches in this loop. `check_weights` and the buffer sizes make the
    // job consistent, so every member builds it (or none does).
    let job =
        x.and_then(|x| unsafe { Job::from_raw(x, w, (m, k, n), (out.ptr, out.len), accumulate) });
    debug_assert!(job.is_some());
    if let Some(job) = job {
        job.run(member);
    }
}

/// Copies the new keys and values of rows `rows` (after the query heads in
/// `qkv`, which holds those rows) into their slots at their positions.
fn store_kv<E: KvElement>(
    qkv: &[f32],
    qkv_width: usize,
    rows: Range<usize>,
    positions: &[usize],
    shape: AttentionShape,
    (keys, values): (Shared<E>, Shared<E>),
) {
    let d = shape.head_dim;
    let kv_width = shape.kv_heads * d;
    for (row, b) in qkv.chunks_exact(qkv_width).zip(rows) {
        let p = positions[b];
        let new_keys = &row[shape.heads * d..][..kv_width];
        let new_values = &row[shape.heads * d + kv_width..][..kv_width];
        for g in 0..shape.kv_heads {
            let at = ((b * shape.kv_heads + g) * shape.context + p) * d;
            // SAFETY: slot `b` is this member's alone in this loop.
            let (k, v) = unsafe { (keys.part(at..at + d), values.part(at..at + d)) };
            E::store_row(&new_keys[g * d..][..d], k);
            E::store_row(&new_values[g * d..][..d], v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::argmax;
    use tch::Tensor;

    #[test]
    fn argmax_picks_as_aten_does() {
        let nan = f32::NAN;
        let rows: [&[f32]; 7] = [
            &[1.0],
            &[0.5, 2.0, -1.0],
            // Ties: the first.
            &[3.0, 1.0, 3.0, 3.0],
            &[f32::NEG_INFINITY, f32::NEG_INFINITY],
            &[-5.0, f32::INFINITY, 7.0],
            // A NaN counts as highest, the first of them.
            &[1.0, nan, 9.0, nan],
            &[nan, 1.0],
        ];
        for row in rows {
            let want = Tensor::from_slice(row).argmax(0, false).int64_value(&[]);
            assert_eq!(i64::from(argmax(row)), want, "{row:?}");
        }
        assert_eq!(argmax(&[]), 0);
    }
}
