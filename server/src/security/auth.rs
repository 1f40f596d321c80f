//! Bearer-token authentication: one tower layer in front of every gRPC
//! service checks the `authorization` metadata before any handler runs, so
//! a request without a valid token is refused with UNAUTHENTICATED and
//! never reaches a queue. Tokens are compared in constant time and never
//! logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::ServerError;

/// Tokens shorter than this are refused at startup: guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// A secret string: `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// `[auth]`: bearer tokens on the gRPC port; off unless a token is set.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File of accepted tokens, one per line (blank lines and `#` comments
    /// skipped); reread on SIGHUP and when it changes.
    pub tokens_file: Option<PathBuf>,
    /// One accepted token; meant for a secret environment variable
    /// (`TORCHWIRE_AUTH_TOKEN`), not for the config file.
    pub token: Option<Secret>,
    /// Leave `grpc.health.v1.Health` open without a token (Kubernetes
    /// probes cannot send one).
    pub open_health: bool,
    /// Leave server reflection open without a token.
    pub open_reflection: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens_file: None,
            token: None,
            open_health: true,
            open_reflection: false,
        }
    }
}

impl AuthConfig {
    /// True when requests must carry a token.
    pub fn enabled(&self) -> bool {
        self.tokens_file.is_some() || self.token.is_some()
    }

    /// Checks every token source; the error names the key, never a token.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.enabled() {
            self.load()?;
        }
        Ok(())
    }

    /// Every accepted token, from the file and the variable.
    fn load(&self) -> Result<Vec<Vec<u8>>, ServerError> {
        let mut tokens = Vec::new();
        if let Some(Secret(token)) = &self.token {
            check_token("auth.token", token)?;
            tokens.push(token.as_bytes().to_vec());
        }
        if let Some(path) = &self.tokens_file {
            let from_file = read_tokens(path)?;
            if from_file.is_empty() {
                return Err(ServerError::config(
                    "auth.tokens_file",
                    format!("{} holds no token", path.display()),
                ));
            }
            tokens.extend(from_file);
        }
        Ok(tokens)
    }
}

fn check_token(key: &str, token: &str) -> Result<(), ServerError> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(ServerError::config(
            key,
            format!("a token must be at least {MIN_TOKEN_LEN} characters"),
        ));
    }
    // It travels in an HTTP/2 header after "Bearer ".
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ServerError::config(
            key,
            "a token must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

fn read_tokens(path: &Path) -> Result<Vec<Vec<u8>>, ServerError> {
    let key = "auth.tokens_file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ServerError::config(key, format!("cannot read {}: {e}", path.display())))?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        check_token(key, line).map_err(|e| match e {
            ServerError::Config { key, message } => ServerError::Config {
                key,
                message: format!("{} line {}: {message}", path.display(), i + 1),
            },
            other => other,
        })?;
        tokens.push(line.as_bytes().to_vec());
    }
    Ok(tokens)
}

/// The accepted tokens; [`Tokens::reload`] rereads the file.
pub struct Tokens {
    settings: AuthConfig,
    accepted: RwLock<Vec<Vec<u8>>>,
}

impl Tokens {
    /// Loads the tokens once; `None` when authentication is off.
    pub fn new(settings: &AuthConfig) -> Result<Option<Arc<Self>>, ServerError> {
        if !settings.enabled() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self {
            accepted: RwLock::new(settings.load()?),
            settings: settings.clone(),
        })))
    }

    /// Rereads the token file. On error the previous tokens stay in force.
    pub fn reload(&self) -> Result<(), ServerError> {
        let tokens = self.settings.load()?;
        *self.accepted.write().expect("tokens lock") = tokens;
        Ok(())
    }

    /// The token file, if there is one, to watch.
    pub fn files(&self) -> Vec<PathBuf> {
        self.settings.tokens_file.iter().cloned().collect()
    }

    /// Whether `presented` is one of the tokens. Every token is compared,
    /// each in constant time, so the answer takes as long whichever matches.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let accepted = self.accepted.read().expect("tokens lock");
        let mut any = subtle::Choice::from(0u8);
        for token in accepted.iter() {
            any |= token.as_slice().ct_eq(presented);
        }
        any.into()
    }
}

/// The token in an `authorization: Bearer <token>` header value.
fn bearer(value: &http::HeaderValue) -> Option<&[u8]> {
    let bytes = value.as_bytes();
    let scheme = b"bearer ";
    if bytes.len() <= scheme.len() || !bytes[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return None;
    }
    Some(bytes[scheme.len()..].trim_ascii())
}

/// Which requests go through without a token.
#[derive(Debug, Clone, Copy)]
struct OpenPaths {
    health: bool,
    reflection: bool,
}

impl OpenPaths {
    fn allows(&self, path: &str) -> bool {
        (self.health && path.starts_with("/grpc.health.v1.Health/"))
            || (self.reflection
                && (path.starts_with("/grpc.reflection.v1.ServerReflection/")
                    || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")))
    }
}

/// Checks the bearer token of every request (see the module docs); does
/// nothing when `tokens` is `None`.
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Option<Arc<Tokens>>,
    open: OpenPaths,
}

impl AuthLayer {
    pub fn new(tokens: Option<Arc<Tokens>>, config: &AuthConfig) -> Self {
        Self {
            tokens,
            open: OpenPaths {
                health: config.open_health,
                reflection: config.open_reflection,
            },
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
            open: self.open,
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
    open: OpenPaths,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        futures::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(tokens) = &self.tokens else {
            return futures::future::Either::Left(self.inner.call(req));
        };
        if self.open.allows(req.uri().path()) {
            return futures::future::Either::Left(self.inner.call(req));
        }
        let presented = req.headers().get(http::header::AUTHORIZATION);
        let status = match presented.map(bearer) {
            Some(Some(token)) if tokens.accepts(token) => {
                return futures::future::Either::Left(self.inner.call(req));
            }
            None => tonic::Status::unauthenticated(
                "this server requires a bearer token: send `authorization: Bearer <token>` metadata",
            ),
            Some(None) => tonic::Status::unauthenticated(
                "the authorization metadata must be `Bearer <token>`",
            ),
            Some(Some(_)) => tonic::Status::unauthenticated("the bearer token is not valid"),
        };
        // Only the method, never the header: the value may be a real token.
        tracing::debug!(path = %req.uri().path(), code = "UNAUTHENTICATED", "request refused");
        futures::future::Either::Right(futures::future::ready(Ok(status.into_http())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(list: &[&str]) -> Tokens {
        Tokens {
            settings: AuthConfig::default(),
            accepted: RwLock::new(list.iter().map(|t| t.as_bytes().to_vec()).collect()),
        }
    }

    #[test]
    fn only_listed_tokens_are_accepted() {
        let t = tokens(&["0123456789abcdef", "fedcba9876543210"]);
        assert!(t.accepts(b"0123456789abcdef"));
        assert!(t.accepts(b"fedcba9876543210"));
        assert!(!t.accepts(b"0123456789abcde"));
        assert!(!t.accepts(b"0123456789abcdeF"));
        assert!(!t.accepts(b""));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_required() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer(&v("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&v("bearer  abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer(&v("Basic abc")), None);
        assert_eq!(bearer(&v("Bearer")), None);
        assert_eq!(bearer(&v("abc")), None);
    }

    #[test]
    fn token_files_skip_comments_and_refuse_weak_tokens() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "# ops\n\n0123456789abcdef\n  fedcba9876543210  \n",
        )
        .unwrap();
        let config = AuthConfig {
            tokens_file: Some(file.path().to_path_buf()),
            ..Default::default()
        };
        assert_eq!(config.load().unwrap().len(), 2);
        std::fs::write(file.path(), "short\n").unwrap();
        let err = config.load().unwrap_err().to_string();
        assert!(
            err.contains("auth.tokens_file") && err.contains("line 1"),
            "{err}"
        );
        assert!(!err.contains("short"), "the token is never echoed: {err}");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let config = AuthConfig {
            token: Some(Secret("0123456789abcdef".into())),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn health_and_reflection_are_open_only_when_configured() {
        let open = OpenPaths {
            health: true,
            reflection: false,
        };
        assert!(open.allows("/grpc.health.v1.Health/Check"));
        assert!(!open.allows("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!open.allows("/torchwire.v1.Inference/Generate"));
        assert!(!open.allows("/grpc.health.v1.HealthX/Check"));
    }
}
