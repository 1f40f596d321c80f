//! Client side of torchwire: a typed gRPC client for the `torchwire.v1`
//! inference API and its health service, and the load generator behind
//! `torchwire bench`.

pub mod bench;
mod client;
mod error;
mod header;

pub use client::{Client, TlsOptions, DEFAULT_ADDR};
pub use error::{code_name, Error};
pub use header::Header;
pub use torchwire_proto::v1 as proto;
