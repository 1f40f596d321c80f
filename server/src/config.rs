//! Server configuration: built-in defaults < TOML file (`--config`, or
//! `torchwire.toml` if present) < `TORCHWIRE_*` environment < command-line
//! flags. Everything is checked before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};
use torchwire_config::EnvLayout;

use crate::engine::device_sampler::SamplerChoice;
use crate::error::ServerError;
pub use torchwire_telemetry::LogFormat;

/// Name and path of the model that ships with the repository, served when
/// no model is configured.
pub const BUNDLED_MODEL: (&str, &str) = ("torchwire-tiny", "models/torchwire-tiny");

/// Prefix cache budget per model unless configured (MiB).
const DEFAULT_PREFIX_CACHE_MIB: u64 = 256;
/// Larger prefix cache budgets are refused as typos (16 TiB).
const MAX_PREFIX_CACHE_MIB: u64 = 1 << 24;

/// Config file read when `--config` is not given, if it exists.
const DEFAULT_CONFIG_FILE: &str = "torchwire.toml";

/// How `TORCHWIRE_*` variables map onto config keys: `TORCHWIRE_LISTEN` →
/// `listen`, `TORCHWIRE_MODELS__TINY__PATH` → `models.tiny.path` (double
/// underscores nest), `TORCHWIRE_NATS_URL` → `nats.url`.
const ENV: EnvLayout = EnvLayout {
    prefix: "TORCHWIRE_",
    description: "TORCHWIRE_* environment variables",
    tables: &["nats", "tls", "auth", "limits", "sessions"],
    // Only these are parsed as numbers: a password of digits or a model
    // named "true" stays a string.
    typed_keys: &[
        "threads",
        "runtime_threads",
        "shutdown_grace_secs",
        "max_batch_size",
        "max_prefill_tokens",
        "max_context",
        "kv_cache_mib",
        "prefix_cache_mib",
        "queue_size",
        "default_max_new_tokens",
        "ack_wait_secs",
        "max_deliver",
        "reload_interval_secs",
        "open_health",
        "open_reflection",
        "limits.max_message_bytes",
        "limits.max_concurrent_streams",
        "limits.keepalive_interval_secs",
        "limits.keepalive_timeout_secs",
        "limits.idle_timeout_secs",
        "limits.max_queue_wait_secs",
        "limits.max_prompt_bytes",
        "retry_delay_ms",
        "retry_delay_max_ms",
        "max_msgs",
        "max_bytes",
        "max_age_secs",
        "max_engine_failures",
        "liveness_stall_secs",
        "sessions.enabled",
        "sessions.ttl_secs",
        "sessions.replicas",
    ],
    list_keys: &[],
    // Other torchwire programs' variables and the toolchain scripts'.
    ignored: &[
        "cache",
        "venv",
        "addr",
        "test_model",
        "parity_model",
        "scaler_",
        // The command line client's.
        "token",
        "token_file",
        // TORCHWIRE_DEBUG_FAULT: the debug builds' fault switch (engine::fault).
        "debug_",
    ],
};

/// Command-line flags. Each overrides the config key of the same name.
#[derive(Debug, Default, Parser)]
#[command(
    name = "torchwire-server",
    version,
    about = "Streams tokens from libtorch language models over gRPC"
)]
pub struct Cli {
    /// TOML config file (default: ./torchwire.toml if it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (config: listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin HTTP address for /metrics, /livez, /readyz, or "off" (config: admin_listen).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Seconds a model with work may go without completing a step before the server is not live (config: liveness_stall_secs).
    #[arg(long, value_name = "SECS")]
    pub liveness_stall_secs: Option<u64>,
    /// Hugging Face checkpoint directory to serve (config: models.<name>.path).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Name to serve --model under (default: the directory's name).
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
    /// Device for the model: auto, cpu, cuda or cuda:N (config: models.<name>.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Weight dtype: float32, bfloat16 or float16 (config: models.<name>.dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Projection weights: none, or int8 (weight-only, quantized at load) (config: models.<name>.quantize).
    #[arg(long, value_name = "none|int8")]
    pub quantize: Option<String>,
    /// KV cache element dtype: auto (the model's dtype), float32, float16 or bfloat16 (config: models.<name>.kv_cache_dtype).
    #[arg(long, value_name = "DTYPE")]
    pub kv_cache_dtype: Option<String>,
    /// Lower the intra-op threads while other processes crowd the cores, true or false (config: models.<name>.adaptive_threads).
    #[arg(long, value_name = "BOOL")]
    pub adaptive_threads: Option<bool>,
    /// Where tokens are sampled: auto (on the device for CUDA, on the host
    /// for CPU), host or device (config: models.<name>.sampler).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Sequences decoded together at most (config: models.<name>.max_batch_size).
    #[arg(long)]
    pub max_batch_size: Option<u32>,
    /// Prompt tokens read per step at most, batched or in chunks (config: models.<name>.max_prefill_tokens).
    #[arg(long, value_name = "TOKENS")]
    pub max_prefill_tokens: Option<u32>,
    /// Prompt + output tokens per sequence at most (config: models.<name>.max_context).
    #[arg(long)]
    pub max_context: Option<u32>,
    /// KV cache budget in MiB; sizes the batch from memory (config: models.<name>.kv_cache_mib).
    #[arg(long)]
    pub kv_cache_mib: Option<u64>,
    /// Memory for finished sequences' KV prefixes in MiB, 0 = off (config: models.<name>.prefix_cache_mib).
    #[arg(long, value_name = "MIB")]
    pub prefix_cache_mib: Option<u64>,
    /// Requests that may wait for a batch slot (config: models.<name>.queue_size).
    #[arg(long)]
    pub queue_size: Option<u32>,
    /// Torch intra-op threads (config: threads; default: the CPUs the process may
    /// use: its affinity mask and cgroup CPU quota).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Async runtime (gRPC, NATS) worker threads (config: runtime_threads; default:
    /// the usable CPUs the model threads leave, at least 1).
    #[arg(long, value_name = "N")]
    pub runtime_threads: Option<u32>,
    /// Seconds streams in flight may take to finish on shutdown (config: shutdown_grace_secs).
    #[arg(long, value_name = "SECS")]
    pub shutdown_grace: Option<u64>,
    /// Log format: text or json (config: log_format).
    #[arg(long)]
    pub log_format: Option<String>,
    /// OTLP/gRPC collector to export spans to, e.g. http://otel-collector:4317
    /// (config: otlp_endpoint; default: OTEL_EXPORTER_OTLP_ENDPOINT, else off).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// NATS server URL(s); turns the JetStream request path on (config: nats.url).
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// JetStream stream of the work queue (config: nats.stream; default TORCHWIRE).
    #[arg(long)]
    pub nats_stream: Option<String>,
    /// Subject requests are published to (config: nats.subject; default torchwire.generate).
    #[arg(long)]
    pub nats_subject: Option<String>,
    /// Durable pull consumer shared by the servers (config: nats.consumer; default torchwire-server).
    #[arg(long)]
    pub nats_consumer: Option<String>,
    /// Server certificate chain (PEM); turns TLS on (config: tls.cert).
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM) (config: tls.key).
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) client certificates must chain to: mutual TLS (config: tls.client_ca).
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// File of accepted bearer tokens, one per line (config: auth.tokens_file).
    #[arg(long, value_name = "FILE")]
    pub auth_tokens_file: Option<PathBuf>,
}

/// The whole server configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: String,
    /// Address of the admin HTTP port (`/metrics`, `/livez`, `/readyz`);
    /// `off` for none.
    pub admin_listen: String,
    /// Seconds a model thread with work may go without completing a step
    /// (a prefill, a prompt chunk or a decode step) before the server
    /// reports itself not live.
    pub liveness_stall_secs: u64,
    /// The model used when a request names none (default: the first by name).
    pub default_model: Option<String>,
    /// Models to serve, by name.
    pub models: BTreeMap<String, ModelConfig>,
    /// Torch intra-op threads; unset = the CPUs the process may use (affinity
    /// mask and cgroup CPU quota, e.g. a Kubernetes CPU limit).
    pub threads: Option<u32>,
    /// Async runtime worker threads; unset = the usable CPUs that the model
    /// threads leave, at least one.
    pub runtime_threads: Option<u32>,
    /// Seconds in-flight streams get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// OTLP/gRPC collector spans are exported to; unset = the standard
    /// `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`, else no export.
    pub otlp_endpoint: Option<String>,
    /// The NATS JetStream request path; on when `nats.url` is set.
    pub nats: torchwire_nats::NatsConfig,
    /// TLS on the gRPC port.
    pub tls: crate::security::TlsConfig,
    /// Bearer tokens on the gRPC port.
    pub auth: crate::security::AuthConfig,
    /// Limits of the gRPC port.
    pub limits: crate::api::limits::LimitsConfig,
    /// Where conversations are kept (with `nats.url`).
    pub sessions: crate::session::SessionConfig,
    /// Seconds between checks of the TLS and token files for changes
    /// (0 = reread on SIGHUP only).
    pub reload_interval_secs: u64,
    /// Engine failures (INTERNAL) in a row after which the server stops
    /// taking work, reports NOT_SERVING and exits non-zero; 0 = never.
    pub max_engine_failures: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            admin_listen: "0.0.0.0:9090".into(),
            liveness_stall_secs: 120,
            default_model: None,
            models: BTreeMap::new(),
            threads: None,
            runtime_threads: None,
            shutdown_grace_secs: 30,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            nats: torchwire_nats::NatsConfig::default(),
            tls: Default::default(),
            auth: Default::default(),
            limits: Default::default(),
            sessions: Default::default(),
            reload_interval_secs: 10,
            max_engine_failures: 3,
        }
    }
}

/// One served model.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    pub path: PathBuf,
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `float32`, `bfloat16` or `float16`; unset = bfloat16 on CUDA, float32 on CPU.
    pub dtype: Option<String>,
    /// `none`, or `int8`: projection weights quantized at load to int8 per
    /// output channel (a quarter of float32's memory traffic on CPU).
    pub quantize: String,
    /// The dtype the KV cache stores keys and values in: `auto` (the
    /// model's dtype), `float32`, `float16` or `bfloat16`. A narrower cache
    /// holds twice the tokens and halves what decode attention reads;
    /// attention still sums in the model's dtype.
    pub kv_cache_dtype: String,
    /// Where tokens are sampled: `auto` (on the device for a CUDA model, on
    /// the host for a CPU one), `host` or `device`.
    pub sampler: SamplerChoice,
    /// On a CPU model, drop intra-op threads while the model thread is kept
    /// off its cores by other processes, and try them again later
    /// (`engine/thread_governor.rs`).
    pub adaptive_threads: bool,
    /// Sequences decoded together at most (ignored when kv_cache_mib is set).
    pub max_batch_size: u32,
    /// Prompt tokens (padded) read per step at most, between the decode
    /// steps of the running sequences: joining prompts run as one batched
    /// prefill within it, and a longer prompt is read in chunks, one a step.
    pub max_prefill_tokens: u32,
    /// Prompt + output tokens per sequence; unset = the model's context, at most 4096.
    pub max_context: Option<u32>,
    /// KV cache budget in MiB; when set, the batch size is as many sequences
    /// of max_context as fit in it.
    pub kv_cache_mib: Option<u64>,
    /// Memory in MiB for the keys and values of recently finished sequences,
    /// reused by prompts that start with one of them; 0 turns reuse off.
    pub prefix_cache_mib: u64,
    /// Requests that may wait for a slot; more are refused with RESOURCE_EXHAUSTED.
    pub queue_size: u32,
    /// max_new_tokens when a request leaves it unset.
    pub default_max_new_tokens: u32,
    /// A chat template file (Jinja) used instead of the model's own; a
    /// relative path is read from the model directory.
    pub chat_template: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            device: "auto".into(),
            dtype: None,
            quantize: "none".into(),
            kv_cache_dtype: "auto".into(),
            sampler: SamplerChoice::Auto,
            adaptive_threads: true,
            max_batch_size: 32,
            max_prefill_tokens: 4096,
            max_context: None,
            kv_cache_mib: None,
            prefix_cache_mib: DEFAULT_PREFIX_CACHE_MIB,
            queue_size: 64,
            default_max_new_tokens: 128,
            chat_template: None,
        }
    }
}

impl Config {
    /// Loads the configuration from every source, in precedence order, and
    /// validates it. `env` is the process environment (tests pass their own).
    pub fn load(cli: &Cli, env: &[(String, String)]) -> Result<Self, ServerError> {
        let mut config: Config =
            torchwire_config::load(cli.config.as_deref(), DEFAULT_CONFIG_FILE, env, &ENV)?;
        config.apply_cli(cli)?;
        config.otlp_endpoint = torchwire_telemetry::resolve_endpoint(
            config.otlp_endpoint.as_deref(),
            "otlp_endpoint",
            env,
        )
        .map_err(|e| ServerError::config(e.key, e.message))?;
        config.validate()?;
        Ok(config)
    }

    /// Applies the command-line flags on top of the merged sources.
    fn apply_cli(&mut self, cli: &Cli) -> Result<(), ServerError> {
        if let Some(listen) = &cli.listen {
            self.listen = listen.clone();
        }
        if let Some(threads) = cli.threads {
            self.threads = Some(threads);
        }
        if let Some(threads) = cli.runtime_threads {
            self.runtime_threads = Some(threads);
        }
        if let Some(admin) = &cli.admin_listen {
            self.admin_listen = admin.clone();
        }
        if let Some(secs) = cli.liveness_stall_secs {
            self.liveness_stall_secs = secs;
        }
        if let Some(grace) = cli.shutdown_grace {
            self.shutdown_grace_secs = grace;
        }
        if let Some(format) = &cli.log_format {
            self.log_format = format
                .parse()
                .map_err(|message: String| ServerError::config("--log-format", message))?;
        }
        if let Some(url) = &cli.otlp_endpoint {
            self.otlp_endpoint = Some(url.clone());
        }
        let nats = &mut self.nats;
        for (flag, value) in [
            (&mut nats.stream, &cli.nats_stream),
            (&mut nats.subject, &cli.nats_subject),
            (&mut nats.consumer, &cli.nats_consumer),
        ] {
            if let Some(v) = value {
                *flag = v.clone();
            }
        }
        if let Some(url) = &cli.nats_url {
            nats.url = Some(url.clone());
        }
        for (key, flag) in [
            (&mut self.tls.cert, &cli.tls_cert),
            (&mut self.tls.key, &cli.tls_key),
            (&mut self.tls.client_ca, &cli.tls_client_ca),
            (&mut self.auth.tokens_file, &cli.auth_tokens_file),
        ] {
            if flag.is_some() {
                key.clone_from(flag);
            }
        }
        let sampler = cli
            .sampler
            .as_deref()
            .map(str::parse::<SamplerChoice>)
            .transpose()
            .map_err(|message| ServerError::config("--sampler", message))?;
        if let Some(path) = &cli.model {
            let name = cli
                .model_name
                .clone()
                .unwrap_or_else(|| model_name_from_path(path));
            self.models.entry(name).or_default().path = path.clone();
        }
        if self.models.is_empty() {
            let (name, path) = BUNDLED_MODEL;
            self.models.insert(
                name.into(),
                ModelConfig {
                    path: path.into(),
                    ..Default::default()
                },
            );
        }
        // Per-model flags apply to the model they name, else to every model.
        let targets: Vec<String> = match (&cli.model_name, &cli.model) {
            (Some(name), _) => vec![name.clone()],
            (None, Some(path)) => vec![model_name_from_path(path)],
            (None, None) => self.models.keys().cloned().collect(),
        };
        for name in targets {
            let Some(m) = self.models.get_mut(&name) else {
                continue;
            };
            if let Some(v) = &cli.device {
                m.device = v.clone();
            }
            if let Some(v) = &cli.dtype {
                m.dtype = Some(v.clone());
            }
            if let Some(v) = &cli.quantize {
                m.quantize = v.clone();
            }
            if let Some(v) = &cli.kv_cache_dtype {
                m.kv_cache_dtype = v.clone();
            }
            if let Some(v) = sampler {
                m.sampler = v;
            }
            if let Some(v) = cli.adaptive_threads {
                m.adaptive_threads = v;
            }
            if let Some(v) = cli.max_batch_size {
                m.max_batch_size = v;
            }
            if let Some(v) = cli.max_prefill_tokens {
                m.max_prefill_tokens = v;
            }
            if let Some(v) = cli.max_context {
                m.max_context = Some(v);
            }
            if let Some(v) = cli.kv_cache_mib {
                m.kv_cache_mib = Some(v);
            }
            if let Some(v) = cli.prefix_cache_mib {
                m.prefix_cache_mib = v;
            }
            if let Some(v) = cli.queue_size {
                m.queue_size = v;
            }
        }
        Ok(())
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), ServerError> {
        self.listen_addr()?;
        self.admin_addr()?;
        if self.liveness_stall_secs == 0 {
            return Err(ServerError::config(
                "liveness_stall_secs",
                "must be at least 1",
            ));
        }
        if let Some(url) = &self.otlp_endpoint {
            torchwire_telemetry::resolve_endpoint(Some(url), "otlp_endpoint", &[])
                .map_err(|e| ServerError::config(e.key, e.message))?;
        }
        if self.nats_enabled() {
            self.nats.validate().map_err(|e| match e {
                torchwire_nats::NatsError::Config { key, message } => {
                    ServerError::config(key, message)
                }
                other => ServerError::config("nats", other.to_string()),
            })?;
        }
        self.tls.validate()?;
        self.auth.validate()?;
        self.limits.validate()?;
        self.sessions.validate()?;
        if let Some(0) = self.threads {
            return Err(ServerError::config("threads", "must be at least 1"));
        }
        if let Some(0) = self.runtime_threads {
            return Err(ServerError::config("runtime_threads", "must be at least 1"));
        }
        if let Some(name) = &self.default_model {
            if !self.models.contains_key(name) {
                return Err(ServerError::config(
                    "default_model",
                    format!("no model named {name:?} is configured"),
                ));
            }
        }
        for (name, m) in &self.models {
            let key = |field: &str| format!("models.{name}.{field}");
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(ServerError::config(
                    format!("models.{name:?}"),
                    "model names must be non-empty without spaces",
                ));
            }
            if !m.path.join("config.json").is_file() {
                return Err(ServerError::config(
                    key("path"),
                    format!(
                        "{} has no config.json (expected a Hugging Face checkpoint directory)",
                        m.path.display()
                    ),
                ));
            }
            crate::model::DeviceChoice::parse(&m.device)
                .map_err(|msg| ServerError::config(key("device"), msg))?;
            if let Some(dtype) = &m.dtype {
                crate::model::parse_dtype(dtype)
                    .map_err(|msg| ServerError::config(key("dtype"), msg))?;
            }
            crate::model::Quantization::parse(&m.quantize)
                .map_err(|msg| ServerError::config(key("quantize"), msg))?;
            crate::model::kv_cache_kind(&m.kv_cache_dtype, tch::Kind::Float)
                .map_err(|msg| ServerError::config(key("kv_cache_dtype"), msg))?;
            if m.max_batch_size == 0 {
                return Err(ServerError::config(
                    key("max_batch_size"),
                    "must be at least 1",
                ));
            }
            if m.max_batch_size > 1024 {
                return Err(ServerError::config(
                    key("max_batch_size"),
                    "must be at most 1024",
                ));
            }
            if m.max_prefill_tokens == 0 {
                return Err(ServerError::config(
                    key("max_prefill_tokens"),
                    "must be at least 1",
                ));
            }
            if let Some(ctx) = m.max_context {
                if ctx < 2 {
                    return Err(ServerError::config(
                        key("max_context"),
                        "must be at least 2",
                    ));
                }
            }
            if m.kv_cache_mib == Some(0) {
                return Err(ServerError::config(
                    key("kv_cache_mib"),
                    "must be at least 1",
                ));
            }
            if m.prefix_cache_mib > MAX_PREFIX_CACHE_MIB {
                return Err(ServerError::config(
                    key("prefix_cache_mib"),
                    format!("must be at most {MAX_PREFIX_CACHE_MIB} (MiB)"),
                ));
            }
            if m.queue_size == 0 {
                return Err(ServerError::config(key("queue_size"), "must be at least 1"));
            }
            if m.default_max_new_tokens == 0 {
                return Err(ServerError::config(
                    key("default_max_new_tokens"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    /// The parsed listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ServerError> {
        self.listen.parse().map_err(|e| {
            ServerError::config(
                "listen",
                format!(
                    "{:?} is not an address like 0.0.0.0:50051: {e}",
                    self.listen
                ),
            )
        })
    }

    /// The admin port's address; none when `admin_listen` is `off`.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ServerError> {
        torchwire_telemetry::admin::parse_listen(&self.admin_listen)
            .map_err(|message| ServerError::config("admin_listen", message))
    }

    /// True when the NATS request path is configured.
    pub fn nats_enabled(&self) -> bool {
        self.nats.url.as_deref().is_some_and(|u| !u.is_empty())
    }

    /// Whether chat turns may name a session (NATS is configured and
    /// sessions are not turned off); if not, why.
    pub fn sessions_enabled(&self) -> Result<(), String> {
        if !self.nats_enabled() {
            Err("sessions are not served: this server has no nats.url".into())
        } else if !self.sessions.enabled {
            Err("sessions are turned off on this server (sessions.enabled = false)".into())
        } else {
            Ok(())
        }
    }

    /// The name of the model used when a request names none.
    pub fn default_model_name(&self) -> String {
        self.default_model
            .clone()
            .or_else(|| self.models.keys().next().cloned())
            .unwrap_or_default()
    }
}

fn model_name_from_path(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint directory with a config.json, so validation passes.
    fn checkpoint() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        dir
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cli_with_model(dir: &Path) -> Cli {
        Cli {
            model: Some(dir.to_path_buf()),
            model_name: Some("m".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_apply_without_any_source() {
        let ckpt = checkpoint();
        let config = Config::load(&cli_with_model(ckpt.path()), &[]).unwrap();
        assert_eq!(config.listen, "0.0.0.0:50051");
        assert_eq!(config.admin_listen, "0.0.0.0:9090");
        assert_eq!(config.liveness_stall_secs, 120);
        assert_eq!(config.models["m"].max_batch_size, 32);
        assert_eq!(config.default_model_name(), "m");
    }

    #[test]
    fn file_then_env_then_flags_take_precedence() {
        let ckpt = checkpoint();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "listen = \"127.0.0.1:1\"\nthreads = 1\nshutdown_grace_secs = 5\n[models.m]\nqueue_size = 3\nmax_batch_size = 4\n",
        )
        .unwrap();
        let mut cli = cli_with_model(ckpt.path());
        cli.config = Some(file.path().to_path_buf());
        // File only.
        let c = Config::load(&cli, &[]).unwrap();
        assert_eq!(
            (c.listen.as_str(), c.threads, c.models["m"].queue_size),
            ("127.0.0.1:1", Some(1), 3)
        );
        // Env beats the file.
        let e = env(&[
            ("TORCHWIRE_LISTEN", "127.0.0.1:2"),
            ("TORCHWIRE_THREADS", "2"),
            ("TORCHWIRE_RUNTIME_THREADS", "3"),
            ("TORCHWIRE_MODELS__M__QUEUE_SIZE", "7"),
        ]);
        let c = Config::load(&cli, &e).unwrap();
        assert_eq!(
            (c.listen.as_str(), c.threads, c.models["m"].queue_size),
            ("127.0.0.1:2", Some(2), 7)
        );
        assert_eq!(c.runtime_threads, Some(3));
        assert_eq!(
            c.shutdown_grace_secs, 5,
            "untouched keys keep the file's value"
        );
        // Flags beat env.
        cli.listen = Some("127.0.0.1:3".into());
        cli.queue_size = Some(9);
        cli.runtime_threads = Some(1);
        let c = Config::load(&cli, &e).unwrap();
        assert_eq!(c.runtime_threads, Some(1));
        assert_eq!(
            (
                c.listen.as_str(),
                c.models["m"].queue_size,
                c.models["m"].max_batch_size
            ),
            ("127.0.0.1:3", 9, 4)
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let ckpt = checkpoint();
        let cli = cli_with_model(ckpt.path());
        let cases = [
            (vec![("TORCHWIRE_LISTEN", "nowhere")], "listen"),
            (vec![("TORCHWIRE_THREADS", "many")], "threads"),
            (vec![("TORCHWIRE_RUNTIME_THREADS", "0")], "runtime_threads"),
            (vec![("TORCHWIRE_RUNTIME_THREADS", "-1")], "runtime_threads"),
            (
                vec![("TORCHWIRE_MODELS__M__MAX_BATCH_SIZE", "0")],
                "models.m.max_batch_size",
            ),
            (
                vec![("TORCHWIRE_MODELS__M__MAX_PREFILL_TOKENS", "0")],
                "models.m.max_prefill_tokens",
            ),
            (
                vec![("TORCHWIRE_MODELS__M__MAX_PREFILL_TOKENS", "lots")],
                "models.m.max_prefill_tokens",
            ),
            (
                vec![("TORCHWIRE_MODELS__M__DEVICE", "tpu")],
                "models.m.device",
            ),
            (
                vec![("TORCHWIRE_MODELS__M__DTYPE", "int4")],
                "models.m.dtype",
            ),
            (
                vec![("TORCHWIRE_MODELS__M__QUANTIZE", "int4")],
                "models.m.quantize",
            ),
            (
                vec![("TORCHWIRE_MODELS__M__KV_CACHE_DTYPE", "fp8")],
                "models.m.kv_cache_dtype",
            ),
            (
                vec![("TORCHWIRE_MODELS__M__SAMPLER", "gpu")],
                "models.m.sampler",
            ),
            (vec![("TORCHWIRE_DEFAULT_MODEL", "other")], "default_model"),
            (vec![("TORCHWIRE_LISTN", "x")], "listn"),
            (vec![("TORCHWIRE_ADMIN_LISTEN", ":9090")], "admin_listen"),
            (
                vec![("TORCHWIRE_LIVENESS_STALL_SECS", "0")],
                "liveness_stall_secs",
            ),
        ];
        for (vars, key) in cases {
            let err = Config::load(&cli, &env(&vars)).unwrap_err().to_string();
            assert!(err.contains(key), "{vars:?}: {err}");
        }
    }

    #[test]
    fn the_sampler_comes_from_env_and_flags_and_a_bad_flag_is_named() {
        let ckpt = checkpoint();
        let mut cli = cli_with_model(ckpt.path());
        let c = Config::load(&cli, &[]).unwrap();
        assert_eq!(c.models["m"].sampler, SamplerChoice::Auto);
        let e = env(&[("TORCHWIRE_MODELS__M__SAMPLER", "host")]);
        assert_eq!(
            Config::load(&cli, &e).unwrap().models["m"].sampler,
            SamplerChoice::Host
        );
        cli.sampler = Some("device".into());
        assert_eq!(
            Config::load(&cli, &e).unwrap().models["m"].sampler,
            SamplerChoice::Device
        );
        assert!(Config::load(&cli, &e).unwrap().models["m"].adaptive_threads);
        cli.adaptive_threads = Some(false);
        assert!(!Config::load(&cli, &e).unwrap().models["m"].adaptive_threads);
        cli.sampler = Some("gpu".into());
        let err = Config::load(&cli, &[]).unwrap_err().to_string();
        assert!(err.contains("--sampler") && err.contains("gpu"), "{err}");
    }

    #[test]
    fn the_admin_port_comes_from_env_and_flags_and_can_be_off() {
        let ckpt = checkpoint();
        let mut cli = cli_with_model(ckpt.path());
        let e = env(&[
            ("TORCHWIRE_ADMIN_LISTEN", "127.0.0.1:9191"),
            ("TORCHWIRE_LIVENESS_STALL_SECS", "30"),
            ("TORCHWIRE_DEBUG_FAULT", "stall-on-prompt:x"),
        ]);
        let c = Config::load(&cli, &e).unwrap();
        assert_eq!(
            c.admin_addr().unwrap(),
            Some("127.0.0.1:9191".parse().unwrap())
        );
        assert_eq!(c.liveness_stall_secs, 30);
        cli.admin_listen = Some("off".into());
        assert_eq!(Config::load(&cli, &e).unwrap().admin_addr().unwrap(), None);
    }

    #[test]
    fn a_missing_checkpoint_is_reported_with_its_key() {
        let cli = Cli {
            model: Some("/nonexistent/ckpt".into()),
            ..Default::default()
        };
        let err = Config::load(&cli, &[]).unwrap_err().to_string();
        assert!(err.contains("models.ckpt.path"), "{err}");
    }

    #[test]
    fn foreign_torchwire_variables_are_ignored() {
        let ckpt = checkpoint();
        let e = env(&[
            ("TORCHWIRE_CACHE", "/x"),
            ("TORCHWIRE_ADDR", "http://h"),
            ("TORCHWIRE_SCALER_LISTEN", "x"),
        ]);
        assert!(Config::load(&cli_with_model(ckpt.path()), &e).is_ok());
    }

    #[test]
    fn nats_settings_come_from_env_and_flags() {
        let ckpt = checkpoint();
        let mut cli = cli_with_model(ckpt.path());
        let e = env(&[
            ("TORCHWIRE_NATS_URL", "nats://a:4222"),
            ("TORCHWIRE_NATS_ACK_WAIT_SECS", "7"),
        ]);
        let c = Config::load(&cli, &e).unwrap();
        assert!(c.nats_enabled());
        assert_eq!(
            (
                c.nats.url.as_deref(),
                c.nats.ack_wait_secs,
                c.nats.stream.as_str()
            ),
            (Some("nats://a:4222"), 7, "TORCHWIRE")
        );
        cli.nats_url = Some("nats://b:4222".into());
        cli.nats_stream = Some("JOBS".into());
        let c = Config::load(&cli, &e).unwrap();
        assert_eq!(
            (c.nats.url.as_deref(), c.nats.stream.as_str()),
            (Some("nats://b:4222"), "JOBS")
        );
        let bad = env(&[
            ("TORCHWIRE_NATS_URL", "nats://a:4222"),
            ("TORCHWIRE_NATS_USER", "u"),
        ]);
        let err = Config::load(&cli_with_model(ckpt.path()), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nats."), "{err}");
        assert!(!Config::load(&cli_with_model(ckpt.path()), &[])
            .unwrap()
            .nats_enabled());
    }

    #[test]
    fn otlp_endpoint_precedence_is_file_env_flag_then_the_otel_variable() {
        let ckpt = checkpoint();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "otlp_endpoint = \"http://file:4317\"\n").unwrap();
        let mut cli = cli_with_model(ckpt.path());
        let endpoint = |cli: &Cli, pairs: &[(&str, &str)]| {
            Config::load(cli, &env(pairs)).unwrap().otlp_endpoint
        };
        let otel = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317");
        assert_eq!(endpoint(&cli, &[]), None, "off by default");
        assert_eq!(endpoint(&cli, &[otel]).as_deref(), Some("http://otel:4317"));
        cli.config = Some(file.path().to_path_buf());
        assert_eq!(endpoint(&cli, &[otel]).as_deref(), Some("http://file:4317"));
        let torchwire = ("TORCHWIRE_OTLP_ENDPOINT", "http://env:4317");
        assert_eq!(
            endpoint(&cli, &[otel, torchwire]).as_deref(),
            Some("http://env:4317")
        );
        cli.otlp_endpoint = Some("https://flag:4317".into());
        assert_eq!(
            endpoint(&cli, &[otel, torchwire]).as_deref(),
            Some("https://flag:4317")
        );
        assert_eq!(
            endpoint(&cli, &[torchwire, ("OTEL_SDK_DISABLED", "true")]),
            None
        );
    }

    #[test]
    fn a_bad_otlp_endpoint_names_its_key() {
        let ckpt = checkpoint();
        let mut cli = cli_with_model(ckpt.path());
        cli.otlp_endpoint = Some("collector:4317".into());
        let err = Config::load(&cli, &[]).unwrap_err().to_string();
        assert!(err.contains("otlp_endpoint"), "{err}");
        let e = env(&[("TORCHWIRE_OTLP_ENDPOINT", "ftp://collector")]);
        let err = Config::load(&cli_with_model(ckpt.path()), &e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("otlp_endpoint"), "{err}");
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]);
        let err = Config::load(&cli_with_model(ckpt.path()), &e)
            .unwrap_err()
            .to_string();
        assert!(err.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{err}");
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let cli = Cli {
            config: Some("/nonexistent/torchwire.toml".into()),
            ..Default::default()
        };
        assert!(Config::load(&cli, &[])
            .unwrap_err()
            .to_string()
            .contains("--config"));
    }
}
