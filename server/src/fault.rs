//! Faults a test can inject into a debug build through the environment
//! variable `TORCHWIRE_DEBUG_FAULT`, a comma-separated list (e.g.
//! `fail-generate`). Release builds compile the switch out: there
//! [`active`] is always false and the variable is ignored.

/// The environment variable that lists the faults.
pub const ENV: &str = "TORCHWIRE_DEBUG_FAULT";

/// A fault that can be injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every generation fails with INTERNAL, as if the engine's forward
    /// pass failed (a poisoned replica).
    FailGenerate,
}

impl Fault {
    fn parse(item: &str) -> Result<Self, String> {
        match item {
            "fail-generate" => Ok(Self::FailGenerate),
            other => Err(format!("unknown fault {other:?} in {ENV}")),
        }
    }
}

/// The model thread's faults (`engine::fault`), which share the variable.
const ENGINE_FAULTS: [&str; 4] = [
    "stall-on-prompt:",
    "panic-on-prompt:",
    "hold-load-until:",
    "fail-slot-move:",
];

/// Parses a `TORCHWIRE_DEBUG_FAULT` value; the model thread's faults are
/// left to it.
pub fn parse(value: &str) -> Result<Vec<Fault>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter(|s| !ENGINE_FAULTS.iter().any(|p| s.starts_with(p)))
        .map(Fault::parse)
        .collect()
}

#[cfg(debug_assertions)]
fn faults() -> &'static [Fault] {
    static FAULTS: std::sync::OnceLock<Vec<Fault>> = std::sync::OnceLock::new();
    FAULTS.get_or_init(|| {
        let value = std::env::var(ENV).unwrap_or_default();
        match parse(&value) {
            Ok(faults) => {
                if !faults.is_empty() {
                    tracing::warn!(?faults, "debug faults injected");
                }
                faults
            }
            Err(e) => {
                tracing::error!("{e}; no fault injected");
                Vec::new()
            }
        }
    })
}

/// Whether `fault` is injected (always false in release builds).
pub fn active(fault: &Fault) -> bool {
    #[cfg(debug_assertions)]
    {
        faults().contains(fault)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = fault;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lists_parse() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(
            parse(" fail-generate , ").unwrap(),
            vec![Fault::FailGenerate]
        );
        assert_eq!(parse("panic-on-prompt:X").unwrap(), vec![]);
        assert_eq!(
            parse("fail-slot-move:X,fail-generate").unwrap(),
            vec![Fault::FailGenerate]
        );
        assert!(parse("fail-generate,explode")
            .unwrap_err()
            .contains("explode"));
    }
}
