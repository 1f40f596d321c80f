//! Test harness for torchwire's end-to-end tests: starts the real binaries
//! (built by cargo into the same target directory as the tests) and a real
//! `nats-server`, each on a free port, and stops them on drop.

mod admin;
mod background;
mod cli;
mod nats;
mod pki;
mod process;
mod wait;

pub use admin::{http_get, http_status, HttpResponse, Metrics};
pub use background::BackgroundGrpc;
pub use cli::{torchwire, CLI_TIMEOUT};
pub use nats::NatsServer;
pub use pki::Pki;
pub use process::{binary_path, repo_root, ChildProcess, Scaler, Server};
pub use wait::until;

/// The model that ships with the repository (or the checkpoint named by
/// `TORCHWIRE_TEST_MODEL`, to run the suite against another one).
pub fn bundled_model() -> std::path::PathBuf {
    std::env::var_os("TORCHWIRE_TEST_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/torchwire-tiny"))
}

/// A request whose `request_id` is `id` (so that logs, spans and metrics can
/// be matched to it), generating `tokens` tokens with EOS ignored.
pub fn tagged_request(id: &str, tokens: u32) -> torchwire_proto::v1::GenerateRequest {
    torchwire_proto::v1::GenerateRequest {
        prompt: format!("Request {id} says"),
        request_id: id.into(),
        max_new_tokens: Some(tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// The `GetStats` figures of the server's first model.
pub async fn model_stats(
    client: &mut torchwire_proto::v1::inference_client::InferenceClient<tonic::transport::Channel>,
) -> torchwire_proto::v1::ModelStats {
    client
        .get_stats(torchwire_proto::v1::GetStatsRequest::default())
        .await
        .expect("GetStats answers")
        .into_inner()
        .models
        .remove(0)
}
