//! The bucket conversations live in: one key per session, the value the
//! session's JSON (`torchwire.v1.Session` in canonical protobuf JSON, so an
//! operator can read it with `nats kv get`), the key's revision the version
//! compared on every write.

use std::time::{Duration, Instant};

use torchwire_nats::async_nats::jetstream::{self, kv};
use torchwire_nats::NatsConfig;
use torchwire_proto::v1 as pb;

use super::{metrics, SessionConfig};
use crate::error::ServerError;

/// A connected bucket (a cheap handle: clones share the connection).
#[derive(Clone)]
pub struct SessionStore {
    kv: kv::Store,
}

/// What a turn read: the stored conversation if there is one, and the
/// revision its write must find unchanged (0: the key must not exist).
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub session: Option<pb::Session>,
    pub revision: u64,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ServerError {
    ServerError::SessionStore(format!("{what}: {e}"))
}

impl SessionStore {
    /// Connects and opens the bucket, creating it (with the configured TTL
    /// and replicas) if it does not exist.
    pub async fn connect(nats: &NatsConfig, config: &SessionConfig) -> Result<Self, ServerError> {
        let client = nats
            .connect_as("torchwire-server-sessions")
            .await
            .map_err(|e| ServerError::config("nats", e.to_string()))?;
        let js = jetstream::new(client);
        let kv = match js.get_key_value(&config.bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: config.bucket.clone(),
                    description: "torchwire conversations (one key per session)".into(),
                    history: 1,
                    max_age: Duration::from_secs(config.ttl_secs),
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    ServerError::config(
                        "sessions.bucket",
                        format!("cannot create key-value bucket {:?}: {e}", config.bucket),
                    )
                })?,
        };
        tracing::info!(bucket = %config.bucket, ttl_secs = config.ttl_secs, "sessions ready");
        Ok(Self { kv })
    }

    /// The session stored under `id` (checked by the caller), with its revision.
    pub async fn load(&self, id: &str) -> Result<Stored, ServerError> {
        let start = Instant::now();
        let loaded = self.read(id).await;
        metrics::operation("load", start);
        loaded
    }

    async fn read(&self, id: &str) -> Result<Stored, ServerError> {
        let entry = self
            .kv
            .entry(id)
            .await
            .map_err(|e| unavailable("reading the session", e))?;
        let Some(entry) = entry else {
            return Ok(Stored::default());
        };
        if entry.operation != kv::Operation::Put {
            // Deleted: gone for readers, but a write must still find this
            // revision, so that a concurrent re-creation is noticed.
            return Ok(Stored {
                session: None,
                revision: entry.revision,
            });
        }
        let mut session: pb::Session = serde_json::from_slice(&entry.value).map_err(|e| {
            ServerError::SessionCorrupt(format!(
                "session {id:?} (revision {}) cannot be read: {e}",
                entry.revision
            ))
        })?;
        session.revision = entry.revision;
        Ok(Stored {
            session: Some(session),
            revision: entry.revision,
        })
    }

    /// Stores `session` if the key is still at `revision` (0: still absent);
    /// returns the new revision. Another write in between is a conflict
    /// (ABORTED): nothing is stored.
    pub async fn save(
        &self,
        id: &str,
        session: &pb::Session,
        revision: u64,
    ) -> Result<u64, ServerError> {
        let start = Instant::now();
        let saved = self.write(id, session, revision).await;
        metrics::operation("store", start);
        metrics::write(&saved);
        saved
    }

    async fn write(
        &self,
        id: &str,
        session: &pb::Session,
        revision: u64,
    ) -> Result<u64, ServerError> {
        let mut value = session.clone();
        value.revision = 0;
        let body = serde_json::to_vec(&value)
            .map_err(|e| ServerError::SessionCorrupt(format!("encoding session {id:?}: {e}")))?;
        let conflict = || {
            ServerError::SessionConflict(format!(
                "session {id:?} was changed by another turn while this one ran \
                 (expected revision {revision}); nothing was stored: retry the turn"
            ))
        };
        if revision == 0 {
            self.kv.create(id, body.into()).await.map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    conflict()
                } else {
                    unavailable("storing the session", e)
                }
            })
        } else {
            self.kv
                .update(id, body.into(), revision)
                .await
                .map_err(|e| {
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                        conflict()
                    } else {
                        unavailable("storing the session", e)
                    }
                })
        }
    }

    /// Forgets the session; false if there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, ServerError> {
        let existed = self.load(id).await?.session.is_some();
        if existed {
            let start = Instant::now();
            let purged = self.kv.purge(id).await;
            metrics::operation("delete", start);
            purged.map_err(|e| unavailable("deleting the session", e))?;
        }
        Ok(existed)
    }
}
