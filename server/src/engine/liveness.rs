//! How a model thread shows that it runs and makes progress: it stamps a
//! heartbeat after every unit of work (each prefill, prompt chunk and decode
//! step) and says when it blocks waiting for work; the liveness probe reads
//! it. A busy engine stamps at every step, however long the batch or the
//! prompt; only a step that never ends, or a thread that is gone, goes
//! quiet.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Written by one model thread, read by the probes.
#[derive(Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Nanoseconds from `origin` to the last stamp.
    last: AtomicU64,
    /// Blocked on an empty queue, with nothing running.
    idle: AtomicBool,
    /// The thread has ended (returned, or unwound from a panic).
    exited: AtomicBool,
}

/// What the heartbeat says about the thread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// Idle, or busy and stamping.
    Running,
    /// Busy (not waiting for work) with no stamp for this long.
    Stalled(Duration),
    /// The thread is gone.
    Exited,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            exited: AtomicBool::new(false),
        }
    }
}

impl Heartbeat {
    /// A unit of work is done.
    pub fn beat(&self) {
        let now = self.origin.elapsed().as_nanos() as u64;
        self.last.store(now, Ordering::Release);
    }

    /// The thread is about to block until work arrives.
    pub fn idle(&self) {
        self.beat();
        self.idle.store(true, Ordering::Release);
    }

    /// Work arrived: the thread is busy from now on. The stamp comes first,
    /// so a probe that sees the thread busy never sees the idle time as a
    /// stall.
    pub fn busy(&self) {
        self.beat();
        self.idle.store(false, Ordering::Release);
    }

    /// Whether the thread runs and makes progress, given that a busy thread
    /// may go `limit` without a stamp.
    pub fn progress(&self, limit: Duration) -> Progress {
        if self.exited.load(Ordering::Acquire) {
            return Progress::Exited;
        }
        if self.idle.load(Ordering::Acquire) {
            return Progress::Running;
        }
        let last = Duration::from_nanos(self.last.load(Ordering::Acquire));
        let quiet = self.origin.elapsed().saturating_sub(last);
        if quiet > limit {
            Progress::Stalled(quiet)
        } else {
            Progress::Running
        }
    }
}

/// Held by the model thread: marks the heartbeat exited when dropped, which
/// also happens while a panic unwinds the thread.
pub struct ExitGuard(pub Arc<Heartbeat>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.exited.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_busy_thread_without_stamps_stalls() {
        let limit = Duration::from_millis(30);
        let heart = Heartbeat::default();
        heart.beat();
        assert_eq!(heart.progress(limit), Progress::Running);
        // Idle for longer than the limit: waiting is not stalling ...
        heart.idle();
        std::thread::sleep(limit * 2);
        assert_eq!(heart.progress(limit), Progress::Running);
        // ... and the idle time does not count once work arrives.
        heart.busy();
        assert_eq!(heart.progress(limit), Progress::Running);
        std::thread::sleep(limit * 2);
        assert!(matches!(heart.progress(limit), Progress::Stalled(d) if d > limit));
        heart.beat();
        assert_eq!(heart.progress(limit), Progress::Running, "a stamp recovers");
    }

    #[test]
    fn a_thread_that_panics_has_exited() {
        let heart = Arc::new(Heartbeat::default());
        let guard = ExitGuard(heart.clone());
        let thread = std::thread::spawn(move || {
            let _guard = guard;
            panic!("model thread fault");
        });
        assert!(thread.join().is_err());
        assert_eq!(heart.progress(Duration::from_secs(60)), Progress::Exited);
    }
}
