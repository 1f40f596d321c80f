//! torchwire-scaler: a KEDA external scaler that sizes a torchwire
//! deployment by the backlog of its NATS JetStream work queue, read through
//! the JetStream API over an authenticated connection.

pub mod admin;
pub mod app;
pub mod backlog;
pub mod config;
pub mod connections;
pub mod error;
pub mod service;
pub mod trigger;

pub use error::ScalerError;
