//! torchwire-server: streams tokens from libtorch Llama-family models over
//! gRPC, with continuous batching on a model thread per model.

pub mod admin;
pub mod api;
pub mod app;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod fault;
pub mod model;
pub mod nats;
pub mod security;
pub mod session;
pub mod threads;
