//! Decode attention on the CPU, read in place from the float32 KV cache:
//! for each sequence `b` and query head `h`, the scores of its one new
//! query against keys `0..=positions[b]` of its slot, a softmax, and the
//! weighted sum of the values. The query heads of a group are taken
//! together, so each key and value row is read once for all of them (GQA);
//! the (sequence, KV head) tasks are spread over libtorch's OpenMP threads,
//! or (sequence, query head) tasks where there are too few of those to keep
//! the threads busy. The scale is in the query already (folded into q's
//! weights).

use std::cell::RefCell;

use super::cpu_matmul::{vectorized, Chunks};

/// Below this many multiply-adds a step's attention runs on one thread.
const PARALLEL_WORK: usize = 1 << 14;

/// The sizes attention needs.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions per slot in the cache (its stride between KV heads).
    pub context: usize,
}

/// Where the tasks write: `[B, heads * head_dim]`, disjoint per task.
struct Out(*mut f32);
// SAFETY: every task writes only its own heads' floats.
unsafe impl Sync for Out {}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Attention of row `b`'s query (heads `0..heads` of `qkv`'s row `b`,
/// `qkv_width` floats a row) over slot `b` of `keys`/`values` (`[slots,
/// kv_heads, context, head_dim]`), positions `0..=positions[b]`, into `out`
/// (`[B, heads * head_dim]`), in tasks over `on`'s threads. Callers check
/// that positions fit the context and the slices their shapes.
///
/// # Safety
/// `out` points to `B * heads * head_dim` floats that nothing else reads or
/// writes while this runs (on a team: in this loop).
pub unsafe fn decode_attention(
    qkv: &[f32],
    qkv_width: usize,
    (keys, values): (&[f32], &[f32]),
    positions: &[usize],
    shape: AttentionShape,
    out: *mut f32,
    on: &dyn Chunks,
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
        context,
    } = shape;
    let group = heads / kv_heads.max(1);
    let work: usize = positions.iter().map(|p| (p + 1) * heads * d).sum();
    let threads = if work < PARALLEL_WORK {
        1
    } else {
        on.threads()
    };
    // Query heads a task takes: a whole group where there are tasks enough.
    let span = if positions.len() * kv_heads >= 4 * threads {
        group.max(1)
    } else {
        1
    };
    let tasks = positions.len() * heads / span;
    let chunk = if threads == 1 { tasks } else { 1 };
    let dst = Out(out);
    on.for_each_chunk(tasks, chunk, &|range| {
        let dst = &dst;
        SCORES.with_borrow_mut(|scores| {
            for task in range {
                // Heads h..h + span of sequence b, all in one group.
                let first = task * span;
                let (b, h) = (first / heads, first % heads);
                let len = positions[b] + 1;
                let q = &qkv[b * qkv_width + h * d..][..span * d];
                let base = (b * kv_heads + h / group) * context * d;
                let (k, v) = (&keys[base..][..len * d], &values[base..][..len * d]);
                // SAFETY: the task owns out[b, h * d..(h + span) * d].
                let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(first * d), span * d) };
                attend(d, q, k, v, scores, o);
            }
        });
    });
}

/// The queries `q` (`d` floats each) against the same `k`/`v` rows of `d`.
fn attend(d: usize, q: &[f32], k: &[f32], v: &[f32], scores: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vectorized() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { attend_avx2(d, q, k, v, scores, out) };
    }
    attend_body(d, q, k, v, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(d: usize, q: &[f32], k: &[f32], v: &[f32], scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_body(d, q, k, v, scores, out)
}

/// Written so that the compiler vectorizes it for the features of the
/// function it is inlined into. `scores` holds each query's scores in turn.
#[inline(always)]
fn attend_body(d: usize, q: &[f32], k: &[f32], v: &[f32], scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = d.max(1);
    let len = k.len() / d;
    scores.clear();
    scores.resize(q.len() / d * len, 0.0);
    for (t, key) in k.chunks_exact(d).enumerate() {
        for (j, q) in q.chunks_exact(d).enumerate() {
            scores[j * len + t] = dot(q, key);
        }
    }
    for row in scores.chunks_exact_mut(len.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
    out.fill(0.0);
    for (t, value) in v.chunks_exact(d).enumerate() {
        for (j, out) in out.chunks_exact_mut(d).enumerate() {
            let p = scores[j * len + t];
            for (o, x) in out.iter_mut().zip(value) {
                *o += p * x;
            }
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_matmul::Regions;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn matches_softmax_attention_over_each_prefix() {
        let _guard = tch::no_grad_guard();
        let shape = AttentionShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 12,
            context: 20,
        };
        let (b, d) = (3usize, shape.head_dim as i64);
        let width = (shape.heads + 2 * shape.kv_heads) * shape.head_dim;
        let opts = (Kind::Float, Device::Cpu);
        let qkv = Tensor::randn([b as i64, width as i64], opts);
        let cache = [b as i64, 2, 20, d];
        let (keys, values) = (Tensor::randn(cache, opts), Tensor::randn(cache, opts));
        let all = [0usize, 7, 19];
        let slice = |t: &Tensor| -> Vec<f32> { Vec::<f32>::try_from(t.flatten(0, -1)).unwrap() };
        // Three sequences take a group of query heads a task, one sequence
        // a query head a task (too few tasks otherwise).
        for (batch, threads) in [(3, 1), (3, 2), (1, 1), (1, 2)] {
            let positions = &all[..batch];
            let mut out = vec![f32::NAN; batch * shape.heads * shape.head_dim];
            // SAFETY: `out` holds batch * heads * head_dim floats.
            unsafe {
                decode_attention(
                    &slice(&qkv)[..batch * width],
                    width,
                    (&slice(&keys), &slice(&values)),
                    positions,
                    shape,
                    out.as_mut_ptr(),
                    &Regions(threads),
                )
            };
            for (row, &p) in positions.iter().enumerate() {
                let len = p as i64 + 1;
                for h in 0..shape.heads as i64 {
                    let g = h / 3;
                    let q = qkv.get(row as i64).narrow(0, h * d, d).view([1, d]);
                    let k = keys.get(row as i64).get(g).narrow(0, 0, len);
                    let v = values.get(row as i64).get(g).narrow(0, 0, len);
                    let want = q.mm(&k.tr()).softmax(-1, Kind::Float).mm(&v).view([d]);
                    let start = (row * shape.heads + h as usize) * shape.head_dim;
                    let got = Tensor::from_slice(&out[start..start + shape.head_dim]);
                    assert!(
                        got.allclose(&want, 1e-5, 1e-5, false),
                        "row {row} head {h} batch {batch} threads {threads}"
                    );
                }
            }
        }
    }
}
