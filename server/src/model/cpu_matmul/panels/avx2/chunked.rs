//! A float32 product of a few rows (the decode batches) chunked by input
//! index, so that memory and the FMA units work at the same time.
//!
//! Over whole panels, the first tile of a panel reads it from memory and the
//! others reuse it from cache while memory idles: at 16 rows the step took
//! about the one-row (memory) time plus the FMA time. Here every tile of a
//! panel runs over one chunk of 128 input indices (8 KiB of the panel, in
//! L1 with its rows of `x`) before any tile starts the next, each tile's
//! accumulators kept between chunks, and the tiles share the asking for the
//! next chunk in proportion to their rows, a cache line every few input
//! indices. Memory then streams the next chunk while every tile computes.
//! It also reads each weight once for up to 64 rows, where blocks of rows
//! that keep `x` in L2 read a weight with 8192 inputs once per 6 rows.
//! Measured in one process against whole-panel tiles (BENCHMARKS.md,
//! "Sixteen rows, chunked"): a quarter off the 16-row step of the 1B shape;
//! chunks of 64 or 256 and chunks without the asking were slower; int8
//! panels, bound by widening, were not faster and keep the whole-panel
//! tiles.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::{Element, Job, Packed, CHUNKED_ROWS, PANEL};
use super::{channel_scales, store, tile_rows, Load};

/// Input indices a chunk covers.
const CHUNK: usize = 128;

/// All `job.m` rows (at most [`CHUNKED_ROWS`]) against panels `range`.
///
/// # Safety
/// As for `panels::columns`, with `job.m <= CHUNKED_ROWS`; the CPU has
/// AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn product<L: Element>(job: &Job, w: Packed<L>, range: Range<usize>) {
    let (k, m) = (job.k, job.m);
    assert!(m <= CHUNKED_ROWS, "{m} rows chunked");
    let zero = [_mm256_setzero_ps(); 2];
    let mut acc = [zero; CHUNKED_ROWS];
    for p in range {
        let panel = w.panels.as_ptr().add(p * k * PANEL);
        acc[..m].fill(zero);
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + CHUNK).min(k);
            // The next chunk, or at a panel's end the next panel's first
            // (contiguous; a prefetch never faults, even past the end).
            let mut ahead = panel.wrapping_add(k1 * PANEL);
            let (mut r, mut asked) = (0, 0);
            while r < m {
                let mr = tile_rows(m - r);
                // This tile's share of the chunk's lines, by its rows.
                let lines = (k1 - k0) * (r + mr) / m - asked;
                let (a, ks) = (&mut acc[r..r + mr], k0..k1);
                match mr {
                    6 => tile::<L, 6>(job, panel, r, ks, a, ahead, lines),
                    4 => tile::<L, 4>(job, panel, r, ks, a, ahead, lines),
                    2 => tile::<L, 2>(job, panel, r, ks, a, ahead, lines),
                    _ => tile::<L, 1>(job, panel, r, ks, a, ahead, lines),
                }
                ahead = ahead.wrapping_add(lines * PANEL);
                asked += lines;
                r += mr;
            }
            k0 = k1;
        }
        let scales = channel_scales(job, w.scales, p);
        for (r, a) in acc[..m].iter().enumerate() {
            store(job, r, p, a[0], a[1], scales);
        }
    }
}

/// `MR` rows of `x` from row `m` over input indices `ks` of the panel at
/// `panel`, added to `acc`; asking for `lines` panel rows (cache lines of
/// float32) from `ahead`, spread evenly over the loop.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<L: Load, const MR: usize>(
    job: &Job,
    panel: *const L,
    m: usize,
    ks: Range<usize>,
    acc: &mut [[__m256; 2]],
    ahead: *const L,
    lines: usize,
) {
    let k = job.k;
    let x = job.x.as_ptr().add(m * k);
    let mut a = [[_mm256_setzero_ps(); 2]; MR];
    a.copy_from_slice(&acc[..MR]);
    // Input indices between two asks; the countdown never reaches zero
    // where there is nothing to ask for.
    let every = ks.len().div_ceil(lines.max(1));
    let mut wait = if lines > 0 { 0 } else { usize::MAX };
    let mut ask = ahead;
    for i in ks {
        if wait == 0 {
            _mm_prefetch::<_MM_HINT_T0>(ask as *const i8);
            ask = ask.wrapping_add(PANEL);
            wait = every;
        }
        wait -= 1;
        let [w0, w1] = L::row(panel.add(i * PANEL));
        for (r, a) in a.iter_mut().enumerate() {
            let xb = _mm256_broadcast_ss(&*x.add(r * k + i));
            a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
        }
    }
    acc[..MR].copy_from_slice(&a);
}
