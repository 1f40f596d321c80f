//! Limits of the public gRPC port: message sizes, HTTP/2 streams per
//! connection, keepalive, idle connections, how long a request may wait in
//! the queue, and the caller's deadline. [`LimitsLayer`] enforces the
//! deadline (`grpc-timeout`) on every RPC, streaming or not, and marks the
//! connection busy while a call is in progress.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Frame;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::ServerError;
use crate::security::listener::{ActiveRequest, ConnInfo};

/// `[limits]`: what one client may ask of the gRPC port.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request or response message, in bytes (decoded and encoded).
    pub max_message_bytes: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Seconds between HTTP/2 keepalive pings to each client (0 = none).
    pub keepalive_interval_secs: u64,
    /// Seconds a client has to answer a keepalive ping before its
    /// connection is closed.
    pub keepalive_timeout_secs: u64,
    /// Seconds a connection with no call in progress stays open (0 = forever).
    pub idle_timeout_secs: u64,
    /// Seconds a generation may wait for its first token (queued, or its
    /// prompt being read) before it ends with RESOURCE_EXHAUSTED (0 = no limit).
    pub max_queue_wait_secs: u64,
    /// Largest prompt in bytes, checked before tokenizing; unset = 16 bytes
    /// per token of each model's context.
    pub max_prompt_bytes: Option<usize>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 256,
            keepalive_interval_secs: 60,
            keepalive_timeout_secs: 20,
            idle_timeout_secs: 600,
            max_queue_wait_secs: 60,
            max_prompt_bytes: None,
        }
    }
}

/// Prompt bytes allowed per token of context when `max_prompt_bytes` is unset.
pub const PROMPT_BYTES_PER_TOKEN: usize = 16;

impl LimitsConfig {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ServerError> {
        let key = |k: &str| format!("limits.{k}");
        if self.max_message_bytes < 1024 {
            return Err(ServerError::config(
                key("max_message_bytes"),
                "must be at least 1024",
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(ServerError::config(
                key("max_concurrent_streams"),
                "must be at least 1",
            ));
        }
        if self.keepalive_interval_secs > 0 && self.keepalive_timeout_secs == 0 {
            return Err(ServerError::config(
                key("keepalive_timeout_secs"),
                "must be at least 1 while keepalive_interval_secs is set",
            ));
        }
        if self.max_prompt_bytes == Some(0) {
            return Err(ServerError::config(
                key("max_prompt_bytes"),
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn secs(s: u64) -> Option<Duration> {
        (s > 0).then(|| Duration::from_secs(s))
    }

    pub fn keepalive_interval(&self) -> Option<Duration> {
        Self::secs(self.keepalive_interval_secs)
    }

    pub fn keepalive_timeout(&self) -> Option<Duration> {
        Self::secs(self.keepalive_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        Self::secs(self.idle_timeout_secs)
    }

    pub fn max_queue_wait(&self) -> Option<Duration> {
        Self::secs(self.max_queue_wait_secs)
    }

    /// The prompt byte limit of a model with `context` tokens.
    pub fn prompt_bytes(&self, context: usize) -> usize {
        self.max_prompt_bytes
            .unwrap_or(context.saturating_mul(PROMPT_BYTES_PER_TOKEN))
    }
}

/// The `grpc-timeout` of a request, if it has a valid one.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Ends every call whose `grpc-timeout` passes with DEADLINE_EXCEEDED,
/// dropping its handler (a generation is cancelled at the engine's next
/// step), and marks the connection busy while a call is in progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitsLayer;

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;
    fn layer(&self, inner: S) -> Limits<S> {
        Limits { inner }
    }
}

/// The service [`LimitsLayer`] makes.
#[derive(Debug, Clone)]
pub struct Limits<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Limits<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = LimitsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // tonic's own timeout answers CANCELLED at the same instant; a
        // millisecond earlier, the caller gets DEADLINE_EXCEEDED from here.
        let deadline = grpc_timeout(req.headers()).map(|t| {
            let now = Instant::now();
            Box::pin(tokio::time::sleep_until(
                now + t.saturating_sub(Duration::from_millis(1)),
            ))
        });
        let active = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.activity.begin());
        LimitsFuture {
            inner: self.inner.call(req),
            state: Some((deadline, active)),
        }
    }
}

type Deadline = Option<Pin<Box<Sleep>>>;

pin_project_lite::pin_project! {
    /// The response of a [`Limits`] call.
    pub struct LimitsFuture<F> {
        #[pin]
        inner: F,
        state: Option<(Deadline, Option<ActiveRequest>)>,
    }
}

fn deadline_exceeded() -> tonic::Status {
    tonic::Status::deadline_exceeded(
        "the call's deadline (grpc-timeout) passed; the request was cancelled",
    )
}

impl<F, E> Future for LimitsFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = Result<http::Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            let (deadline, active) = this.state.take().expect("polled after completion");
            return Poll::Ready(result.map(|response| {
                response.map(|body| {
                    tonic::body::Body::new(LimitedBody {
                        inner: Some(body),
                        deadline,
                        _active: active,
                    })
                })
            }));
        }
        let (deadline, _) = this.state.as_mut().expect("polled after completion");
        if let Some(sleep) = deadline {
            if sleep.as_mut().poll(cx).is_ready() {
                *this.state = None;
                return Poll::Ready(Ok(deadline_exceeded().into_http()));
            }
        }
        Poll::Pending
    }
}

/// A response body that ends with DEADLINE_EXCEEDED trailers when the
/// deadline passes, and holds the connection busy until it is dropped.
struct LimitedBody {
    inner: Option<tonic::body::Body>,
    deadline: Deadline,
    _active: Option<ActiveRequest>,
}

impl http_body::Body for LimitedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => {}
            Poll::Ready(None) => {
                self.inner = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame)),
        }
        if let Some(sleep) = self.deadline.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                // Dropping the handler's stream cancels the generation.
                self.inner = None;
                self.deadline = None;
                let mut trailers = http::HeaderMap::new();
                let _ = deadline_exceeded().add_header(&mut trailers);
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Some(b) if self.deadline.is_none() => b.size_hint(),
            _ => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_says() {
        let t = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(t("500m"), Some(Duration::from_millis(500)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99999999)));
        assert_eq!(t("123456789S"), None, "at most 8 digits");
        assert_eq!(t("5x"), None);
        assert_eq!(t("m"), None);
        assert_eq!(t("-5S"), None);
    }

    #[test]
    fn the_prompt_limit_follows_the_context_unless_set() {
        let mut l = LimitsConfig::default();
        assert_eq!(l.prompt_bytes(2048), 2048 * PROMPT_BYTES_PER_TOKEN);
        l.max_prompt_bytes = Some(100);
        assert_eq!(l.prompt_bytes(2048), 100);
        l.max_prompt_bytes = Some(0);
        assert!(l
            .validate()
            .unwrap_err()
            .to_string()
            .contains("limits.max_prompt_bytes"));
    }
}
