//! Token sampling on the logits' own device: the repetition penalty,
//! temperature, top-k, top-p and min-p of a whole batch computed with tensor
//! ops where the logits are, so that only the chosen ids (and the asked-for
//! log-probabilities) are copied to the host. It follows `sampler`'s
//! semantics; each row's one uniform number comes from its request's RNG.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

use super::sampler::{Sampled, SamplingParams};
use crate::model::upload;

/// Where a model's tokens are sampled, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerChoice {
    /// On the device for a CUDA model; on the host for a CPU one, where the
    /// host sampler is the faster (BENCHMARKS.md, `device_sampler_bench`).
    #[default]
    Auto,
    /// Every row's logits copied to the host and sampled there (`sampler`).
    Host,
    /// Here, on the logits' device, whatever it is.
    Device,
}

impl SamplerChoice {
    /// True when a model on `device` samples with this module.
    pub fn on_device(self, device: Device) -> bool {
        match self {
            Self::Auto => device.is_cuda(),
            Self::Host => false,
            Self::Device => true,
        }
    }
}

impl std::str::FromStr for SamplerChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "host" => Ok(Self::Host),
            "device" => Ok(Self::Device),
            other => Err(format!("expected auto, host or device, got {other:?}")),
        }
    }
}

/// One row of the batch: its settings, the tokens seen so far (for the
/// repetition penalty) and the uniform number in `[0, 1)` its draw uses
/// (`Sampler::next_uniform`; ignored for a greedy row).
pub struct Row<'a> {
    pub params: &'a SamplingParams,
    pub history: &'a [u32],
    pub uniform: f32,
}

/// How a row's token is chosen; rows of one kind are sampled together.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The argmax of the (penalised) logits.
    Greedy,
    /// Inverse CDF over the whole vocabulary in id order: nothing is sorted.
    InOrder,
    /// The `top_k` best candidates (`topk`), best first, then top-p.
    TopK,
    /// top-p without top-k: every candidate sorted, best first.
    Sorted,
}

impl Path {
    fn of(p: &SamplingParams, vocab: usize) -> Self {
        if p.is_greedy() {
            Self::Greedy
        } else if p.top_k > 0 && p.top_k < vocab {
            Self::TopK
        } else if p.top_p < 1.0 {
            Self::Sorted
        } else {
            Self::InOrder
        }
    }
}

/// Samples one token per row of `logits` (`[B, vocab]`, float32, on any
/// device), with `rows[b]` the settings of row `b`.
pub fn sample(logits: &Tensor, rows: &[Row<'_>]) -> Result<Vec<Sampled>, TchError> {
    let (batch, vocab) = logits.size2()?;
    if batch as usize != rows.len() || vocab == 0 {
        return Err(TchError::Shape(format!(
            "{} sampling rows for logits of shape [{batch}, {vocab}]",
            rows.len()
        )));
    }
    let device = logits.device();
    let work = penalised(logits, rows, vocab)?;
    let mut ids = Tensor::f_zeros([batch], (Kind::Int64, device))?;
    for path in [Path::Greedy, Path::InOrder, Path::TopK, Path::Sorted] {
        let members: Vec<usize> = (0..rows.len())
            .filter(|&b| Path::of(rows[b].params, vocab as usize) == path)
            .collect();
        if members.is_empty() {
            continue;
        }
        let index = index_tensor(&members, device)?;
        let group = select_rows(&work, &members, &index, rows.len())?;
        let chosen = if path == Path::Greedy {
            group.f_argmax(1, false)?
        } else {
            let c = columns(rows, &members, device)?;
            let min_p = members.iter().any(|&b| rows[b].params.min_p > 0.0);
            match path {
                Path::TopK => {
                    let kmax = members.iter().map(|&b| rows[b].params.top_k).max();
                    let (values, ids) = top_k(&group, kmax.unwrap_or(1) as i64, &c.top_k)?;
                    draw_sorted(&values, &ids, &c, min_p)?
                }
                Path::Sorted => {
                    let (values, ids) = group.f_sort_stable(true, 1, true)?;
                    draw_sorted(&values, &ids, &c, min_p)?
                }
                _ => draw_in_order(&group, &c, min_p)?,
            }
        };
        let _ = ids.f_index_copy_(0, &index, &chosen)?;
    }
    let logprobs = Logprobs::of(logits, rows, &ids)?;
    let ids = Vec::<i64>::try_from(&ids)?;
    Ok(ids
        .iter()
        .enumerate()
        .map(|(b, &id)| {
            let (logprob, top) = logprobs
                .as_ref()
                .and_then(|l| l.row(b, rows[b].params.logprobs))
                .unzip();
            Sampled {
                token: id as u32,
                logprob,
                top: top.unwrap_or_default(),
            }
        })
        .collect())
}

/// `logits` with each penalised row's seen tokens' logits divided by the
/// penalty when positive and multiplied when negative (as
/// `sampler::apply_repetition_penalty`): one gather and one scatter over the
/// flat `[B * vocab]` indices of the distinct seen tokens. `logits` itself is
/// left as it is (log-probabilities are of the raw logits).
fn penalised(logits: &Tensor, rows: &[Row<'_>], vocab: i64) -> Result<Tensor, TchError> {
    let mut flat = Vec::new();
    let mut penalty = Vec::new();
    for (b, row) in rows.iter().enumerate() {
        let p = row.params.repetition_penalty;
        if p == 1.0 {
            continue;
        }
        let mut seen: Vec<u32> = row
            .history
            .iter()
            .copied()
            .filter(|&t| i64::from(t) < vocab)
            .collect();
        seen.sort_unstable();
        seen.dedup();
        flat.extend(seen.iter().map(|&t| b as i64 * vocab + i64::from(t)));
        penalty.resize(flat.len(), p);
    }
    if flat.is_empty() {
        return Ok(logits.shallow_clone());
    }
    let device = logits.device();
    let flat = upload(&flat, device)?;
    let penalty = upload(&penalty, device)?;
    let mut work = logits.f_empty_like()?;
    work.f_copy_(logits)?;
    let mut all = work.f_view([-1])?;
    let seen = all.f_index_select(0, &flat)?;
    let lowered = seen
        .f_div(&penalty)?
        .f_where_self(&seen.f_gt(0.0)?, &seen.f_mul(&penalty)?)?;
    let _ = all.f_index_copy_(0, &flat, &lowered)?;
    Ok(work)
}

/// The rows `members` (as `index`) of `t`; `t` itself when they are all of its `batch` rows.
fn select_rows(
    t: &Tensor,
    members: &[usize],
    index: &Tensor,
    batch: usize,
) -> Result<Tensor, TchError> {
    if members.len() == batch {
        Ok(t.shallow_clone())
    } else {
        t.f_index_select(0, index)
    }
}

fn index_tensor(members: &[usize], device: Device) -> Result<Tensor, TchError> {
    let index: Vec<i64> = members.iter().map(|&b| b as i64).collect();
    upload(&index, device)
}

/// Per-row settings of a group as `[n, 1]` columns, sent in one copy.
struct Columns {
    inv_t: Tensor,
    uniform: Tensor,
    /// Candidates top-k keeps (float; the group's width when off).
    top_k: Tensor,
    /// top-p, or infinity when off (no prefix ever reaches it).
    top_p: Tensor,
    min_p: Tensor,
}

fn columns(rows: &[Row<'_>], members: &[usize], device: Device) -> Result<Columns, TchError> {
    const N: usize = 5;
    let mut host = Vec::with_capacity(members.len() * N);
    for &b in members {
        let p = rows[b].params;
        let top_k = if p.top_k > 0 {
            p.top_k as f32
        } else {
            f32::INFINITY
        };
        let top_p = if p.top_p < 1.0 {
            p.top_p
        } else {
            f32::INFINITY
        };
        host.extend([1.0 / p.temperature, rows[b].uniform, top_k, top_p, p.min_p]);
    }
    let all = upload(&host, device)?.f_view([members.len() as i64, N as i64])?;
    let col = |i: i64| all.f_narrow(1, i, 1);
    Ok(Columns {
        inv_t: col(0)?,
        uniform: col(1)?,
        top_k: col(2)?,
        top_p: col(3)?,
        min_p: col(4)?,
    })
}

/// Weights `exp((l - best) / t)` of `logits` (`[n, K]`) given each row's best logit.
fn weights(logits: &Tensor, best: &Tensor, inv_t: &Tensor) -> Result<Tensor, TchError> {
    let mut w = logits.f_sub(best)?;
    let _ = w.f_mul_(inv_t)?;
    let _ = w.f_exp_()?;
    Ok(w)
}

/// Temperature (and min-p) sampling in id order: the weights' cumulative
/// sum, and the first id whose running sum passes `u * total`.
fn draw_in_order(logits: &Tensor, c: &Columns, min_p: bool) -> Result<Tensor, TchError> {
    let (best, argmax) = logits.f_max_dim(1, true)?;
    let mut w = weights(logits, &best, &c.inv_t)?;
    if min_p {
        // The best weight is exp(0) = 1, so min_p is the threshold.
        let _ = w.f_masked_fill_(&w.f_lt_tensor(&c.min_p)?, 0.0)?;
    }
    let cum = w.f_cumsum(1, Kind::Float)?;
    let width = cum.size()[1];
    let total = cum.f_narrow(1, width - 1, 1)?.f_contiguous()?;
    let at = inverse_cdf(&cum, &total, &c.uniform)?;
    choose(at, &total, &argmax)
}

/// Sampling over candidates sorted best first (`values`, `ids`: `[n, K]`):
/// each of top-k, top-p and min-p keeps a best-first prefix, so the row
/// keeps the shortest of the three and draws within it.
fn draw_sorted(
    values: &Tensor,
    ids: &Tensor,
    c: &Columns,
    min_p: bool,
) -> Result<Tensor, TchError> {
    let width = values.size()[1];
    let best = values.f_narrow(1, 0, 1)?;
    let w = weights(values, &best, &c.inv_t)?;
    let cum = w.f_cumsum(1, Kind::Float)?;
    // top-k: its k best (all K when off).
    let mut keep = c.top_k.f_clamp_max(width as f64)?.f_to_kind(Kind::Int64)?;
    // top-p: the smallest prefix whose weight reaches top_p of the top-k
    // candidates' total; the first position at or past it, plus one.
    let top_k_total = cum.f_gather(1, &keep.f_sub_scalar(1)?, false)?;
    let mass = top_k_total.f_mul(&c.top_p)?;
    let reaching = mass.f_searchsorted(&cum, false, false, "left", None::<Tensor>)?;
    keep = keep.f_minimum(&reaching.f_add_scalar(1)?)?;
    if min_p {
        // min-p: the candidates of at least min_p times the best weight (1).
        let above = w
            .f_ge_tensor(&c.min_p)?
            .f_sum_dim_intlist(1, true, Kind::Int64)?;
        keep = keep.f_minimum(&above)?;
    }
    let keep = keep.f_clamp(1, width)?;
    let total = cum.f_gather(1, &keep.f_sub_scalar(1)?, false)?;
    let at = inverse_cdf(&cum, &total, &c.uniform)?;
    let chosen = ids
        .f_gather(1, &at.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?;
    choose(chosen, &total, &ids.f_narrow(1, 0, 1)?)
}

/// The position of `cum` (`[n, K]`, running sums of weights) where a draw
/// of `uniform` lands: the first whose running sum passes `uniform * total`,
/// and never past the first that reaches `total` (so a draw that rounding
/// puts at the total takes the last candidate with weight, as the host
/// sampler does). Returns `[n]`, clamped into the row.
fn inverse_cdf(cum: &Tensor, total: &Tensor, uniform: &Tensor) -> Result<Tensor, TchError> {
    let width = cum.size()[1];
    let r = uniform.f_mul(total)?;
    let passes = r.f_searchsorted(cum, false, true, "right", None::<Tensor>)?;
    let last = total.f_searchsorted(cum, false, false, "left", None::<Tensor>)?;
    passes
        .f_minimum(&last)?
        .f_clamp(0, width - 1)?
        .f_squeeze_dim(1)
}

/// `chosen` (`[n]`) where the row's total weight is a positive finite
/// number, else its argmax (`[n, 1]`): non-finite logits leave no
/// distribution to draw from.
fn choose(chosen: Tensor, total: &Tensor, argmax: &Tensor) -> Result<Tensor, TchError> {
    let valid = total.f_isfinite()?.f_logical_and(&total.f_gt(0.0)?)?;
    chosen.f_where_self(&valid.f_squeeze_dim(1)?, &argmax.f_squeeze_dim(1)?)
}

/// Each row's `top_k` (`[n, 1]`, float) best logits of `logits` (`[n,
/// vocab]`) and their ids, best first and lowest id first among equals,
/// as the host sampler takes them; `[n, kmax]`, of which a row's first k
/// are its candidates. `topk` leaves open which of several equal logits
/// at a row's k-th place it returns, so those places are filled again with
/// the lowest ids of that value (a second `topk`, over their reversed ids).
fn top_k(logits: &Tensor, kmax: i64, top_k: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let (values, ids) = logits.f_topk(kmax, 1, true, true)?;
    let (values, ids) = ties_by_id(&values, &ids)?;
    let (n, vocab) = logits.size2()?;
    let options = (Kind::Int64, logits.device());
    let k = top_k.f_clamp_max(kmax as f64)?.f_to_kind(Kind::Int64)?;
    let kth = values.f_gather(1, &k.f_sub_scalar(1)?, false)?;
    let above = values
        .f_gt_tensor(&kth)?
        .f_sum_dim_intlist(1, true, Kind::Int64)?;
    let reversed = Tensor::f_arange_start_step(vocab, 0, -1, options)?;
    let tied = logits.f_eq_tensor(&kth)?.f_mul(&reversed)?;
    let (_, tied_ids) = tied.f_topk(kmax, 1, true, true)?;
    let place = Tensor::f_arange(kmax, options)?.f_expand([n, kmax], false)?;
    let from_tied = place.f_sub(&above)?.f_clamp_min(0)?;
    let tied_ids = tied_ids.f_gather(1, &from_tied, false)?;
    let keep = place.f_lt_tensor(&above)?;
    Ok((
        values.f_where_self(&keep, &kth)?,
        ids.f_where_self(&keep, &tied_ids)?,
    ))
}

/// `values` and `ids` (`[n, K]`, best first, from `topk`) reordered so that
/// equal values go lowest id first, as the host sampler orders candidates.
fn ties_by_id(values: &Tensor, ids: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let (ids, by_id) = ids.f_sort_stable(true, 1, false)?;
    let values = values.f_gather(1, &by_id, false)?;
    let (values, best_first) = values.f_sort_stable(true, 1, true)?;
    Ok((values, ids.f_gather(1, &best_first, false)?))
}

/// Log-probabilities of the rows that ask for them, copied to the host: the
/// chosen token's and the top `n` alternatives, of the raw logits (before
/// the penalty), as the host sampler reports them.
struct Logprobs {
    /// Batch row → row of the tensors below.
    slot: Vec<Option<usize>>,
    chosen: Vec<f32>,
    top_ids: Vec<i64>,
    top: Vec<f32>,
    width: usize,
}

impl Logprobs {
    fn of(logits: &Tensor, rows: &[Row<'_>], ids: &Tensor) -> Result<Option<Self>, TchError> {
        let vocab = logits.size()[1] as usize;
        let members: Vec<usize> = (0..rows.len())
            .filter(|&b| rows[b].params.logprobs > 0)
            .collect();
        let Some(n) = members.iter().map(|&b| rows[b].params.logprobs).max() else {
            return Ok(None);
        };
        let width = n.min(vocab);
        let index = index_tensor(&members, logits.device())?;
        let raw = select_rows(logits, &members, &index, rows.len())?;
        let log_z = raw.f_logsumexp([1], true)?;
        let chosen_ids = ids.f_index_select(0, &index)?.f_unsqueeze(1)?;
        let chosen = raw.f_gather(1, &chosen_ids, false)?.f_sub(&log_z)?;
        let (top, top_ids) = raw.f_topk(width as i64, 1, true, true)?;
        let (top, top_ids) = ties_by_id(&top, &top_ids)?;
        let top = top.f_sub(&log_z)?;
        let mut slot = vec![None; rows.len()];
        for (i, &b) in members.iter().enumerate() {
            slot[b] = Some(i);
        }
        Ok(Some(Self {
            slot,
            chosen: Vec::<f32>::try_from(&chosen.f_flatten(0, -1)?)?,
            top_ids: Vec::<i64>::try_from(&top_ids.f_flatten(0, -1)?)?,
            top: Vec::<f32>::try_from(&top.f_flatten(0, -1)?)?,
            width,
        }))
    }

    /// Batch row `b`'s chosen log-probability and its `n` best alternatives.
    fn row(&self, b: usize, n: usize) -> Option<(f32, Vec<(u32, f32)>)> {
        let i = self.slot.get(b).copied().flatten()?;
        let start = i * self.width;
        let top = (start..start + n.min(self.width))
            .map(|j| (self.top_ids[j] as u32, self.top[j]))
            .collect();
        Some((self.chosen[i], top))
    }
}

#[cfg(test)]
mod tests;
