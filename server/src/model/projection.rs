//! A projection weight as the device multiplies it fastest.
//!
//! On the CPU in float32 the weight keeps the checkpoint's `[out, in]` rows:
//! products of a few rows (every decode step) run on torchwire's own kernel
//! over libtorch's OpenMP threads (`cpu_matmul`), because MKL runs them on
//! one thread through a generic path on AMD CPUs (BENCHMARKS.md, "Against
//! llama.cpp on CPU"); products of many rows (prompts) go to MKL's GEMM. On
//! GPUs and in half precision the weight is `[in, out]` for a plain matmul.
//! A projection may instead hold its weight in int8 (`--quantize int8`,
//! `int8.rs`).

use tch::{Device, Kind, TchError, Tensor};

use super::cpu_matmul::{self, WeightRows};
use super::int8::Int8Weight;

/// Products with at most this many rows run on torchwire's own CPU kernel;
/// larger ones (prompts) on MKL's GEMM, which packs the weight and is
/// compute bound there.
const KERNEL_MAX_ROWS: i64 = 64;

/// A projection `x @ W` of a checkpoint's `[out, in]` weight `W.T`.
pub struct Projection {
    repr: Repr,
    out: i64,
}

enum Repr {
    /// `[in, out]`, contiguous or a transposed view: a plain matmul (GPUs,
    /// half precision on the CPU).
    Dense(Tensor),
    /// Float32 on the CPU, rows `[out, in]` as the checkpoint has them: few
    /// rows through `cpu_matmul`, many through MKL.
    Rows(Tensor),
    Int8(Int8Weight),
}

impl Projection {
    /// A checkpoint's `[out, in]` projection weight, as served on its device
    /// and dtype.
    pub fn new(weight: &Tensor) -> Self {
        let out = weight.size()[0];
        let repr = if weight.device() == Device::Cpu && weight.kind() == Kind::Float {
            Repr::Rows(weight.contiguous())
        } else {
            Repr::Dense(weight.tr().contiguous())
        };
        Self { repr, out }
    }

    /// A head tied to the embedding `[vocab, hidden]`: a view of it, never a
    /// copy.
    pub fn tied(embed: &Tensor) -> Self {
        let out = embed.size()[0];
        let repr = if super::is_cpu_f32(embed) {
            Repr::Rows(embed.shallow_clone())
        } else {
            Repr::Dense(embed.tr())
        };
        Self { repr, out }
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
            Repr::Dense(weight) | Repr::Rows(weight) => weight.numel(),
            Repr::Int8(w) => w.numel(),
        }
    }

    /// Bytes the weight takes.
    pub fn bytes(&self) -> u64 {
        match &self.repr {
            Repr::Dense(weight) | Repr::Rows(weight) => super::tensor_bytes(weight),
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
            Repr::Rows(w) => super::floats(w).map(WeightRows::F32),
            Repr::Int8(w) => w.cpu_rows(),
        }
    }

    /// `x @ W` for `x`: `[M, in]`; returns `[M, out]`.
    pub fn mm(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.repr {
            Repr::Dense(weight) => x.f_mm(weight),
            Repr::Rows(weight) if x.size()[0] > KERNEL_MAX_ROWS => x.f_mm(&weight.f_tr()?),
            Repr::Rows(_) => self.kernel(x, None),
            Repr::Int8(w) => w.mm(x),
        }
    }

    /// `base + x @ W` (a residual or a bias `base`).
    pub fn addmm(&self, base: &Tensor, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.repr {
            Repr::Dense(weight) => base.f_addmm(x, weight),
            Repr::Rows(weight) if x.size()[0] > KERNEL_MAX_ROWS => base.f_addmm(x, &weight.f_tr()?),
            Repr::Rows(_) => self.kernel(x, Some(base)),
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
        // A checkpoint's [out, in] weight.
        let w = Tensor::randn([12, 24], (Kind::Float, Device::Cpu));
        let rows = Projection::new(&w);
        assert!(matches!(rows.repr, Repr::Rows(_)));
        assert!(rows.cpu_rows().is_some());
        let dense = Projection::new(&w.to_kind(Kind::Double));
        assert!(matches!(dense.repr, Repr::Dense(_)));
        assert!(dense.cpu_rows().is_none());
        let tied = Projection::tied(&w);
        assert_eq!(tied.bytes(), rows.bytes());
        // Few rows (the kernel) and many (MKL), with and without a base.
        for m in [1, 5, KERNEL_MAX_ROWS + 3] {
            let x = Tensor::randn([m, 24], (Kind::Float, Device::Cpu));
            let base = Tensor::randn([m, 12], (Kind::Float, Device::Cpu));
            let want = x.mm(&w.tr());
            for p in [&rows, &tied] {
                assert_eq!(p.mm(&x).unwrap().size(), vec![m, 12]);
                assert!(close(&p.mm(&x).unwrap(), &want), "m={m}");
                assert!(close(&p.addmm(&base, &x).unwrap(), &(&want + &base)));
            }
            let d = dense.mm(&x.to_kind(Kind::Double)).unwrap();
            assert!(close(&d.to_kind(Kind::Float), &want));
        }
        // The base is read, not written.
        let x = Tensor::randn([2, 24], (Kind::Float, Device::Cpu));
        let base = Tensor::randn([2, 12], (Kind::Float, Device::Cpu));
        let kept = base.copy();
        let _ = rows.addmm(&base, &x).unwrap();
        assert!(base.equal(&kept));
        // A wrong width is an error, not a crash.
        assert!(rows
            .mm(&Tensor::randn([1, 23], (Kind::Float, Device::Cpu)))
            .is_err());
        // int8 of the same weight: close, not equal.
        let q = Projection::int8(&w, Kind::Float, 2).unwrap();
        let x = Tensor::randn([3, 24], (Kind::Float, Device::Cpu));
        let (a, b) = (rows.mm(&x).unwrap(), q.mm(&x).unwrap());
        assert!((&a - &b).norm().double_value(&[]) < 0.02 * a.norm().double_value(&[]));
    }
}
