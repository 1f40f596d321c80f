//! The AVX2 + FMA tiles of the panel product: `2 * MR` accumulators of
//! eight channels for `MR` rows of `x`, each weight load used `MR` times.
// Raw SIMD loads at offsets within the panel and the `x` rows that `Job::new`
// and the block loop establish.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Element, Job, Packed, PANEL};

pub(super) mod chunked;

/// How the tiles read a panel row of 16 elements, widened to float32.
pub trait Load: Sized {
    /// Input indices ahead that a one-row product asks for (none: the
    /// hardware prefetcher alone).
    const AHEAD: usize;
    /// Whether the tiles ask memory for the weight ahead of them: in blocks
    /// of rows a panel's first tile for the next panel, and products of up
    /// to `CHUNKED_ROWS` rows run `chunked`. Paid for float32 (a 16-row
    /// step 5-10 % and then a quarter faster, BENCHMARKS.md); int8 at 16
    /// rows is bound by widening, not by its quarter of the bytes: the
    /// first gained nothing, chunked was 4-6 % slower.
    const PREFETCH_NEXT: bool;
    /// The 16 elements at `w` as two vectors of 8 floats.
    unsafe fn row(w: *const Self) -> [__m256; 2];
}

impl Load for f32 {
    // Reached the read ceiling without (BENCHMARKS.md).
    const AHEAD: usize = 0;
    const PREFETCH_NEXT: bool = true;
    #[inline(always)]
    unsafe fn row(w: *const f32) -> [__m256; 2] {
        [_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8))]
    }
}

impl Load for i8 {
    // Four cache lines ahead: a 1-row int8 product is otherwise
    // 5-10 % slower than the row kernel it replaced, which prefetched.
    const AHEAD: usize = 64;
    const PREFETCH_NEXT: bool = false;
    #[inline(always)]
    unsafe fn row(w: *const i8) -> [__m256; 2] {
        let v = _mm_loadu_si128(w as *const __m128i);
        [
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v))),
        ]
    }
}

/// Panels `range` against `x` rows `rows`: for each panel, six rows at
/// a time while there are six, then four, two, one. The first tile of a
/// panel reads it from memory, the others from cache.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn block<L: Element>(
    job: &Job,
    w: Packed<L>,
    range: Range<usize>,
    rows: Range<usize>,
) {
    let k = job.k;
    for p in range {
        let panel = w.panels.as_ptr().add(p * k * PANEL);
        let scales = channel_scales(job, w.scales, p);
        // Where a panel takes more than one tile, the first tile asks
        // for the next panel as it goes: memory streams that in while the
        // other tiles reuse this one from cache, instead of the next
        // first tile waiting on it (a prefetch never faults, even past
        // the end). With one tile, its own reads are the stream.
        let mut ahead = if L::PREFETCH_NEXT && rows.len() > 6 {
            panel.wrapping_add(k * PANEL)
        } else {
            std::ptr::null()
        };
        let mut m = rows.start;
        while m < rows.end {
            m += match tile_rows(rows.end - m) {
                6 => tile::<L, 6>(job, panel, m, p, scales, ahead),
                4 => tile::<L, 4>(job, panel, m, p, scales, ahead),
                2 => tile::<L, 2>(job, panel, m, p, scales, ahead),
                _ => {
                    let [lo, hi] = single::<L>(job, panel, m);
                    store(job, m, p, lo, hi, scales);
                    1
                }
            };
            ahead = std::ptr::null();
        }
    }
}

/// Rows of the tile that comes next where `left` rows remain: six while
/// there are six, then four, two, one.
fn tile_rows(left: usize) -> usize {
    match left {
        6.. => 6,
        4 | 5 => 4,
        2 | 3 => 2,
        _ => 1,
    }
}

/// The scales of panel `p`'s 16 channels (zero past the last channel),
/// or `None` for float32 weights.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn channel_scales(job: &Job, scales: Option<&[f32]>, p: usize) -> Option<[__m256; 2]> {
    let scales = scales?;
    let mut lanes = [0f32; PANEL];
    let width = PANEL.min(job.n - p * PANEL);
    lanes[..width].copy_from_slice(&scales[p * PANEL..][..width]);
    Some([
        _mm256_loadu_ps(lanes.as_ptr()),
        _mm256_loadu_ps(lanes.as_ptr().add(8)),
    ])
}

/// `MR` rows of `x` from row `m` against panel `p` (at `panel`), stored:
/// `2 * MR` accumulators of 8 channels, each weight load used `MR`
/// times; asking for the float32 panel at `ahead` a cache line (one
/// panel row) an input index as it goes, unless it is null. Returns `MR`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<L: Load, const MR: usize>(
    job: &Job,
    panel: *const L,
    m: usize,
    p: usize,
    scales: Option<[__m256; 2]>,
    ahead: *const L,
) -> usize {
    let k = job.k;
    let x = job.x.as_ptr().add(m * k);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for i in 0..k {
        if !ahead.is_null() {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(i * PANEL) as *const i8);
        }
        let [w0, w1] = L::row(panel.add(i * PANEL));
        for (r, acc) in acc.iter_mut().enumerate() {
            let xb = _mm256_broadcast_ss(&*x.add(r * k + i));
            acc[0] = _mm256_fmadd_ps(xb, w0, acc[0]);
            acc[1] = _mm256_fmadd_ps(xb, w1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        store(job, m + r, p, acc[0], acc[1], scales);
    }
    MR
}

/// One row of `x` (the batch-1 decode step): four input indices at a
/// time into their own accumulators, so the FMA latency chains do not
/// hold back the stream of weights.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn single<L: Load>(job: &Job, panel: *const L, m: usize) -> [__m256; 2] {
    let k = job.k;
    let x = job.x.as_ptr().add(m * k);
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut i = 0;
    while i + 4 <= k {
        if L::AHEAD > 0 {
            // Non-temporal, well ahead: the weight is read once a step
            // and should not push the activations and the cache out.
            // (A prefetch never faults, even past the end.)
            let ahead = panel.wrapping_add((i + L::AHEAD) * PANEL);
            _mm_prefetch::<_MM_HINT_NTA>(ahead as *const i8);
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let [w0, w1] = L::row(panel.add((i + j) * PANEL));
            let xb = _mm256_broadcast_ss(&*x.add(i + j));
            acc[0] = _mm256_fmadd_ps(xb, w0, acc[0]);
            acc[1] = _mm256_fmadd_ps(xb, w1, acc[1]);
        }
        i += 4;
    }
    while i < k {
        let [w0, w1] = L::row(panel.add(i * PANEL));
        let xb = _mm256_broadcast_ss(&*x.add(i));
        acc[0][0] = _mm256_fmadd_ps(xb, w0, acc[0][0]);
        acc[0][1] = _mm256_fmadd_ps(xb, w1, acc[0][1]);
        i += 1;
    }
    let sum = |h: usize| {
        _mm256_add_ps(
            _mm256_add_ps(acc[0][h], acc[1][h]),
            _mm256_add_ps(acc[2][h], acc[3][h]),
        )
    };
    [sum(0), sum(1)]
}

/// Writes (or adds) the 16 channels of panel `p` for row `m`, scaled
/// where the weight is int8, fewer where the last panel is padding.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store(
    job: &Job,
    m: usize,
    p: usize,
    lo: __m256,
    hi: __m256,
    scales: Option<[__m256; 2]>,
) {
    let (lo, hi) = match scales {
        Some([s0, s1]) => (_mm256_mul_ps(lo, s0), _mm256_mul_ps(hi, s1)),
        None => (lo, hi),
    };
    let mut lanes = [0f32; PANEL];
    _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    let width = PANEL.min(job.n - p * PANEL);
    for (c, &v) in lanes[..width].iter().enumerate() {
        job.store(m, p * PANEL + c, v);
    }
}
