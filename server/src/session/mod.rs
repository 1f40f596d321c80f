//! Conversations kept outside the pods: a chat turn that names a
//! `session_id` continues the conversation stored under that id in a NATS
//! JetStream key-value bucket, and stores it back with the answer. Any
//! replica can continue any session; two turns of one session racing on two
//! replicas are told apart by the key's revision (the loser gets ABORTED and
//! nothing it said is stored).
//!
//! - [`config`]: the `[sessions]` settings (bucket, TTL, replicas).
//! - [`id`]: which session ids are accepted.
//! - [`store`]: the bucket: load, compare-and-set, delete.
//! - [`metrics`]: store latency and write outcomes.
//! - [`turn`]: a chat turn with a session, from load to store.

pub mod config;
pub mod id;
pub mod metrics;
pub mod store;
pub mod turn;

pub use config::SessionConfig;
pub use store::{SessionStore, Stored};

use crate::config::Config;
use crate::error::ServerError;
use turn::Sessions;

/// Opens the session bucket if sessions are served.
pub async fn connect(config: &Config) -> Result<Sessions, ServerError> {
    match config.sessions_enabled() {
        Ok(()) => Ok(Sessions::On(Box::new(
            SessionStore::connect(&config.nats, &config.sessions).await?,
        ))),
        Err(why) => Ok(Sessions::Off(why)),
    }
}
