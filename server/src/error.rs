//! The server's one error type, and its single mapping to a gRPC status.

use std::borrow::Cow;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Everything that can go wrong serving a request or starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The request is malformed; `field` names the offending request field.
    #[error("{field}: {message}")]
    InvalidArgument {
        field: Cow<'static, str>,
        message: String,
    },
    /// Several request fields are malformed at once, each with its reason.
    #[error("{}", .0.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join("; "))]
    InvalidArguments(Vec<(Cow<'static, str>, String)>),
    /// The request waited for its first token longer than the server allows.
    #[error("the request waited {waited_ms} ms in the queue of model {model:?}, longer than the {limit_ms} ms allowed; retry later or elsewhere")]
    QueueTimeout {
        model: String,
        waited_ms: u64,
        limit_ms: u64,
    },
    /// No model is served under this name.
    #[error("model: no model named {0:?} is served (see ListModels)")]
    ModelNotFound(String),
    /// The model's request queue is full.
    #[error("the request queue of model {model:?} is full ({capacity} waiting); retry later")]
    Overloaded { model: String, capacity: usize },
    /// The server is shutting down and takes no new requests.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The model thread is gone (it failed or stopped).
    #[error("model {0:?} is not running")]
    EngineStopped(String),
    /// A tensor operation failed (e.g. out of memory) while running a request.
    #[error("model {model:?} failed: {message}")]
    Compute { model: String, message: String },
    /// The model files could not be loaded.
    #[error("loading model {model:?} from {path}: {message}")]
    Load {
        model: String,
        path: String,
        message: String,
    },
    /// The model cannot chat (it has no usable chat template); says why.
    #[error("{0}")]
    NoChatTemplate(String),
    /// The model's chat template failed to render (not a refusal of the input).
    #[error("the chat template of model {model:?} failed: {message}")]
    ChatTemplate { model: String, message: String },
    /// A session was asked for where sessions are not served; says why.
    #[error("session_id: {0}")]
    SessionsOff(String),
    /// The session does not exist (never created, deleted or expired).
    #[error("session_id: no session {0:?} (never created, deleted, or expired)")]
    SessionNotFound(String),
    /// Another turn of the session was stored first; nothing was stored.
    #[error("{0}")]
    SessionConflict(String),
    /// The session store could not be reached; retryable.
    #[error("session store unavailable: {0}")]
    SessionStore(String),
    /// A stored session cannot be decoded (or encoded).
    #[error("{0}")]
    SessionCorrupt(String),
    /// The turn cannot be served from this session as asked (its model, or
    /// a conversation that no longer fits the context); says why.
    #[error("{0}")]
    SessionRefused(String),
    /// A configuration value is invalid; `key` names it.
    #[error("config {key}: {message}")]
    Config { key: String, message: String },
}

impl ServerError {
    /// Shorthand for [`ServerError::InvalidArgument`].
    pub fn invalid(field: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`ServerError::Config`].
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The gRPC status code this error is reported with, on every transport.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } | Self::InvalidArguments(_) => Code::InvalidArgument,
            Self::ModelNotFound(_) => Code::NotFound,
            Self::Overloaded { .. } | Self::QueueTimeout { .. } => Code::ResourceExhausted,
            Self::ShuttingDown | Self::EngineStopped(_) => Code::Unavailable,
            Self::NoChatTemplate(_) | Self::SessionsOff(_) | Self::SessionRefused(_) => {
                Code::FailedPrecondition
            }
            Self::SessionNotFound(_) => Code::NotFound,
            Self::SessionConflict(_) => Code::Aborted,
            Self::SessionStore(_) => Code::Unavailable,
            Self::SessionCorrupt(_) => Code::Internal,
            Self::ChatTemplate { .. } => Code::Internal,
            Self::Compute { .. } | Self::Load { .. } | Self::Config { .. } => Code::Internal,
        }
    }
}

impl ServerError {
    /// The request fields at fault and why, for `google.rpc.BadRequest`.
    pub fn field_violations(&self) -> Vec<(&str, &str)> {
        match self {
            Self::InvalidArgument { field, message } => vec![(field.as_ref(), message.as_str())],
            Self::InvalidArguments(all) => {
                all.iter().map(|(f, m)| (f.as_ref(), m.as_str())).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// The one mapping to a gRPC status. Invalid arguments also carry a
/// `google.rpc.BadRequest` with one field violation per bad field (the
/// gRPC richer error model), besides the message naming them.
impl From<ServerError> for Status {
    fn from(err: ServerError) -> Self {
        let violations = err.field_violations();
        if violations.is_empty() {
            return Status::new(err.code(), err.to_string());
        }
        let mut details = ErrorDetails::new();
        for (field, message) in violations {
            details.add_bad_request_violation(field, message);
        }
        Status::with_error_details(err.code(), err.to_string(), details)
    }
}

impl From<torchwire_config::ConfigError> for ServerError {
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
    fn invalid_argument_names_the_field() {
        let status = Status::from(ServerError::invalid("top_p", "must be in (0, 1], got 1.5"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("top_p: "),
            "{}",
            status.message()
        );
    }

    #[test]
    fn invalid_arguments_carry_a_bad_request_per_field() {
        let status = Status::from(ServerError::InvalidArguments(vec![
            ("top_p".into(), "must be in (0, 1]".into()),
            ("min_p".into(), "must be in [0, 1]".into()),
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("top_p: ") && status.message().contains("min_p: "));
        let bad = status
            .get_details_bad_request()
            .expect("BadRequest details");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["top_p", "min_p"]);
        let other = Status::from(ServerError::ShuttingDown);
        assert!(other.get_details_bad_request().is_none());
    }

    #[test]
    fn overload_is_resource_exhausted() {
        let err = ServerError::Overloaded {
            model: "m".into(),
            capacity: 4,
        };
        assert_eq!(Status::from(err).code(), Code::ResourceExhausted);
    }
}
