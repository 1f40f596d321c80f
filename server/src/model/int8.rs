//! Weight-only int8 projections: each output channel of a `[out, in]`
//! weight stored as int8 with one float scale (`w ≈ scale[n] * q[n, :]`,
//! `q` in -127..=127), quantized once at load from the checkpoint.
//!
//! On the CPU the weight is packed in panels of 16 channels and the product
//! runs in `cpu_matmul` (int8 widened in registers, on libtorch's OpenMP
//! threads); on other devices it is
//! libtorch's `_weight_int8pack_mm` where the device has it, else the
//! weight is widened to the activations' dtype for each product (memory
//! saved, speed not).

use tch::{Device, Kind, TchError, Tensor};

use super::cpu_matmul::{self, WeightRows};

/// A `[out, in]` projection in int8.
pub struct Int8Weight {
    /// int8: on the CPU packed in panels `[ceil(out/16), in, 16]`
    /// (`cpu_matmul::pack`), elsewhere `[out, in]` contiguous.
    weight: Tensor,
    /// `[out]`: float32 on the CPU, the activations' dtype elsewhere.
    scales: Tensor,
    out: i64,
    inner: i64,
    backend: Backend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// `cpu_matmul` on `threads` threads.
    Cpu { threads: usize },
    /// libtorch's `_weight_int8pack_mm`.
    Packed,
    /// The weight widened to the activations' dtype, then a plain matmul.
    Widened,
}

impl Int8Weight {
    /// Quantizes `weight` (`[out, in]`, any float dtype, on its device) for
    /// products whose activations are `kind`, using `threads` threads on CPU.
    pub fn quantize(weight: &Tensor, kind: Kind, threads: usize) -> Result<Self, TchError> {
        let (q, scales) = quantized(weight)?;
        let (out, inner) = (weight.size()[0], weight.size()[1]);
        let device = weight.device();
        let mut this = Self {
            weight: q,
            scales: scales.f_to_kind(Kind::Float)?.f_contiguous()?,
            out,
            inner,
            backend: Backend::Cpu {
                threads: threads.max(1),
            },
        };
        if device == Device::Cpu {
            // Read in panels of 16 channels, like float32 weights.
            this.weight = cpu_matmul::pack(&this.weight)?;
            return Ok(this);
        }
        this.scales = this.scales.f_to_kind(kind)?;
        this.backend = Backend::Packed;
        // Where the device has no such kernel, the probe fails at load.
        let probe = Tensor::f_zeros([1, inner], (kind, device))?;
        if this.mm(&probe).is_err() {
            tracing::info!(device = ?device, "_weight_int8pack_mm unavailable: int8 weights are widened per product");
            this.backend = Backend::Widened;
        }
        Ok(this)
    }

    /// Elements of the weight (without a packed weight's padding).
    pub fn numel(&self) -> usize {
        (self.out * self.inner) as usize
    }

    /// Bytes of the int8 weight and its scales.
    pub fn bytes(&self) -> u64 {
        super::tensor_bytes(&self.weight) + super::tensor_bytes(&self.scales)
    }

    /// `x @ W.T` for `x`: `[M, in]`; returns `[M, out]` in `x`'s dtype.
    pub fn mm(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let size = x.size();
        if size.len() != 2 || size[1] != self.inner {
            return Err(TchError::Shape(format!(
                "int8 projection of [{}, {}] given input {size:?}",
                self.out, self.inner
            )));
        }
        match self.backend {
            // The thread governor may have lowered the count since load.
            Backend::Cpu { threads } => self.mm_cpu(x, None, threads),
            Backend::Packed => x.f_internal_weight_int8pack_mm(&self.weight, &self.scales),
            Backend::Widened => x
                .f_mm(&self.weight.f_to_kind(x.kind())?.f_tr()?)?
                .f_mul(&self.scales),
        }
    }

    /// `base + x @ W.T` (a residual or a bias `base`).
    pub fn addmm(&self, base: &Tensor, x: &Tensor) -> Result<Tensor, TchError> {
        match self.backend {
            Backend::Cpu { threads } => self.mm_cpu(x, Some(base), threads),
            _ => self.mm(x)?.f_add_(base),
        }
    }

    /// The weight as rows for `cpu_matmul`, where it lives on the CPU.
    pub fn cpu_rows(&self) -> Option<WeightRows<'_>> {
        if !matches!(self.backend, Backend::Cpu { .. }) {
            return None;
        }
        let n = self.out as usize;
        // SAFETY: contiguous int8 panels and float32 `[out]` CPU tensors
        // (made so in `quantize`), borrowed for as long as `self`.
        Some(unsafe {
            WeightRows::Int8 {
                w: std::slice::from_raw_parts(
                    self.weight.data_ptr() as *const i8,
                    self.weight.numel(),
                ),
                scales: std::slice::from_raw_parts(self.scales.data_ptr() as *const f32, n),
            }
        })
    }

    fn mm_cpu(
        &self,
        x: &Tensor,
        base: Option<&Tensor>,
        threads: usize,
    ) -> Result<Tensor, TchError> {
        let rows = self
            .cpu_rows()
            .ok_or_else(|| TchError::Kind("int8 weight is not on the CPU".into()))?;
        // The thread governor may have lowered the count since load.
        let threads = threads.min(tch::get_num_threads().max(1) as usize);
        cpu_matmul::mm(x, rows, self.out as usize, base, threads)
    }
}

/// `weight` (`[out, in]`, any float dtype) as int8 rows `[out, in]` and a
/// float32 scale per row (`[out]`), on the weight's device.
fn quantized(weight: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let _guard = tch::no_grad_guard();
    let out = weight.size()[0];
    let w = weight.f_to_kind(Kind::Float)?;
    let absmax = w.f_abs()?.f_amax([1], true)?;
    // An all-zero row keeps scale 1 (its int8 values are all 0).
    let scales = absmax
        .f_div_scalar(127.0)?
        .f_where_scalarother(&absmax.f_gt(0.0)?, 1.0)?;
    let q = w
        .f_div(&scales)?
        .f_round()?
        .f_clamp(-127.0, 127.0)?
        .f_to_kind(Kind::Int8)?
        .f_contiguous()?;
    Ok((q, scales.f_view([out])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).norm().double_value(&[]) / b.norm().double_value(&[])
    }

    #[test]
    fn int8_products_stay_close_to_float() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(1);
        let w = Tensor::randn([96, 72], (Kind::Float, Device::Cpu));
        // One row of zeros: its scale must not divide by zero.
        let _ = w.get(5).fill_(0.0);
        for threads in [1, 2] {
            let q = Int8Weight::quantize(&w, Kind::Float, threads).unwrap();
            assert_eq!(q.numel(), 96 * 72);
            for m in [1, 3, 16] {
                let x = Tensor::randn([m, 72], (Kind::Float, Device::Cpu));
                let want = x.mm(&w.tr());
                let got = q.mm(&x).unwrap();
                assert_eq!(got.size(), vec![m, 96]);
                // Per-channel int8: about 0.5-1 % relative error on Gaussian weights.
                assert!(
                    rel_err(&got, &want) < 0.02,
                    "m={m}: {}",
                    rel_err(&got, &want)
                );
                let base = Tensor::randn([m, 96], (Kind::Float, Device::Cpu));
                let sum = q.addmm(&base, &x).unwrap();
                assert!(rel_err(&sum, &(&want + &base)) < 0.02);
            }
        }
    }

    #[test]
    fn the_tensor_backends_agree_with_the_cpu_kernel() {
        let _guard = tch::no_grad_guard();
        let w = Tensor::randn([64, 32], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));
        let cpu = Int8Weight::quantize(&w, Kind::Float, 1).unwrap();
        let want = cpu.mm(&x).unwrap();
        for backend in [Backend::Packed, Backend::Widened] {
            // As on a GPU: int8 rows, not panels.
            let (q, scales) = quantized(&w).unwrap();
            let other = Int8Weight {
                weight: q,
                scales,
                out: 64,
                inner: 32,
                backend,
            };
            let got = other.mm(&x).unwrap();
            assert!(rel_err(&got, &want) < 1e-5, "{backend:?}");
        }
    }

    #[test]
    fn wrong_input_width_is_an_error_not_a_crash() {
        let w = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let q = Int8Weight::quantize(&w, Kind::Float, 2).unwrap();
        let x = Tensor::randn([1, 15], (Kind::Float, Device::Cpu));
        assert!(q.mm(&x).is_err());
    }
}
