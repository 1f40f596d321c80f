//! Running the real `torchwire` command line against a test server.

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::binary_path;

/// Longest any single CLI invocation may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `torchwire --addr <addr> args...` (with `input` on standard input
/// when given) and returns its output; `TORCHWIRE_ADDR` from the test's
/// environment is not passed on.
pub async fn torchwire(addr: &str, args: &[&str], input: Option<&str>) -> Output {
    let mut child = tokio::process::Command::new(binary_path("torchwire"))
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env_remove("TORCHWIRE_ADDR")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("torchwire runs");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(input.as_bytes()).await.unwrap();
    }
    tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("torchwire {args:?} ran longer than {CLI_TIMEOUT:?}"))
        .expect("torchwire runs")
}
