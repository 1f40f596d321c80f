//! How far one model's logits are from a reference's on the same tokens:
//! what quantization costs (`--quantize`), reported by
//! `examples/quant_eval.rs` and bounded by the quantization tests.

use tch::{Kind, TchError, Tensor};

/// Totals over positions; `add` more, then read the means.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogitComparison {
    /// Positions compared.
    pub positions: usize,
    /// Positions whose argmax is the same token.
    pub same_top1: usize,
    /// Sum over positions of KL(reference || other), in nats.
    pub kl_sum: f64,
    /// Largest |logit difference| anywhere.
    pub max_abs_diff: f64,
    /// Sum over scored positions of -log p(next token), reference and other.
    pub nll_reference: f64,
    pub nll_other: f64,
    /// Positions with a next token (all but each sequence's last).
    pub scored: usize,
}

impl LogitComparison {
    /// Adds one sequence: `reference` and `other` are its logits `[T, vocab]`
    /// at every position, `tokens` its `T` ids (position `t` predicts
    /// `tokens[t + 1]`).
    pub fn add(
        &mut self,
        reference: &Tensor,
        other: &Tensor,
        tokens: &[u32],
    ) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        let t = reference.size()[0];
        if other.size() != reference.size() || tokens.len() as i64 != t {
            return Err(TchError::Shape(format!(
                "logits {:?} and {:?} for {} tokens",
                reference.size(),
                other.size(),
                tokens.len()
            )));
        }
        let r = reference
            .f_to_kind(Kind::Double)?
            .f_log_softmax(-1, Kind::Double)?;
        let o = other
            .f_to_kind(Kind::Double)?
            .f_log_softmax(-1, Kind::Double)?;
        let kl = r.f_exp()?.f_mul(&(&r - &o))?.f_sum(Kind::Double)?;
        self.kl_sum += kl.f_double_value(&[])?;
        let same = r
            .f_argmax(-1, false)?
            .f_eq_tensor(&o.f_argmax(-1, false)?)?
            .f_sum(Kind::Int64)?;
        self.same_top1 += same.f_int64_value(&[])? as usize;
        let diff = (reference - other).f_abs()?.f_max()?.f_double_value(&[])?;
        self.max_abs_diff = self.max_abs_diff.max(diff);
        self.positions += t as usize;
        if t > 1 {
            let next: Vec<i64> = tokens[1..].iter().map(|&id| i64::from(id)).collect();
            let next = Tensor::from_slice(&next).f_view([t - 1, 1])?;
            let nll = |lp: &Tensor| -> Result<f64, TchError> {
                Ok(-lp
                    .f_narrow(0, 0, t - 1)?
                    .f_gather(1, &next, false)?
                    .f_sum(Kind::Double)?
                    .f_double_value(&[])?)
            };
            self.nll_reference += nll(&r)?;
            self.nll_other += nll(&o)?;
            self.scored += (t - 1) as usize;
        }
        Ok(())
    }

    /// Mean KL(reference || other) per position, in nats.
    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions.max(1) as f64
    }

    /// Share of positions with the same argmax.
    pub fn top1_agreement(&self) -> f64 {
        self.same_top1 as f64 / self.positions.max(1) as f64
    }

    /// Perplexity of the text under the reference and under the other model.
    pub fn perplexities(&self) -> (f64, f64) {
        let n = self.scored.max(1) as f64;
        ((self.nll_reference / n).exp(), (self.nll_other / n).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn identical_logits_compare_as_identical_and_shifted_ones_do_not() {
        let logits = Tensor::randn([5, 11], (Kind::Float, Device::Cpu));
        let tokens = [1, 2, 3, 4, 5];
        let mut same = LogitComparison::default();
        same.add(&logits, &logits, &tokens).unwrap();
        assert_eq!((same.positions, same.same_top1, same.scored), (5, 5, 4));
        assert!(same.mean_kl().abs() < 1e-12 && same.max_abs_diff == 0.0);
        let (a, b) = same.perplexities();
        assert!(a > 1.0 && (a - b).abs() < 1e-9);
        // A constant shift changes no probability; noise does.
        let mut shifted = LogitComparison::default();
        shifted.add(&logits, &(&logits + 3.0), &tokens).unwrap();
        assert!(shifted.mean_kl().abs() < 1e-9 && (shifted.max_abs_diff - 3.0).abs() < 1e-5);
        let mut noisy = LogitComparison::default();
        let other = &logits + Tensor::randn([5, 11], (Kind::Float, Device::Cpu));
        noisy.add(&logits, &other, &tokens).unwrap();
        assert!(noisy.mean_kl() > 1e-3);
        assert!(noisy.add(&logits, &other, &tokens[..4]).is_err());
    }
}
