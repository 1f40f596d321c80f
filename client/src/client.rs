//! `Client`: one HTTP/2 channel to a torchwire server, shared by the
//! inference and health stubs. Cloning is cheap and every clone multiplexes
//! its calls over the same connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use torchwire_proto::v1::inference_client::InferenceClient;
use torchwire_proto::v1::{
    ChatRequest, DeleteSessionRequest, DeleteSessionResponse, GenerateRequest, GenerateResponse,
    GetSessionRequest, GetSessionResponse, GetStatsRequest, GetStatsResponse, ListModelsRequest,
    ListModelsResponse, RenderChatRequest, RenderChatResponse, TokenizeRequest, TokenizeResponse,
};

use crate::{Error, Header};

/// Where the CLI connects when neither `--addr` nor `TORCHWIRE_ADDR` is set.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// How long to wait for the TCP (and TLS) handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings; all empty means plaintext unless the address is `https://`.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM file with the CA certificate(s) that sign the server's certificate.
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require mutual TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against, if not the address's host.
    pub domain: Option<String>,
}

impl TlsOptions {
    /// Whether any TLS option was given.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some()
    }

    fn config(&self) -> Result<ClientTlsConfig, Error> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_enabled_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?))
            }
            (None, None) => {}
            _ => {
                return Err(Error::TlsOptions(
                    "a client certificate and its key must be given together",
                ))
            }
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::TlsFile {
        path: path.to_path_buf(),
        source,
    })
}

/// A connected client for one torchwire server.
#[derive(Debug, Clone)]
pub struct Client {
    inference: InferenceClient<Channel>,
    health: HealthClient<Channel>,
    /// Sent with every call.
    metadata: MetadataMap,
}

impl Client {
    /// Connects to `addr` (`http://host:port`, `https://host:port`, or a bare
    /// `host:port`, which means https when TLS options are set).
    pub async fn connect(addr: &str, tls: &TlsOptions) -> Result<Self, Error> {
        let uri = with_scheme(addr, tls.is_set());
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|source| Error::InvalidAddress {
                addr: addr.to_string(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if tls.is_set() || uri.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tls.config()?)
                .map_err(|source| Error::Tls { source })?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| Error::Connect { addr: uri, source })?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps a channel the caller already has.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inference: InferenceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            metadata: MetadataMap::new(),
        }
    }

    /// Sends `headers` with every call from now on (a later one with the
    /// same name replaces an earlier one).
    pub fn with_headers(mut self, headers: &[Header]) -> Self {
        for header in headers {
            let (name, value) = header.metadata();
            self.metadata.insert(name, value);
        }
        self
    }

    /// Sends `authorization: Bearer <token>` with every call. The value is
    /// marked sensitive: never shown by `Debug`, never put in HPACK's table.
    pub fn with_token(mut self, token: &str) -> Result<Self, Error> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Token(
                "the token must be non-empty printable ASCII without spaces",
            ));
        }
        let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::Token("the token must be printable ASCII"))?;
        value.set_sensitive(true);
        self.metadata.insert("authorization", value);
        Ok(self)
    }

    /// `message` with this client's metadata.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        request
    }

    /// Starts a generation; the stream yields one message per token (or
    /// small group of tokens), the last one with finish reason and usage.
    pub async fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<Streaming<GenerateResponse>, Error> {
        let request = self.request(request);
        Ok(self.inference.clone().generate(request).await?.into_inner())
    }

    /// Runs a generation to the end and returns it as one message.
    pub async fn complete(&self, request: GenerateRequest) -> Result<GenerateResponse, Error> {
        let request = self.request(request);
        Ok(self.inference.clone().complete(request).await?.into_inner())
    }

    /// Starts a chat turn; the answer streams as in [`Client::generate`].
    pub async fn chat(&self, request: ChatRequest) -> Result<Streaming<GenerateResponse>, Error> {
        let request = self.request(request);
        Ok(self.inference.clone().chat(request).await?.into_inner())
    }

    /// Runs a chat turn to the end and returns the answer as one message.
    pub async fn chat_complete(&self, request: ChatRequest) -> Result<GenerateResponse, Error> {
        let request = self.request(request);
        Ok(self
            .inference
            .clone()
            .chat_complete(request)
            .await?
            .into_inner())
    }

    /// The prompt (and its token count) the model would see for a chat.
    pub async fn render_chat(
        &self,
        request: RenderChatRequest,
    ) -> Result<RenderChatResponse, Error> {
        let request = self.request(request);
        Ok(self
            .inference
            .clone()
            .render_chat(request)
            .await?
            .into_inner())
    }

    /// A stored conversation.
    pub async fn get_session(&self, session_id: &str) -> Result<GetSessionResponse, Error> {
        let request = self.request(GetSessionRequest {
            session_id: session_id.to_string(),
        });
        Ok(self
            .inference
            .clone()
            .get_session(request)
            .await?
            .into_inner())
    }

    /// Forgets a stored conversation.
    pub async fn delete_session(&self, session_id: &str) -> Result<DeleteSessionResponse, Error> {
        let request = self.request(DeleteSessionRequest {
            session_id: session_id.to_string(),
        });
        Ok(self
            .inference
            .clone()
            .delete_session(request)
            .await?
            .into_inner())
    }

    /// The models the server has loaded.
    pub async fn models(&self) -> Result<ListModelsResponse, Error> {
        Ok(self
            .inference
            .clone()
            .list_models(self.request(ListModelsRequest {}))
            .await?
            .into_inner())
    }

    /// Tokenizes `text` with `model`'s tokenizer ("" = the default model).
    pub async fn tokenize(
        &self,
        model: &str,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<TokenizeResponse, Error> {
        let request = TokenizeRequest {
            model: model.to_string(),
            text: text.to_string(),
            add_special_tokens,
        };
        let request = self.request(request);
        Ok(self.inference.clone().tokenize(request).await?.into_inner())
    }

    /// Engine counters for `model` ("" = every model).
    pub async fn stats(&self, model: &str) -> Result<GetStatsResponse, Error> {
        let request = GetStatsRequest {
            model: model.to_string(),
        };
        Ok(self
            .inference
            .clone()
            .get_stats(self.request(request))
            .await?
            .into_inner())
    }

    /// gRPC health of `service` ("" = the whole server).
    pub async fn health(&self, service: &str) -> Result<ServingStatus, Error> {
        let request = HealthCheckRequest {
            service: service.to_string(),
        };
        let request = self.request(request);
        let response = self.health.clone().check(request).await?.into_inner();
        Ok(ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown))
    }
}

/// Adds `http://` (or `https://` when TLS is configured) to a bare `host:port`.
fn with_scheme(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_get_a_scheme() {
        assert_eq!(
            with_scheme("127.0.0.1:50051", false),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            with_scheme("example.com:443", true),
            "https://example.com:443"
        );
        assert_eq!(with_scheme("http://h:1", true), "http://h:1");
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let tls = TlsOptions {
            cert: Some("client.pem".into()),
            ..Default::default()
        };
        assert!(matches!(
            tls.config(),
            Err(Error::TlsFile { .. }) | Err(Error::TlsOptions(_))
        ));
        let tls = TlsOptions {
            domain: Some("x".into()),
            ..Default::default()
        };
        assert!(tls.is_set());
        assert!(tls.config().is_ok());
    }

    #[tokio::test]
    async fn the_token_is_sent_as_a_sensitive_bearer_header() {
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let client = Client::from_channel(channel)
            .with_token("0123456789abcdef\n")
            .unwrap();
        let value = client.metadata.get("authorization").unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer 0123456789abcdef");
        assert!(value.is_sensitive());
        assert!(!format!("{client:?}").contains("0123456789abcdef"));
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        assert!(Client::from_channel(channel).with_token("a b").is_err());
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_is_unavailable() {
        // Bind then drop to get a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = Client::connect(&format!("127.0.0.1:{port}"), &TlsOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.to_string().contains("cannot connect"), "{err}");
    }
}
