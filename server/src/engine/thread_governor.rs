//! Fewer intra-op threads while other processes take the cores.
//!
//! libtorch's OpenMP workers spin while they wait for work. Alone on its
//! cores that is the fastest way to run many small ops; beside another busy
//! process the spinning workers and the model thread take turns on the
//! cores, and a decode step can take several times as long (BENCHMARKS.md,
//! "Threads beside a busy process"). The sign is that the model thread
//! stops running for part of its steps: its CPU time falls behind the wall
//! time of the step (spinning counts as running, so alone the two agree).
//!
//! The governor watches that ratio over windows of decode steps. When the
//! model thread ran less than `CONTENDED` of the time, it drops one thread;
//! later it tries one more again (after `PROBE_AFTER`, doubling up to
//! `PROBE_MAX` while tries fail), and keeps it if the window is clean.
//! Only CPU models are governed; on a GPU the host threads do not matter.

use std::time::{Duration, Instant};

/// The model thread ran less than this share of a window: contended.
pub const CONTENDED: f64 = 0.7;
/// A window with one more thread is kept if the model thread ran at least this.
pub const CLEAR: f64 = 0.85;
/// A window is judged once it holds this much stepping and `MIN_STEPS` steps.
const WINDOW: Duration = Duration::from_millis(200);
const MIN_STEPS: u32 = 8;
/// The first try of one more thread comes this long after dropping one.
const PROBE_AFTER: Duration = Duration::from_secs(2);
const PROBE_MAX: Duration = Duration::from_secs(60);

/// Decides the model thread's intra-op thread count.
#[derive(Debug)]
pub struct ThreadGovernor {
    max: usize,
    current: usize,
    steps: u32,
    wall: Duration,
    cpu: Duration,
    /// Trying `current` (one more than before) for one window.
    probing: bool,
    probe_after: Duration,
    next_probe: Option<Instant>,
}

/// What one window showed, for the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    pub from: usize,
    pub to: usize,
    /// The model thread's CPU time over the window's wall time.
    pub ran: f64,
}

impl ThreadGovernor {
    /// Governs between 1 and `max` threads; `None` when there is nothing to
    /// govern (`max` <= 1).
    pub fn new(max: usize) -> Option<Self> {
        (max > 1).then_some(Self {
            max,
            current: max,
            steps: 0,
            wall: Duration::ZERO,
            cpu: Duration::ZERO,
            probing: false,
            probe_after: PROBE_AFTER,
            next_probe: None,
        })
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// Records one step (`wall` elapsed, `cpu` of it on the model thread)
    /// ending at `now`; returns a new thread count when it changes.
    pub fn record(&mut self, wall: Duration, cpu: Duration, now: Instant) -> Option<Change> {
        self.steps += 1;
        self.wall += wall;
        self.cpu += cpu;
        if self.steps < MIN_STEPS || self.wall < WINDOW {
            return None;
        }
        let ran = self.cpu.as_secs_f64() / self.wall.as_secs_f64();
        self.steps = 0;
        self.wall = Duration::ZERO;
        self.cpu = Duration::ZERO;
        let from = self.current;
        if self.probing {
            self.probing = false;
            if ran >= CLEAR {
                self.probe_after = PROBE_AFTER;
                self.schedule(now);
                return None;
            }
            self.probe_after = (self.probe_after * 2).min(PROBE_MAX);
            self.current -= 1;
            self.schedule(now);
        } else if ran < CONTENDED && self.current > 1 {
            self.current -= 1;
            self.schedule(now);
        } else if self.next_probe.is_some_and(|t| now >= t) {
            self.current += 1;
            self.probing = true;
            self.next_probe = None;
        } else {
            return None;
        }
        Some(Change {
            from,
            to: self.current,
            ran,
        })
    }

    fn schedule(&mut self, now: Instant) {
        self.next_probe = (self.current < self.max).then(|| now + self.probe_after);
    }
}

/// When a step began, by the wall clock and by the model thread's CPU clock.
#[derive(Debug, Clone, Copy)]
pub struct StepClock {
    wall: Instant,
    cpu: Duration,
}

impl StepClock {
    pub fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: thread_cpu_time(),
        }
    }
}

impl ThreadGovernor {
    /// Records the step begun at `clock` on the calling (model) thread and,
    /// when the count changes, applies it to this thread and logs it.
    pub fn after_step(&mut self, clock: StepClock, model: &str) {
        let cpu = thread_cpu_time().saturating_sub(clock.cpu);
        if let Some(change) = self.record(clock.wall.elapsed(), cpu, Instant::now()) {
            tch::set_num_threads(change.to as i32);
            tracing::info!(
                model,
                from = change.from,
                to = change.to,
                model_thread_ran = format!("{:.0}%", change.ran * 100.0),
                "intra-op threads changed"
            );
        }
    }
}

/// CPU time the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: Duration = Duration::from_millis(25);

    /// Feeds one window of steps that ran `ran` of the time.
    fn window(g: &mut ThreadGovernor, ran: f64, now: Instant) -> Option<Change> {
        let mut last = None;
        for _ in 0..MIN_STEPS {
            last = g.record(STEP, STEP.mul_f64(ran), now);
        }
        last
    }

    #[test]
    fn one_thread_has_nothing_to_govern() {
        assert!(ThreadGovernor::new(1).is_none());
    }

    #[test]
    fn a_clean_machine_keeps_every_thread() {
        let mut g = ThreadGovernor::new(4).unwrap();
        let t = Instant::now();
        for i in 0..20 {
            assert_eq!(window(&mut g, 0.97, t + STEP * i), None);
        }
        assert_eq!(g.current(), 4);
    }

    #[test]
    fn contention_drops_threads_and_probes_back_when_it_ends() {
        let mut g = ThreadGovernor::new(2).unwrap();
        let t0 = Instant::now();
        let change = window(&mut g, 0.45, t0).unwrap();
        assert_eq!((change.from, change.to), (2, 1));
        assert!((change.ran - 0.45).abs() < 1e-9);
        // At the floor, contended or not, nothing changes before the probe.
        assert_eq!(window(&mut g, 0.4, t0 + Duration::from_secs(1)), None);
        assert_eq!(window(&mut g, 0.99, t0 + Duration::from_secs(1)), None);
        // The probe: one more thread for a window...
        let probe = window(&mut g, 0.99, t0 + PROBE_AFTER).unwrap();
        assert_eq!((probe.from, probe.to), (1, 2));
        // ...still contended: back to 1, and the next try waits twice as long.
        let back = window(&mut g, 0.5, t0 + PROBE_AFTER).unwrap();
        assert_eq!((back.from, back.to), (2, 1));
        let later = t0 + PROBE_AFTER + PROBE_AFTER;
        assert_eq!(window(&mut g, 0.99, later), None);
        let probe = window(&mut g, 0.99, later + PROBE_AFTER).unwrap();
        assert_eq!(probe.to, 2);
        // The contention is gone: the probe's window is clean, 2 stay.
        assert_eq!(window(&mut g, 0.95, later + PROBE_AFTER), None);
        assert_eq!(g.current(), 2);
        assert_eq!(window(&mut g, 0.95, later + PROBE_MAX * 2), None);
    }

    #[test]
    fn waits_between_tries_are_capped() {
        let mut g = ThreadGovernor::new(2).unwrap();
        let mut now = Instant::now();
        window(&mut g, 0.3, now);
        for _ in 0..10 {
            now += PROBE_MAX;
            assert_eq!(window(&mut g, 0.99, now).map(|c| c.to), Some(2));
            assert_eq!(window(&mut g, 0.3, now).map(|c| c.to), Some(1));
        }
        assert_eq!(g.probe_after, PROBE_MAX);
    }

    #[test]
    fn the_thread_clock_advances_with_work() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
