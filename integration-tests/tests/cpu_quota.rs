//! The server's default torch thread count follows the CPU quota of its
//! cgroup (what a Kubernetes CPU limit sets), not the host's core count.
//!
//! The test makes a cgroup with a one-CPU quota and starts the server in it.
//! Creating cgroups needs root and a writable cgroup file system; where the
//! machine offers neither, the test says so and passes without checking.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use torchwire_integration_tests::{binary_path, repo_root};

/// A cgroup with a CPU quota, removed on drop.
struct QuotaGroup {
    dir: PathBuf,
    /// The file a process id is written to, to move that process in.
    procs: PathBuf,
}

impl QuotaGroup {
    /// A cgroup limited to `cpus` CPUs (v1 `cpu` controller, or v2 `cpu.max`).
    fn create(cpus: u32) -> Option<Self> {
        let name = format!("torchwire-test-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(&name);
            std::fs::create_dir(&dir).ok()?;
            let group = Self {
                procs: dir.join("cgroup.procs"),
                dir,
            };
            std::fs::write(group.dir.join("cpu.cfs_period_us"), "100000").ok()?;
            std::fs::write(
                group.dir.join("cpu.cfs_quota_us"),
                (100_000 * cpus).to_string(),
            )
            .ok()?;
            return Some(group);
        }
        let v2 = Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(v2.join("cgroup.subtree_control")).ok()?;
        if !controllers.split_whitespace().any(|c| c == "cpu") {
            return None;
        }
        let dir = v2.join(&name);
        std::fs::create_dir(&dir).ok()?;
        let group = Self {
            procs: dir.join("cgroup.procs"),
            dir,
        };
        std::fs::write(
            group.dir.join("cpu.max"),
            format!("{} 100000", 100_000 * cpus),
        )
        .ok()?;
        Some(group)
    }
}

impl Drop for QuotaGroup {
    fn drop(&mut self) {
        // Empty by now: the server was killed and reaped.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The `starting` log line's `threads` and `usable_cpus` fields of a server
/// started by `sh -c PREFIX exec server ...`.
fn starting_threads(shell_prefix: &str) -> (u64, u64) {
    let server = binary_path("torchwire-server");
    let script = format!("{shell_prefix} exec \"$0\" \"$@\"");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&server)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--model",
            "models/torchwire-tiny",
            "--log-format",
            "json",
        ])
        .current_dir(repo_root())
        .env_remove("TORCHWIRE_THREADS")
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let line = starting_line(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    let fields = &line["fields"];
    (
        fields["threads"].as_u64().expect("threads field"),
        fields["usable_cpus"].as_u64().expect("usable_cpus field"),
    )
}

/// The first JSON log line whose message is `starting`.
fn starting_line(child: &mut Child) -> serde_json::Value {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs its start within a minute");
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if value["fields"]["message"] == "starting" {
            return value;
        }
    }
}

#[test]
fn default_threads_follow_the_cgroup_cpu_quota() {
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    if host < 2 {
        eprintln!("skipped: a one-CPU machine cannot tell a quota from the host");
        return;
    }
    let Some(group) = QuotaGroup::create(1) else {
        eprintln!("skipped: cannot create a cgroup with a CPU quota here");
        return;
    };
    let (threads, usable) = starting_threads(&format!("echo $$ > '{}' &&", group.procs.display()));
    assert_eq!(
        (threads, usable),
        (1, 1),
        "a one-CPU quota on a {host}-CPU machine"
    );

    // Outside the cgroup the same server uses every CPU it may.
    let (threads, usable) = starting_threads("");
    assert_eq!((threads, usable), (host as u64, host as u64));
}
