//! The server runs its idle OpenMP workers with a short spin
//! (`GOMP_SPINCOUNT`) unless the operator chose their waiting: libgomp reads
//! the variables only as it loads, so the server executes itself again with
//! the variable set, keeping its process id and arguments.

use std::process::{Command, Stdio};

use torchwire_integration_tests::{binary_path, first_log_line, repo_root};

/// What a server started with `vars` (on top of an environment without
/// either OpenMP waiting variable) ran with: the `openmp_wait` field of its
/// start-up line, its environment and its arguments as the kernel has them.
struct Started {
    logged: String,
    environ: Vec<String>,
    cmdline: Vec<String>,
}

fn start(vars: &[(&str, &str)]) -> Started {
    let mut cmd = Command::new(binary_path("torchwire-server"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--model",
        "models/torchwire-tiny",
        "--log-format",
        "json",
    ])
    .current_dir(repo_root())
    .env_remove("GOMP_SPINCOUNT")
    .env_remove("OMP_WAIT_POLICY")
    .env("TORCHWIRE_ADMIN_LISTEN", "127.0.0.1:0")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start the server");
    let line = first_log_line(&mut child, "starting");
    let read = |file: &str| -> Vec<String> {
        let bytes = std::fs::read(format!("/proc/{}/{file}", child.id())).expect("read /proc");
        bytes
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let (environ, cmdline) = (read("environ"), read("cmdline"));
    let _ = child.kill();
    let _ = child.wait();
    Started {
        logged: line["fields"]["openmp_wait"]
            .as_str()
            .expect("openmp_wait field")
            .to_owned(),
        environ,
        cmdline,
    }
}

fn spin_counts(environ: &[String]) -> Vec<&str> {
    environ
        .iter()
        .filter_map(|v| v.strip_prefix("GOMP_SPINCOUNT="))
        .collect()
}

#[test]
fn the_server_sets_a_short_spin_unless_the_operator_chose() {
    // Neither variable: the same process runs again with the short spin,
    // and with the arguments it was given.
    let started = start(&[]);
    assert_eq!(started.logged, "GOMP_SPINCOUNT=100");
    assert_eq!(spin_counts(&started.environ), ["100"]);
    assert_eq!(
        started.cmdline[1..],
        [
            "--listen",
            "127.0.0.1:0",
            "--model",
            "models/torchwire-tiny",
            "--log-format",
            "json"
        ]
    );
    assert!(
        started.cmdline[0].ends_with("torchwire-server"),
        "{:?}",
        started.cmdline
    );

    // The operator's spin count is kept as it is.
    let started = start(&[("GOMP_SPINCOUNT", "300000")]);
    assert_eq!(started.logged, "GOMP_SPINCOUNT=300000");
    assert_eq!(spin_counts(&started.environ), ["300000"]);

    // So is a waiting policy, without a spin count added.
    let started = start(&[("OMP_WAIT_POLICY", "PASSIVE")]);
    assert_eq!(started.logged, "OMP_WAIT_POLICY=PASSIVE");
    assert!(
        spin_counts(&started.environ).is_empty(),
        "{:?}",
        started.environ
    );
}
