//! A program's environment variables as a figment provider.
//!
//! `<PREFIX>LISTEN` sets `listen`; a double underscore nests
//! (`<PREFIX>MODELS__TINY__DEVICE` sets `models.tiny.device`), and a table
//! named in [`EnvLayout::tables`] is reached with one underscore
//! (`<PREFIX>NATS_URL` sets `nats.url`, as the flag `--nats-url` does).

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

/// How one program's environment variables map onto its config keys.
#[derive(Debug, Clone, Copy)]
pub struct EnvLayout {
    /// Variable prefix, e.g. `TORCHWIRE_`.
    pub prefix: &'static str,
    /// Where the values came from, as error messages say it.
    pub description: &'static str,
    /// Tables reached with one underscore.
    pub tables: &'static [&'static str],
    /// Keys whose values are parsed as numbers or booleans, by full dotted
    /// key or by last part; every other value stays a string (a password of
    /// digits, a model named "true").
    pub typed_keys: &'static [&'static str],
    /// Keys whose values are comma-separated lists.
    pub list_keys: &'static [&'static str],
    /// Variables (lower case, prefix removed) that belong to other programs:
    /// exact names, or name prefixes ending in `_`.
    pub ignored: &'static [&'static str],
}

impl EnvLayout {
    /// The provider for the variables in `env`.
    pub fn provider(&self, env: &[(String, String)]) -> EnvVars {
        let mut dict = Dict::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(self.prefix) else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            if self.is_ignored(&rest) {
                continue;
            }
            let path = self.path(&rest);
            insert_nested(&mut dict, &path, self.value(&path, value));
        }
        EnvVars {
            dict,
            description: self.description,
        }
    }

    fn is_ignored(&self, name: &str) -> bool {
        self.ignored
            .iter()
            .any(|ignored| match ignored.strip_suffix('_') {
                Some(_) => name.starts_with(ignored),
                None => name == *ignored,
            })
    }

    fn path<'a>(&self, name: &'a str) -> Vec<&'a str> {
        for table in self.tables {
            if let Some(field) = name
                .strip_prefix(table)
                .and_then(|rest| rest.strip_prefix('_'))
            {
                return vec![&name[..table.len()], field];
            }
        }
        name.split("__").collect()
    }

    fn value(&self, path: &[&str], value: &str) -> Value {
        let key = path.join(".");
        let last = path.last().copied().unwrap_or_default();
        let listed = |keys: &[&str]| keys.contains(&key.as_str()) || keys.contains(&last);
        if listed(self.list_keys) {
            let items: Vec<String> = value
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            Value::from(items)
        } else if listed(self.typed_keys) {
            value.parse().unwrap_or_else(|_| Value::from(value))
        } else {
            Value::from(value)
        }
    }
}

/// The variables of one [`EnvLayout`], ready to merge.
pub struct EnvVars {
    dict: Dict,
    description: &'static str,
}

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.description)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn insert_nested(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_string(), value);
        }
        [head, tail @ ..] => {
            let entry = dict
                .entry((*head).to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, tail, value);
            }
        }
    }
}
