//! `[sessions]`: where conversations are kept. Sessions are served when
//! `nats.url` is set and `sessions.enabled` is not false.

use serde::{Deserialize, Serialize};

use crate::error::ServerError;

/// `[sessions]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Serve sessions (they need `nats.url`).
    pub enabled: bool,
    /// The JetStream key-value bucket; created if missing.
    pub bucket: String,
    /// Seconds a session is kept after its last turn (0 = until deleted).
    /// Applies when the bucket is created; an existing bucket keeps its own.
    pub ttl_secs: u64,
    /// Copies of the bucket in a NATS cluster (1 to 5).
    pub replicas: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bucket: "torchwire_sessions".into(),
            ttl_secs: 7 * 24 * 3600,
            replicas: 1,
        }
    }
}

impl SessionConfig {
    pub fn validate(&self) -> Result<(), ServerError> {
        let b = &self.bucket;
        if b.is_empty()
            || b.len() > 64
            || !b
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ServerError::config(
                "sessions.bucket",
                format!("must be 1 to 64 of A-Z a-z 0-9 - _, got {b:?}"),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(ServerError::config(
                "sessions.replicas",
                format!("must be 1 to 5, got {}", self.replicas),
            ));
        }
        if self.ttl_secs > 10 * 365 * 24 * 3600 {
            return Err(ServerError::config(
                "sessions.ttl_secs",
                format!(
                    "at most ten years (0 keeps sessions until deleted), got {}",
                    self.ttl_secs
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        SessionConfig::default().validate().unwrap();
        let cases = [
            (
                SessionConfig {
                    bucket: "a.b".into(),
                    ..Default::default()
                },
                "sessions.bucket",
            ),
            (
                SessionConfig {
                    replicas: 0,
                    ..Default::default()
                },
                "sessions.replicas",
            ),
            (
                SessionConfig {
                    ttl_secs: u64::MAX,
                    ..Default::default()
                },
                "sessions.ttl_secs",
            ),
        ];
        for (config, key) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
