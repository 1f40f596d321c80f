//! Decode attention on the CPU, read in place from the KV cache (float32,
//! or half precision widened as it is loaded):
//! for each sequence `b` and query head `h`, the scores of its one new
//! query against keys `0..=positions[b]` of its slot, a softmax, and the
//! weighted sum of the values. The query heads of a group are taken
//! together, so each key and value row is read once for all of them (GQA);
//! the (sequence, KV head) tasks are spread over libtorch's OpenMP threads,
//! or (sequence, query head) tasks where there are too few of those to keep
//! the threads busy. The scale is in the query already (folded into q's
//! weights).

use std::cell::RefCell;

use super::cpu_matmul::Chunks;
use super::kv_element::{vectorized, KvElement};
use super::vec_exp::exp_shifted_sum;

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
pub unsafe fn decode_attention<E: KvElement>(
    qkv: &[f32],
    qkv_width: usize,
    (keys, values): (&[E], &[E]),
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

/// The queries `q` (`d` floats each) against the same `k`/`v` rows of `d`;
/// `scores` is scratch, holding each query's scores in turn.
fn attend<E: KvElement>(
    d: usize,
    q: &[f32],
    k: &[E],
    v: &[E],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = d.max(1);
    scores.clear();
    scores.resize(q.len() / d * (k.len() / d), 0.0);
    #[cfg(target_arch = "x86_64")]
    if vectorized() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { attend_avx2(d, q, k, v, scores, out) };
    }
    attend_body(d, q, k, v, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2<E: KvElement>(
    d: usize,
    q: &[f32],
    k: &[E],
    v: &[E],
    scores: &mut [f32],
    out: &mut [f32],
) {
    if !d.is_multiple_of(8) {
        return attend_body(d, q, k, v, scores, out);
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (this function's features).
    unsafe { avx2::scores(d, q, k, scores) };
    softmax_rows(scores, k.len() / d);
    // SAFETY: as above.
    unsafe { avx2::values(d, v, scores, out) };
}

/// Written so that the compiler vectorizes it for the features of the
/// function it is inlined into; `d` is at least 1.
#[inline(always)]
fn attend_body<E: KvElement>(
    d: usize,
    q: &[f32],
    k: &[E],
    v: &[E],
    scores: &mut [f32],
    out: &mut [f32],
) {
    scores_body(d, q, k, scores);
    weigh_values(d, v, scores, out)
}

/// `scores[j * len + t] = q_j . k_t`.
#[inline(always)]
fn scores_body<E: KvElement>(d: usize, q: &[f32], k: &[E], scores: &mut [f32]) {
    let len = k.len() / d;
    for (t, key) in k.chunks_exact(d).enumerate() {
        for (j, q) in q.chunks_exact(d).enumerate() {
            scores[j * len + t] = dot(q, key);
        }
    }
}

/// Softmax of each query's scores, then `out_j = sum_t p_jt v_t`.
#[inline(always)]
fn weigh_values<E: KvElement>(d: usize, v: &[E], scores: &mut [f32], out: &mut [f32]) {
    let d = d.max(1);
    let len = v.len() / d;
    softmax_rows(scores, len);
    out.fill(0.0);
    for (t, value) in v.chunks_exact(d).enumerate() {
        for (j, out) in out.chunks_exact_mut(d).enumerate() {
            let p = scores[j * len + t];
            for (o, x) in out.iter_mut().zip(value) {
                *o += p * x.to_f32();
            }
        }
    }
}

/// Each row of `len` scores into probabilities.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], len: usize) {
    for row in scores.chunks_exact_mut(len.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv = 1.0 / exp_shifted_sum(row, max);
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::KvElement;

    /// The sums of four vectors' lanes, in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sums4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    /// As `scores_body`, four keys at a time against each query, so that a
    /// horizontal sum serves four scores. `d` is a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores<E: KvElement>(d: usize, q: &[f32], k: &[E], scores: &mut [f32]) {
        let len = k.len() / d;
        let queries = q.len() / d;
        assert!(d.is_multiple_of(8) && scores.len() >= queries * len);
        let (qp, kp, sp) = (q.as_ptr(), k.as_ptr(), scores.as_mut_ptr());
        let whole = len / 4 * 4;
        for t in (0..whole).step_by(4) {
            for j in 0..queries {
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in (0..d).step_by(8) {
                    // SAFETY: query j, keys t..t + 4 and the chunk at c are
                    // within q and k (j < queries, t + 4 <= len, c + 8 <= d).
                    unsafe {
                        let qv = _mm256_loadu_ps(qp.add(j * d + c));
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(qv, E::load8(kp.add((t + i) * d + c)), *a);
                        }
                    }
                }
                let four = sums4(acc[0], acc[1], acc[2], acc[3]);
                // SAFETY: j * len + t + 4 <= queries * len (asserted).
                unsafe { _mm_storeu_ps(sp.add(j * len + t), four) };
            }
        }
        for t in whole..len {
            for j in 0..queries {
                scores[j * len + t] = super::dot(&q[j * d..][..d], &k[t * d..][..d]);
            }
        }
    }

    /// `out_j = sum_t p_jt v_t` for the probabilities `p` (each query's
    /// `len` in turn), up to 64 output floats of a query held in registers
    /// through all the values. `d` is a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn values<E: KvElement>(d: usize, v: &[E], p: &[f32], out: &mut [f32]) {
        let len = v.len() / d;
        let queries = out.len() / d;
        assert!(d.is_multiple_of(8) && p.len() >= queries * len);
        for j in 0..queries {
            let (p, o) = (&p[j * len..][..len], &mut out[j * d..][..d]);
            let mut c = 0;
            // SAFETY (each call): c + 8 * N <= d, so every load is inside a
            // value row and every store inside `o`.
            while c + 64 <= d {
                unsafe { columns::<E, 8>(d, c, v, p, o) };
                c += 64;
            }
            while c + 32 <= d {
                unsafe { columns::<E, 4>(d, c, v, p, o) };
                c += 32;
            }
            while c < d {
                unsafe { columns::<E, 1>(d, c, v, p, o) };
                c += 8;
            }
        }
    }

    /// Output floats `c..c + 8N` of one query.
    ///
    /// # Safety
    /// `c + 8 * N <= d`, `v` holds `p.len()` rows of `d`, `o` holds `d`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn columns<E: KvElement, const N: usize>(
        d: usize,
        c: usize,
        v: &[E],
        p: &[f32],
        o: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); N];
        let vp = v.as_ptr();
        for (t, &pt) in p.iter().enumerate() {
            let b = _mm256_set1_ps(pt);
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: row t < len, columns within d, per the caller.
                *a = _mm256_fmadd_ps(b, unsafe { E::load8(vp.add(t * d + c + 8 * i)) }, *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: c + 8 * i + 8 <= d = o.len(), per the caller.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(c + 8 * i), *a) };
        }
    }
}

#[inline(always)]
fn dot<E: KvElement>(a: &[f32], b: &[E]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i].to_f32();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_matmul::Regions;
    use crate::model::kv_element::{bf16, f16};
    use tch::{Device, Kind, Tensor};

    #[test]
    fn matches_softmax_attention_over_each_prefix() {
        let _guard = tch::no_grad_guard();
        // A head of 12 takes the plain loops; one of 32 the vector scores,
        // four keys at a time and a tail (prefixes of 1, 11 and 20 keys).
        // The cache in float32 and in both half precisions.
        for head_dim in [12, 32] {
            let shape = AttentionShape {
                heads: 6,
                kv_heads: 2,
                head_dim,
                context: 20,
            };
            check_against_softmax::<f32>(shape);
            check_against_softmax::<f16>(shape);
            check_against_softmax::<bf16>(shape);
        }
    }

    fn check_against_softmax<E: KvElement>(shape: AttentionShape) {
        let (b, d) = (3usize, shape.head_dim as i64);
        let width = (shape.heads + 2 * shape.kv_heads) * shape.head_dim;
        let opts = (Kind::Float, Device::Cpu);
        let qkv = Tensor::randn([b as i64, width as i64], opts);
        let cache = [b as i64, 2, 20, d];
        let slice = |t: &Tensor| -> Vec<f32> { Vec::<f32>::try_from(t.flatten(0, -1)).unwrap() };
        // The cache rounded to E, and the reference on the rounded values.
        let stored = |t: Tensor| {
            let floats = slice(&t);
            let elements: Vec<E> = floats.iter().map(|&x| E::from_f32(x)).collect();
            let widened: Vec<f32> = elements.iter().map(|e| e.to_f32()).collect();
            (elements, Tensor::from_slice(&widened).view(cache))
        };
        let (key_elements, keys) = stored(Tensor::randn(cache, opts));
        let (value_elements, values) = stored(Tensor::randn(cache, opts));
        let all = [0usize, 10, 19];
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
                    (&key_elements, &value_elements),
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
                        "{:?} cache, d {d} row {row} head {h} batch {batch} threads {threads}",
                        E::KIND
                    );
                }
            }
        }
    }
}
