//! The request side: validation, the transport-independent generate call
//! (shared by gRPC and NATS), and the gRPC service.

pub mod breaker;
pub mod chat;
pub mod gauges;
pub mod generate;
pub mod limits;
pub mod metrics;
pub mod models;
pub mod service;
pub mod span;
pub mod validate;

pub use chat::ChatTurn;
pub use generate::{Generator, ResponseStream};
pub use models::Models;
pub use service::InferenceService;
