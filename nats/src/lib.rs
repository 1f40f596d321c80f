//! torchwire's NATS JetStream work queue, shared by the server (consumer),
//! the scaler (reads the backlog) and the CLI (publisher): connection
//! settings, queue set-up, message headers and the wire encoding.

pub mod codec;
mod config;
mod error;
pub mod headers;
mod work_queue;

pub use codec::Encoding;
pub use config::{Discard, NatsConfig, DEFAULT_URL};
pub use error::NatsError;
pub use work_queue::{ensure_work_queue, stream_config, subject_matches};

/// The async-nats version this crate is built against, re-exported so that
/// users name the same types.
pub use async_nats;
