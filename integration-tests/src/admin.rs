//! Reading a binary's admin HTTP port: plain HTTP/1.0 GETs (the response
//! ends with the connection, no client library needed), and `/metrics`
//! parsed with a Prometheus text-format parser.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP response: status, `Content-Type` and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `GET path` on `addr`, within 30 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8(raw)?)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange).await??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of headers in {raw:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {head:?}"))?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Ok(HttpResponse {
        status,
        content_type,
        body: body.to_string(),
    })
}

/// The status code of `GET path`.
pub async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
        .status
}

/// One scrape of `/metrics`, parsed.
pub struct Metrics {
    pub text: String,
    pub scrape: prometheus_parse::Scrape,
}

impl Metrics {
    /// Scrapes `/metrics` on `addr`; it must answer 200 in the text format.
    pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Self> {
        let response = http_get(addr, "/metrics").await?;
        anyhow::ensure!(response.status == 200, "/metrics: {response:?}");
        anyhow::ensure!(
            response
                .content_type
                .starts_with("text/plain; version=0.0.4"),
            "/metrics content type {:?}",
            response.content_type
        );
        Self::parse(&response.body)
    }

    /// Parses a text exposition.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        Ok(Self {
            text: text.to_string(),
            scrape: prometheus_parse::Scrape::parse(lines)?,
        })
    }

    /// Samples of metric `name` whose labels include `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
        self.scrape.samples.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The value of the one counter, gauge or untyped sample of `name`
    /// with `labels`; none when there is none, a panic when there are more.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let values: Vec<f64> = self
            .samples(name, labels)
            .filter_map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .collect();
        assert!(
            values.len() <= 1,
            "{name} {labels:?} matches {} series",
            values.len()
        );
        values.first().copied()
    }

    /// Whether the scrape has a `# TYPE` line for `name` saying `kind`.
    pub fn has_type(&self, name: &str, kind: &str) -> bool {
        self.text
            .lines()
            .any(|l| l == format!("# TYPE {name} {kind}"))
    }
}
