//! What the engines report at each collection of the metrics (the OTLP
//! export and every scrape of `/metrics` alike): queue, batch, KV cache,
//! prefix cache, steps, and how long each model took to load. Read from the counters the
//! model threads publish (atomics), never by asking a model thread.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use torchwire_telemetry::opentelemetry::metrics::Meter;
use torchwire_telemetry::opentelemetry::KeyValue;

use super::metrics::{meter, MODEL};
use super::models::Models;
use crate::engine::Engine;

/// Requests waiting for a batch slot, per model. The name operators (and
/// KEDA's `prometheus` trigger) query, the same as the scaler's JetStream
/// backlog gauge.
pub const QUEUE_LENGTH: &str = "inference_queue_length";
pub const BATCH_RUNNING: &str = "torchwire.batch.running";
pub const BATCH_PREFILLING: &str = "torchwire.batch.prefilling";
pub const KV_SLOTS: &str = "torchwire.kv_cache.slots";
pub const KV_SLOTS_USED: &str = "torchwire.kv_cache.slots.used";
pub const KV_MEMORY: &str = "torchwire.kv_cache.memory";
pub const KV_MEMORY_USED: &str = "torchwire.kv_cache.memory.used";
pub const DECODE_STEPS: &str = "torchwire.decode.steps";
pub const PREFILLS: &str = "torchwire.prefills";
pub const LOAD_DURATION: &str = "torchwire.model.load.duration";
pub const WARMUP_DURATION: &str = "torchwire.model.warmup.duration";
pub const PREFIX_CACHE_HITS: &str = "torchwire.prefix_cache.hits";
pub const PREFIX_CACHE_MISSES: &str = "torchwire.prefix_cache.misses";
pub const PREFIX_CACHE_TOKENS_REUSED: &str = "torchwire.prefix_cache.tokens_reused";
pub const PREFIX_CACHE_EVICTIONS: &str = "torchwire.prefix_cache.evictions";
pub const PREFIX_CACHE_MEMORY: &str = "torchwire.prefix_cache.memory";
pub const PREFIX_CACHE_ENTRIES: &str = "torchwire.prefix_cache.entries";

/// A gauge or counter's description, unit and per-engine reading.
struct Reading {
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    read: fn(&Engine) -> u64,
}

/// Registers every engine gauge. Holds the models weakly: it never keeps a
/// stopped engine alive.
pub fn observe_engines(models: &Arc<Models>) {
    let meter = meter();
    let gauges = [
        Reading {
            name: QUEUE_LENGTH,
            unit: "{request}",
            description: "Requests queued for the model, waiting for a batch slot",
            read: |e| e.waiting() as u64,
        },
        Reading {
            name: BATCH_RUNNING,
            unit: "{request}",
            description: "Sequences in the batch, decoding",
            read: |e| u64::from(e.stats.running.load(Relaxed)),
        },
        Reading {
            name: BATCH_PREFILLING,
            unit: "{request}",
            description: "Requests taken by the model thread that do not decode yet: their prompt is being read or waits its turn",
            read: |e| u64::from(e.stats.prefilling.load(Relaxed)),
        },
        Reading {
            name: KV_SLOTS,
            unit: "{sequence}",
            description: "KV cache slots (sequences the batch may hold)",
            read: |e| e.info.max_batch_size as u64,
        },
        Reading {
            name: KV_SLOTS_USED,
            unit: "{sequence}",
            description: "KV cache slots held by running sequences",
            read: |e| u64::from(e.stats.kv_slots_used.load(Relaxed)),
        },
        Reading {
            name: PREFIX_CACHE_MEMORY,
            unit: "By",
            description: "Bytes of keys and values the prefix cache holds",
            read: |e| e.stats.prefix_bytes.load(Relaxed),
        },
        Reading {
            name: PREFIX_CACHE_ENTRIES,
            unit: "{entry}",
            description: "Finished sequences' prefixes the prefix cache holds",
            read: |e| e.stats.prefix_entries.load(Relaxed),
        },
        Reading {
            name: KV_MEMORY,
            unit: "By",
            description: "Bytes allocated for the KV cache",
            read: |e| e.info.kv_cache_bytes,
        },
        Reading {
            name: KV_MEMORY_USED,
            unit: "By",
            description: "Bytes of the KV cache holding cached tokens",
            read: |e| e.stats.kv_tokens.load(Relaxed) * e.info.kv_bytes_per_token,
        },
    ];
    for gauge in gauges {
        let models = Arc::downgrade(models);
        meter
            .u64_observable_gauge(gauge.name)
            .with_unit(gauge.unit)
            .with_description(gauge.description)
            .with_callback(move |o| {
                for_each_engine(&models, |engine, attrs| {
                    o.observe((gauge.read)(engine), attrs)
                })
            })
            .build();
    }
    let counters = [
        Reading {
            name: DECODE_STEPS,
            unit: "{step}",
            description: "Decode steps run over the batch",
            read: |e| e.stats.decode_steps.load(Relaxed),
        },
        Reading {
            name: PREFILLS,
            unit: "{request}",
            description: "Prompts prefilled",
            read: |e| e.stats.prefills.load(Relaxed),
        },
        Reading {
            name: PREFIX_CACHE_HITS,
            unit: "{request}",
            description: "Prompts that started with a cached prefix",
            read: |e| e.stats.prefix_hits.load(Relaxed),
        },
        Reading {
            name: PREFIX_CACHE_MISSES,
            unit: "{request}",
            description: "Prompts that found no cached prefix (while the cache is on)",
            read: |e| e.stats.prefix_misses.load(Relaxed),
        },
        Reading {
            name: PREFIX_CACHE_TOKENS_REUSED,
            unit: "{token}",
            description: "Prompt tokens copied from the prefix cache instead of being read",
            read: |e| e.stats.prefix_tokens_reused.load(Relaxed),
        },
        Reading {
            name: PREFIX_CACHE_EVICTIONS,
            unit: "{entry}",
            description: "Prefix cache entries dropped to make room",
            read: |e| e.stats.prefix_evictions.load(Relaxed),
        },
    ];
    for counter in counters {
        let models = Arc::downgrade(models);
        meter
            .u64_observable_counter(counter.name)
            .with_unit(counter.unit)
            .with_description(counter.description)
            .with_callback(move |o| {
                for_each_engine(&models, |engine, attrs| {
                    o.observe((counter.read)(engine), attrs)
                })
            })
            .build();
    }
    observe_load_times(&meter, models);
}

/// How long each model took to load and to warm up (also in the
/// `model loaded` log line).
fn observe_load_times(meter: &Meter, models: &Arc<Models>) {
    for (name, description, read) in [
        (
            LOAD_DURATION,
            "Seconds the model took to load: weights, tokenizer, KV cache",
            (|e: &Engine| e.info.load_time.as_secs_f64()) as fn(&Engine) -> f64,
        ),
        (
            WARMUP_DURATION,
            "Seconds the model's warm-up passes took after loading",
            |e: &Engine| e.info.warmup_time.as_secs_f64(),
        ),
    ] {
        let models = Arc::downgrade(models);
        meter
            .f64_observable_gauge(name)
            .with_unit("s")
            .with_description(description)
            .with_callback(move |o| for_each_engine(&models, |e, attrs| o.observe(read(e), attrs)))
            .build();
    }
}

fn for_each_engine(models: &Weak<Models>, mut f: impl FnMut(&Engine, &[KeyValue])) {
    let Some(models) = models.upgrade() else {
        return;
    };
    for engine in models.iter() {
        f(engine, &[KeyValue::new(MODEL, engine.info.name.clone())]);
    }
}
