//! How many threads torch runs on by default: the CPUs this process may
//! really use (its affinity mask and its cgroup CPU quota, i.e. a Kubernetes
//! CPU limit), not the host's core count that libtorch would pick.
//!
//! OpenMP threads spin while they wait for work; more of them than the CPUs
//! the quota grants means throttled, stalled decode steps.

use std::num::NonZeroUsize;

use crate::model::DeviceChoice;

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

    /// The async runtime's worker threads when none are configured: the
    /// usable CPUs that `compute` threads (the models' intra-op teams, or
    /// one per model on a GPU) leave, and at least one. gRPC and NATS work
    /// is light next to a decode step; a worker per core beside spinning
    /// OpenMP threads only wakes, steals from its sibling and preempts the
    /// model thread (BENCHMARKS.md, "The token hand-off").
    pub fn default_runtime_threads(&self, compute: usize) -> usize {
        self.usable.saturating_sub(compute).max(1)
    }
}

/// Cores the models keep busy: the intra-op team (`threads`) where a model
/// runs on the CPU, else the model thread of each model on a GPU.
pub fn compute_threads(
    devices: impl IntoIterator<Item = DeviceChoice>,
    cuda_available: bool,
    threads: usize,
) -> usize {
    let mut models = 0;
    for device in devices {
        if device.is_cpu(cuda_available) {
            return threads;
        }
        models += 1;
    }
    models
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

    #[test]
    fn the_runtime_gets_the_cpus_compute_leaves_and_at_least_one() {
        let budget = CpuBudget {
            usable: 8,
            online: 64,
        };
        assert_eq!(budget.default_runtime_threads(8), 1);
        assert_eq!(budget.default_runtime_threads(12), 1);
        assert_eq!(budget.default_runtime_threads(2), 6);
        assert_eq!(budget.default_runtime_threads(0), 8);
    }

    #[test]
    fn cpu_models_keep_their_team_busy_gpu_models_one_thread() {
        use DeviceChoice::{Auto, Cpu, Cuda};
        assert_eq!(compute_threads([Auto], false, 4), 4);
        assert_eq!(compute_threads([Auto], true, 4), 1);
        assert_eq!(compute_threads([Cuda(0), Cuda(1)], true, 4), 2);
        assert_eq!(compute_threads([Cuda(0), Cpu], true, 4), 4);
    }
}
