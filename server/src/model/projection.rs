//! A projection weight as the device multiplies it fastest.
//!
//! On the CPU in float32 the weight is packed in panels of 16 output channels
//! (`cpu_matmul/panels.rs`) and every product, a decode step's few rows and
//! a prompt's many, runs on torchwire's own kernel over libtorch's OpenMP
//! threads: MKL runs few-row products on one thread through a generic path
//! on AMD CPUs, and its GEMM was slower than the kernel on prompts there too
//! (BENCHMARKS.md, "Float32 weights in packed panels"). On GPUs and in half
//! precision the weight is `[in, out]` for a plain matmul.
//! A projection may instead hold its weight in int8 (`--quantize int8`,
//! `int8.rs`).

use tch::{Device, Kind, TchError, Tensor};

use super::cpu_matmul::{self, WeightRows};
use super::int8::Int8Weight;

/// A projection `x @ W` of a checkpoint's `[out, in]` weight `W.T`.
pub struct Projection {
    repr: Repr,
    out: i64,
}

enum Repr {
    /// `[in, out]`, contiguous or a transposed view: a plain matmul (GPUs,
    /// half precision on the CPU).
    Dense(Tensor),
    /// Float32 on the CPU, packed `[ceil(out/16), in, 16]` for `cpu_matmul`.
    Panels {
        panels: Tensor,
        inner: usize,
    },
    Int8(Int8Weight),
}

impl Projection {
    /// A checkpoint's `[out, in]` projection weight, as served on its device
    /// and dtype.
    pub fn new(weight: &Tensor) -> Result<Self, TchError> {
        let size = weight.size();
        let out = size[0];
        let repr = if weight.device() == Device::Cpu && weight.kind() == Kind::Float {
            Repr::Panels {
                panels: cpu_matmul::pack(weight)?,
                inner: size.get(1).copied().unwrap_or(0) as usize,
            }
        } else {
            Repr::Dense(weight.f_tr()?.f_contiguous()?)
        };
        Ok(Self { repr, out })
    }

    /// A head tied to the embedding `[vocab, hidden]`: a view of it on GPUs
    /// and in half precision; packed panels on the CPU in float32, which
    /// the embedding then reads its rows from (`embedding.rs`), so the
    /// weight is still held once.
    pub fn tied(embed: &Tensor) -> Result<Self, TchError> {
        if super::is_cpu_f32(embed) {
            return Self::new(embed);
        }
        Ok(Self {
            out: embed.size()[0],
            repr: Repr::Dense(embed.f_tr()?),
        })
    }

    /// The packed panels, where the weight is float32 on the CPU.
    pub fn panels(&self) -> Option<&Tensor> {
        match &self.repr {
            Repr::Panels { panels, .. } => Some(panels),
            _ => None,
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

    /// The weight's element count.
    pub fn numel(&self) -> usize {
        match &self.repr {
            Repr::Dense(weight) => weight.numel(),
            Repr::Panels { inner, .. } => self.out as usize * inner,
            Repr::Int8(w) => w.numel(),
        }
    }

    /// Bytes the weight takes (with a packed weight's padding).
    pub fn bytes(&self) -> u64 {
        match &self.repr {
            Repr::Dense(weight) | Repr::Panels { panels: weight, .. } => {
                super::tensor_bytes(weight)
            }
            Repr::Int8(w) => w.bytes(),
        }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out as usize
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.numel().checked_div(self.out as usize).unwrap_or(0)
    }

    /// The weight as rows for `cpu_matmul`, where it is float32 or int8 on
    /// the CPU.
    pub fn cpu_rows(&self) -> Option<WeightRows<'_>> {
        match &self.repr {
            Repr::Dense(_) => None,
            Repr::Panels { panels, .. } => super::floats(panels).map(WeightRows::F32Panels),
            Repr::Int8(w) => w.cpu_rows(),
        }
    }

    /// `x @ W` for `x`: `[M, in]`; returns `[M, out]`.
    pub fn mm(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.repr {
            Repr::Dense(weight) => x.f_mm(weight),
            Repr::Panels { .. } => self.kernel(x, None),
            Repr::Int8(w) => w.mm(x),
        }
    }

    /// `base + x @ W` (a residual or a bias `base`).
    pub fn addmm(&self, base: &Tensor, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.repr {
            Repr::Dense(weight) => base.f_addmm(x, weight),
            Repr::Panels { .. } => self.kernel(x, Some(base)),
            Repr::Int8(w) => w.addmm(base, x),
        }
    }

    fn kernel(&self, x: &Tensor, base: Option<&Tensor>) -> Result<Tensor, TchError> {
        let rows = self
            .cpu_rows()
            .ok_or_else(|| TchError::Kind("projection weight is not on the CPU".into()))?;
        let threads = tch::get_num_threads().max(1) as usize;
        cpu_matmul::mm(x, rows, self.out as usize, base, threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor) -> bool {
        a.allclose(b, 1e-4, 1e-4, false)
    }

    #[test]
    fn every_layout_gives_the_plain_matmul() {
        let _guard = tch::no_grad_guard();
        // A checkpoint's [out, in] weight, its last panel partly padding.
        let w = Tensor::randn([37, 24], (Kind::Float, Device::Cpu));
        let packed = Projection::new(&w).unwrap();
        assert!(matches!(packed.repr, Repr::Panels { .. }));
        assert!(packed.cpu_rows().is_some());
        assert_eq!((packed.out_features(), packed.in_features()), (37, 24));
        assert_eq!(packed.numel(), 37 * 24);
        assert_eq!(packed.bytes(), 48 * 24 * 4, "three panels of 16");
        let dense = Projection::new(&w.to_kind(Kind::Double)).unwrap();
        assert!(matches!(dense.repr, Repr::Dense(_)));
        assert!(dense.cpu_rows().is_none());
        let tied = Projection::tied(&w).unwrap();
        assert_eq!(tied.bytes(), packed.bytes());
        // A decode step's rows and a prompt's, with and without a base.
        for m in [1, 5, 7, 13, 16, 70] {
            let x = Tensor::randn([m, 24], (Kind::Float, Device::Cpu));
            let base = Tensor::randn([m, 37], (Kind::Float, Device::Cpu));
            let want = x.mm(&w.tr());
            for p in [&packed, &tied] {
                assert_eq!(p.mm(&x).unwrap().size(), vec![m, 37]);
                assert!(close(&p.mm(&x).unwrap(), &want), "m={m}");
                assert!(close(&p.addmm(&base, &x).unwrap(), &(&want + &base)));
            }
            let d = dense.mm(&x.to_kind(Kind::Double)).unwrap();
            assert!(close(&d.to_kind(Kind::Float), &want));
        }
        // The base is read, not written.
        let x = Tensor::randn([2, 24], (Kind::Float, Device::Cpu));
        let base = Tensor::randn([2, 37], (Kind::Float, Device::Cpu));
        let kept = base.copy();
        let _ = packed.addmm(&base, &x).unwrap();
        assert!(base.equal(&kept));
        // A wrong width is an error, not a crash.
        assert!(packed
            .mm(&Tensor::randn([1, 23], (Kind::Float, Device::Cpu)))
            .is_err());
        // int8 of the same weight: close, not equal.
        let q = Projection::int8(&w, Kind::Float, 2).unwrap();
        let x = Tensor::randn([3, 24], (Kind::Float, Device::Cpu));
        let (a, b) = (packed.mm(&x).unwrap(), q.mm(&x).unwrap());
        assert!((&a - &b).norm().double_value(&[]) < 0.02 * a.norm().double_value(&[]));
    }

    #[test]
    fn a_weight_that_is_not_a_matrix_is_an_error() {
        let w = Tensor::randn([4, 3, 2], (Kind::Float, Device::Cpu));
        assert!(Projection::new(&w).is_err());
    }
}
