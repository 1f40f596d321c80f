//! How long libtorch's idle OpenMP workers spin before they sleep.
//!
//! libgomp reads `GOMP_SPINCOUNT` and `OMP_WAIT_POLICY` once, as it loads,
//! before `main`. By default an idle worker spins for about 300,000 rounds
//! (around a millisecond) after every parallel region. A CPU decode step is
//! one region (`model::cpu_matmul::team`); after it the model thread samples
//! and hands each sequence its token, which wakes the gRPC tasks. A worker
//! still spinning holds the other core, so the woken tasks take the model
//! thread's core and the next step waits for them: on the bundled model at
//! concurrency 16 the hand-off took 0.5 ms of wall time a step for 0.09 ms of
//! CPU. With a short spin the worker sleeps at once, the tasks run on its
//! core, and the next region wakes it (BENCHMARKS.md, "OpenMP workers that
//! sleep between decode steps").
//!
//! So unless the operator set either variable, the server sets
//! `GOMP_SPINCOUNT` and executes itself again, once, first thing in `main`,
//! while it has no other thread. Where that fails it runs on with libgomp's
//! defaults and says so in the start-up log.

use std::ffi::OsString;
use std::fmt;

/// The spin count the server runs with unless told otherwise: an idle
/// worker sleeps after a few microseconds.
pub const SPIN_COUNT: &str = "100";

/// The variables libgomp reads for its waiting, in the order they are shown.
const VARIABLES: [&str; 2] = ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"];

/// How the OpenMP workers of this process wait, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenMpWait {
    /// The variables as the process was started with (set by the operator,
    /// or by this server before it executed itself again).
    Set(String),
    /// Neither variable set, and executing again failed: libgomp defaults.
    Defaults { error: String },
}

impl fmt::Display for OpenMpWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Set(vars) => f.write_str(vars),
            Self::Defaults { error } => {
                write!(
                    f,
                    "libgomp defaults (executing again with GOMP_SPINCOUNT failed: {error})"
                )
            }
        }
    }
}

/// The waiting variables of an environment read through `var`, as
/// `NAME=value` joined by spaces; `None` when neither is set.
pub fn chosen(var: impl Fn(&str) -> Option<OsString>) -> Option<String> {
    let set: Vec<String> = VARIABLES
        .iter()
        .filter_map(|name| var(name).map(|v| format!("{name}={}", v.to_string_lossy())))
        .collect();
    (!set.is_empty()).then(|| set.join(" "))
}

/// Executes this server again with `GOMP_SPINCOUNT` set, unless the
/// process already has either variable. Returns how the workers wait: only
/// when nothing had to be done, or when executing again failed.
///
/// Call it before any thread starts: `exec` replaces the whole process.
pub fn ensure() -> OpenMpWait {
    if let Some(vars) = chosen(|name| std::env::var_os(name)) {
        return OpenMpWait::Set(vars);
    }
    OpenMpWait::Defaults {
        error: exec_again().to_string(),
    }
}

/// Replaces the process by the same binary and arguments with
/// `GOMP_SPINCOUNT` added; returns only on failure.
fn exec_again() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return e,
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env(VARIABLES[0], SPIN_COUNT)
        .exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn either_variable_set_by_the_operator_is_kept_and_shown() {
        assert_eq!(chosen(env(&[])), None);
        assert_eq!(chosen(env(&[("OMP_NUM_THREADS", "4")])), None);
        assert_eq!(
            chosen(env(&[("OMP_WAIT_POLICY", "PASSIVE")])).as_deref(),
            Some("OMP_WAIT_POLICY=PASSIVE")
        );
        assert_eq!(
            chosen(env(&[
                ("OMP_WAIT_POLICY", "active"),
                ("GOMP_SPINCOUNT", "300000")
            ]))
            .as_deref(),
            Some("GOMP_SPINCOUNT=300000 OMP_WAIT_POLICY=active")
        );
        // An empty value is still the operator's choice.
        assert_eq!(
            chosen(env(&[("GOMP_SPINCOUNT", "")])).as_deref(),
            Some("GOMP_SPINCOUNT=")
        );
    }

    #[test]
    fn the_log_names_a_failed_execution() {
        let wait = OpenMpWait::Defaults {
            error: "No such file or directory".into(),
        };
        assert!(wait.to_string().contains("libgomp defaults"), "{wait}");
        assert!(wait.to_string().contains("No such file"), "{wait}");
        assert_eq!(
            OpenMpWait::Set("GOMP_SPINCOUNT=100".into()).to_string(),
            "GOMP_SPINCOUNT=100"
        );
    }
}
