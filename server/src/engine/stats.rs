//! Counters a model thread publishes for GetStats, the metrics and the
//! logs, and its heartbeat for the liveness probe.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::liveness::Heartbeat;

/// Live counters of one engine (written by its model thread).
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences in the batch, decoding.
    pub running: AtomicU32,
    /// Requests the model thread took from the queue that do not decode
    /// yet: their prompt is being read in chunks or waits its turn.
    pub prefilling: AtomicU32,
    pub peak_batch: AtomicU32,
    pub decode_steps: AtomicU64,
    pub prefills: AtomicU64,
    pub tokens_generated: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected: AtomicU64,
    /// Prompts that started with a cached prefix, and those that did not
    /// (counted only while the prefix cache is on).
    pub prefix_hits: AtomicU64,
    pub prefix_misses: AtomicU64,
    /// Prompt tokens copied from the prefix cache instead of being read.
    pub prefix_tokens_reused: AtomicU64,
    /// Entries dropped to make room for newer ones.
    pub prefix_evictions: AtomicU64,
    /// What the prefix cache holds now: bytes of keys and values, entries.
    pub prefix_bytes: AtomicU64,
    pub prefix_entries: AtomicU64,
    /// KV cache slots held: running sequences and the prompt read in chunks.
    pub kv_slots_used: AtomicU32,
    /// Tokens whose keys and values are in the cache.
    pub kv_tokens: AtomicU64,
    pub heartbeat: Arc<Heartbeat>,
}

impl Stats {
    /// Records a decode step over `batch` sequences.
    pub fn record_step(&self, batch: usize) {
        self.decode_steps.fetch_add(1, Relaxed);
        self.peak_batch.fetch_max(batch as u32, Relaxed);
    }

    /// Batch slots held: decoding sequences and taken requests.
    pub fn slots_held(&self) -> usize {
        self.running.load(Relaxed) as usize + self.prefilling.load(Relaxed) as usize
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
