//! Test harness for torchwire's end-to-end tests: starts the real binaries
//! (built by cargo into the same target directory as the tests) and a real
//! `nats-server`, each on a free port, and stops them on drop.

mod nats;
mod process;

pub use nats::NatsServer;
pub use process::{binary_path, repo_root, ChildProcess, Scaler, Server};

/// The model that ships with the repository (or the checkpoint named by
/// `TORCHWIRE_TEST_MODEL`, to run the suite against another one).
pub fn bundled_model() -> std::path::PathBuf {
    std::env::var_os("TORCHWIRE_TEST_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/torchwire-tiny"))
}
