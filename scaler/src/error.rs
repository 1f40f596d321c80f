//! The scaler's one error type, and its single mapping to a gRPC status.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};
use torchwire_nats::NatsError;

/// A NATS failure, shared between the watcher that saw it and every caller.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong answering KEDA or starting the scaler.
#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    /// A trigger metadata value is invalid; `key` is its name in the ScaledObject.
    #[error("scalerMetadata.{key}: {message}")]
    InvalidMetadata { key: String, message: String },
    /// KEDA asked for a metric this scaler does not report.
    #[error(
        "metricName: unknown metric {0:?} (this scaler reports backlog, pending and in_flight)"
    )]
    UnknownMetric(String),
    /// The JetStream stream does not exist.
    #[error("stream {stream:?} not found on {url}")]
    StreamNotFound { url: String, stream: String },
    /// The stream exists but the consumer does not.
    #[error("consumer {consumer:?} not found on stream {stream:?} at {url}")]
    ConsumerNotFound {
        url: String,
        stream: String,
        consumer: String,
    },
    /// NATS has not answered for longer than the staleness limit.
    #[error("no backlog reading from NATS at {url} for {}ms (limit {}ms){}", .stale_for.as_millis(), .limit.as_millis(), cause_suffix(.cause))]
    Unavailable {
        url: String,
        stale_for: Duration,
        limit: Duration,
        cause: Option<Cause>,
    },
    /// NATS could not be reached or refused the connection.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A configuration value is invalid; `key` names it.
    #[error("config {key}: {message}")]
    Config { key: String, message: String },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn cause_suffix(cause: &Option<Cause>) -> String {
    cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
}

impl ScalerError {
    /// Shorthand for [`ScalerError::InvalidMetadata`].
    pub fn metadata(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidMetadata {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`ScalerError::Config`].
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The gRPC status code KEDA sees for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidMetadata { .. } | Self::UnknownMetric(_) => Code::InvalidArgument,
            Self::StreamNotFound { .. } | Self::ConsumerNotFound { .. } => Code::NotFound,
            Self::Unavailable { .. } | Self::Nats(_) => Code::Unavailable,
            Self::Config { .. } | Self::Transport(_) => Code::Internal,
        }
    }
}

impl From<ScalerError> for Status {
    fn from(err: ScalerError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

impl From<torchwire_config::ConfigError> for ScalerError {
    fn from(e: torchwire_config::ConfigError) -> Self {
        Self::Config {
            key: e.key,
            message: e.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_errors_name_the_key() {
        let status = Status::from(ScalerError::metadata(
            "targetPerReplica",
            "must be > 0, got -1",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("scalerMetadata.targetPerReplica: "),
            "{}",
            status.message()
        );
    }

    #[test]
    fn missing_queue_is_not_found_and_outage_is_unavailable() {
        let err = ScalerError::ConsumerNotFound {
            url: "nats://x".into(),
            stream: "S".into(),
            consumer: "C".into(),
        };
        assert_eq!(Status::from(err).code(), Code::NotFound);
        let cause: Cause = Arc::new(std::io::Error::other("connection refused"));
        let err = ScalerError::Unavailable {
            url: "nats://x".into(),
            stale_for: Duration::from_millis(1500),
            limit: Duration::from_secs(1),
            cause: Some(cause),
        };
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("connection refused"),
            "{}",
            status.message()
        );
    }
}
