//! How many threads torch runs on by default: the CPUs this process may
//! really use (its affinity mask and its cgroup CPU quota, i.e. a Kubernetes
//! CPU limit), not the host's core count that libtorch would pick.
//!
//! OpenMP threads spin while they wait for work; more of them than the CPUs
//! the quota grants means throttled, stalled decode steps.

use std::num::NonZeroUsize;

/// Where the default thread count came from, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuBudget {
    /// CPUs the process may use: min(affinity mask, cgroup quota rounded
    /// down, at least 1), as the Rust standard library reads them.
    pub usable: usize,
    /// CPUs the host has online, what libtorch would otherwise use.
    pub online: usize,
}

impl CpuBudget {
    /// Reads the budget of the current process.
    pub fn current() -> Self {
        let usable = std::thread::available_parallelism()
            .map(NonZeroUsize::get)
            .unwrap_or(1);
        Self {
            usable,
            online: online_cpus().unwrap_or(usable),
        }
    }

    /// The torch intra-op thread count to use when none is configured.
    pub fn default_threads(&self) -> usize {
        self.usable.max(1)
    }
}

/// CPUs online on the host (`sysconf(_SC_NPROCESSORS_ONLN)`).
fn online_cpus() -> Option<usize> {
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_at_least_one_and_at_most_the_host() {
        let budget = CpuBudget::current();
        assert!(budget.default_threads() >= 1);
        assert!(budget.usable <= budget.online, "{budget:?}");
    }
}
