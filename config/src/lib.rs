//! Configuration loading shared by torchwire's server and scaler: built-in
//! defaults < a TOML file < the program's environment variables. Flags are
//! applied on top by each program. Errors name the key they are about.

mod env;

use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use env::EnvLayout;

/// A configuration value that cannot be used, and its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Merges `T::default()`, the TOML file (`file`, which must exist, or else
/// `default_file` if it exists) and the environment `env` as `layout` reads
/// it, and deserializes the result.
pub fn load<T>(
    file: Option<&Path>,
    default_file: &str,
    env: &[(String, String)],
    layout: &EnvLayout,
) -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    match file {
        Some(path) if !path.exists() => {
            return Err(ConfigError::new(
                "--config",
                format!("{} does not exist", path.display()),
            ));
        }
        Some(path) => figment = figment.merge(Toml::file_exact(path)),
        None if Path::new(default_file).exists() => {
            figment = figment.merge(Toml::file_exact(default_file))
        }
        None => {}
    }
    figment
        .merge(layout.provider(env))
        .extract()
        .map_err(figment_error)
}

/// The key a figment error is about, and where the value came from.
fn figment_error(err: figment::Error) -> ConfigError {
    let key = if err.path.is_empty() {
        "(root)".to_string()
    } else {
        err.path.join(".")
    };
    let source = err
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    ConfigError::new(key, format!("{}{source}", err.kind))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        listen: String,
        threads: Option<u32>,
        nats: Nats,
        models: BTreeMap<String, Model>,
    }

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Nats {
        url: Option<String>,
        password: Option<String>,
    }

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Model {
        path: String,
        max_batch_size: Option<u32>,
    }

    const LAYOUT: EnvLayout = EnvLayout {
        prefix: "TW_",
        description: "TW_* environment variables",
        tables: &["nats"],
        typed_keys: &["threads", "max_batch_size"],
        list_keys: &[],
        ignored: &["addr", "other_"],
    };

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listen = \"a\"\nthreads = 2\n").unwrap();
        let vars = env(&[("TW_THREADS", "3"), ("TW_ADDR", "ignored")]);
        let c: Sample = load(Some(&file), "absent.toml", &vars, &LAYOUT).unwrap();
        assert_eq!((c.listen.as_str(), c.threads), ("a", Some(3)));
    }

    #[test]
    fn a_missing_file_is_an_error_of_the_flag() {
        let err =
            load::<Sample>(Some(Path::new("/nonexistent.toml")), "x", &[], &LAYOUT).unwrap_err();
        assert_eq!(err.key, "--config");
    }

    #[test]
    fn a_bad_value_names_its_key_and_source() {
        let vars = env(&[("TW_MODELS__M__MAX_BATCH_SIZE", "many")]);
        let err = load::<Sample>(None, "absent.toml", &vars, &LAYOUT).unwrap_err();
        assert_eq!(err.key, "models.m.max_batch_size");
        assert!(err.message.contains("TW_* environment"), "{err}");
        let vars = env(&[("TW_LISTN", "x")]);
        let err = load::<Sample>(None, "absent.toml", &vars, &LAYOUT).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn tables_nesting_and_string_values() {
        let vars = env(&[
            ("TW_NATS_URL", "nats://x:4222"),
            ("TW_NATS_PASSWORD", "12345"),
            ("TW_MODELS__TINY__PATH", "models/t"),
            ("TW_MODELS__TINY__MAX_BATCH_SIZE", "8"),
            ("TW_OTHER_THING", "ignored"),
        ]);
        let c: Sample = load(None, "absent.toml", &vars, &LAYOUT).unwrap();
        assert_eq!(c.nats.url.as_deref(), Some("nats://x:4222"));
        // Not a typed key: digits stay a string.
        assert_eq!(c.nats.password.as_deref(), Some("12345"));
        assert_eq!(c.models["tiny"].path, "models/t");
        assert_eq!(c.models["tiny"].max_batch_size, Some(8));
    }
}
