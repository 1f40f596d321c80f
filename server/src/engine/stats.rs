//! Counters a model thread publishes for GetStats and the logs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Live counters of one engine (written by its model thread).
#[derive(Debug, Default)]
pub struct Stats {
    pub running: AtomicU32,
    pub peak_batch: AtomicU32,
    pub decode_steps: AtomicU64,
    pub prefills: AtomicU64,
    pub tokens_generated: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected: AtomicU64,
}

impl Stats {
    /// Records a decode step over `batch` sequences.
    pub fn record_step(&self, batch: usize) {
        self.decode_steps.fetch_add(1, Relaxed);
        self.peak_batch.fetch_max(batch as u32, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
