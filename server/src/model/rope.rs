//! Rotary position embeddings in the Hugging Face (rotate-half) layout,
//! including Llama 3's frequency scaling.

use tch::{Device, Kind, Tensor};

use super::hf_config::HfConfig;

/// Inverse frequencies for each pair of dimensions, scaled as the config asks.
pub fn inverse_frequencies(config: &HfConfig) -> Vec<f64> {
    let dim = config.head_dim();
    let theta = config.rope_theta();
    let mut inv: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    if let Some(rope) = config.rope() {
        // Other types are refused when the config is read.
        if rope.kind() == Some("llama3") {
            llama3_scale(
                &mut inv,
                rope.factor.unwrap_or(8.0),
                rope.low_freq_factor.unwrap_or(1.0),
                rope.high_freq_factor.unwrap_or(4.0),
                rope.original_max_position_embeddings.unwrap_or(8192) as f64,
            );
        } else if rope.kind() == Some("linear") {
            let factor = rope.factor.unwrap_or(1.0);
            inv.iter_mut().for_each(|f| *f /= factor);
        }
    }
    inv
}

/// transformers' `_compute_llama3_parameters`.
fn llama3_scale(
    inv: &mut [f64],
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max: f64,
) {
    let low_freq_wavelen = original_max / low_freq_factor;
    let high_freq_wavelen = original_max / high_freq_factor;
    for f in inv.iter_mut() {
        let wavelen = 2.0 * std::f64::consts::PI / *f;
        if wavelen > low_freq_wavelen {
            *f /= factor;
        } else if wavelen >= high_freq_wavelen {
            let smooth =
                (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
            *f = (1.0 - smooth) * *f / factor + smooth * *f;
        }
    }
}

/// Precomputed cos and sin tables, `[max_positions, head_dim]`, with `sin`
/// carrying rotate-half's sign so that `rope(x) = x*cos + roll(x, d/2)*sin`.
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    pub fn new(config: &HfConfig, max_positions: usize, device: Device, kind: Kind) -> Self {
        let inv = inverse_frequencies(config);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half * 2);
        let mut sin = Vec::with_capacity(max_positions * half * 2);
        for pos in 0..max_positions {
            // Angles in f32 as transformers computes them (f32 inv_freq x f32 positions).
            let angles: Vec<f32> = inv.iter().map(|f| (*f as f32) * pos as f32).collect();
            for repeat in 0..2 {
                for a in &angles {
                    cos.push(a.cos());
                    // rotate_half(x) = cat(-x2, x1) = roll(x, d/2) * [-1.., +1..]
                    sin.push(if repeat == 0 { -a.sin() } else { a.sin() });
                }
            }
        }
        let shape = [max_positions as i64, (half * 2) as i64];
        Self {
            cos: Tensor::from_slice(&cos)
                .view(shape)
                .to_device(device)
                .to_kind(kind),
            sin: Tensor::from_slice(&sin)
                .view(shape)
                .to_device(device)
                .to_kind(kind),
        }
    }
}

/// Applies the rotation to `x` of shape `[B, T, heads, head_dim]`, with
/// `cos`/`sin` broadcastable to it (`[B or 1, T, 1, head_dim]`).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, tch::TchError> {
    let half = x.size()[3] / 2;
    let rotated = x.f_roll([half], [3])?;
    x.f_mul(cos)?.f_addcmul_(&rotated, sin)
}
