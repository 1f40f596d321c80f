//! The crate's one error type.

use crate::codec::Encoding;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// A config value is invalid; `key` is its full name (e.g. `nats.tls_key`).
    #[error("invalid {key}: {message}")]
    Config { key: String, message: String },
    /// The NATS server could not be reached or refused the connection.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// A credentials file could not be read.
    #[error("cannot read nats.credentials_file {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A JetStream API call failed.
    #[error("JetStream {action} failed: {source}")]
    JetStream {
        action: String,
        #[source]
        source: async_nats::Error,
    },
    /// The stream or consumer exists but cannot serve as torchwire's work queue.
    #[error("{what} cannot be used as the work queue: {reason}")]
    Incompatible { what: String, reason: String },
    /// A value from a message (a header, a request field) is refused;
    /// `what` names it (e.g. `Torchwire-Reply-To`, `request_id`).
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// A message body is not a valid request or response.
    #[error("cannot decode {encoding} message: {source}")]
    Decode {
        encoding: Encoding,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl NatsError {
    /// A config error for `key`.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A refused message value, see [`NatsError::Invalid`].
    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            reason: reason.into(),
        }
    }

    pub(crate) fn jetstream(
        action: impl Into<String>,
        source: impl Into<async_nats::Error>,
    ) -> Self {
        Self::JetStream {
            action: action.into(),
            source: source.into(),
        }
    }
}
