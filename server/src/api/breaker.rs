//! Takes a replica out of service when its engine keeps failing: after
//! `max_engine_failures` engine-side failures in a row (INTERNAL: a forward
//! pass failed), or at once when a model thread is gone while serving, the
//! breaker trips. The server then stops pulling NATS work, reports
//! NOT_SERVING, drains and exits non-zero, so that Kubernetes restarts it
//! instead of letting it fail every request it takes. Client errors (bad
//! input, load) never count; a request that finishes resets the count.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::sync::watch;

use crate::error::ServerError;

/// Engine-side failures in a row that trip the breaker; 0 = never.
pub struct Breaker {
    limit: u32,
    consecutive: AtomicU32,
    /// Set once shutdown starts: engines stopped on purpose are no fault.
    disarmed: AtomicBool,
    /// Why the breaker tripped, once it has.
    tripped: watch::Sender<Option<String>>,
}

impl Breaker {
    /// A breaker that trips after `limit` failures in a row (0: never).
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            consecutive: AtomicU32::new(0),
            disarmed: AtomicBool::new(false),
            tripped: watch::Sender::new(None),
        }
    }

    /// A request finished normally: the engine works.
    pub fn success(&self) {
        self.consecutive.store(0, Ordering::SeqCst);
    }

    /// A request failed with `err`; only engine-side errors count.
    pub fn failure(&self, err: &ServerError) {
        if self.limit == 0 || self.disarmed.load(Ordering::SeqCst) {
            return;
        }
        match err {
            ServerError::Compute { .. } => {
                let n = self.consecutive.fetch_add(1, Ordering::SeqCst) + 1;
                if n >= self.limit {
                    self.trip(format!(
                        "{n} engine failures in a row (max_engine_failures = {}), the last: {err}",
                        self.limit
                    ));
                }
            }
            ServerError::EngineStopped(_) => self.trip(format!("{err} (the model thread is gone)")),
            _ => {}
        }
    }

    /// From now on nothing trips the breaker (shutdown stops the engines).
    pub fn disarm(&self) {
        self.disarmed.store(true, Ordering::SeqCst);
    }

    /// Whether the breaker has tripped.
    pub fn is_tripped(&self) -> bool {
        self.tripped.borrow().is_some()
    }

    /// Resolves with the reason once the breaker trips.
    pub async fn tripped(&self) -> String {
        let mut rx = self.tripped.subscribe();
        // The sender lives in self, so wait_for only ends when it is set.
        let reason = rx
            .wait_for(Option::is_some)
            .await
            .map(|r| r.clone().unwrap_or_default());
        match reason {
            Ok(reason) => reason,
            Err(_) => std::future::pending().await,
        }
    }

    fn trip(&self, reason: String) {
        self.tripped.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            tracing::error!(reason = %reason, "the engine keeps failing: taking this replica out of service");
            *state = Some(reason);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compute() -> ServerError {
        ServerError::Compute {
            model: "m".into(),
            message: "out of memory".into(),
        }
    }

    #[test]
    fn only_consecutive_engine_failures_trip() {
        let b = Breaker::new(3);
        b.failure(&compute());
        b.failure(&compute());
        b.success();
        b.failure(&compute());
        b.failure(&ServerError::invalid("prompt", "must not be empty"));
        b.failure(&compute());
        assert!(!b.is_tripped());
        b.failure(&compute());
        assert!(b.is_tripped());
    }

    #[test]
    fn a_dead_engine_trips_at_once_unless_shutting_down() {
        let b = Breaker::new(3);
        b.disarm();
        b.failure(&ServerError::EngineStopped("m".into()));
        assert!(!b.is_tripped());
        let b = Breaker::new(3);
        b.failure(&ServerError::EngineStopped("m".into()));
        assert!(b.is_tripped());
        let never = Breaker::new(0);
        for _ in 0..10 {
            never.failure(&compute());
        }
        assert!(!never.is_tripped());
    }

    #[tokio::test]
    async fn tripped_resolves_with_the_reason() {
        let b = std::sync::Arc::new(Breaker::new(1));
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.tripped().await }
        });
        b.failure(&compute());
        let reason = waiter.await.unwrap();
        assert!(reason.contains("out of memory"), "{reason}");
    }
}
