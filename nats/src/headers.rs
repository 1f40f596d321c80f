//! Header names and values of torchwire's NATS messages. A request carries
//! `REPLY_TO` (the subject its responses go to), optionally `REQUEST_ID` and
//! `CONTENT_TYPE`; each response carries `SEQUENCE`, `REQUEST_ID`, the same
//! `CONTENT_TYPE` as its request, and `FINAL` on the last one.

/// Subject the responses to a request are published to.
pub const REPLY_TO: &str = "Torchwire-Reply-To";
/// Position of a response message in its stream: 0, 1, 2, ...
pub const SEQUENCE: &str = "Torchwire-Seq";
/// `"true"` on the last response message of a request.
pub const FINAL: &str = "Torchwire-Final";
/// The request id, on requests (optional) and on every response.
pub const REQUEST_ID: &str = "Torchwire-Request-Id";
/// Encoding of the body: [`JSON`] or [`PROTOBUF`] (the default when absent).
pub const CONTENT_TYPE: &str = "Content-Type";
/// Canonical protobuf JSON (proto3 JSON mapping).
pub const JSON: &str = "application/json";
/// Binary protobuf.
pub const PROTOBUF: &str = "application/protobuf";
/// Value of [`FINAL`] on the last response.
pub const TRUE: &str = "true";
