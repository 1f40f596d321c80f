//! The admin HTTP port both programs serve beside gRPC: `GET /metrics` (the
//! Prometheus text format), `GET /livez` and `GET /readyz` (Kubernetes
//! probes; 200 or 503 with the reason in the body). Plain HTTP/1.1 and
//! nothing to change through it: bind it where only the cluster reaches it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the probes answer, from the program's own state.
pub trait Probes: Send + Sync + 'static {
    /// `Ok` while the process is running and making progress; otherwise why
    /// not (`/livez` answers 503: Kubernetes restarts the container).
    fn live(&self) -> Result<(), String>;
    /// `Ok` while the process should be sent work; otherwise why not
    /// (`/readyz` answers 503: the pod leaves the Service's endpoints).
    fn ready(&self) -> Result<(), String>;
}

/// Parses an `admin_listen` value: an address such as `0.0.0.0:9090`, or
/// `off` (or nothing) for no admin port.
pub fn parse_listen(value: &str) -> Result<Option<SocketAddr>, String> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|e| format!("{value:?} is not an address like 0.0.0.0:9090 (or \"off\"): {e}"))
}

/// The bound admin port, not serving yet.
pub struct AdminListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl AdminListener {
    /// Binds `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves on the runtime until the returned handle is dropped.
    pub fn serve(self, probes: Arc<dyn Probes>) -> AdminServer {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .with_state(probes);
        let addr = self.addr;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(self.listener, app).await {
                tracing::error!(%addr, error = %e, "the admin HTTP server stopped");
            }
        });
        AdminServer(task)
    }
}

/// The running admin server; dropping it stops it.
pub struct AdminServer(JoinHandle<()>);

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Shared = Arc<dyn Probes>;

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn probe(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => text(StatusCode::OK, "ok\n".into()),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn livez(State(probes): State<Shared>) -> Response {
    probe(probes.live())
}

async fn readyz(State(probes): State<Shared>) -> Response {
    // Not live is never ready.
    probe(probes.live().and_then(|()| probes.ready()))
}

async fn metrics() -> Response {
    // Collecting runs every observable callback (some read /proc): off the
    // async workers.
    let scraped = tokio::task::spawn_blocking(crate::prometheus::scrape).await;
    match scraped {
        Ok(Some(Ok((body, content_type)))) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            "no Prometheus metrics in this process\n".into(),
        ),
        Ok(Some(Err(e))) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_listen_is_an_address_or_off() {
        assert_eq!(
            parse_listen("127.0.0.1:9090"),
            Ok(Some("127.0.0.1:9090".parse().unwrap()))
        );
        assert_eq!(parse_listen("off"), Ok(None));
        assert_eq!(parse_listen(""), Ok(None));
        let err = parse_listen("localhost").unwrap_err();
        assert!(
            err.contains("\"localhost\"") && err.contains("off"),
            "{err}"
        );
    }
}
