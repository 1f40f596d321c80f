//! NATS connections by URL: the scaler's own server, connected at start-up,
//! and any allowed `natsUrl` override, connected on first use. Each URL has
//! one client; async-nats reconnects it on its own after it first connects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::Client;
use tokio::sync::OnceCell;
use torchwire_nats::{NatsConfig, NatsError};

/// Connection name the scaler shows in NATS (`nats server report connections`).
pub const CONNECTION_NAME: &str = "torchwire-scaler";

/// One lazily connected client per NATS URL, all with the scaler's auth and TLS settings.
pub struct Connections {
    config: NatsConfig,
    clients: Mutex<HashMap<String, Arc<OnceCell<Client>>>>,
}

impl Connections {
    /// No connections yet; `config` supplies authentication and TLS.
    pub fn new(config: NatsConfig) -> Self {
        Self {
            config,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Registers an already connected client for `url`.
    pub fn insert(&self, url: &str, client: Client) {
        let cell = Arc::new(OnceCell::new_with(Some(client)));
        self.clients
            .lock()
            .expect("connections lock")
            .insert(url.to_string(), cell);
    }

    /// The client for `url`, connecting first if there is none yet. Callers
    /// for the same URL share one connection attempt; a failed attempt is
    /// retried by the next call.
    pub async fn get(&self, url: &str) -> Result<Client, NatsError> {
        let cell = self
            .clients
            .lock()
            .expect("connections lock")
            .entry(url.to_string())
            .or_default()
            .clone();
        let client = cell
            .get_or_try_init(|| async {
                let config = NatsConfig {
                    url: Some(url.to_string()),
                    ..self.config.clone()
                };
                let client = config.connect_as(CONNECTION_NAME).await?;
                tracing::info!(%url, "connected to NATS");
                Ok::<_, NatsError>(client)
            })
            .await?;
        Ok(client.clone())
    }
}
