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

    mod fuzz {
        //! The loader fed what a broken config file or environment could
        //! hold: a value, or an error that names the key it is about, never
        //! a panic. `scripts/fuzz.sh` runs these with many more cases.

        use super::*;
        use proptest::prelude::*;

        /// Keys of `Sample` and near misses, none a table of another.
        const KEYS: &[&str] = &[
            "listen",
            "threads",
            "nats.url",
            "nats.password",
            "models.m.path",
            "models.m.max_batch_size",
            "listn",
            "nats.urll",
            "models.m.bogus",
        ];

        /// TOML values of every kind, some of them of the wrong type.
        fn toml_value() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9 :/._-]{0,12}".prop_map(|s| format!("\"{s}\"")),
                any::<i64>().prop_map(|v| v.to_string()),
                any::<f64>()
                    .prop_filter("finite", |v| v.is_finite())
                    .prop_map(|v| format!("{v:?}")),
                any::<bool>().prop_map(|v| v.to_string()),
                Just("[1, \"a\"]".to_string()),
                Just("{ a = 1 }".to_string()),
                Just("1979-05-27T07:32:00Z".to_string()),
            ]
        }

        /// The last part of the key an error is about (the error's key,
        /// or in its message for an unknown one).
        fn names_one_of(err: &ConfigError, keys: &[&str]) -> bool {
            let text = err.to_string();
            keys.iter()
                .any(|k| text.contains(k.rsplit('.').next().unwrap_or(k)))
        }

        proptest! {
            #[test]
            fn any_file_of_known_shape_loads_or_names_the_key(
                lines in proptest::collection::btree_map(proptest::sample::select(KEYS), toml_value(), 0..6)
            ) {
                let text: Vec<String> = lines.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("c.toml");
                std::fs::write(&file, text.join("\n")).unwrap();
                if let Err(err) = load::<Sample>(Some(&file), "absent.toml", &[], &LAYOUT) {
                    let keys: Vec<&str> = lines.keys().copied().collect();
                    prop_assert!(names_one_of(&err, &keys), "{err} for {text:?}");
                    prop_assert!(!err.message.is_empty());
                }
            }

            #[test]
            fn arbitrary_text_loads_or_fails_cleanly(text in "\\PC{0,200}") {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("c.toml");
                std::fs::write(&file, &text).unwrap();
                if let Err(err) = load::<Sample>(Some(&file), "absent.toml", &[], &LAYOUT) {
                    prop_assert!(!err.key.is_empty() && !err.message.is_empty(), "{err:?}");
                }
            }

            #[test]
            fn any_environment_loads_or_names_the_key(
                vars in proptest::collection::btree_map(
                    proptest::sample::select(&[
                        "THREADS",
                        "LISTEN",
                        "NATS_URL",
                        "MODELS__M__PATH",
                        "MODELS__M__MAX_BATCH_SIZE",
                        "MODELS__M__BOGUS",
                        "LISTN",
                    ][..]),
                    "\\PC{0,12}",
                    0..5,
                )
            ) {
                let env: Vec<(String, String)> =
                    vars.iter().map(|(k, v)| (format!("TW_{k}"), v.clone())).collect();
                if let Err(err) = load::<Sample>(None, "absent.toml", &env, &LAYOUT) {
                    let keys: Vec<String> = vars.keys().map(|k| k.to_ascii_lowercase()).collect();
                    let keys: Vec<&str> = keys.iter().map(|k| k.rsplit('_').next().unwrap_or(k)).collect();
                    prop_assert!(names_one_of(&err, &keys), "{err} for {env:?}");
                }
            }
        }
    }
}
