//! Spawning torchwire binaries on port 0 and waiting until they are ready.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long a binary may take to print its address and report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits inside the repository")
        .to_path_buf()
}

/// Path of a workspace binary in the target directory these tests run from.
pub fn binary_path(name: &str) -> PathBuf {
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (the justfile's test recipe does)",
        path.display()
    );
    path
}

/// A child process that is killed (SIGKILL) when dropped, with its stderr
/// forwarded to the test's output (and kept, see [`stderr_lines`](Self::stderr_lines)).
pub struct ChildProcess {
    child: Option<Child>,
    /// The address the process printed on its `listening on` line.
    pub addr: SocketAddr,
    /// The admin HTTP port's address, from its `admin listening on` line.
    pub admin: Option<SocketAddr>,
    /// Lines of stdout after the `listening on` line.
    pub stdout_lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl ChildProcess {
    /// Spawns `binary args...` and waits for a stdout line
    /// `<binary> listening on <addr>`.
    pub fn spawn(binary: &str, args: &[String], envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut process = Self::start(binary, args, envs)?;
        let marker = format!("{binary} listening on ");
        let admin_marker = format!("{binary} admin listening on ");
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match process.next_stdout_line(left) {
                Some(line) => {
                    if let Some(addr) = line.strip_prefix(&admin_marker) {
                        process.admin = Some(addr.trim().parse()?);
                    } else if let Some(addr) = line.strip_prefix(&marker) {
                        process.addr = addr.trim().parse()?;
                        return Ok(process);
                    }
                }
                None => anyhow::bail!("{binary} did not print its address"),
            }
        }
    }

    /// Spawns `binary args...` without waiting for anything (`addr` is
    /// unspecified): read its stdout with
    /// [`next_stdout_line`](Self::next_stdout_line).
    pub fn start(binary: &str, args: &[String], envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary_path(binary));
        cmd.args(args)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Only the variables a test passes: no TORCHWIRE_* (or OTEL_*, which
        // would export spans somewhere) from the shell.
        for (k, _) in std::env::vars() {
            if k.starts_with("TORCHWIRE_") || k.starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        // Many servers share two cores while the suite runs: idle OpenMP
        // threads must sleep rather than spin, or every server crawls.
        cmd.env("OMP_WAIT_POLICY", "PASSIVE");
        // The admin port on a free port too (a test may set its own).
        match binary {
            "torchwire-server" => cmd.env("TORCHWIRE_ADMIN_LISTEN", "127.0.0.1:0"),
            "torchwire-scaler" => cmd.env("TORCHWIRE_SCALER_ADMIN_LISTEN", "127.0.0.1:0"),
            _ => &mut cmd,
        };
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("piped stderr");
        let kept = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                kept.lock().expect("stderr lines").push(line);
            }
        });
        Ok(Self {
            child: Some(child),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: None,
            stdout_lines: rx,
            stderr,
        })
    }

    /// The next line of stdout, waiting at most `timeout`; none once the
    /// process closed it or the time is up.
    pub fn next_stdout_line(&self, timeout: Duration) -> Option<String> {
        self.stdout_lines.recv_timeout(timeout).ok()
    }

    /// Every line the process wrote to stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lines").clone()
    }

    /// The admin port's address; panics when the process printed none.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("the process printed no admin address")
    }

    /// `http://addr`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and still own; no memory is touched.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("process {} still running after {timeout:?}", child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens a gRPC channel to the process.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(self.url())?.connect().await?)
    }

    /// Polls gRPC health (`service`, "" for the whole server) until SERVING.
    pub async fn wait_serving(&self, service: &str) -> anyhow::Result<()> {
        let mut health = HealthClient::new(self.channel().await?);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        loop {
            let next = tokio::time::timeout_at(deadline, watch.message()).await;
            match next {
                Ok(Ok(Some(resp))) if resp.status == ServingStatus::Serving as i32 => return Ok(()),
                Ok(Ok(Some(_))) => continue,
                Ok(other) => anyhow::bail!("health watch for {service:?} ended: {other:?}"),
                Err(_) => anyhow::bail!("{service:?} not SERVING after {START_TIMEOUT:?}"),
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `torchwire-server`.
pub struct Server(pub ChildProcess);

impl Server {
    /// Starts the server on 127.0.0.1:0 with the bundled model and extra
    /// flags, and waits until health reports SERVING.
    pub async fn start(extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_args(&Self::default_args(extra_args)).await
    }

    /// Starts the server with exactly these flags (include `--listen`).
    pub async fn start_with_args(args: &[String]) -> anyhow::Result<Self> {
        Self::start_with_env(args, &[]).await
    }

    /// Starts the server with these flags and `TORCHWIRE_*` variables.
    pub async fn start_with_env(args: &[String], envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut all = vec![("RUST_LOG", "info")];
        all.extend_from_slice(envs);
        let process = ChildProcess::spawn("torchwire-server", args, &all)?;
        process.wait_serving("").await?;
        Ok(Self(process))
    }

    /// The default flags (port 0, the bundled model) plus `extra`.
    pub fn default_args(extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--model".into(),
            crate::bundled_model().display().to_string(),
        ];
        // One torch thread per server: the tests run several servers at once.
        if !extra.contains(&"--threads") {
            args.extend(["--threads".to_string(), "1".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

impl std::ops::Deref for Server {
    type Target = ChildProcess;
    fn deref(&self) -> &ChildProcess {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut ChildProcess {
        &mut self.0
    }
}

/// A running `torchwire-scaler`.
pub struct Scaler(pub ChildProcess);

impl Scaler {
    /// Starts the scaler on 127.0.0.1:0 with extra flags and waits for SERVING.
    pub async fn start(extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut args = vec!["--listen".to_string(), "127.0.0.1:0".into()];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let process = ChildProcess::spawn("torchwire-scaler", &args, &[("RUST_LOG", "info")])?;
        process.wait_serving("").await?;
        Ok(Self(process))
    }
}

impl std::ops::Deref for Scaler {
    type Target = ChildProcess;
    fn deref(&self) -> &ChildProcess {
        &self.0
    }
}
