//! Weight quantization chosen at start-up (`--quantize`).

/// How projection weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// In the model's dtype, as loaded.
    #[default]
    None,
    /// int8 per output channel (symmetric, one scale each), quantized from
    /// the loaded checkpoint; activations, norms, embeddings and the KV cache
    /// stay in the model's dtype.
    Int8,
}

impl Quantization {
    /// Parses `none` or `int8`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "int8" => Ok(Self::Int8),
            other => Err(format!("expected none or int8, got {other:?}")),
        }
    }

    /// The name ListModels reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Int8 => "int8",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names_only() {
        assert_eq!(Quantization::parse("int8"), Ok(Quantization::Int8));
        assert_eq!(Quantization::parse("none"), Ok(Quantization::None));
        let err = Quantization::parse("int4").unwrap_err();
        assert!(err.contains("int4") && err.contains("int8"), "{err}");
        assert_eq!(Quantization::Int8.name(), "int8");
    }
}
