//! Session instruments: how long the bucket takes to read and write a
//! conversation, and how writes end (a rising `conflict` count means clients
//! send turns of one session concurrently).

use std::sync::OnceLock;
use std::time::Instant;

use torchwire_telemetry::opentelemetry::metrics::{Counter, Histogram};
use torchwire_telemetry::opentelemetry::{global, KeyValue};

use crate::error::ServerError;

/// Histogram of key-value operations, in seconds, by `torchwire.session.operation`.
pub const DURATION: &str = "torchwire.session.duration";
/// Counter of session writes by `torchwire.session.outcome`.
pub const WRITES: &str = "torchwire.session.writes";

struct Instruments {
    duration: Histogram<f64>,
    writes: Counter<u64>,
}

fn instruments() -> &'static Instruments {
    static ALL: OnceLock<Instruments> = OnceLock::new();
    ALL.get_or_init(|| {
        let meter = global::meter("torchwire-server");
        Instruments {
            duration: meter
                .f64_histogram(DURATION)
                .with_unit("s")
                .with_description("Session store operations (load, store, delete)")
                .with_boundaries(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                ])
                .build(),
            writes: meter
                .u64_counter(WRITES)
                .with_unit("{write}")
                .with_description(
                    "Session writes by outcome: stored, conflict (another turn won), failed",
                )
                .build(),
        }
    })
}

/// Records one store operation that started at `start`.
pub fn operation(name: &'static str, start: Instant) {
    instruments().duration.record(
        start.elapsed().as_secs_f64(),
        &[KeyValue::new("torchwire.session.operation", name)],
    );
}

/// Records how a write ended.
pub fn write<T>(result: &Result<T, ServerError>) {
    let outcome = match result {
        Ok(_) => "stored",
        Err(ServerError::SessionConflict(_)) => "conflict",
        Err(_) => "failed",
    };
    instruments()
        .writes
        .add(1, &[KeyValue::new("torchwire.session.outcome", outcome)]);
}
