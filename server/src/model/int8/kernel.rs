//! Matrix products with int8 weights on the CPU:
//! `out[m, n] = scale[n] * sum_k x[m, k] * w[n, k]` for float32 `x` `[M, K]`
//! and int8 `w` `[N, K]` (row-major, one scale per output channel).
//!
//! At decode batch sizes a projection is limited by memory bandwidth, and an
//! int8 weight is a quarter of float32's bytes. Each weight is widened to
//! float32 in registers and multiplied there (AVX2 + FMA where the CPU has
//! them, a portable loop elsewhere); activations stay float32, so this is
//! weight-only quantization.

use std::ops::Range;

/// One product: `x` `[m, k]`, `w` `[n, k]`, `scales` `[n]`.
#[derive(Clone, Copy)]
pub struct Problem<'a> {
    pub x: &'a [f32],
    pub w: &'a [i8],
    pub scales: &'a [f32],
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// Where the output goes: `[m, n]` float32, row-major. Callers on several
/// threads write disjoint column ranges of it.
#[derive(Clone, Copy)]
pub struct Out(pub *mut f32);

// SAFETY: threads write disjoint columns (see `columns`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Problem<'_> {
    /// Whether the slices hold the shapes they claim.
    pub fn is_consistent(&self) -> bool {
        self.x.len() == self.m * self.k
            && self.w.len() == self.n * self.k
            && self.scales.len() == self.n
    }
}

/// Computes output columns `cols` of `p` into `out`.
///
/// # Safety
/// `p` must be consistent, `cols` within `0..p.n`, `out` must point at
/// `p.m * p.n` writable floats, and concurrent calls must use disjoint `cols`.
pub unsafe fn columns(p: &Problem, cols: Range<usize>, out: Out) {
    debug_assert!(p.is_consistent() && cols.end <= p.n);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA; the caller upholds the rest.
        unsafe { avx2::columns(p, cols, out) };
        return;
    }
    // SAFETY: upheld by the caller.
    unsafe { columns_portable(p, cols, out) }
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
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The same product in plain Rust, for CPUs without AVX2 and as the
/// reference the vector kernel is tested against.
///
/// # Safety
/// As for [`columns`].
pub unsafe fn columns_portable(p: &Problem, cols: Range<usize>, out: Out) {
    let k = p.k;
    for n in cols {
        let w = &p.w[n * k..(n + 1) * k];
        for m in 0..p.m {
            let x = &p.x[m * k..(m + 1) * k];
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
            // SAFETY: (m, n) is inside the [m, n] output; columns are ours.
            unsafe { *out.0.add(m * p.n + n) = sum * p.scales[n] };
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Raw SIMD loads throughout, at offsets within the bounds that
// `Problem::is_consistent` and the tile loops establish.
#[allow(unsafe_op_in_unsafe_fn)]
mod avx2 {
    use super::{Out, Problem};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Weight rows per tile.
    const NR: usize = 4;

    /// # Safety
    /// AVX2 and FMA present; otherwise as for `super::columns`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns(p: &Problem, cols: Range<usize>, out: Out) {
        let mut n = cols.start;
        while n + NR <= cols.end {
            let mut m = 0;
            while m + 2 <= p.m {
                tile_2x4(p, m, n, out);
                m += 2;
            }
            if m < p.m {
                tile_1x4(p, m, n, out);
            }
            n += NR;
        }
        while n < cols.end {
            for m in 0..p.m {
                tile_1x1(p, m, n, out);
            }
            n += 1;
        }
    }

    /// Eight int8 weights at `w` widened to float32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn widen(w: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(w as *const __m128i)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Asks for the weights the next tile reads (row `r + NR`, at `i`), so
    /// that the rows stream from memory ahead of use: the hardware
    /// prefetcher alone left a large weight read at a quarter of the
    /// bandwidth float32 products reach.
    #[inline(always)]
    unsafe fn prefetch_next_tile(row: *const i8, i: usize, k: usize) {
        // A prefetch never faults, even past the end of the weight.
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(NR * k + i));
    }

    /// The scalar rest of a dot product from `from` to `k`.
    #[inline]
    unsafe fn tail(x: *const f32, w: *const i8, from: usize, k: usize) -> f32 {
        let mut sum = 0.0;
        for i in from..k {
            sum += *x.add(i) * f32::from(*w.add(i));
        }
        sum
    }

    /// One x row against four weight rows, two accumulators per row (the
    /// decode case: enough independent sums to hide FMA latency).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_1x4(p: &Problem, m: usize, n: usize, out: Out) {
        let k = p.k;
        let x = p.x.as_ptr().add(m * k);
        let w: [*const i8; NR] = std::array::from_fn(|r| p.w.as_ptr().add((n + r) * k));
        let mut a = [_mm256_setzero_ps(); NR];
        let mut b = [_mm256_setzero_ps(); NR];
        let mut i = 0;
        while i + 16 <= k {
            let x0 = _mm256_loadu_ps(x.add(i));
            let x1 = _mm256_loadu_ps(x.add(i + 8));
            for r in 0..NR {
                prefetch_next_tile(w[r], i, k);
                a[r] = _mm256_fmadd_ps(x0, widen(w[r].add(i)), a[r]);
                b[r] = _mm256_fmadd_ps(x1, widen(w[r].add(i + 8)), b[r]);
            }
            i += 16;
        }
        if i + 8 <= k {
            let x0 = _mm256_loadu_ps(x.add(i));
            for r in 0..NR {
                a[r] = _mm256_fmadd_ps(x0, widen(w[r].add(i)), a[r]);
            }
            i += 8;
        }
        for r in 0..NR {
            let sum = hsum(_mm256_add_ps(a[r], b[r])) + tail(x, w[r], i, k);
            *out.0.add(m * p.n + n + r) = sum * p.scales[n + r];
        }
    }

    /// Two x rows against four weight rows: each widened weight is used twice.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_2x4(p: &Problem, m: usize, n: usize, out: Out) {
        let k = p.k;
        let x0 = p.x.as_ptr().add(m * k);
        let x1 = x0.add(k);
        let w: [*const i8; NR] = std::array::from_fn(|r| p.w.as_ptr().add((n + r) * k));
        let mut a = [_mm256_setzero_ps(); NR];
        let mut b = [_mm256_setzero_ps(); NR];
        let mut i = 0;
        while i + 8 <= k {
            let xa = _mm256_loadu_ps(x0.add(i));
            let xb = _mm256_loadu_ps(x1.add(i));
            for r in 0..NR {
                prefetch_next_tile(w[r], i, k);
                let wv = widen(w[r].add(i));
                a[r] = _mm256_fmadd_ps(xa, wv, a[r]);
                b[r] = _mm256_fmadd_ps(xb, wv, b[r]);
            }
            i += 8;
        }
        for r in 0..NR {
            let s = p.scales[n + r];
            *out.0.add(m * p.n + n + r) = (hsum(a[r]) + tail(x0, w[r], i, k)) * s;
            *out.0.add((m + 1) * p.n + n + r) = (hsum(b[r]) + tail(x1, w[r], i, k)) * s;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_1x1(p: &Problem, m: usize, n: usize, out: Out) {
        let k = p.k;
        let x = p.x.as_ptr().add(m * k);
        let w = p.w.as_ptr().add(n * k);
        let mut a = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= k {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i)), widen(w.add(i)), a);
            i += 8;
        }
        *out.0.add(m * p.n + n) = (hsum(a) + tail(x, w, i, k)) * p.scales[n];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn reference(p: &Problem) -> Vec<f64> {
        let mut out = vec![0.0; p.m * p.n];
        for m in 0..p.m {
            for n in 0..p.n {
                let dot: f64 = (0..p.k)
                    .map(|i| f64::from(p.x[m * p.k + i]) * f64::from(p.w[n * p.k + i]))
                    .sum();
                out[m * p.n + n] = dot * f64::from(p.scales[n]);
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
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let w: Vec<i8> = (0..n * k).map(|_| rng.random_range(-127..=127)).collect();
            let scales: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..0.1)).collect();
            let p = Problem {
                x: &x,
                w: &w,
                scales: &scales,
                m,
                k,
                n,
            };
            assert!(p.is_consistent());
            let want = reference(&p);
            let mut split = vec![f32::NAN; m * n];
            let mut portable = vec![f32::NAN; m * n];
            // SAFETY: consistent problem, outputs of m * n floats, one thread.
            unsafe {
                // Two column ranges, as two threads would take them.
                columns(&p, 0..n / 2, Out(split.as_mut_ptr()));
                columns(&p, n / 2..n, Out(split.as_mut_ptr()));
                columns_portable(&p, 0..n, Out(portable.as_mut_ptr()));
            }
            for (got, label) in [(&split, "dispatched"), (&portable, "portable")] {
                for (g, w) in got.iter().zip(&want) {
                    let tol = 1e-4 * (1.0 + w.abs());
                    assert!(
                        (f64::from(*g) - w).abs() <= tol,
                        "{label} kernel, m={m} k={k} n={n}: got {g}, want {w}"
                    );
                }
            }
        }
    }
}
