//! Matrix products on the CPU, the projections of the decode step and of
//! prompts: `out (+)= x @ W.T` for float32 activations `x` `[M, K]` and a
//! weight of `N` output channels, float32 or int8 packed in panels of 16
//! channels (`panels`).
//!
//! At decode batch sizes a projection is bound by memory bandwidth: the whole
//! weight streams through once per step. libtorch's MKL runs such products on
//! one thread through a generic path on AMD CPUs, and its GEMM was slower
//! than the panel kernel on prompts there too (BENCHMARKS.md), so torchwire
//! has its own: the output columns are split over libtorch's own OpenMP
//! threads (`parallel`), each thread streams its weights front to back. The
//! product can add into `out` (a residual) instead of overwriting it, which
//! saves an op and a pass.

mod kernel;
mod panels;
mod parallel;
mod team;

use tch::{Device, Kind, TchError, Tensor};

pub use kernel::vectorized;
pub use panels::{pack, panel_count, unpack_row, PANEL};
pub use parallel::on_openmp;
pub use team::{run_team, Chunks, Member, Regions};

/// Output channels a thread takes at a time at least: a panel of 16.
const MIN_CHUNK: usize = 16;

/// Products smaller than this many multiply-adds run on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;

/// A weight as the kernel reads it: float32 or int8 packed in panels.
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    /// `[ceil(N/16), K, 16]`, see [`pack`].
    F32Panels(&'a [f32]),
    /// `q` packed the same way, `w[n, k] ≈ scales[n] * q[n, k]`.
    Int8 { w: &'a [i8], scales: &'a [f32] },
}

impl WeightRows<'_> {
    /// The elements a weight of `n` rows of `k` must have.
    pub fn fits(&self, n: usize, k: usize) -> bool {
        let panels = panel_count(n) * k * PANEL;
        match self {
            Self::F32Panels(w) => w.len() == panels,
            Self::Int8 { w, scales } => w.len() == panels && scales.len() == n,
        }
    }

    /// The input width of a weight of `n` rows.
    fn width(&self, n: usize) -> usize {
        let len = match self {
            Self::F32Panels(w) => w.len(),
            Self::Int8 { w, .. } => w.len(),
        };
        len.checked_div(panel_count(n) * PANEL).unwrap_or(0)
    }
}

/// One product, checked: `x` `[m, k]`, `w` `[n, k]`, `out` `[m, n]`.
pub struct Job<'a> {
    x: &'a [f32],
    w: WeightRows<'a>,
    m: usize,
    k: usize,
    n: usize,
    out: *mut f32,
    accumulate: bool,
}

// SAFETY: threads sharing a job write disjoint columns of `out` (see
// `kernel::columns`); everything else is read only.
unsafe impl Sync for Job<'_> {}

impl<'a> Job<'a> {
    /// The product `out (+)= x @ w.T`, or `None` where the sizes disagree.
    pub fn new(
        x: &'a [f32],
        w: WeightRows<'a>,
        (m, k, n): (usize, usize, usize),
        out: &'a mut [f32],
        accumulate: bool,
    ) -> Option<Self> {
        let out = (out.as_mut_ptr(), out.len());
        // SAFETY: `out` is borrowed mutably for the job's life.
        unsafe { Self::from_raw(x, w, (m, k, n), out, accumulate) }
    }

    /// As [`Job::new`] with `out` given by pointer and length, for the
    /// members of a team that each build the same job over buffers they
    /// share.
    ///
    /// # Safety
    /// `out` points to `out_len` floats, valid while the job runs, that
    /// nothing else reads or writes meanwhile but the job's own calls.
    pub unsafe fn from_raw(
        x: &'a [f32],
        w: WeightRows<'a>,
        (m, k, n): (usize, usize, usize),
        (out, out_len): (*mut f32, usize),
        accumulate: bool,
    ) -> Option<Self> {
        let consistent = x.len() == m * k && w.fits(n, k) && out_len == m * n;
        consistent.then_some(Self {
            x,
            w,
            m,
            k,
            n,
            out,
            accumulate,
        })
    }

    /// Writes (or adds) one output element.
    ///
    /// # Safety
    /// `m < self.m`, `n < self.n`, and no other thread writes column `n`.
    #[inline(always)]
    unsafe fn store(&self, m: usize, n: usize, value: f32) {
        // SAFETY: inside the `[m, n]` output, per the caller.
        let dst = unsafe { &mut *self.out.add(m * self.n + n) };
        if self.accumulate {
            *dst += value;
        } else {
            *dst = value;
        }
    }

    /// Runs the product, its output columns in chunks over `on`'s threads
    /// (one thread where it is small).
    pub fn run(&self, on: &dyn Chunks) {
        if self.m == 0 || self.n == 0 {
            return;
        }
        let chunk = if self.m * self.n * self.k < PARALLEL_WORK {
            self.n
        } else {
            self.n
                .div_ceil(on.threads() * 4)
                .next_multiple_of(MIN_CHUNK)
                .max(MIN_CHUNK)
        };
        on.for_each_chunk(self.n, chunk, &|cols| {
            // SAFETY: the job was checked at construction and the loop
            // hands out disjoint column ranges.
            unsafe { kernel::columns(self, cols) }
        });
    }
}

/// `out (+)= x @ w.T` on up to `threads` threads; false (nothing done) where
/// the sizes disagree.
pub fn product(
    x: &[f32],
    w: WeightRows,
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
    accumulate: bool,
    threads: usize,
) -> bool {
    match Job::new(x, w, (m, k, n), out, accumulate) {
        Some(job) => {
            job.run(&Regions(threads));
            true
        }
        None => false,
    }
}

/// `base + x @ w.T` (or `x @ w.T` without `base`) for a CPU tensor `x`
/// `[M, K]` of any float dtype and a weight of `n` rows; returns `[M, n]` in
/// `x`'s dtype.
pub fn mm(
    x: &Tensor,
    w: WeightRows,
    n: usize,
    base: Option<&Tensor>,
    threads: usize,
) -> Result<Tensor, TchError> {
    let size = x.size();
    let k = w.width(n);
    if size.len() != 2 || size[1] as usize != k || x.device() != Device::Cpu {
        return Err(TchError::Shape(format!(
            "CPU projection of [{n}, {k}] given input {size:?} on {:?}",
            x.device()
        )));
    }
    let kind = x.kind();
    let m = size[0] as usize;
    let x = x.f_to_kind(Kind::Float)?.f_contiguous()?;
    let mut out = Tensor::f_empty([m as i64, n as i64], (Kind::Float, Device::Cpu))?;
    if let Some(base) = base {
        out.f_copy_(base)?;
    }
    // SAFETY: `x` and `out` are contiguous float32 CPU tensors of `m * k`
    // and `m * n` elements, alive for this call; `out` is a fresh tensor,
    // so it aliases neither `x` nor the weight.
    let (xs, outs) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, m * k),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, m * n),
        )
    };
    if !product(xs, w, (m, k, n), outs, base.is_some(), threads) {
        return Err(TchError::Shape(format!(
            "CPU projection of [{n}, {k}]: the weight does not fit"
        )));
    }
    if kind == Kind::Float {
        Ok(out)
    } else {
        out.f_to_kind(kind)
    }
}

/// What the CPU products run on, for the start-up log.
pub fn cpu_path() -> &'static str {
    match (vectorized(), on_openmp()) {
        (true, true) => "AVX2 kernels on libtorch's OpenMP threads",
        (true, false) => "AVX2 kernels on scoped threads",
        (false, true) => "portable kernels on libtorch's OpenMP threads",
        (false, false) => "portable kernels on scoped threads",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_products_run_in_parallel_and_agree_with_one_thread() {
        let (m, k, n) = (3, 256, 1000);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let w: Vec<f32> = (0..panel_count(n) * k * PANEL)
            .map(|i| ((i * 5) % 11) as f32 * 0.1)
            .collect();
        let mut one = vec![0.0; m * n];
        let mut two = vec![0.0; m * n];
        assert!(product(
            &x,
            WeightRows::F32Panels(&w),
            (m, k, n),
            &mut one,
            false,
            1
        ));
        assert!(product(
            &x,
            WeightRows::F32Panels(&w),
            (m, k, n),
            &mut two,
            false,
            2
        ));
        assert_eq!(one, two, "threads changed the result");
    }

    #[test]
    fn sizes_that_disagree_are_refused() {
        let x = vec![0.0; 2 * 8];
        // One panel of width 8: four channels and twelve of padding.
        let w = vec![0.0; PANEL * 8];
        let mut out = vec![0.0; 2 * 4];
        assert!(!product(
            &x,
            WeightRows::F32Panels(&w),
            (2, 8, 5),
            &mut out,
            false,
            1
        ));
        assert!(!product(
            &x,
            WeightRows::F32Panels(&w),
            (2, 7, 4),
            &mut out,
            false,
            1
        ));
        // 20 channels take two panels.
        let mut wide = vec![0.0; 2 * 20];
        assert!(!product(
            &x,
            WeightRows::F32Panels(&w),
            (2, 8, 20),
            &mut wide,
            false,
            1
        ));
        let q = vec![0i8; PANEL * 8];
        let scales = [1.0; 3];
        let w = WeightRows::Int8 {
            w: &q,
            scales: &scales,
        };
        assert!(!product(&x, w, (2, 8, 4), &mut out, false, 1));
    }

    #[test]
    fn libtorch_brings_its_openmp_runtime() {
        // The products would fall back to threads of their own, fighting
        // libtorch's spinning workers for the cores.
        assert!(on_openmp());
    }
}
