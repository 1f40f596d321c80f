//! Connection and work-queue settings, as the `[nats]` table of the server's
//! and the scaler's config. Checked with [`NatsConfig::validate`] before
//! anything connects.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr};
use serde::{Deserialize, Serialize};

use crate::NatsError;

/// The server used when `url` is unset.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// How long one attempt to reach a NATS server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// NATS connection, authentication, TLS and work-queue settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URL(s), comma-separated (`nats://host:4222`, `tls://host:4222`); unset = nats://127.0.0.1:4222.
    pub url: Option<String>,
    /// User name for user/password authentication (needs `password`).
    pub user: Option<String>,
    /// Password for user/password authentication (needs `user`).
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// `.creds` file (JWT + nkey seed) for decentralized authentication.
    pub credentials_file: Option<PathBuf>,
    /// Nkey seed (`SU...`) for nkey authentication.
    pub nkey_seed: Option<String>,
    /// PEM file of CA certificates that sign the NATS server's certificate; setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (needs `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// JetStream stream that holds the work queue.
    pub stream: String,
    /// Subject requests are published to (the stream's subject).
    pub subject: String,
    /// Durable pull consumer the servers share.
    pub consumer: String,
    /// Seconds a delivered request may go unacknowledged before redelivery (servers send progress acks meanwhile).
    pub ack_wait_secs: u64,
    /// Deliveries of one request at most; the last one that fails answers
    /// the publisher with a final error and terminates the message.
    pub max_deliver: i64,
    /// Delay before a failed request is offered again, doubled with each
    /// delivery (milliseconds).
    pub retry_delay_ms: u64,
    /// Longest delay before a failed request is offered again (milliseconds).
    pub retry_delay_max_ms: u64,
    /// Reply subjects must start with this (e.g. `_INBOX.`); unset = any literal subject.
    pub reply_prefix: Option<String>,
    /// Requests the stream holds at most (set when it is created); 0 = no limit.
    pub max_msgs: i64,
    /// Bytes the stream holds at most (set when it is created); 0 = no limit.
    pub max_bytes: i64,
    /// Seconds a request may wait in the stream before it is dropped unanswered; 0 = forever.
    pub max_age_secs: u64,
    /// What a full stream does: `new` refuses new requests (publishers get an
    /// error), `old` drops the oldest waiting ones unanswered.
    pub discard: Discard,
}

/// The stream's policy when it reaches a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    /// Refuse new messages: the publisher learns the queue is full.
    #[default]
    New,
    /// Drop the oldest messages, which are never answered.
    Old,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: None,
            user: None,
            password: None,
            token: None,
            credentials_file: None,
            nkey_seed: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            stream: "TORCHWIRE".into(),
            subject: "torchwire.generate".into(),
            consumer: "torchwire-server".into(),
            ack_wait_secs: 30,
            max_deliver: 5,
            retry_delay_ms: 500,
            retry_delay_max_ms: 30_000,
            reply_prefix: None,
            max_msgs: 100_000,
            max_bytes: 0,
            max_age_secs: 0,
            discard: Discard::New,
        }
    }
}

impl NatsConfig {
    /// The configured URL, or [`DEFAULT_URL`].
    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or(DEFAULT_URL)
    }

    /// The server addresses `url` lists.
    pub fn server_addrs(&self) -> Result<Vec<ServerAddr>, NatsError> {
        parse_urls(self.url())
    }

    /// `ack_wait_secs` as a duration.
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }

    /// How long to wait before a request is offered again after its
    /// `delivered`-th delivery failed: `retry_delay_ms` doubled per earlier
    /// delivery, at most `retry_delay_max_ms`.
    pub fn retry_delay(&self, delivered: i64) -> Duration {
        let doublings = delivered.saturating_sub(1).clamp(0, 32) as u32;
        let delay = self.retry_delay_ms.saturating_mul(1u64 << doublings);
        Duration::from_millis(delay.min(self.retry_delay_max_ms))
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), NatsError> {
        self.server_addrs()?;
        match (&self.user, &self.password) {
            (Some(_), None) => {
                return Err(NatsError::config(
                    "nats.user",
                    "is set without nats.password",
                ))
            }
            (None, Some(_)) => {
                return Err(NatsError::config(
                    "nats.password",
                    "is set without nats.user",
                ))
            }
            _ => {}
        }
        let methods: Vec<&str> = [
            self.user.as_ref().map(|_| "nats.user/nats.password"),
            self.token.as_ref().map(|_| "nats.token"),
            self.credentials_file
                .as_ref()
                .map(|_| "nats.credentials_file"),
            self.nkey_seed.as_ref().map(|_| "nats.nkey_seed"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if methods.len() > 1 {
            return Err(NatsError::config(
                methods[1],
                format!(
                    "only one authentication method may be set, found {}",
                    methods.join(", ")
                ),
            ));
        }
        for (key, value) in [("nats.user", &self.user), ("nats.token", &self.token)] {
            if value.as_deref() == Some("") {
                return Err(NatsError::config(key, "is empty"));
            }
        }
        if let Some(seed) = &self.nkey_seed {
            if !seed.starts_with('S') || seed.len() < 2 {
                return Err(NatsError::config(
                    "nats.nkey_seed",
                    "is not an nkey seed (seeds start with 'S')",
                ));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(NatsError::config(
                    "nats.tls_cert",
                    "is set without nats.tls_key",
                ))
            }
            (None, Some(_)) => {
                return Err(NatsError::config(
                    "nats.tls_key",
                    "is set without nats.tls_cert",
                ))
            }
            _ => {}
        }
        for (key, path) in [
            ("nats.credentials_file", &self.credentials_file),
            ("nats.tls_ca", &self.tls_ca),
            ("nats.tls_cert", &self.tls_cert),
            ("nats.tls_key", &self.tls_key),
        ] {
            if let Some(path) = path {
                check_file(key, path)?;
            }
        }
        check_name("nats.stream", &self.stream)?;
        check_name("nats.consumer", &self.consumer)?;
        check_subject("nats.subject", &self.subject)?;
        if self.ack_wait_secs == 0 {
            return Err(NatsError::config(
                "nats.ack_wait_secs",
                "must be at least 1",
            ));
        }
        if self.max_deliver < 1 {
            return Err(NatsError::config("nats.max_deliver", "must be at least 1"));
        }
        if self.retry_delay_max_ms < self.retry_delay_ms {
            return Err(NatsError::config(
                "nats.retry_delay_max_ms",
                format!(
                    "is {}, less than nats.retry_delay_ms ({})",
                    self.retry_delay_max_ms, self.retry_delay_ms
                ),
            ));
        }
        for (key, value) in [
            ("nats.max_msgs", self.max_msgs),
            ("nats.max_bytes", self.max_bytes),
        ] {
            if value < 0 {
                return Err(NatsError::config(key, "must be 0 (no limit) or more"));
            }
        }
        if let Some(prefix) = &self.reply_prefix {
            let bad = prefix.is_empty()
                || prefix.starts_with('.')
                || prefix.contains("..")
                || prefix.contains(|c: char| {
                    c.is_whitespace() || c.is_control() || matches!(c, '*' | '>' | '$')
                });
            if bad {
                return Err(NatsError::config(
                    "nats.reply_prefix",
                    format!("{prefix:?} is not the start of a literal subject"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the connection must use TLS.
    pub fn tls_required(&self) -> bool {
        self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self
                .url()
                .split(',')
                .any(|u| u.trim().to_ascii_lowercase().starts_with("tls://"))
    }

    /// async-nats options with this config's authentication and TLS applied,
    /// and `name` as the connection name (shown by `nats server report connections`).
    pub async fn connect_options(&self, name: &str) -> Result<ConnectOptions, NatsError> {
        let mut options = match &self.credentials_file {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| NatsError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?,
            None => ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required() {
            options = options.require_tls(true);
        }
        // One bounded attempt at start-up: a wrong URL or credentials fail
        // fast; once connected, the client reconnects on its own forever.
        Ok(options
            .name(name)
            .connection_timeout(CONNECT_TIMEOUT)
            .max_reconnects(None))
    }

    /// Connects to `url` under the connection name `torchwire`.
    pub async fn connect(&self) -> Result<async_nats::Client, NatsError> {
        self.connect_as("torchwire").await
    }

    /// Connects to `url` with the auth and TLS settings, under connection name `name`.
    pub async fn connect_as(&self, name: &str) -> Result<async_nats::Client, NatsError> {
        let addrs = self.server_addrs()?;
        let options = self.connect_options(name).await?;
        options
            .connect(addrs)
            .await
            .map_err(|source| NatsError::Connect {
                url: self.url().to_string(),
                source,
            })
    }
}

/// Parses a comma-separated list of NATS server URLs.
fn parse_urls(urls: &str) -> Result<Vec<ServerAddr>, NatsError> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .map(|url| {
            if url.is_empty() {
                return Err(NatsError::config(
                    "nats.url",
                    format!("{urls:?} has an empty entry"),
                ));
            }
            url.parse::<ServerAddr>().map_err(|e| {
                NatsError::config("nats.url", format!("{url:?} is not a NATS URL: {e}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(addrs)
}

fn check_file(key: &str, path: &Path) -> Result<(), NatsError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(NatsError::config(
            key,
            format!("{} is not a readable file", path.display()),
        ))
    }
}

/// Stream and consumer names: no whitespace, `.`, `*`, `>`, path separators.
pub(crate) fn check_name(key: &str, name: &str) -> Result<(), NatsError> {
    if name.is_empty() {
        return Err(NatsError::config(key, "is empty"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(NatsError::config(
            key,
            format!("{name:?} contains {c:?}, which NATS names may not"),
        ));
    }
    Ok(())
}

/// A literal subject: dot-separated non-empty tokens, no wildcards.
fn check_subject(key: &str, subject: &str) -> Result<(), NatsError> {
    let bad = subject.is_empty()
        || subject.contains(char::is_whitespace)
        || subject
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">");
    if bad {
        return Err(NatsError::config(
            key,
            format!("{subject:?} is not a literal subject (dot-separated tokens, no wildcards)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(config: &NatsConfig) -> String {
        match config.validate().unwrap_err() {
            NatsError::Config { key, .. } => key,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = NatsConfig::default();
        config.validate().unwrap();
        assert_eq!(config.url(), DEFAULT_URL);
        assert_eq!(config.stream, "TORCHWIRE");
        assert_eq!(config.subject, "torchwire.generate");
        assert_eq!(config.consumer, "torchwire-server");
        assert_eq!(config.ack_wait(), Duration::from_secs(30));
        assert!(!config.tls_required());
    }

    #[test]
    fn url_lists_parse_and_bad_urls_are_named() {
        let config = NatsConfig {
            url: Some("nats://a:4222, tls://b:4223".into()),
            ..Default::default()
        };
        assert_eq!(config.server_addrs().unwrap().len(), 2);
        assert!(config.tls_required());
        let config = NatsConfig {
            url: Some("nats://a:4222,".into()),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.url");
        let config = NatsConfig {
            url: Some("nats://host:notaport".into()),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("nats.url") && err.contains("notaport"),
            "{err}"
        );
    }

    #[test]
    fn auth_settings_must_be_complete_and_unique() {
        let config = NatsConfig {
            user: Some("u".into()),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("nats.user") && err.contains("nats.password"),
            "{err}"
        );
        let config = NatsConfig {
            password: Some("p".into()),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.password");
        let config = NatsConfig {
            user: Some("u".into()),
            password: Some("p".into()),
            token: Some("t".into()),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("only one authentication method"), "{err}");
        let config = NatsConfig {
            nkey_seed: Some("UABC".into()),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.nkey_seed");
        let config = NatsConfig {
            user: Some("u".into()),
            password: Some("p".into()),
            ..Default::default()
        };
        config.validate().unwrap();
    }

    #[test]
    fn tls_files_must_pair_and_exist() {
        let dir = std::env::temp_dir();
        let config = NatsConfig {
            tls_cert: Some(dir.join("cert.pem")),
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(err, "invalid nats.tls_cert: is set without nats.tls_key");
        let config = NatsConfig {
            tls_key: Some(dir.join("key.pem")),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.tls_key");
        let config = NatsConfig {
            tls_ca: Some(dir.join("torchwire-no-such-ca.pem")),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.tls_ca");
        let config = NatsConfig {
            credentials_file: Some(dir.join("torchwire-none.creds")),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.credentials_file");
    }

    #[test]
    fn queue_names_are_checked() {
        let config = NatsConfig {
            stream: "A.B".into(),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.stream");
        let config = NatsConfig {
            consumer: "".into(),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.consumer");
        let config = NatsConfig {
            subject: "torchwire.*".into(),
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.subject");
        let config = NatsConfig {
            ack_wait_secs: 0,
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.ack_wait_secs");
        let config = NatsConfig {
            max_deliver: 0,
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.max_deliver");
    }

    #[test]
    fn retry_delay_doubles_up_to_the_maximum() {
        let config = NatsConfig {
            retry_delay_ms: 100,
            retry_delay_max_ms: 1000,
            ..Default::default()
        };
        let ms = |d: i64| config.retry_delay(d).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(4), ms(5)],
            [100, 100, 200, 400, 800, 1000]
        );
        assert_eq!(ms(i64::MAX), 1000);
        let config = NatsConfig {
            retry_delay_ms: 200,
            retry_delay_max_ms: 100,
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.retry_delay_max_ms");
    }

    #[test]
    fn limits_and_reply_prefix_are_checked() {
        let config = NatsConfig {
            max_msgs: -1,
            ..Default::default()
        };
        assert_eq!(key_of(&config), "nats.max_msgs");
        for prefix in ["", "a b", "_INBOX.*", "$JS.", ".x"] {
            let config = NatsConfig {
                reply_prefix: Some(prefix.into()),
                ..Default::default()
            };
            assert_eq!(key_of(&config), "nats.reply_prefix", "{prefix:?}");
        }
        let config: NatsConfig =
            serde_json::from_str(r#"{"discard":"old","reply_prefix":"_INBOX."}"#).unwrap();
        assert_eq!(config.discard, Discard::Old);
        config.validate().unwrap();
        assert!(serde_json::from_str::<NatsConfig>(r#"{"discard":"oldest"}"#).is_err());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err =
            serde_json::from_str::<NatsConfig>(r#"{"url":"nats://x","passwrd":"p"}"#).unwrap_err();
        assert!(err.to_string().contains("passwrd"), "{err}");
        let config: NatsConfig = serde_json::from_str(r#"{"stream":"JOBS"}"#).unwrap();
        assert_eq!(config.stream, "JOBS");
        assert_eq!(config.consumer, "torchwire-server");
    }
}
