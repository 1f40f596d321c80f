//! Weights packed in panels, float32 or int8, and the product over them.
//!
//! A panel holds 16 consecutive weight rows (output channels) interleaved by
//! input index: `panel[p][k][c] = w[16 p + c, k]`, so the whole weight is one
//! contiguous `[N/16, K, 16]` block (the last panel padded with zero rows).
//! An int8 panel is read the same way, 16 bytes an input index widened to
//! float32 in registers, and each channel's scale applied once to its sum
//! (`w[n, k] = scale[n] * q[n, k]`).
//! The product is an outer product per input index: each `x[m, k]` is
//! broadcast and multiplied into the 16 channels of the panel's row `k`,
//! accumulating in registers, no horizontal sums. Two things follow, both
//! measured (BENCHMARKS.md, "Float32 weights in packed panels"):
//! - a thread reads its weights front to back as one stream, which the
//!   hardware prefetchers follow to the memory bandwidth (four rows read
//!   side by side, the row kernel's tile, reached about three quarters of
//!   it);
//! - up to six rows of `x` share each weight load with no reduction at the
//!   end, so a batch of rows runs near the FMA peak instead of being bound
//!   by loads (the row kernel's tile does a load per FMA and a half).
//!
//! Float32 products of up to 64 rows (the decode batches) run chunked by
//! input index so that memory streams the weight while the tiles compute
//! (`avx2/chunked.rs`); prompts go in blocks of rows over whole panels.

use std::ops::Range;

use tch::{Kind, TchError, Tensor};

use super::Job;

/// Weight rows a panel holds.
pub const PANEL: usize = 16;

/// Rows of `x` a block covers: enough that every panel is used many times
/// while it is in cache, few enough that the block stays in L2.
const BLOCK_BYTES: usize = 256 << 10;

/// Panels for `n` weight rows.
pub fn panel_count(n: usize) -> usize {
    n.div_ceil(PANEL)
}

/// Packs a float32 or int8 `[N, K]` weight into `[ceil(N/16), K, 16]`
/// panels of its dtype.
pub fn pack(weight: &Tensor) -> Result<Tensor, TchError> {
    let size = weight.size();
    if size.len() != 2 || !matches!(weight.kind(), Kind::Float | Kind::Int8) {
        return Err(TchError::Shape(format!(
            "panels of a {:?} {size:?} weight: want float32 or int8 [out, in]",
            weight.kind()
        )));
    }
    let (n, k) = (size[0], size[1]);
    let panels = panel_count(n as usize) as i64;
    let pad = panels * PANEL as i64 - n;
    let padded = if pad > 0 {
        weight.f_constant_pad_nd([0, 0, 0, pad])?
    } else {
        weight.shallow_clone()
    };
    padded
        .f_view([panels, PANEL as i64, k])?
        .f_transpose(1, 2)?
        .f_contiguous()
}

/// Row `row` of the weight packed in `panels` (`k` wide) into `out`.
pub fn unpack_row(panels: &[f32], k: usize, row: usize, out: &mut [f32]) {
    let (p, c) = (row / PANEL, row % PANEL);
    let panel = &panels[p * k * PANEL..][..k * PANEL];
    for (o, w) in out[..k].iter_mut().zip(panel.chunks_exact(PANEL)) {
        *o = w[c];
    }
}

/// The tile sets, fastest first where the CPU has them.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tiles {
    /// 6 rows to a tile, two 256-bit registers per panel row.
    Avx2,
    /// Plain Rust (CPUs without AVX2; the reference the others are tested
    /// against).
    Portable,
}

impl Tiles {
    fn best() -> Self {
        if super::kernel::vectorized() {
            Tiles::Avx2
        } else {
            Tiles::Portable
        }
    }
}

/// A weight element a panel holds: widened to float32 by the portable
/// loop, and by the AVX2 tiles 16 at a time (`avx2::Load`).
#[cfg(target_arch = "x86_64")]
pub trait Element: Copy + Into<f32> + avx2::Load {}
/// A weight element a panel holds, widened to float32.
#[cfg(not(target_arch = "x86_64"))]
pub trait Element: Copy + Into<f32> {}
impl Element for f32 {}
impl Element for i8 {}

/// A packed weight: its panels, and a scale per output channel where its
/// elements are int8.
#[derive(Clone, Copy)]
pub struct Packed<'a, E> {
    pub panels: &'a [E],
    pub scales: Option<&'a [f32]>,
}

/// Output columns `cols` of `job`, whose weight is `w`.
///
/// # Safety
/// As for `kernel::columns`; `cols.start` a multiple of [`PANEL`],
/// `w.panels` holds `ceil(job.n / 16) * job.k * 16` elements and the scales
/// (if any) `job.n`.
pub unsafe fn columns<E: Element>(job: &Job, w: Packed<E>, cols: Range<usize>) {
    // SAFETY: upheld by the caller; `best` only names tiles the CPU runs.
    unsafe { columns_with(Tiles::best(), job, w, cols) }
}

/// [`columns`] in plain Rust.
///
/// # Safety
/// As for [`columns`].
#[cfg(test)]
pub unsafe fn columns_portable<E: Element>(job: &Job, w: Packed<E>, cols: Range<usize>) {
    // SAFETY: upheld by the caller.
    unsafe { columns_with(Tiles::Portable, job, w, cols) }
}

/// [`columns`] on `tiles`.
///
/// # Safety
/// As for [`columns`], and the CPU runs `tiles`.
unsafe fn columns_with<E: Element>(tiles: Tiles, job: &Job, w: Packed<E>, cols: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    if tiles == Tiles::Avx2 && E::PREFETCH_NEXT && (2..=CHUNKED_ROWS).contains(&job.m) {
        // SAFETY: upheld by the caller.
        unsafe { avx2::chunked::product(job, w, panel_range(job, cols)) };
        return;
    }
    for_blocks(job, cols, |range, rows| match tiles {
        // SAFETY: upheld by the caller.
        #[cfg(target_arch = "x86_64")]
        Tiles::Avx2 => unsafe { avx2::block(job, w, range, rows) },
        _ => portable_block(job, w, range, rows),
    });
}

/// The scale of output channel `n` (1 for float32 weights).
#[inline(always)]
fn scale_of(scales: Option<&[f32]>, n: usize) -> f32 {
    scales.map_or(1.0, |s| s[n])
}

/// Rows up to which a float32 product runs chunked (`avx2::chunked`): the
/// decode batches. Past it (prompts) rows go in blocks, each block over
/// whole panels.
const CHUNKED_ROWS: usize = 64;

/// The panels of columns `cols`.
fn panel_range(job: &Job, cols: Range<usize>) -> Range<usize> {
    debug_assert!(cols.start.is_multiple_of(PANEL) && cols.end <= job.n);
    cols.start / PANEL..cols.end.div_ceil(PANEL)
}

/// Calls `body` with the panels of `cols` and each block of `x` rows.
fn for_blocks(job: &Job, cols: Range<usize>, mut body: impl FnMut(Range<usize>, Range<usize>)) {
    let range = panel_range(job, cols);
    let block = ((BLOCK_BYTES / (job.k * 4).max(1)) / 6 * 6).max(6);
    let mut m0 = 0;
    while m0 < job.m {
        let rows = m0..(m0 + block).min(job.m);
        body(range.clone(), rows.clone());
        m0 = rows.end;
    }
}

/// Panels `range` against `x` rows `rows`, one row and panel at a time.
fn portable_block<E: Element>(job: &Job, w: Packed<E>, range: Range<usize>, rows: Range<usize>) {
    let k = job.k;
    for p in range {
        let panel = &w.panels[p * k * PANEL..][..k * PANEL];
        let width = PANEL.min(job.n - p * PANEL);
        for m in rows.clone() {
            let x = &job.x[m * k..][..k];
            let mut acc = [0f32; PANEL];
            for (xi, w) in x.iter().zip(panel.chunks_exact(PANEL)) {
                for (a, &w) in acc.iter_mut().zip(w) {
                    *a += xi * w.into();
                }
            }
            for (c, &v) in acc[..width].iter().enumerate() {
                let n = p * PANEL + c;
                // SAFETY: (m, column) inside the output; the columns are ours.
                unsafe { job.store(m, n, v * scale_of(w.scales, n)) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
mod tests {
    use super::super::WeightRows;
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn every_tile_set_the_cpu_has_agrees_with_the_portable_loop() {
        let mut sets = vec![Tiles::Portable];
        if super::super::kernel::vectorized() {
            sets.push(Tiles::Avx2);
        }
        let mut rng = StdRng::seed_from_u64(5);
        // Every row count a tile takes, and blocks of rows past one.
        // Input widths past a chunk (128) and not a multiple of it; 64 rows
        // chunked, 65 in blocks.
        let shapes = (1..=20)
            .map(|m| (m, 40, 37))
            .chain([(33, 9, 16), (100, 1536, 20), (3, 1, 5)])
            .chain([
                (16, 300, 37),
                (7, 129, 20),
                (64, 257, 33),
                (65, 200, 17),
                (2, 128, 16),
            ]);
        for (m, k, n) in shapes {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let floats: Vec<f32> = (0..panel_count(n) * k * PANEL)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let bytes: Vec<i8> = (0..panel_count(n) * k * PANEL)
                .map(|_| rng.random_range(-127..=127))
                .collect();
            let scales: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..0.1)).collect();
            let f32_weight = Packed {
                panels: &floats,
                scales: None,
            };
            let i8_weight = Packed {
                panels: &bytes,
                scales: Some(&scales),
            };
            let rows = [
                WeightRows::F32Panels(&floats),
                WeightRows::Int8 {
                    w: &bytes,
                    scales: &scales,
                },
            ];
            for (i, rows) in rows.into_iter().enumerate() {
                // The product on `tiles` into `out`, added where `accumulate`.
                let run = |tiles, out: &mut [f32], accumulate| {
                    let job = Job::new(&x, rows, (m, k, n), out, accumulate).unwrap();
                    // SAFETY: a consistent job on one thread; the CPU runs `tiles`.
                    unsafe {
                        if i == 0 {
                            columns_with(tiles, &job, f32_weight, 0..n)
                        } else {
                            columns_with(tiles, &job, i8_weight, 0..n)
                        }
                    };
                };
                let mut want = vec![0.0; m * n];
                run(Tiles::Portable, &mut want, false);
                for &tiles in &sets {
                    let mut got = vec![1.0; m * n];
                    run(tiles, &mut got, true);
                    for (g, w) in got.iter().zip(&want) {
                        let tol = 1e-4 * (1.0 + w.abs()) * (k as f32 / 64.0).sqrt().max(1.0);
                        assert!(
                            (g - 1.0 - w).abs() <= tol,
                            "{tiles:?} weight {i} m={m} k={k} n={n}: {g} - 1 against {w}"
                        );
                    }
                }
            }
        }
    }
}
