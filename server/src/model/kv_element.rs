//! The element types the CPU decode step reads and writes the KV cache in:
//! float32, or half precision (`kv_cache_dtype`), which halves the bytes
//! attention reads a step. Keys and values are widened to float32 as they
//! are loaded (F16C's `vcvtph2ps` for float16, a shift for bfloat16) and
//! rounded to nearest-even as they are stored; every sum stays float32.

use tch::Kind;

pub use half::{bf16, f16};

/// An element of the KV cache as the CPU step sees it.
pub trait KvElement: Copy + Send + Sync + 'static {
    /// The tensor dtype of a cache of these elements.
    const KIND: Kind;

    fn to_f32(self) -> f32;

    /// `x` rounded to nearest-even.
    fn from_f32(x: f32) -> Self;

    /// `src` rounded into `dst` (the same length).
    fn store_row(src: &[f32], dst: &mut [Self]);

    /// Eight elements at `p` widened to float32.
    ///
    /// # Safety
    /// Eight elements readable at `p`; [`vectorized`] is true and the
    /// caller is compiled with AVX2, FMA and F16C (this is inlined into it).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElement for f32 {
    const KIND: Kind = Kind::Float;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn from_f32(x: f32) -> f32 {
        x
    }

    fn store_row(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: per the caller.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElement for f16 {
    const KIND: Kind = Kind::Half;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.into()
    }

    fn from_f32(x: f32) -> f16 {
        f16::from_f32(x)
    }

    fn store_row(src: &[f32], dst: &mut [f16]) {
        assert_eq!(src.len(), dst.len());
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: the CPU has F16C and AVX; the slices are equally long.
            return unsafe { f16c::store_row(src, dst) };
        }
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(s);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: per the caller (F16C among its features).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

impl KvElement for bf16 {
    const KIND: Kind = Kind::BFloat16;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.into()
    }

    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }

    fn store_row(src: &[f32], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(s);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: per the caller (AVX2 among its features). A bfloat16 is
        // the high half of a float32.
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
}

/// Whether the vector loads run on this CPU: AVX2 and FMA (the other
/// kernels' test) and F16C (every CPU with AVX2 has it).
pub fn vectorized() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu_matmul::vectorized() && has_f16c()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU converts float16 in hardware.
#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    use super::f16;

    /// `src` rounded to nearest-even into `dst`, eight at a time.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn store_row(src: &[f32], dst: &mut [f16]) {
        let whole = src.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= len of both slices.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
        }
        for (d, &s) in dst[whole..].iter_mut().zip(&src[whole..]) {
            *d = f16::from_f32(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values around every rounding case: ties, subnormals, overflow, signs.
    fn samples() -> Vec<f32> {
        let mut v = vec![
            0.0, -0.0, 1.0, -1.0, 65504.0, 65520.0, 1e9, -1e9, 1e-8, 6e-5,
        ];
        v.extend((0..400).map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 9 - 4)));
        // Exactly halfway between two float16 values after 1.0.
        v.push(1.0 + 1.0 / 2048.0);
        v.push(1.0 + 3.0 / 2048.0);
        v
    }

    #[test]
    fn stores_round_as_the_scalar_conversion_does() {
        let src = samples();
        let mut got = vec![f16::ZERO; src.len()];
        f16::store_row(&src, &mut got);
        for (g, &s) in got.iter().zip(&src) {
            assert_eq!(g.to_bits(), f16::from_f32(s).to_bits(), "{s}");
        }
        let mut got = vec![bf16::ZERO; src.len()];
        bf16::store_row(&src, &mut got);
        for (g, &s) in got.iter().zip(&src) {
            assert_eq!(g.to_bits(), bf16::from_f32(s).to_bits(), "{s}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_loads_widen_as_the_scalar_conversion_does() {
        fn check<E: KvElement + std::fmt::Debug>(from: fn(f32) -> E) {
            if !vectorized() {
                return;
            }
            let src: Vec<E> = samples().into_iter().map(from).collect();
            for chunk in src.chunks_exact(8) {
                let mut out = [0f32; 8];
                // SAFETY: eight elements; the CPU has the features checked.
                unsafe { load_into::<E>(chunk.as_ptr(), &mut out) };
                for (o, e) in out.iter().zip(chunk) {
                    assert_eq!(o.to_bits(), e.to_f32().to_bits(), "{e:?}");
                }
            }
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load_into<E: KvElement>(p: *const E, out: &mut [f32; 8]) {
            // SAFETY: per the caller.
            unsafe { std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), E::load8(p)) }
        }
        check::<f32>(|x| x);
        check::<f16>(f16::from_f32);
        check::<bf16>(bf16::from_f32);
    }
}
