//! Scaler configuration: built-in defaults < TOML file (`--config`, or
//! `torchwire-scaler.toml` if present) < `TORCHWIRE_SCALER_*` environment <
//! command-line flags. Everything is checked before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};
use torchwire_config::EnvLayout;
use torchwire_nats::{NatsConfig, NatsError};

use crate::error::ScalerError;
pub use torchwire_telemetry::LogFormat;

/// Config file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG_FILE: &str = "torchwire-scaler.toml";

/// How `TORCHWIRE_SCALER_*` variables map onto config keys:
/// `TORCHWIRE_SCALER_LISTEN` → `listen`, `TORCHWIRE_SCALER_NATS_URL` →
/// `nats.url`, `TORCHWIRE_SCALER_TLS_CLIENT_CA` → `tls.client_ca`;
/// `TORCHWIRE_SCALER_ALLOWED_NATS_URLS` is a comma-separated list.
const ENV: EnvLayout = EnvLayout {
    prefix: "TORCHWIRE_SCALER_",
    description: "TORCHWIRE_SCALER_* environment variables",
    tables: &["nats", "tls"],
    // Only these are parsed as numbers: a token of digits stays a token.
    typed_keys: &[
        "refresh_interval_ms",
        "stale_after_ms",
        "idle_timeout_secs",
        "heartbeat_secs",
        "shutdown_grace_secs",
        "nats.ack_wait_secs",
        "nats.max_deliver",
    ],
    list_keys: &["allowed_nats_urls"],
    ignored: &[],
};

/// Command-line flags. Each overrides the config key of the same name.
#[derive(Debug, Default, Parser)]
#[command(
    name = "torchwire-scaler",
    version,
    about = "KEDA external scaler for torchwire's NATS JetStream work queue"
)]
pub struct Cli {
    /// TOML config file (default: ./torchwire-scaler.toml if it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address the gRPC server listens on (config: listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin HTTP address for /metrics, /livez, /readyz, or "off" (config: admin_listen).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// NATS server URL(s), comma-separated (config: nats.url).
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// NATS user; needs --nats-password (config: nats.user).
    #[arg(long, value_name = "USER")]
    pub nats_user: Option<String>,
    /// NATS password; prefer TORCHWIRE_SCALER_NATS_PASSWORD (config: nats.password).
    #[arg(long, value_name = "PASSWORD")]
    pub nats_password: Option<String>,
    /// NATS token; prefer TORCHWIRE_SCALER_NATS_TOKEN (config: nats.token).
    #[arg(long, value_name = "TOKEN")]
    pub nats_token: Option<String>,
    /// NATS .creds file (config: nats.credentials_file).
    #[arg(long, value_name = "FILE")]
    pub nats_credentials_file: Option<PathBuf>,
    /// NATS nkey seed; prefer TORCHWIRE_SCALER_NATS_NKEY_SEED (config: nats.nkey_seed).
    #[arg(long, value_name = "SEED")]
    pub nats_nkey_seed: Option<String>,
    /// CA certificates (PEM) for the NATS server's TLS (config: nats.tls_ca).
    #[arg(long, value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS (config: nats.tls_cert).
    #[arg(long, value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for NATS mutual TLS (config: nats.tls_key).
    #[arg(long, value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,
    /// Stream triggers use when their metadata names none (config: nats.stream).
    #[arg(long, value_name = "NAME")]
    pub nats_stream: Option<String>,
    /// Consumer triggers use when their metadata names none (config: nats.consumer).
    #[arg(long, value_name = "NAME")]
    pub nats_consumer: Option<String>,
    /// Another NATS URL triggers may name in natsUrl; repeatable (config: allowed_nats_urls).
    #[arg(long = "allow-nats-url", value_name = "URL")]
    pub allowed_nats_urls: Vec<String>,
    /// Server certificate (PEM) for this scaler's gRPC TLS (config: tls.cert).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Server key (PEM) for this scaler's gRPC TLS (config: tls.key).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that gRPC clients' certificates must chain to; requires client certificates (config: tls.client_ca).
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Milliseconds between two backlog readings of one consumer (config: refresh_interval_ms).
    #[arg(long, value_name = "MS")]
    pub refresh_interval_ms: Option<u64>,
    /// Milliseconds without a reading after which calls fail UNAVAILABLE (config: stale_after_ms).
    #[arg(long, value_name = "MS")]
    pub stale_after_ms: Option<u64>,
    /// Seconds an unused consumer watcher lives on (config: idle_timeout_secs).
    #[arg(long, value_name = "SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Seconds between repeats of the current state on StreamIsActive (config: heartbeat_secs).
    #[arg(long, value_name = "SECS")]
    pub heartbeat_secs: Option<u64>,
    /// Log format: text or json (config: log_format).
    #[arg(long)]
    pub log_format: Option<String>,
    /// OTLP/gRPC collector to export spans to, e.g. http://otel-collector:4317
    /// (config: otlp_endpoint; default: OTEL_EXPORTER_OTLP_ENDPOINT, else off).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// The whole scaler configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: String,
    /// Address of the admin HTTP port (`/metrics`, `/livez`, `/readyz`);
    /// `off` for none.
    pub admin_listen: String,
    /// NATS connection; `stream` and `consumer` are the defaults for triggers.
    pub nats: NatsConfig,
    /// Other NATS URLs a trigger may name in `natsUrl` (they get this scaler's credentials).
    pub allowed_nats_urls: Vec<String>,
    /// TLS for this scaler's own gRPC endpoint.
    pub tls: TlsConfig,
    /// Milliseconds between two backlog readings of one consumer.
    pub refresh_interval_ms: u64,
    /// Milliseconds without a successful reading after which calls fail UNAVAILABLE.
    pub stale_after_ms: u64,
    /// Seconds a consumer watcher nobody asks about keeps running.
    pub idle_timeout_secs: u64,
    /// Seconds between repeats of the current state on StreamIsActive streams.
    pub heartbeat_secs: u64,
    /// Seconds calls in progress get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// OTLP/gRPC collector spans are exported to; unset = the standard
    /// `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`, else no export.
    pub otlp_endpoint: Option<String>,
}

/// TLS for the scaler's gRPC endpoint; unset = plaintext.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) clients' certificates must chain to; setting it requires client certificates.
    pub client_ca: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50052".into(),
            admin_listen: "0.0.0.0:9091".into(),
            nats: NatsConfig::default(),
            allowed_nats_urls: Vec::new(),
            tls: TlsConfig::default(),
            refresh_interval_ms: 200,
            stale_after_ms: 10_000,
            idle_timeout_secs: 120,
            heartbeat_secs: 30,
            shutdown_grace_secs: 5,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
        }
    }
}

impl Config {
    /// Loads the configuration from every source, in precedence order, and
    /// validates it. `env` is the process environment (tests pass their own).
    pub fn load(cli: &Cli, env: &[(String, String)]) -> Result<Self, ScalerError> {
        let mut config: Config =
            torchwire_config::load(cli.config.as_deref(), DEFAULT_CONFIG_FILE, env, &ENV)?;
        config.apply_cli(cli)?;
        config.otlp_endpoint = torchwire_telemetry::resolve_endpoint(
            config.otlp_endpoint.as_deref(),
            "otlp_endpoint",
            env,
        )
        .map_err(|e| ScalerError::config(e.key, e.message))?;
        config.validate()?;
        Ok(config)
    }

    /// Applies the command-line flags on top of the merged sources.
    fn apply_cli(&mut self, cli: &Cli) -> Result<(), ScalerError> {
        fn set<T: Clone>(target: &mut T, flag: &Option<T>) {
            if let Some(value) = flag {
                *target = value.clone();
            }
        }
        fn set_some<T: Clone>(target: &mut Option<T>, flag: &Option<T>) {
            if flag.is_some() {
                target.clone_from(flag);
            }
        }
        set(&mut self.listen, &cli.listen);
        set(&mut self.admin_listen, &cli.admin_listen);
        let nats = &mut self.nats;
        set_some(&mut nats.url, &cli.nats_url);
        set_some(&mut nats.user, &cli.nats_user);
        set_some(&mut nats.password, &cli.nats_password);
        set_some(&mut nats.token, &cli.nats_token);
        set_some(&mut nats.credentials_file, &cli.nats_credentials_file);
        set_some(&mut nats.nkey_seed, &cli.nats_nkey_seed);
        set_some(&mut nats.tls_ca, &cli.nats_tls_ca);
        set_some(&mut nats.tls_cert, &cli.nats_tls_cert);
        set_some(&mut nats.tls_key, &cli.nats_tls_key);
        set(&mut nats.stream, &cli.nats_stream);
        set(&mut nats.consumer, &cli.nats_consumer);
        self.allowed_nats_urls
            .extend(cli.allowed_nats_urls.iter().cloned());
        set_some(&mut self.tls.cert, &cli.tls_cert);
        set_some(&mut self.tls.key, &cli.tls_key);
        set_some(&mut self.tls.client_ca, &cli.tls_client_ca);
        set(&mut self.refresh_interval_ms, &cli.refresh_interval_ms);
        set(&mut self.stale_after_ms, &cli.stale_after_ms);
        set(&mut self.idle_timeout_secs, &cli.idle_timeout_secs);
        set(&mut self.heartbeat_secs, &cli.heartbeat_secs);
        set_some(&mut self.otlp_endpoint, &cli.otlp_endpoint);
        if let Some(format) = &cli.log_format {
            self.log_format = format
                .parse()
                .map_err(|message: String| ScalerError::config("--log-format", message))?;
        }
        Ok(())
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), ScalerError> {
        self.listen_addr()?;
        self.admin_addr()?;
        if let Some(url) = &self.otlp_endpoint {
            torchwire_telemetry::resolve_endpoint(Some(url), "otlp_endpoint", &[])
                .map_err(|e| ScalerError::config(e.key, e.message))?;
        }
        self.nats.validate().map_err(|e| match e {
            NatsError::Config { key, message } => ScalerError::Config { key, message },
            other => ScalerError::Nats(other),
        })?;
        for url in &self.allowed_nats_urls {
            let probe = NatsConfig {
                url: Some(url.clone()),
                ..Default::default()
            };
            probe
                .server_addrs()
                .map_err(|e| ScalerError::config("allowed_nats_urls", e.to_string()))?;
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => {
                return Err(ScalerError::config("tls.cert", "is set without tls.key"))
            }
            (None, Some(_)) => {
                return Err(ScalerError::config("tls.key", "is set without tls.cert"))
            }
            _ => {}
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return Err(ScalerError::config(
                "tls.client_ca",
                "needs tls.cert and tls.key (client certificates need TLS)",
            ));
        }
        for (key, path) in [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(ScalerError::config(
                        key,
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
        if !(10..=60_000).contains(&self.refresh_interval_ms) {
            return Err(ScalerError::config(
                "refresh_interval_ms",
                "must be between 10 and 60000",
            ));
        }
        if self.stale_after_ms < self.refresh_interval_ms {
            return Err(ScalerError::config(
                "stale_after_ms",
                "must be at least refresh_interval_ms",
            ));
        }
        if self.idle_timeout_secs == 0 {
            return Err(ScalerError::config(
                "idle_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.heartbeat_secs == 0 {
            return Err(ScalerError::config("heartbeat_secs", "must be at least 1"));
        }
        Ok(())
    }

    /// The parsed listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ScalerError> {
        self.listen.parse().map_err(|e| {
            ScalerError::config(
                "listen",
                format!(
                    "{:?} is not an address like 0.0.0.0:50052: {e}",
                    self.listen
                ),
            )
        })
    }

    /// The admin port's address; none when `admin_listen` is `off`.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ScalerError> {
        torchwire_telemetry::admin::parse_listen(&self.admin_listen)
            .map_err(|message| ScalerError::config("admin_listen", message))
    }

    /// Time between two readings of one consumer.
    pub fn refresh_interval(&self) -> Duration {
        Duration::from_millis(self.refresh_interval_ms)
    }

    /// Age after which a reading no longer counts.
    pub fn stale_after(&self) -> Duration {
        Duration::from_millis(self.stale_after_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn key_of(err: ScalerError) -> String {
        match err {
            ScalerError::Config { key, .. } => key,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn defaults_load() {
        let config = Config::load(&Cli::default(), &[]).unwrap();
        assert_eq!(config.listen, "0.0.0.0:50052");
        assert_eq!(
            config.admin_addr().unwrap(),
            Some("0.0.0.0:9091".parse().unwrap())
        );
        assert_eq!(config.refresh_interval(), Duration::from_millis(200));
        assert_eq!(config.stale_after(), Duration::from_secs(10));
        assert_eq!(config.nats.stream, "TORCHWIRE");
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("scaler.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\nstale_after_ms = 3000\n[nats]\nurl = \"nats://file:4222\"\nconsumer = \"c-file\"\n",
        )
        .unwrap();
        let cli = Cli {
            config: Some(file.clone()),
            ..Default::default()
        };
        let vars = env(&[
            ("TORCHWIRE_SCALER_NATS_URL", "nats://env:4222"),
            ("TORCHWIRE_SCALER_NATS_TOKEN", "12345"),
            ("TORCHWIRE_SCALER_REFRESH_INTERVAL_MS", "100"),
            (
                "TORCHWIRE_SCALER_ALLOWED_NATS_URLS",
                "nats://a:4222, nats://b:4222",
            ),
            ("TORCHWIRE_OTHER", "ignored"),
        ]);
        let config = Config::load(&cli, &vars).unwrap();
        assert_eq!(config.listen, "127.0.0.1:1");
        assert_eq!(config.nats.url.as_deref(), Some("nats://env:4222"));
        assert_eq!(
            config.nats.token.as_deref(),
            Some("12345"),
            "digit-only tokens stay strings"
        );
        assert_eq!(config.nats.consumer, "c-file");
        assert_eq!(
            (config.refresh_interval_ms, config.stale_after_ms),
            (100, 3000)
        );
        assert_eq!(
            config.allowed_nats_urls,
            vec!["nats://a:4222", "nats://b:4222"]
        );

        let cli = Cli {
            config: Some(file),
            nats_url: Some("nats://flag:4222".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::load(&cli, &vars).unwrap().nats.url.as_deref(),
            Some("nats://flag:4222")
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let load = |cli: Cli, vars: &[(&str, &str)]| Config::load(&cli, &env(vars)).unwrap_err();
        assert_eq!(
            key_of(load(
                Cli::default(),
                &[("TORCHWIRE_SCALER_LISTEN", "nowhere")]
            )),
            "listen"
        );
        assert_eq!(
            key_of(load(Cli::default(), &[("TORCHWIRE_SCALER_NATS_URLS", "x")])),
            "nats.urls"
        );
        assert_eq!(
            key_of(load(
                Cli::default(),
                &[("TORCHWIRE_SCALER_ADMIN_LISTEN", "localhost")]
            )),
            "admin_listen"
        );
        let cli = Cli {
            admin_listen: Some("off".into()),
            ..Default::default()
        };
        assert_eq!(Config::load(&cli, &[]).unwrap().admin_addr().unwrap(), None);
        assert_eq!(
            key_of(load(
                Cli::default(),
                &[("TORCHWIRE_SCALER_STALE_AFTER_MS", "soon")]
            )),
            "stale_after_ms"
        );
        let cli = Cli {
            nats_user: Some("u".into()),
            ..Default::default()
        };
        assert_eq!(key_of(load(cli, &[])), "nats.user");
        let cli = Cli {
            tls_cert: Some("cert.pem".into()),
            ..Default::default()
        };
        assert_eq!(key_of(load(cli, &[])), "tls.cert");
        let cli = Cli {
            stale_after_ms: Some(50),
            ..Default::default()
        };
        assert_eq!(key_of(load(cli, &[])), "stale_after_ms");
        let cli = Cli {
            allowed_nats_urls: vec!["nats://h:port".into()],
            ..Default::default()
        };
        assert_eq!(key_of(load(cli, &[])), "allowed_nats_urls");
        let cli = Cli {
            config: Some("/nonexistent/torchwire-scaler.toml".into()),
            ..Default::default()
        };
        assert_eq!(key_of(load(cli, &[])), "--config");
        let cli = Cli {
            otlp_endpoint: Some("collector:4317".into()),
            ..Default::default()
        };
        assert_eq!(key_of(load(cli, &[])), "otlp_endpoint");
    }

    #[test]
    fn otlp_endpoint_comes_from_env_and_flags_before_the_otel_variable() {
        let otel = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317");
        let endpoint =
            |cli: &Cli, vars: &[(&str, &str)]| Config::load(cli, &env(vars)).unwrap().otlp_endpoint;
        let mut cli = Cli::default();
        assert_eq!(endpoint(&cli, &[]), None);
        assert_eq!(endpoint(&cli, &[otel]).as_deref(), Some("http://otel:4317"));
        let mine = ("TORCHWIRE_SCALER_OTLP_ENDPOINT", "http://env:4317");
        assert_eq!(
            endpoint(&cli, &[otel, mine]).as_deref(),
            Some("http://env:4317")
        );
        cli.otlp_endpoint = Some("http://flag:4317".into());
        assert_eq!(
            endpoint(&cli, &[otel, mine]).as_deref(),
            Some("http://flag:4317")
        );
    }
}
