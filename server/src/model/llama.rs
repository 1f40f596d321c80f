//! The Llama-family decoder (Llama 2/3, TinyLlama, SmolLM, Qwen2, Mistral
//! without sliding windows): RMSNorm, rotary embeddings, grouped-query
//! attention over a slot-based KV cache, SwiGLU MLP. q/k/v and gate/up
//! projections are fused into one matmul each, and the attention scale is
//! folded into the q weights.
//!
//! Prompts run as tch ops everywhere. The decode step runs as tch ops on
//! GPUs and in half precision (residual adds fused into `addmm`, decode
//! attention's mask added inside `baddbmm`, so a step launches few small
//! ops); on the CPU in float32 it runs without ATen in `cpu_decode.rs`,
//! where per-op overhead would cost more than the arithmetic. Projection
//! weights are kept as `projection.rs` says is fastest for the device.

use std::path::Path;

use tch::{Device, Kind, TchError, Tensor};

use super::cpu_decode::{self, Dims, LayerRows, ModelRows};
use super::cpu_ops;
use super::embedding::Embedding;
use super::hf_config::{GenerationConfig, HfConfig};
use super::projection::Projection;
use super::quantization::Quantization;
use super::rope::{self, RopeTables};
use super::upload::upload;
use super::weights::Weights;
use super::{floats, tensor_bytes};
use crate::engine::kv_cache::KvCache;

/// How to load a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub device: Device,
    pub kind: Kind,
    /// Positions the rotary tables cover (the serving context length).
    pub max_positions: usize,
    /// How projection weights are stored.
    pub quantization: Quantization,
}

/// One decoder layer; projection weights are `[in, out]`.
struct Layer {
    input_norm: Tensor,
    qkv: Projection,
    qkv_bias: Option<Tensor>,
    o: Projection,
    post_norm: Tensor,
    gate_up: Projection,
    down: Projection,
}

/// A loaded decoder, ready to run on its device.
pub struct Llama {
    pub config: HfConfig,
    /// End-of-sequence token ids (from generation_config.json, else config.json).
    pub eos_token_ids: Vec<u32>,
    pub device: Device,
    pub kind: Kind,
    pub parameters: u64,
    /// Bytes the weights take on the device (a tied head that is a view of
    /// the embedding counted once).
    pub weight_bytes: u64,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Projection,
    rope: RopeTables,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Llama {
    /// Loads `dir` (config.json, safetensors, generation_config.json).
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<Self, String> {
        let config = HfConfig::read(dir)?;
        config.check_context(opts.max_positions)?;
        let generation = GenerationConfig::read(dir)?;
        let eos_token_ids = generation
            .eos_token_id
            .as_ref()
            .or(config.eos_token_id.as_ref())
            .map(|ids| ids.to_vec())
            .unwrap_or_default();
        let _guard = tch::no_grad_guard();
        let mut w = Weights::load(dir, opts.device, opts.kind)?;
        let threads = tch::get_num_threads().max(1) as usize;
        // A checkpoint's `[out, in]` projection weight, as served.
        let proj = |weight: Tensor| -> Result<Projection, String> {
            match opts.quantization {
                Quantization::None => {
                    Projection::new(&weight).map_err(|e| format!("packing a weight: {e}"))
                }
                Quantization::Int8 => Projection::int8(&weight, opts.kind, threads)
                    .map_err(|e| format!("quantizing to int8: {e}")),
            }
        };
        let mut parameters = 0u64;
        let mut count = |n: usize| parameters += n as u64;

        let embed = w.take("model.embed_tokens.weight")?;
        count(embed.numel());
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = |name: &str| format!("model.layers.{i}.{name}");
            let q = w.take(&p("self_attn.q_proj.weight"))?;
            let k = w.take(&p("self_attn.k_proj.weight"))?;
            let v = w.take(&p("self_attn.v_proj.weight"))?;
            // Scores are q.k / sqrt(head_dim): the scale goes into q's
            // weights (and bias) once, rotary embedding being linear.
            let scale = 1.0 / (config.head_dim() as f64).sqrt();
            let q = q * scale;
            let qkv_bias = if config.qkv_bias() {
                let qb = w.take(&p("self_attn.q_proj.bias"))? * scale;
                let kb = w.take(&p("self_attn.k_proj.bias"))?;
                let vb = w.take(&p("self_attn.v_proj.bias"))?;
                Some(Tensor::cat(&[qb, kb, vb], 0))
            } else {
                None
            };
            let gate = w.take(&p("mlp.gate_proj.weight"))?;
            let up = w.take(&p("mlp.up_proj.weight"))?;
            let layer = Layer {
                input_norm: w.take(&p("input_layernorm.weight"))?,
                qkv: proj(Tensor::cat(&[q, k, v], 0))?,
                qkv_bias,
                o: proj(w.take(&p("self_attn.o_proj.weight"))?)?,
                post_norm: w.take(&p("post_attention_layernorm.weight"))?,
                gate_up: proj(Tensor::cat(&[gate, up], 0))?,
                down: proj(w.take(&p("mlp.down_proj.weight"))?)?,
            };
            count(layer.input_norm.numel());
            count(layer.post_norm.numel());
            for p in [&layer.qkv, &layer.o, &layer.gate_up, &layer.down] {
                count(p.numel());
            }
            if let Some(b) = &layer.qkv_bias {
                count(b.numel());
            }
            // Llama checkpoints with attention_bias also carry an o_proj bias.
            if let Some(bias) = w.take_optional(&p("self_attn.o_proj.bias")) {
                if bias.abs().max().double_value(&[]) != 0.0 {
                    return Err(format!(
                        "layer {i}: a non-zero o_proj bias is not supported"
                    ));
                }
            }
            layers.push(layer);
        }
        let norm = w.take("model.norm.weight")?;
        count(norm.numel());
        let (lm_head, head_is_embedding) = match w.take_optional("lm_head.weight") {
            Some(head) if !config.tie_word_embeddings => {
                count(head.numel());
                (proj(head)?, false)
            }
            // Tied: quantized, else the embedding's weight, held once.
            _ if opts.quantization != Quantization::None => (proj(embed.shallow_clone())?, false),
            _ => (
                Projection::tied(&embed).map_err(|e| format!("packing the head: {e}"))?,
                true,
            ),
        };
        // A tied head packed in panels holds the embedding's rows too.
        let embed = match lm_head.panels() {
            Some(panels) if head_is_embedding => Embedding::Panels {
                panels: panels.shallow_clone(),
                vocab: embed.size()[0] as usize,
            },
            _ => Embedding::Rows(embed),
        };
        // The head counts unless it is a view of the embedding's rows.
        let mut weight_bytes = embed.own_bytes() + tensor_bytes(&norm);
        if !(head_is_embedding && matches!(embed, Embedding::Rows(_))) {
            weight_bytes += lm_head.bytes();
        }
        for l in &layers {
            weight_bytes += tensor_bytes(&l.input_norm) + tensor_bytes(&l.post_norm);
            weight_bytes += l.qkv_bias.as_ref().map_or(0, tensor_bytes);
            weight_bytes += [&l.qkv, &l.o, &l.gate_up, &l.down]
                .iter()
                .map(|p| p.bytes())
                .sum::<u64>();
        }
        // Rotary inv-freq buffers are recomputed from the config.
        let leftover: Vec<&str> = w
            .remaining()
            .into_iter()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !leftover.is_empty() {
            tracing::warn!(tensors = ?leftover, "checkpoint tensors not used by the decoder");
        }
        let rope = RopeTables::new(&config, opts.max_positions, opts.device, opts.kind);
        Ok(Self {
            heads: config.num_attention_heads as i64,
            kv_heads: config.num_kv_heads() as i64,
            head_dim: config.head_dim() as i64,
            eos_token_ids,
            device: opts.device,
            kind: opts.kind,
            parameters,
            weight_bytes,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            config,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads as usize
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim as usize
    }

    /// Runs a prompt for the sequence in `slot`, filling its cache entries
    /// `0..tokens.len()`. Returns float32 logits: of the last position
    /// (`[vocab]`), or of every position (`[T, vocab]`) when `all_positions`.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        slot: usize,
        all_positions: bool,
    ) -> Result<Tensor, TchError> {
        let _guard = tch::no_grad_guard();
        let h = self.prompt_hidden(&[tokens], cache, slot, 0)?;
        if all_positions {
            self.logits(&h)
        } else {
            self.logits(&h.f_narrow(0, tokens.len() as i64 - 1, 1)?)?
                .f_squeeze_dim(0)
        }
    }

    /// Runs `tokens`, the part of a prompt at positions `start..`, for the
    /// sequence in `slot` whose positions `0..start` are in the cache already
    /// (chunked prefill). Returns the float32 logits of the last position,
    /// `[vocab]`.
    pub fn prefill_chunk(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        slot: usize,
        start: usize,
    ) -> Result<Tensor, TchError> {
        let _guard = tch::no_grad_guard();
        let h = self.prompt_hidden(&[tokens], cache, slot, start)?;
        self.logits(&h.f_narrow(0, tokens.len() as i64 - 1, 1)?)?
            .f_squeeze_dim(0)
    }

    /// Runs several prompts as one batch, prompt `i` into cache slot
    /// `first_slot + i`. Returns the float32 logits of each prompt's last
    /// position, `[N, vocab]`.
    pub fn prefill_batch(
        &self,
        prompts: &[&[u32]],
        cache: &mut KvCache,
        first_slot: usize,
    ) -> Result<Tensor, TchError> {
        let _guard = tch::no_grad_guard();
        let h = self.prompt_hidden(prompts, cache, first_slot, 0)?;
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0) as i64;
        let last: Vec<i64> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| i as i64 * t + p.len() as i64 - 1)
            .collect();
        let last = upload(&last, self.device)?;
        self.logits(&h.f_index_select(0, &last)?)
    }

    /// The decoder over prompts at positions `start..`, right-padded to the
    /// longest. Causal attention keeps every real position blind to the
    /// padding after it; the padding's cache entries lie beyond each
    /// sequence's length, where decode masks them until they are overwritten.
    /// With `start > 0` (one prompt, chunked prefill) positions `0..start`
    /// of its slot are in the cache already and are attended to as well.
    /// Returns the final hidden states `[N * T, hidden]`.
    fn prompt_hidden(
        &self,
        prompts: &[&[u32]],
        cache: &mut KvCache,
        first_slot: usize,
        start: usize,
    ) -> Result<Tensor, TchError> {
        let n = prompts.len() as i64;
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0) as i64;
        let start = start as i64;
        let mut padded = Vec::with_capacity((n * t) as usize);
        for p in prompts {
            padded.extend(p.iter().map(|&id| id as i64));
            padded.resize(padded.len() + t as usize - p.len(), 0);
        }
        let ids = upload(&padded, self.device)?;
        // Token (prompt i, offset j) is at position start + j.
        let positions: Vec<usize> = (0..n)
            .flat_map(|_| (0..t).map(|j| (start + j) as usize))
            .collect();
        let cos = self
            .rope
            .cos
            .f_narrow(0, start, t)?
            .f_view([1, t, 1, self.head_dim])?;
        let sin = self
            .rope
            .sin
            .f_narrow(0, start, t)?
            .f_view([1, t, 1, self.head_dim])?;
        // After a cached prefix: token i (position start + i) sees positions
        // 0..=start + i of its slot.
        let prefix_mask = if start > 0 {
            let seen = start + t;
            let visible = Tensor::f_arange(seen, (Kind::Int64, self.device))?
                .f_view([1, seen])?
                .f_le_tensor(
                    &Tensor::f_arange_start(start, seen, (Kind::Int64, self.device))?
                        .f_view([t, 1])?,
                )?;
            Some(visible)
        } else {
            None
        };
        let mut h = self.embed.lookup(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.attention_inputs(layer, &h, n, t, (&positions, &cos, &sin))?;
            cache.write_prompts(i, first_slot, start, &k, &v)?;
            // q carries the scale already.
            let attn = match &prefix_mask {
                // A fresh prompt attends only to itself: plain causal attention.
                None => Tensor::f_scaled_dot_product_attention::<Tensor>(
                    &q, &k, &v, None, 0.0, true, 1.0, true,
                )?,
                Some(mask) => {
                    let (keys, values) = cache.slot_view(i, first_slot, start + t)?;
                    Tensor::f_scaled_dot_product_attention(
                        &q,
                        &keys,
                        &values,
                        Some(mask),
                        0.0,
                        false,
                        1.0,
                        true,
                    )?
                }
            };
            let attn = attn
                .f_transpose(1, 2)?
                .f_reshape([n * t, self.heads * self.head_dim])?;
            h = self.finish_layer(layer, h, &attn)?;
        }
        Ok(h)
    }

    /// One decode step for the sequences in slots `0..B`: `tokens[b]` is fed
    /// at position `positions[b]`. Returns float32 logits `[B, vocab]`.
    pub fn decode(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor, TchError> {
        match self.cpu_rows() {
            Some(rows) => cpu_decode::decode(&rows, tokens, positions, cache, None),
            None => self.decode_with_ops(tokens, positions, cache),
        }
    }

    /// As [`decode`](Self::decode) for greedy decoding: returns only each
    /// row's highest-scoring token id (the first of equals), found where the
    /// logits are (in the CPU step's own parallel region, or by one argmax
    /// on the device), so that only the ids reach the host.
    pub fn decode_argmax(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache,
    ) -> Result<Vec<u32>, TchError> {
        if let Some(rows) = self.cpu_rows() {
            let mut ids = vec![0; tokens.len()];
            let _logits = cpu_decode::decode(&rows, tokens, positions, cache, Some(&mut ids))?;
            return Ok(ids);
        }
        let logits = self.decode_with_ops(tokens, positions, cache)?;
        let ids = Vec::<i64>::try_from(&logits.f_argmax(-1, false)?.f_to_kind(Kind::Int64)?)?;
        Ok(ids.into_iter().map(|t| t as u32).collect())
    }

    /// Which implementation runs the decode step, for the start-up log.
    pub fn decode_path(&self) -> &'static str {
        if self.cpu_rows().is_some() {
            super::cpu_matmul::cpu_path()
        } else {
            "libtorch ops"
        }
    }

    /// The weights as float32 slices and weight rows for the CPU decode
    /// step, where the model is float32 on the CPU (else `None`).
    fn cpu_rows(&self) -> Option<ModelRows<'_>> {
        if self.device != Device::Cpu || self.kind != Kind::Float || self.head_dim % 2 != 0 {
            return None;
        }
        let config = &self.config;
        let dims = Dims {
            hidden: config.hidden_size,
            heads: self.heads as usize,
            kv_heads: self.kv_heads as usize,
            head_dim: self.head_dim as usize,
            intermediate: self.layers.first()?.down.in_features(),
            vocab: self.lm_head.out_features(),
            eps: config.rms_norm_eps as f32,
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Some(LayerRows {
                    input_norm: floats(&l.input_norm)?,
                    qkv: l.qkv.cpu_rows()?,
                    qkv_bias: match &l.qkv_bias {
                        Some(bias) => Some(floats(bias)?),
                        None => None,
                    },
                    o: l.o.cpu_rows()?,
                    post_norm: floats(&l.post_norm)?,
                    gate_up: l.gate_up.cpu_rows()?,
                    down: l.down.cpu_rows()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let embed = self.embed.cpu(dims.vocab, dims.hidden)?;
        Some(ModelRows {
            dims,
            embed,
            layers,
            norm: floats(&self.norm)?,
            lm_head: self.lm_head.cpu_rows()?,
            cos: floats(&self.rope.cos)?,
            sin: floats(&self.rope.sin)?,
        })
    }

    /// The decode step as libtorch ops (GPUs, half precision).
    fn decode_with_ops(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor, TchError> {
        let _guard = tch::no_grad_guard();
        let b = tokens.len() as i64;
        let ids = ids_tensor(tokens, self.device)?;
        // Each sequence sees its own prefix: positions 0..=pos[b].
        let len = positions.iter().max().copied().unwrap_or(0) as i64 + 1;
        let step = if positions.iter().all(|&p| p as i64 == len - 1) {
            // Every sequence at the same position (always so at batch 1):
            // no mask, and plain slices instead of gathers and scatters.
            StepPositions::Same(len - 1)
        } else {
            let pos: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
            let pos = upload(&pos, self.device)?;
            let slots = Tensor::f_arange(b, (Kind::Int64, self.device))?;
            let mask = self.decode_mask(&pos, len)?;
            StepPositions::Mixed { pos, slots, mask }
        };
        let (cos, sin) = match &step {
            StepPositions::Same(p) => (
                self.rope.cos.f_narrow(0, *p, 1)?,
                self.rope.sin.f_narrow(0, *p, 1)?,
            ),
            StepPositions::Mixed { pos, .. } => (
                self.rope.cos.f_index_select(0, pos)?,
                self.rope.sin.f_index_select(0, pos)?,
            ),
        };
        let rows = cos.size()[0];
        let cos = cos.f_view([rows, 1, 1, self.head_dim])?;
        let sin = sin.f_view([rows, 1, 1, self.head_dim])?;
        let mut h = self.embed.lookup(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.attention_inputs(layer, &h, b, 1, (positions, &cos, &sin))?;
            let mask = match &step {
                StepPositions::Same(p) => {
                    cache.write_position(i, *p, &k, &v)?;
                    None
                }
                StepPositions::Mixed { pos, slots, mask } => {
                    cache.write_step(i, slots, pos, &k, &v)?;
                    Some(mask)
                }
            };
            let (keys, values) = cache.view(i, b, len)?;
            let attn = self.decode_attention(&q, &keys, &values, mask)?;
            h = self.finish_layer(layer, h, &attn)?;
        }
        self.logits(&h)
    }

    /// Additive attention mask for a decode step, 0 where visible and -inf
    /// beyond each sequence's position, shaped `[B * kv_heads, 1, len]` to
    /// broadcast over the grouped scores `[B * kv_heads, group, len]`.
    fn decode_mask(&self, positions: &Tensor, len: i64) -> Result<Tensor, TchError> {
        let b = positions.size()[0];
        let hidden = Tensor::f_arange(len, (Kind::Int64, self.device))?
            .f_view([1, 1, len])?
            .f_gt_tensor(&positions.f_view([b, 1, 1])?)?;
        Tensor::f_zeros([b, 1, len], (self.kind, self.device))?
            .f_masked_fill(&hidden, f64::NEG_INFINITY)?
            .f_expand([b, self.kv_heads, len], false)?
            .f_reshape([b * self.kv_heads, 1, len])
    }

    /// Norm, fused q/k/v projection and rotary embedding for hidden states
    /// `[B * T, hidden]`. Returns q, k, v as `[B, heads, T, head_dim]`.
    fn attention_inputs(
        &self,
        layer: &Layer,
        h: &Tensor,
        b: i64,
        t: i64,
        (positions, cos, sin): (&[usize], &Tensor, &Tensor),
    ) -> Result<(Tensor, Tensor, Tensor), TchError> {
        let x = self.rms_norm(h, &layer.input_norm)?;
        let qkv = match &layer.qkv_bias {
            Some(bias) => layer.qkv.addmm(bias, &x)?,
            None => layer.qkv.mm(&x)?,
        };
        // On CPU in float32: q and k rotated in place in one pass over the
        // fresh projection output (token i at positions[i]).
        let rotated = cpu_ops::rope_in_place(
            &qkv,
            (self.heads + self.kv_heads) as usize,
            self.head_dim as usize,
            positions,
            &self.rope.cos,
            &self.rope.sin,
        )?;
        let qkv = qkv.f_view([b, t, self.heads + 2 * self.kv_heads, self.head_dim])?;
        // Else rotate q and k together: one set of ops for both.
        let qk = if rotated {
            qkv.shallow_clone()
        } else {
            rope::apply(&qkv.f_narrow(2, 0, self.heads + self.kv_heads)?, cos, sin)?
        };
        let q = qk.f_narrow(2, 0, self.heads)?.f_transpose(1, 2)?;
        let k = qk
            .f_narrow(2, self.heads, self.kv_heads)?
            .f_transpose(1, 2)?;
        let v = qkv
            .f_narrow(2, self.heads + self.kv_heads, self.kv_heads)?
            .f_transpose(1, 2)?;
        Ok((q, k, v))
    }

    /// Attention of one new token per sequence over its cached prefix.
    /// Query heads are grouped by the KV head they share, so keys and values
    /// are read in place from the cache view, never repeated per head.
    /// `q`: `[B, heads, 1, d]` (already scaled); keys/values:
    /// `[B, kv_heads, len, d]`. Returns `[B, heads * d]`.
    fn decode_attention(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor, TchError> {
        let b = q.size()[0];
        let (groups, group) = (b * self.kv_heads, self.heads / self.kv_heads);
        let len = keys.size()[2];
        let q = q.f_reshape([groups, group, self.head_dim])?;
        let keys = keys.f_reshape([groups, len, self.head_dim])?;
        let values = values.f_reshape([groups, len, self.head_dim])?;
        let keys = keys.f_transpose(1, 2)?;
        let scores = match mask {
            Some(mask) => mask.f_baddbmm(&q, &keys, 1.0, 1.0)?,
            None => q.f_bmm(&keys)?,
        };
        let probs = scores.f_softmax(-1, scores.kind())?;
        probs
            .f_bmm(&values)?
            .f_reshape([b, self.heads * self.head_dim])
    }

    /// Output projection and residual, then the SwiGLU MLP and its residual;
    /// `h`: `[M, hidden]`, `attn`: `[M, heads * head_dim]`.
    fn finish_layer(&self, layer: &Layer, h: Tensor, attn: &Tensor) -> Result<Tensor, TchError> {
        let h = layer.o.addmm(&h, attn)?;
        let x = self.rms_norm(&h, &layer.post_norm)?;
        let gate_up = layer.gate_up.mm(&x)?;
        let act = match cpu_ops::silu_mul(&gate_up)? {
            Some(act) => act,
            None => {
                let halves = gate_up.f_chunk(2, -1)?;
                halves[0].f_silu()?.f_mul(&halves[1])?
            }
        };
        layer.down.addmm(&h, &act)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor, TchError> {
        if let Some(normed) = cpu_ops::rms_norm(x, weight, self.config.rms_norm_eps)? {
            return Ok(normed);
        }
        if self.kind == Kind::Float {
            return x.f_rms_norm(
                [self.config.hidden_size as i64],
                Some(weight),
                self.config.rms_norm_eps,
            );
        }
        // Half precision: normalise in float32 as transformers does, then scale.
        let normed = x
            .f_to_kind(Kind::Float)?
            .f_rms_norm::<Tensor>(
                [self.config.hidden_size as i64],
                None,
                self.config.rms_norm_eps,
            )?
            .f_to_kind(self.kind)?;
        normed.f_mul(weight)
    }

    /// Float32 logits of hidden states `[M, hidden]`.
    fn logits(&self, h: &Tensor) -> Result<Tensor, TchError> {
        let x = self.rms_norm(h, &self.norm)?;
        self.lm_head.mm(&x)?.f_to_kind(Kind::Float)
    }
}

/// Where the sequences of a decode step are.
enum StepPositions {
    /// All at this position.
    Same(i64),
    /// At positions `pos` (`[B]`), with their slots `0..B` and attention mask.
    Mixed {
        pos: Tensor,
        slots: Tensor,
        mask: Tensor,
    },
}

fn ids_tensor(tokens: &[u32], device: Device) -> Result<Tensor, TchError> {
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    upload(&ids, device)
}

#[cfg(test)]
mod shape_tests;
#[cfg(test)]
mod tests;
