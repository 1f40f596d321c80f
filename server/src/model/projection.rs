//! Projection weights split by output columns for CPU decoding: a `[in, out]`
//! matrix kept as `parts` contiguous blocks `[parts, in, out / parts]` and
//! multiplied with one batched matmul, so each intra-op thread gets a block.
//!
//! Why: libtorch's MKL runs `x @ W` with one or a few rows on a single thread
//! (on AMD CPUs through its generic `sgemv` path): at decode batch 1 the second
//! thread only spins. The batched form is spread over the threads (1.5-1.9x per
//! projection on 2 cores; see BENCHMARKS.md, "Against llama.cpp on CPU").
//!
//! A projection may instead hold its weight in int8 (`--quantize int8`,
//! `int8.rs`).

use tch::{Device, Kind, TchError, Tensor};

use super::int8::Int8Weight;

/// A projection `x @ W` with `W` given as `[in, out]`.
pub struct Projection {
    repr: Repr,
    out: i64,
}

enum Repr {
    /// `weight` is `[in, out]` when `parts == 1`, else `[parts, in, out / parts]`.
    Dense {
        weight: Tensor,
        parts: i64,
    },
    Int8(Int8Weight),
}

impl Projection {
    /// `weight` is `[in, out]` and contiguous; it is split into `parts` column
    /// blocks when `parts > 1` divides `out`, else kept whole.
    pub fn new(weight: Tensor, parts: i64) -> Self {
        let (rows, out) = (weight.size()[0], weight.size()[1]);
        if parts <= 1 || out % parts != 0 {
            return Self {
                repr: Repr::Dense { weight, parts: 1 },
                out,
            };
        }
        let blocks = weight
            .view([rows, parts, out / parts])
            .permute([1, 0, 2])
            .contiguous();
        Self {
            repr: Repr::Dense {
                weight: blocks,
                parts,
            },
            out,
        }
    }

    /// `weight` as a checkpoint stores it, `[out, in]`, quantized to int8 for
    /// activations of `kind` (see `int8.rs`).
    pub fn int8(weight: &Tensor, kind: Kind, threads: usize) -> Result<Self, TchError> {
        Ok(Self {
            out: weight.size()[0],
            repr: Repr::Int8(Int8Weight::quantize(weight, kind, threads)?),
        })
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
        match &self.repr {
            Repr::Dense { weight, .. } => weight.numel(),
            Repr::Int8(w) => w.numel(),
        }
    }

    /// Bytes the weight takes.
    pub fn bytes(&self) -> u64 {
        match &self.repr {
            Repr::Dense { weight, .. } => super::tensor_bytes(weight),
            Repr::Int8(w) => w.bytes(),
        }
    }

    /// `x @ W` for `x`: `[M, in]`; returns `[M, out]`.
    pub fn mm(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.repr {
            Repr::Dense { weight, parts: 1 } => x.f_mm(weight),
            Repr::Dense { weight, parts } => {
                let (m, k) = (x.size()[0], x.size()[1]);
                x.f_unsqueeze(0)?
                    .f_expand([*parts, m, k], false)?
                    .f_bmm(weight)?
                    .f_permute([1, 0, 2])?
                    .f_reshape([m, self.out])
            }
            Repr::Int8(w) => w.mm(x),
        }
    }

    /// `base + x @ W` (a residual or a bias `base`).
    pub fn addmm(&self, base: &Tensor, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.repr {
            Repr::Dense { weight, parts: 1 } => base.f_addmm(x, weight),
            Repr::Dense { .. } => self.mm(x)?.f_add_(base),
            Repr::Int8(w) => w.addmm(base, x),
        }
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
            assert!(matches!(split.repr, Repr::Dense { parts: p, .. } if p == parts));
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
        assert!(matches!(
            Projection::new(w.copy(), 5).repr,
            Repr::Dense { parts: 1, .. }
        ));
        // int8 of the same weight (given as [out, in]): close, not equal.
        let q = Projection::int8(&w.tr(), Kind::Float, 2).unwrap();
        let x = Tensor::randn([3, 24], (Kind::Float, Device::Cpu));
        let (a, b) = (whole.mm(&x).unwrap(), q.mm(&x).unwrap());
        assert!((&a - &b).norm().double_value(&[]) < 0.02 * a.norm().double_value(&[]));
    }
}
