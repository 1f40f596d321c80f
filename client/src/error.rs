//! The client's one error type: every failure is either a gRPC status from
//! the server or a local problem that is given the closest gRPC code, so the
//! CLI can report all of them the same way.

use std::path::PathBuf;

use tonic::Code;

/// Everything that can go wrong talking to a torchwire server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server address is not a URI tonic accepts.
    #[error("invalid address {addr:?}: {}", chain(source))]
    InvalidAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A certificate or key file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TLS options that do not fit together.
    #[error("TLS configuration: {0}")]
    TlsOptions(&'static str),
    /// The bearer token cannot be sent.
    #[error("token: {0}")]
    Token(&'static str),
    /// The token file could not be read.
    #[error("cannot read the token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// tonic refused the TLS configuration.
    #[error("TLS configuration: {}", chain(source))]
    Tls {
        #[source]
        source: tonic::transport::Error,
    },
    /// No connection could be made to the server.
    #[error("cannot connect to {addr}: {}", chain(source))]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A results file (JSON, chart) could not be written.
    #[error("cannot write {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    /// The server (or the transport under a call) answered with a status.
    #[error("{}", status_message(.0))]
    Status(#[from] tonic::Status),
}

impl Error {
    /// The gRPC code that best describes this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidAddress { .. }
            | Error::TlsFile { .. }
            | Error::TlsOptions(_)
            | Error::Token(_)
            | Error::TokenFile { .. }
            | Error::Tls { .. } => Code::InvalidArgument,
            Error::Connect { .. } => Code::Unavailable,
            Error::Write { .. } => Code::Unknown,
            Error::Status(status) => status.code(),
        }
    }
}

/// The canonical upper-case name of a gRPC code (`INVALID_ARGUMENT`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A status's message, or the code's description when the server sent none;
/// transport failures surfaced as a status also name their cause.
fn status_message(status: &tonic::Status) -> String {
    let mut message = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    if let Some(source) = std::error::Error::source(status) {
        message.push_str(": ");
        message.push_str(&chain(source));
    }
    message
}

/// An error and its causes, joined by `: ` (transport errors keep the
/// useful part, e.g. "Connection refused", in their sources).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_keep_code_and_message() {
        let err = Error::from(tonic::Status::invalid_argument("temperature must be >= 0"));
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(code_name(err.code()), "INVALID_ARGUMENT");
        assert_eq!(err.to_string(), "temperature must be >= 0");
    }

    #[test]
    fn empty_status_message_falls_back_to_the_code_description() {
        let err = Error::from(tonic::Status::new(Code::Unavailable, ""));
        assert_eq!(err.to_string(), Code::Unavailable.description());
    }

    #[test]
    fn every_code_has_a_canonical_name() {
        for n in 0..=16 {
            let name = code_name(Code::from_i32(n));
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
    }
}
