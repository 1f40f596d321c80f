//! `config.json` and `generation_config.json` of a Hugging Face checkpoint.

use std::path::Path;

use serde::Deserialize;

/// The architecture fields of `config.json` that the decoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Transformers 5 moves rope_theta / rope_scaling here.
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's name for q/k/v/o biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Mistral's and Qwen2's attention window (tokens); null = none.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for `sliding_window` (off by default there).
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers from this one on slide (when the window is on).
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Transformers 5's per-layer attention kinds (`sliding_attention`...).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

/// Rope types whose frequencies `rope::inverse_frequencies` computes.
pub const ROPE_TYPES: &[&str] = &["default", "linear", "llama3"];

/// `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(default)]
    pub rope_type: Option<String>,
    /// The older name of `rope_type`; some configs carry both.
    #[serde(default, rename = "type")]
    pub legacy_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

impl RopeScaling {
    /// The rope type, under either name; None = default.
    pub fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.legacy_type.as_deref())
    }
}

/// A token id or a list of them (both forms occur for eos_token_id).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `generation_config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
}

/// Why a `config.json` is not served.
#[derive(Debug)]
enum ParseError {
    Json(serde_json::Error),
    /// Names the field (as `config.json: FIELD ...`).
    Unsupported(String),
}

fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

impl HfConfig {
    /// Reads and checks `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| match e {
            ParseError::Json(e) => format!("{}: {e}", path.display()),
            ParseError::Unsupported(message) => message,
        })
    }

    /// Parses and checks the text of a `config.json`.
    fn parse(text: &str) -> Result<Self, ParseError> {
        let config: Self = serde_json::from_str(text).map_err(ParseError::Json)?;
        config.check().map_err(ParseError::Unsupported)?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        const SUPPORTED: &[&str] = &["llama", "qwen2", "mistral", ""];
        if !SUPPORTED.contains(&self.model_type.as_str()) {
            return Err(format!(
                "config.json: model_type {:?} is not a Llama-family decoder (supported: llama, qwen2, mistral)",
                self.model_type
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "config.json: hidden_act {act:?} is not supported (only silu)"
                ));
            }
        }
        if self.num_attention_heads == 0
            || self.num_kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.num_kv_heads())
        {
            return Err(
                "config.json: num_attention_heads must be a multiple of num_key_value_heads".into(),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(
                "config.json: the head dimension must be even for rotary embeddings".into(),
            );
        }
        self.check_rope()
    }

    /// Refuses a rope scaling this decoder does not implement (dynamic,
    /// yarn, longrope...): its outputs would be wrong, not just worse.
    fn check_rope(&self) -> Result<(), String> {
        let blocks = [
            ("rope_scaling", self.rope_scaling.as_ref()),
            ("rope_parameters", self.rope_parameters.as_ref()),
        ];
        for (field, rope) in blocks {
            let Some(rope) = rope else { continue };
            let (key, kind) = match (&rope.rope_type, &rope.legacy_type) {
                (Some(kind), _) => ("rope_type", kind),
                (None, Some(kind)) => ("type", kind),
                (None, None) => continue,
            };
            if !ROPE_TYPES.contains(&kind.as_str()) {
                return Err(format!(
                    "config.json: {field}.{key} {kind:?} is not implemented (supported: {}); \
                     the model would be served wrong, so it is not served",
                    ROPE_TYPES.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The attention window of the layers that slide, if any does, as
    /// transformers applies it: Llama never slides, Mistral whenever
    /// `sliding_window` is set, Qwen2 only with `use_sliding_window` and
    /// from layer `max_window_layers` on, or where transformers 5's
    /// `layer_types` says `sliding_attention`.
    pub fn attention_window(&self) -> Option<usize> {
        let window = self.sliding_window?;
        match self.model_type.as_str() {
            "mistral" => Some(window),
            // Off unless asked (transformers then drops the window).
            "qwen2" if self.use_sliding_window != Some(true) => None,
            "qwen2" => {
                if let Some(types) = &self.layer_types {
                    return types
                        .iter()
                        .any(|t| t == "sliding_attention")
                        .then_some(window);
                }
                let from = self.max_window_layers.unwrap_or(self.num_hidden_layers);
                (from < self.num_hidden_layers).then_some(window)
            }
            _ => None,
        }
    }

    /// Refuses to serve `context` tokens per sequence when the checkpoint's
    /// attention window is shorter: sliding-window attention is not
    /// implemented, and within the window full attention is the same thing.
    pub fn check_context(&self, context: usize) -> Result<(), String> {
        match self.attention_window() {
            Some(window) if window < context => Err(format!(
                "config.json: sliding_window is {window} tokens, shorter than the context \
                 served ({context} tokens), and sliding-window attention is not implemented; \
                 set max_context to at most {window} to serve it"
            )),
            _ => Ok(()),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Qwen2 always has q/k/v biases; Llama only with attention_bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// The rope scaling block, wherever the transformers version put it.
    pub fn rope(&self) -> Option<&RopeScaling> {
        self.rope_scaling.as_ref().or(self.rope_parameters.as_ref())
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.rope_theta)
    }

    pub fn architecture(&self) -> String {
        if self.model_type.is_empty() {
            "llama".into()
        } else {
            self.model_type.clone()
        }
    }
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a missing file is the default.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small Llama-shaped config with `extra` fields merged in.
    fn config(extra: serde_json::Value) -> Result<HfConfig, String> {
        let mut base = serde_json::json!({
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "vocab_size": 100,
            "max_position_embeddings": 32768,
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        HfConfig::parse(&base.to_string()).map_err(|e| match e {
            ParseError::Json(e) => panic!("not JSON: {e}"),
            ParseError::Unsupported(m) => m,
        })
    }

    #[test]
    fn unimplemented_rope_types_are_refused_naming_the_field() {
        for (field, key, kind) in [
            ("rope_scaling", "type", "dynamic"),
            ("rope_scaling", "rope_type", "yarn"),
            ("rope_scaling", "type", "longrope"),
            ("rope_scaling", "rope_type", "su"),
            ("rope_parameters", "rope_type", "yarn"),
        ] {
            let err = config(serde_json::json!({
                field: {key: kind, "factor": 4.0, "original_max_position_embeddings": 4096}
            }))
            .unwrap_err();
            let named = format!("{field}.{key} \"{kind}\" is not implemented");
            assert!(err.contains(&named), "{err}");
        }
    }

    #[test]
    fn implemented_rope_types_load_under_either_name() {
        for rope in [
            serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
            serde_json::json!({"type": "linear", "factor": 2.0}),
            // Both names at once (some checkpoints write both).
            serde_json::json!({"type": "linear", "rope_type": "linear", "factor": 2.0}),
            serde_json::json!({"rope_type": "default", "rope_theta": 10000.0}),
        ] {
            let c = config(serde_json::json!({"rope_scaling": rope})).unwrap();
            assert!(c.rope().unwrap().kind().is_some());
        }
        // Transformers 5's block with the default type, and no block at all.
        config(serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}))
            .unwrap();
        config(serde_json::json!({"rope_scaling": null})).unwrap();
    }

    #[test]
    fn a_sliding_window_shorter_than_the_context_is_refused() {
        // Mistral 7B v0.1: a 4096-token window, 32k positions.
        let mistral =
            config(serde_json::json!({"model_type": "mistral", "sliding_window": 4096})).unwrap();
        assert_eq!(mistral.attention_window(), Some(4096));
        let err = mistral.check_context(8192).unwrap_err();
        assert!(err.contains("sliding_window is 4096 tokens"), "{err}");
        assert!(err.contains("max_context"), "{err}");
        // Within the window, full attention is exact.
        mistral.check_context(4096).unwrap();

        // Mistral v0.2+: no window.
        let c =
            config(serde_json::json!({"model_type": "mistral", "sliding_window": null})).unwrap();
        assert_eq!(c.attention_window(), None);
        c.check_context(32768).unwrap();

        // Qwen2 has the field but slides only when asked, from max_window_layers on.
        let qwen = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"model_type": "qwen2", "sliding_window": 4096});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            config(v).unwrap()
        };
        assert_eq!(
            qwen(serde_json::json!({"use_sliding_window": false})).attention_window(),
            None
        );
        assert_eq!(qwen(serde_json::json!({})).attention_window(), None);
        assert_eq!(
            qwen(serde_json::json!({"use_sliding_window": true, "max_window_layers": 4}))
                .attention_window(),
            None,
            "no layer at or past max_window_layers"
        );
        assert_eq!(
            qwen(serde_json::json!({"use_sliding_window": true, "max_window_layers": 2}))
                .attention_window(),
            Some(4096)
        );
        // Transformers 5 says it per layer.
        let layers = |types: &[&str]| {
            config(serde_json::json!({
                "model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": true,
                "max_window_layers": 0, "layer_types": types,
            }))
            .unwrap()
        };
        let c = layers(&[
            "full_attention",
            "sliding_attention",
            "full_attention",
            "full_attention",
        ]);
        assert!(c
            .check_context(2048)
            .unwrap_err()
            .contains("sliding_window"));
        assert_eq!(layers(&["full_attention"; 4]).attention_window(), None);
        let c = config(serde_json::json!({
            "model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": false,
            "layer_types": ["sliding_attention", "sliding_attention"],
        }))
        .unwrap();
        assert_eq!(c.attention_window(), None, "use_sliding_window off wins");
        // Llama ignores the field, as transformers does.
        let c = config(serde_json::json!({"sliding_window": 16})).unwrap();
        c.check_context(32768).unwrap();
    }
}
