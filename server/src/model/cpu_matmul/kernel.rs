//! The dispatch of a product on the CPU to the tiles of its weight's
//! panels (`panels.rs`): AVX2 + FMA where the CPU has them, a portable loop
//! elsewhere.

use std::ops::Range;

use super::panels::{self, Packed};
use super::{Job, WeightRows};

/// Computes output columns `cols` of `job`.
///
/// # Safety
/// `job` must be consistent (`Job::new` checked it), `cols` within
/// `0..job.n` starting at a whole panel, and concurrent calls must use
/// disjoint `cols`.
pub unsafe fn columns(job: &Job, cols: Range<usize>) {
    debug_assert!(cols.end <= job.n);
    // SAFETY: upheld by the caller; the panels pick their own tiles.
    unsafe {
        match job.w {
            WeightRows::F32Panels(w) => panels::columns(job, f32_panels(w), cols),
            WeightRows::Int8 { w, scales } => panels::columns(job, i8_panels(w, scales), cols),
        }
    }
}

/// The same product in plain Rust, for CPUs without AVX2 and as the
/// reference the vector tiles are tested against.
///
/// # Safety
/// As for [`columns`].
#[cfg(test)]
pub unsafe fn columns_portable(job: &Job, cols: Range<usize>) {
    // SAFETY: upheld by the caller.
    unsafe {
        match job.w {
            WeightRows::F32Panels(w) => panels::columns_portable(job, f32_panels(w), cols),
            WeightRows::Int8 { w, scales } => {
                panels::columns_portable(job, i8_panels(w, scales), cols)
            }
        }
    }
}

fn f32_panels(w: &[f32]) -> Packed<'_, f32> {
    Packed {
        panels: w,
        scales: None,
    }
}

fn i8_panels<'a>(w: &'a [i8], scales: &'a [f32]) -> Packed<'a, i8> {
    Packed {
        panels: w,
        scales: Some(scales),
    }
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

#[cfg(test)]
mod tests {
    use super::super::PANEL;
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `w` `[n, k]` packed in panels, as `panels::pack` packs a tensor.
    fn pack_slice<T: Copy + Default>(w: &[T], n: usize, k: usize) -> Vec<T> {
        let mut out = vec![T::default(); n.div_ceil(PANEL) * k * PANEL];
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
            let packed_q = pack_slice(&wq, n, k);
            let cases = [
                (
                    WeightRows::Int8 {
                        w: &packed_q,
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
                // Where two threads would split the columns: at a whole panel.
                let half = n / 2 / PANEL * PANEL;
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
