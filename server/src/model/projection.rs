//! Projection weights split by output columns for CPU decoding: a `[in, out]`
//! matrix kept as `parts` contiguous blocks `[parts, in, out / parts]` and
//! multiplied with one batched matmul, so each intra-op thread gets a block.
//!
//! Why: libtorch's MKL runs `x @ W` with one or a few rows on a single thread
//! (on AMD CPUs through its generic `sgemv` path): at decode batch 1 the second
//! thread only spins. The batched form is spread over the threads (1.5-1.9x per
//! projection on 2 cores; see BENCHMARKS.md, "Against llama.cpp on CPU").

use tch::{Device, Kind, TchError, Tensor};

/// A projection `x @ W` with `W` given as `[in, out]`.
pub struct Projection {
    /// `[in, out]` when `parts == 1`, else `[parts, in, out / parts]`.
    weight: Tensor,
    parts: i64,
    out: i64,
}

impl Projection {
    /// `weight` is `[in, out]` and contiguous; it is split into `parts` column
    /// blocks when `parts > 1` divides `out`, else kept whole.
    pub fn new(weight: Tensor, parts: i64) -> Self {
        let (rows, out) = (weight.size()[0], weight.size()[1]);
        if parts <= 1 || out % parts != 0 {
            return Self {
                weight,
                parts: 1,
                out,
            };
        }
        let blocks = weight
            .view([rows, parts, out / parts])
            .permute([1, 0, 2])
            .contiguous();
        Self {
            weight: blocks,
            parts,
            out,
        }
    }

    /// The column blocks to use for `threads` intra-op threads of `kind` on
    /// `device`: one per thread for float32 on CPU (MKL's path), else 1.
    pub fn parts_for(device: Device, kind: Kind, threads: i64) -> i64 {
        if device == Device::Cpu && kind == Kind::Float {
            threads.max(1)
        } else {
            1
        }
    }

    /// The weight's element count.
    pub fn numel(&self) -> usize {
        self.weight.numel()
    }

    /// `x @ W` for `x`: `[M, in]`; returns `[M, out]`.
    pub fn mm(&self, x: &Tensor) -> Result<Tensor, TchError> {
        if self.parts == 1 {
            return x.f_mm(&self.weight);
        }
        let (m, k) = (x.size()[0], x.size()[1]);
        x.f_unsqueeze(0)?
            .f_expand([self.parts, m, k], false)?
            .f_bmm(&self.weight)?
            .f_permute([1, 0, 2])?
            .f_reshape([m, self.out])
    }

    /// `base + x @ W` (a residual or a bias `base`).
    pub fn addmm(&self, base: &Tensor, x: &Tensor) -> Result<Tensor, TchError> {
        if self.parts == 1 {
            return base.f_addmm(x, &self.weight);
        }
        self.mm(x)?.f_add_(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_projection_matches_the_plain_matmul() {
        let _guard = tch::no_grad_guard();
        let w = Tensor::randn([24, 12], (Kind::Float, Device::Cpu));
        let whole = Projection::new(w.copy(), 1);
        for parts in [2, 3, 4] {
            let split = Projection::new(w.copy(), parts);
            assert_eq!(split.parts, parts);
            for m in [1, 5] {
                let x = Tensor::randn([m, 24], (Kind::Float, Device::Cpu));
                let base = Tensor::randn([m, 12], (Kind::Float, Device::Cpu));
                let a = whole.mm(&x).unwrap();
                let b = split.mm(&x).unwrap();
                assert_eq!(b.size(), vec![m, 12]);
                assert!(a.allclose(&b, 1e-5, 1e-5, false));
                let c = whole.addmm(&base, &x).unwrap();
                let d = split.addmm(&base, &x).unwrap();
                assert!(c.allclose(&d, 1e-5, 1e-5, false));
            }
        }
        // Parts that do not divide the output width: kept whole.
        assert_eq!(Projection::new(w.copy(), 5).parts, 1);
    }
}
