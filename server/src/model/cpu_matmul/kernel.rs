//! The dispatch of a few-row product on the CPU, and its tiles for int8
//! weight rows: `out[m, n] (+)= scale[n] * sum_k x[m, k] * w[n, k]` for
//! float32 `x` `[M, K]` and int8 rows `w` `[N, K]` with one scale per row.
//! Weights are read once per tile of 4 rows and used for 2 rows of `x` at a
//! time (AVX2 + FMA where the CPU has them, a portable loop elsewhere),
//! widened to float32 in registers. Float32 weights are packed in panels
//! (`panels.rs`).

use std::ops::Range;

use super::{Job, WeightRows};

/// Computes output columns `cols` of `job`.
///
/// # Safety
/// `job` must be consistent (`Job::new` checked it), `cols` within
/// `0..job.n`, and concurrent calls must use disjoint `cols`.
pub unsafe fn columns(job: &Job, cols: Range<usize>) {
    debug_assert!(cols.end <= job.n);
    if let WeightRows::F32Panels(w) = job.w {
        // SAFETY: upheld by the caller; the panels pick their own tiles.
        return unsafe { super::panels::columns(job, w, cols) };
    }
    #[cfg(target_arch = "x86_64")]
    if let (true, WeightRows::Int8 { w, scales }) = (has_avx2_fma(), job.w) {
        // SAFETY: the CPU has AVX2 and FMA; the caller upholds the rest.
        unsafe { avx2::i8_rows::columns(job, w.as_ptr(), Some(scales), cols) };
        return;
    }
    // SAFETY: upheld by the caller.
    unsafe { columns_portable(job, cols) }
}

/// Whether the vector kernel runs on this CPU.
pub fn vectorized() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The same product in plain Rust, for CPUs without AVX2 and as the
/// reference the vector kernel is tested against.
///
/// # Safety
/// As for [`columns`].
pub unsafe fn columns_portable(job: &Job, cols: Range<usize>) {
    // SAFETY: upheld by the caller.
    unsafe {
        match job.w {
            WeightRows::F32Panels(w) => super::panels::columns_portable(job, w, cols),
            WeightRows::Int8 { w, scales } => portable_rows(job, w, Some(scales), cols),
        }
    }
}

unsafe fn portable_rows<W: Copy>(job: &Job, w: &[W], scales: Option<&[f32]>, cols: Range<usize>)
where
    f32: From<W>,
{
    let k = job.k;
    for n in cols {
        let w = &w[n * k..(n + 1) * k];
        for m in 0..job.m {
            let x = &job.x[m * k..(m + 1) * k];
            let mut lanes = [0f32; 8];
            let mut wc = w.chunks_exact(8);
            let mut xc = x.chunks_exact(8);
            for (wc, xc) in (&mut wc).zip(&mut xc) {
                for i in 0..8 {
                    lanes[i] += xc[i] * f32::from(wc[i]);
                }
            }
            let mut sum: f32 = lanes.iter().sum();
            for (&wi, &xi) in wc.remainder().iter().zip(xc.remainder()) {
                sum += xi * f32::from(wi);
            }
            let scale = scales.map_or(1.0, |s| s[n]);
            // SAFETY: (m, n) is inside the output; columns are ours.
            unsafe { job.store(m, n, sum * scale) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Raw SIMD loads throughout, at offsets within the bounds that `Job::new`
// and the tile loops establish.
#[allow(unsafe_op_in_unsafe_fn)]
mod avx2 {
    use std::arch::x86_64::*;

    /// Weight rows per tile.
    pub(super) const NR: usize = 4;

    /// Eight int8 weights at `w` widened to float32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn load_i8(w: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(w as *const __m128i)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The tiles for one weight element type, read with `$load`.
    macro_rules! tiles {
        ($module:ident, $elem:ty, $load:ident) => {
            pub(super) mod $module {
                use super::{hsum, $load, NR};
                use crate::model::cpu_matmul::Job;
                use std::arch::x86_64::*;
                use std::ops::Range;

                /// # Safety
                /// AVX2 and FMA present; `w` points at the job's `[n, k]`
                /// weight; otherwise as for `kernel::columns`.
                #[target_feature(enable = "avx2,fma")]
                pub unsafe fn columns(
                    job: &Job,
                    w: *const $elem,
                    scales: Option<&[f32]>,
                    cols: Range<usize>,
                ) {
                    let mut n = cols.start;
                    while n + NR <= cols.end {
                        let mut m = 0;
                        while m + 2 <= job.m {
                            tile_2x4(job, w, scales, m, n);
                            m += 2;
                        }
                        if m < job.m {
                            tile_1x4(job, w, scales, m, n);
                        }
                        n += NR;
                    }
                    while n < cols.end {
                        for m in 0..job.m {
                            tile_1x1(job, w, scales, m, n);
                        }
                        n += 1;
                    }
                }

                /// Asks for the weights the next tile reads (row `r + NR`,
                /// at `i`), so that the rows stream from memory ahead of
                /// use: the hardware prefetcher alone left a large int8
                /// weight read at a quarter of the bandwidth MKL reaches.
                /// Non-temporal: a weight is read once a step, so it should
                /// not push the cache, activations and attention rows out
                /// (5-10 % faster decode steps at batch 1, BENCHMARKS.md).
                #[inline(always)]
                unsafe fn prefetch_next_tile(row: *const $elem, i: usize, k: usize) {
                    // A prefetch never faults, even past the end of the weight.
                    _mm_prefetch::<_MM_HINT_NTA>(row.wrapping_add(NR * k + i) as *const i8);
                }

                /// The scalar rest of a dot product from `from` to `k`.
                #[inline]
                unsafe fn tail(x: *const f32, w: *const $elem, from: usize, k: usize) -> f32 {
                    let mut sum = 0.0;
                    for i in from..k {
                        sum += *x.add(i) * f32::from(*w.add(i));
                    }
                    sum
                }

                #[inline(always)]
                fn scale(scales: Option<&[f32]>, n: usize) -> f32 {
                    scales.map_or(1.0, |s| s[n])
                }

                /// One x row against four weight rows, two accumulators per
                /// row (the decode case: enough independent sums to hide
                /// FMA latency).
                #[target_feature(enable = "avx2,fma")]
                unsafe fn tile_1x4(
                    job: &Job,
                    w: *const $elem,
                    scales: Option<&[f32]>,
                    m: usize,
                    n: usize,
                ) {
                    let k = job.k;
                    let x = job.x.as_ptr().add(m * k);
                    let w: [*const $elem; NR] = std::array::from_fn(|r| w.add((n + r) * k));
                    let mut a = [_mm256_setzero_ps(); NR];
                    let mut b = [_mm256_setzero_ps(); NR];
                    let mut i = 0;
                    while i + 16 <= k {
                        let x0 = _mm256_loadu_ps(x.add(i));
                        let x1 = _mm256_loadu_ps(x.add(i + 8));
                        for r in 0..NR {
                            prefetch_next_tile(w[r], i, k);
                            a[r] = _mm256_fmadd_ps(x0, $load(w[r].add(i)), a[r]);
                            b[r] = _mm256_fmadd_ps(x1, $load(w[r].add(i + 8)), b[r]);
                        }
                        i += 16;
                    }
                    if i + 8 <= k {
                        let x0 = _mm256_loadu_ps(x.add(i));
                        for r in 0..NR {
                            a[r] = _mm256_fmadd_ps(x0, $load(w[r].add(i)), a[r]);
                        }
                        i += 8;
                    }
                    for r in 0..NR {
                        let sum = hsum(_mm256_add_ps(a[r], b[r])) + tail(x, w[r], i, k);
                        job.store(m, n + r, sum * scale(scales, n + r));
                    }
                }

                /// Two x rows against four weight rows: each weight load is
                /// used twice.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn tile_2x4(
                    job: &Job,
                    w: *const $elem,
                    scales: Option<&[f32]>,
                    m: usize,
                    n: usize,
                ) {
                    let k = job.k;
                    let x0 = job.x.as_ptr().add(m * k);
                    let x1 = x0.add(k);
                    let w: [*const $elem; NR] = std::array::from_fn(|r| w.add((n + r) * k));
                    let mut a = [_mm256_setzero_ps(); NR];
                    let mut b = [_mm256_setzero_ps(); NR];
                    let mut i = 0;
                    while i + 8 <= k {
                        let xa = _mm256_loadu_ps(x0.add(i));
                        let xb = _mm256_loadu_ps(x1.add(i));
                        for r in 0..NR {
                            prefetch_next_tile(w[r], i, k);
                            let wv = $load(w[r].add(i));
                            a[r] = _mm256_fmadd_ps(xa, wv, a[r]);
                            b[r] = _mm256_fmadd_ps(xb, wv, b[r]);
                        }
                        i += 8;
                    }
                    for r in 0..NR {
                        let s = scale(scales, n + r);
                        job.store(m, n + r, (hsum(a[r]) + tail(x0, w[r], i, k)) * s);
                        job.store(m + 1, n + r, (hsum(b[r]) + tail(x1, w[r], i, k)) * s);
                    }
                }

                #[target_feature(enable = "avx2,fma")]
                unsafe fn tile_1x1(
                    job: &Job,
                    w: *const $elem,
                    scales: Option<&[f32]>,
                    m: usize,
                    n: usize,
                ) {
                    let k = job.k;
                    let x = job.x.as_ptr().add(m * k);
                    let w = w.add(n * k);
                    let mut a = _mm256_setzero_ps();
                    let mut i = 0;
                    while i + 8 <= k {
                        a = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i)), $load(w.add(i)), a);
                        i += 8;
                    }
                    job.store(m, n, (hsum(a) + tail(x, w, i, k)) * scale(scales, n));
                }
            }
        };
    }

    tiles!(i8_rows, i8, load_i8);
}

#[cfg(test)]
mod tests {
    use super::super::PANEL;
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `w` `[n, k]` packed in panels, as `panels::pack` packs a tensor.
    fn pack_slice(w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; n.div_ceil(PANEL) * k * PANEL];
        for (row, w) in w.chunks_exact(k).enumerate() {
            let (p, c) = (row / PANEL, row % PANEL);
            for (i, &v) in w.iter().enumerate() {
                out[(p * k + i) * PANEL + c] = v;
            }
        }
        out
    }

    fn reference(x: &[f32], w: &[f64], scales: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|l| f64::from(x[i * k + l]) * w[j * k + l]).sum();
                out[i * n + j] = dot * f64::from(scales[j]);
            }
        }
        out
    }

    #[test]
    fn kernels_match_the_reference_on_every_shape() {
        let mut rng = StdRng::seed_from_u64(3);
        for &(m, k, n) in &[
            (1, 8, 4),
            (1, 576, 37),
            (2, 16, 8),
            (3, 13, 5),
            (5, 40, 9),
            (16, 64, 12),
            (1, 7, 3),
            (4, 1, 6),
            (7, 9, 17),
            (13, 33, 37),
            (20, 24, 33),
            // More rows than a block of the panel kernel takes at this width.
            (70, 4096, 20),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let wq: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127)).collect();
            let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let scales: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..0.1)).collect();
            let base: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let packed = pack_slice(&wf, n, k);
            let cases = [
                (
                    WeightRows::Int8 {
                        w: &wq,
                        scales: &scales,
                    },
                    reference(
                        &x,
                        &wq.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                        &scales,
                        m,
                        k,
                        n,
                    ),
                ),
                (
                    WeightRows::F32Panels(&packed),
                    reference(
                        &x,
                        &wf.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                        &vec![1.0; n],
                        m,
                        k,
                        n,
                    ),
                ),
            ];
            for (w, want) in cases {
                // Where two threads would split the columns: anywhere for
                // rows, at a whole panel for panels.
                let half = match w {
                    WeightRows::F32Panels(_) => n / 2 / PANEL * PANEL,
                    _ => n / 2,
                };
                for accumulate in [false, true] {
                    let mut split = if accumulate {
                        base.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    let mut portable = split.clone();
                    // SAFETY: consistent jobs, one thread.
                    unsafe {
                        // Two column ranges, as two threads would take them.
                        let job = Job::new(&x, w, (m, k, n), &mut split, accumulate).unwrap();
                        columns(&job, 0..half);
                        columns(&job, half..n);
                        let job = Job::new(&x, w, (m, k, n), &mut portable, accumulate).unwrap();
                        columns_portable(&job, 0..n);
                    }
                    for (got, label) in [(&split, "dispatched"), (&portable, "portable")] {
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            let w = if accumulate {
                                w + f64::from(base[i])
                            } else {
                                *w
                            };
                            // Rounding error grows like the square root of
                            // the terms summed.
                            let tol = 1e-4 * (1.0 + w.abs()) * (k as f64 / 64.0).sqrt().max(1.0);
                            assert!(
                                (f64::from(*g) - w).abs() <= tol,
                                "{label} kernel, m={m} k={k} n={n} acc={accumulate}: got {g}, want {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
