//! `exp` over float32 slices, eight lanes at a time with AVX2 and FMA where
//! the CPU has them: the softmax of decode attention and the SwiGLU
//! activation call it for every score and every channel, and libm's scalar
//! `expf` was about 3 % of a small model's decode step (BENCHMARKS.md).
//!
//! The method is Cephes' `expf`: `x = n ln2 + r` with `|r| <= ln2 / 2`, a
//! degree-7 polynomial for `e^r`, and `2^n` put into the exponent bits; the
//! relative error is within a few units in the last place. Inputs are
//! clamped to about `[-87.3, 88.7]`, so the result is a normal float (no
//! infinities, no denormals).

use super::cpu_matmul::vectorized;

const HI: f32 = 88.376_26;
const LO: f32 = -87.336_54;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts, the first exact in few bits.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` the way the vector lanes compute it, for the tails and for CPUs
/// without AVX2.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    let x = x.clamp(LO, HI);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    f32::from_bits(e.to_bits().wrapping_add(((n as i32) << 23) as u32))
}

/// `values[i] = e^(values[i] - shift)`; returns their sum.
pub fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vectorized() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::exp_shifted_sum(values, shift) };
    }
    values.iter_mut().fold(0.0, |sum, v| {
        *v = exp_lane(*v - shift);
        sum + *v
    })
}

/// `out[i] = silu(gate[i]) * up[i]` (`silu(g) = g / (1 + e^-g)`).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vectorized() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::silu_mul(gate, up, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_mul_lane(g, u);
    }
}

/// One lane of [`silu_mul`], for the tails and for CPUs without AVX2.
#[inline(always)]
fn silu_mul_lane(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_lane(-g)) * u
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{exp_lane, silu_mul_lane, HI, LN2_HI, LN2_LO, LO, LOG2E, P};

    /// Eight lanes of [`exp_lane`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let scale = _mm256_slli_epi32::<23>(_mm256_cvtps_epi32(n));
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), scale))
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn exp_shifted_sum(values: &mut [f32], shift: f32) -> f32 {
        let mut chunks = values.chunks_exact_mut(8);
        let mut sum = _mm256_setzero_ps();
        let shift8 = _mm256_set1_ps(shift);
        for chunk in &mut chunks {
            // SAFETY: eight floats in bounds.
            let v = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            let e = exp8(_mm256_sub_ps(v, shift8));
            sum = _mm256_add_ps(sum, e);
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), e) };
        }
        let mut lanes = [0f32; 8];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let mut total: f32 = lanes.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_lane(*v - shift);
            total += *v;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len().min(gate.len()).min(up.len());
        let whole = n / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= n, within all three slices.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let s = _mm256_div_ps(_mm256_mul_ps(g, u), _mm256_add_ps(one, e));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), s);
            }
        }
        for i in whole..n {
            out[i] = silu_mul_lane(gate[i], up[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulps_of_libm() {
        // Every 1/64 over the range, plus the ends and values beyond them;
        // lengths that leave tails of every size after the vector lanes.
        let mut xs: Vec<f32> = (-87 * 64..88 * 64).map(|i| i as f32 / 64.0).collect();
        xs.extend([LO, HI, -1e-7, 0.0, 1e-7, -0.5, 0.5]);
        for len in [xs.len(), 1, 7, 9, 15] {
            let mut ours = xs[..len].to_vec();
            exp_shifted_sum(&mut ours, 0.0);
            for (&x, &e) in xs[..len].iter().zip(&ours) {
                let want = (x as f64).exp();
                let rel = ((e as f64 - want) / want).abs();
                assert!(
                    rel < 4.0 * f32::EPSILON as f64,
                    "exp({x}) = {e}, want {want}"
                );
                let lane = exp_lane(x) as f64;
                let rel = ((lane - want) / want).abs();
                assert!(rel < 4.0 * f32::EPSILON as f64, "exp_lane({x}) = {lane}");
            }
        }
        // As softmax calls it: shifted by the maximum, the sum returned.
        let scores: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32 * 0.25).collect();
        let max = scores.iter().copied().fold(f32::MIN, f32::max);
        let mut ours = scores.clone();
        let sum = exp_shifted_sum(&mut ours, max);
        let want: f64 = scores.iter().map(|&s| ((s - max) as f64).exp()).sum();
        assert!(
            ((sum as f64 - want) / want).abs() < 1e-5,
            "{sum} against {want}"
        );
        // Clamped, never infinite or zero.
        let mut ends = [-1000.0, 1000.0, f32::MIN, f32::MAX];
        exp_shifted_sum(&mut ends, 0.0);
        assert!(ends.iter().all(|e| e.is_normal()), "{ends:?}");
    }

    #[test]
    fn silu_mul_matches_the_formula() {
        let gate: Vec<f32> = (0..203).map(|i| (i as f32 - 100.0) * 0.37).collect();
        let up: Vec<f32> = (0..203).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let mut out = vec![f32::NAN; 203];
        silu_mul(&gate, &up, &mut out);
        for ((&g, &u), &o) in gate.iter().zip(&up).zip(&out) {
            let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (o as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "silu({g}) * {u} = {o}, want {want}"
            );
        }
    }
}
