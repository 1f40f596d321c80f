//! Reading a consumer's backlog from JetStream, cached: one watcher task per
//! (NATS URL, stream, consumer) asks for the consumer info at a bounded rate
//! and publishes each reading on a `watch` channel that every caller and every
//! StreamIsActive subscriber shares. Watchers nobody used for a while stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::connections::Connections;
use crate::error::{Cause, ScalerError};

/// Longest pause between connection attempts to an unreachable server.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// A consumer's message counts, as JetStream reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests not delivered to any server yet (`num_pending`).
    pub pending: u64,
    /// Requests delivered and not acknowledged yet: being generated (`num_ack_pending`).
    pub in_flight: u64,
    /// Pull requests servers have waiting for work (`num_waiting`).
    pub waiting: u64,
    /// Requests delivered more than once (`num_redelivered`).
    pub redelivered: u64,
}

/// Which consumer to watch, on which server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchKey {
    /// NATS URL.
    pub url: String,
    /// JetStream stream.
    pub stream: String,
    /// Durable consumer on the stream.
    pub consumer: String,
}

/// How watchers refresh and when they stop.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// Time between two consumer-info requests of one watcher.
    pub refresh_interval: Duration,
    /// Without a successful reading for this long, callers get UNAVAILABLE.
    pub stale_after: Duration,
    /// A watcher with no subscriber and no caller for this long stops.
    pub idle_timeout: Duration,
}

/// The outcome of one consumer-info request.
#[derive(Debug, Clone)]
enum Reading {
    Counts(Counts),
    StreamNotFound,
    ConsumerNotFound,
    Failed(Cause),
}

/// What a watcher knows: its latest reading and its latest good one.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    latest: Option<(Reading, Instant)>,
    last_ok: Option<(Counts, Instant)>,
}

impl Snapshot {
    /// The counts to report, or why there are none; `None` before the first reading.
    fn evaluate(
        &self,
        key: &WatchKey,
        stale_after: Duration,
    ) -> Option<Result<Counts, ScalerError>> {
        let (latest, at) = self.latest.as_ref()?;
        let fresh = at.elapsed() <= stale_after;
        Some(match latest {
            Reading::Counts(counts) if fresh => Ok(*counts),
            Reading::StreamNotFound if fresh => Err(ScalerError::StreamNotFound {
                url: key.url.clone(),
                stream: key.stream.clone(),
            }),
            Reading::ConsumerNotFound if fresh => Err(ScalerError::ConsumerNotFound {
                url: key.url.clone(),
                stream: key.stream.clone(),
                consumer: key.consumer.clone(),
            }),
            // A failed or overdue request: the last good reading stands in
            // until it is older than the limit.
            _ => match self.last_ok {
                Some((counts, ok_at)) if ok_at.elapsed() <= stale_after => Ok(counts),
                _ => Err(ScalerError::Unavailable {
                    url: key.url.clone(),
                    stale_for: self
                        .last_ok
                        .map_or(at.elapsed(), |(_, ok_at)| ok_at.elapsed()),
                    limit: stale_after,
                    cause: match latest {
                        Reading::Failed(cause) => Some(cause.clone()),
                        _ => None,
                    },
                }),
            },
        })
    }

    /// Records a reading; true when callers should look again (the answer changed).
    fn record(&mut self, reading: Reading, now: Instant) -> bool {
        let changed = match (&self.latest, &reading) {
            (Some((Reading::Counts(a), _)), Reading::Counts(b)) => a != b,
            (Some((Reading::StreamNotFound, _)), Reading::StreamNotFound) => false,
            (Some((Reading::ConsumerNotFound, _)), Reading::ConsumerNotFound) => false,
            (Some((Reading::Failed(_), _)), Reading::Failed(_)) => false,
            _ => true,
        };
        if let Reading::Counts(counts) = &reading {
            self.last_ok = Some((*counts, now));
        }
        self.latest = Some((reading, now));
        changed
    }
}

/// The registry of watchers, shared by every gRPC call.
#[derive(Clone)]
pub struct Watchers(Arc<Inner>);

struct Inner {
    connections: Connections,
    settings: WatchSettings,
    entries: Mutex<HashMap<WatchKey, Entry>>,
}

struct Entry {
    rx: watch::Receiver<Snapshot>,
    last_used: Instant,
}

impl Watchers {
    /// No watchers yet; they start on first use.
    pub fn new(connections: Connections, settings: WatchSettings) -> Self {
        Self(Arc::new(Inner {
            connections,
            settings,
            entries: Mutex::new(HashMap::new()),
        }))
    }

    /// A handle on `key`'s readings, starting its watcher if there is none.
    pub fn subscribe(&self, key: &WatchKey) -> Subscription {
        let mut entries = self.0.entries.lock().expect("watchers lock");
        let entry = entries.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = watch::channel(Snapshot::default());
            tokio::spawn(run_watcher(self.0.clone(), key.clone(), tx));
            tracing::debug!(url = %key.url, stream = %key.stream, consumer = %key.consumer, "watcher started");
            Entry { rx, last_used: Instant::now() }
        });
        entry.last_used = Instant::now();
        Subscription {
            key: key.clone(),
            rx: entry.rx.clone(),
            stale_after: self.0.settings.stale_after,
        }
    }

    /// The current counts for `key` (waits for the first reading of a new watcher).
    pub async fn counts(&self, key: &WatchKey) -> Result<Counts, ScalerError> {
        self.subscribe(key).current().await
    }

    /// The latest good counts of every watcher on NATS server `url`, by
    /// stream and consumer; watchers without a reading within the
    /// staleness limit are left out (unknown is not zero).
    pub fn latest_counts(&self, url: &str) -> Vec<(WatchKey, Counts)> {
        let stale_after = self.0.settings.stale_after;
        let entries = self.0.entries.lock().expect("watchers lock");
        entries
            .iter()
            .filter(|(key, _)| key.url == url)
            .filter_map(
                |(key, entry)| match entry.rx.borrow().evaluate(key, stale_after) {
                    Some(Ok(counts)) => Some((key.clone(), counts)),
                    _ => None,
                },
            )
            .collect()
    }

    /// Number of running watchers.
    pub fn len(&self) -> usize {
        self.0.entries.lock().expect("watchers lock").len()
    }

    /// Whether no watcher runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One caller's view of a watcher.
pub struct Subscription {
    key: WatchKey,
    rx: watch::Receiver<Snapshot>,
    stale_after: Duration,
}

impl Subscription {
    /// The counts now; waits (up to the staleness limit) for a new watcher's first reading.
    pub async fn current(&mut self) -> Result<Counts, ScalerError> {
        let waited =
            tokio::time::timeout(self.stale_after, self.rx.wait_for(|s| s.latest.is_some())).await;
        match waited {
            Ok(Ok(snapshot)) => snapshot
                .evaluate(&self.key, self.stale_after)
                .expect("a reading exists"),
            Ok(Err(_)) | Err(_) => Err(ScalerError::Unavailable {
                url: self.key.url.clone(),
                stale_for: self.stale_after,
                limit: self.stale_after,
                cause: None,
            }),
        }
    }

    /// The counts as of the latest reading, without waiting.
    pub fn latest(&self) -> Option<Result<Counts, ScalerError>> {
        self.rx.borrow().evaluate(&self.key, self.stale_after)
    }

    /// Waits until the reading changes; false once the watcher is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// A watcher's channel fed by hand, for tests of what reads it.
#[cfg(test)]
pub(crate) struct TestFeed(watch::Sender<Snapshot>);

#[cfg(test)]
impl TestFeed {
    /// Records a good reading, as the watcher does.
    pub(crate) fn record_counts(&self, counts: Counts) {
        self.0
            .send_if_modified(|s| s.record(Reading::Counts(counts), Instant::now()));
    }
}

/// A subscription to readings the test records through the feed.
#[cfg(test)]
pub(crate) fn test_feed(stale_after: Duration) -> (TestFeed, Subscription) {
    let (tx, rx) = watch::channel(Snapshot::default());
    let key = WatchKey {
        url: "nats://test:4222".into(),
        stream: "S".into(),
        consumer: "C".into(),
    };
    (
        TestFeed(tx),
        Subscription {
            key,
            rx,
            stale_after,
        },
    )
}

async fn run_watcher(inner: Arc<Inner>, key: WatchKey, tx: watch::Sender<Snapshot>) {
    let settings = inner.settings;
    // Each request may take up to half the staleness limit, so that a hung
    // request turns into an error before callers are told NATS is gone.
    let request_timeout =
        (settings.stale_after / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut ticker = tokio::time::interval(settings.refresh_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut connect_failures: u32 = 0;
    loop {
        ticker.tick().await;
        if retire_if_idle(&inner, &key, &tx) {
            tracing::debug!(url = %key.url, stream = %key.stream, consumer = %key.consumer, "idle watcher stopped");
            return;
        }
        let reading = match inner.connections.get(&key.url).await {
            Ok(client) => {
                connect_failures = 0;
                read_consumer(client, &key, request_timeout).await
            }
            Err(err) => {
                connect_failures = connect_failures.saturating_add(1);
                tracing::warn!(url = %key.url, error = %err, "cannot connect to NATS");
                Reading::Failed(Arc::new(err))
            }
        };
        if let Reading::Failed(cause) = &reading {
            tracing::debug!(url = %key.url, stream = %key.stream, consumer = %key.consumer, error = %cause, "backlog reading failed");
        }
        tx.send_if_modified(|snapshot| snapshot.record(reading, Instant::now()));
        if connect_failures > 0 {
            let backoff = settings
                .refresh_interval
                .saturating_mul(1 << connect_failures.min(8));
            tokio::time::sleep(backoff.min(MAX_CONNECT_BACKOFF)).await;
        }
    }
}

/// Removes the watcher from the registry when it has no subscriber besides
/// the registry and no caller within the idle timeout. Runs under the registry
/// lock, which `subscribe` also takes, so a new caller cannot slip in between.
fn retire_if_idle(inner: &Inner, key: &WatchKey, tx: &watch::Sender<Snapshot>) -> bool {
    let mut entries = inner.entries.lock().expect("watchers lock");
    let idle = match entries.get(key) {
        Some(entry) => {
            tx.receiver_count() <= 1 && entry.last_used.elapsed() >= inner.settings.idle_timeout
        }
        None => true,
    };
    if idle {
        entries.remove(key);
    }
    idle
}

async fn read_consumer(client: async_nats::Client, key: &WatchKey, timeout: Duration) -> Reading {
    if client.connection_state() != State::Connected {
        return Reading::Failed(Arc::new(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "disconnected from NATS, reconnecting",
        )));
    }
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(timeout);
    let stream = match js.get_stream_no_info(&key.stream).await {
        Ok(stream) => stream,
        Err(err) => return Reading::Failed(Arc::new(err)),
    };
    // Answered by the consumer's leader in a cluster, so the counts are current.
    match stream.consumer_info(&key.consumer).await {
        Ok(info) => Reading::Counts(Counts {
            pending: info.num_pending,
            in_flight: info.num_ack_pending as u64,
            waiting: info.num_waiting as u64,
            redelivered: info.num_redelivered as u64,
        }),
        Err(err) => match err.kind() {
            ConsumerInfoErrorKind::StreamNotFound => Reading::StreamNotFound,
            ConsumerInfoErrorKind::NotFound => Reading::ConsumerNotFound,
            _ => Reading::Failed(Arc::new(err)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> WatchKey {
        WatchKey {
            url: "nats://x:4222".into(),
            stream: "S".into(),
            consumer: "C".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_reading_until_it_is_stale() {
        let limit = Duration::from_secs(10);
        let mut s = Snapshot::default();
        assert!(s.evaluate(&key(), limit).is_none());
        let counts = Counts {
            pending: 3,
            ..Default::default()
        };
        assert!(s.record(Reading::Counts(counts), Instant::now()));
        assert_eq!(s.evaluate(&key(), limit).unwrap().unwrap(), counts);
        assert!(
            !s.record(Reading::Counts(counts), Instant::now()),
            "same counts are no change"
        );

        tokio::time::advance(Duration::from_secs(5)).await;
        let cause: Cause = Arc::new(std::io::Error::other("connection refused"));
        assert!(s.record(Reading::Failed(cause.clone()), Instant::now()));
        assert_eq!(
            s.evaluate(&key(), limit).unwrap().unwrap(),
            counts,
            "within the limit"
        );

        tokio::time::advance(Duration::from_secs(6)).await;
        s.record(Reading::Failed(cause), Instant::now());
        let err = s.evaluate(&key(), limit).unwrap().unwrap_err();
        assert!(matches!(err, ScalerError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("connection refused"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_overdue_reading_is_unavailable_not_zero() {
        let limit = Duration::from_secs(1);
        let mut s = Snapshot::default();
        s.record(Reading::Counts(Counts::default()), Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(
            s.evaluate(&key(), limit).unwrap(),
            Err(ScalerError::Unavailable { .. })
        ));
    }

    #[tokio::test]
    async fn unreachable_nats_is_unavailable_and_idle_watchers_stop() {
        // Port 1 refuses connections at once.
        let url = "nats://127.0.0.1:1";
        let connections = Connections::new(torchwire_nats::NatsConfig::default());
        let settings = WatchSettings {
            refresh_interval: Duration::from_millis(10),
            stale_after: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(100),
        };
        let watchers = Watchers::new(connections, settings);
        let key = WatchKey {
            url: url.into(),
            ..key()
        };
        let err = watchers.counts(&key).await.unwrap_err();
        assert!(
            matches!(err, ScalerError::Unavailable { cause: Some(_), .. }),
            "{err}"
        );
        assert!(err.to_string().contains(url), "{err}");
        assert_eq!(watchers.len(), 1, "one watcher per consumer");

        // A subscriber keeps the watcher alive past the idle timeout ...
        let subscription = watchers.subscribe(&key);
        tokio::time::sleep(settings.idle_timeout * 3).await;
        assert_eq!(watchers.len(), 1);
        // ... and once nobody watches or asks, it stops (after its connect backoff).
        drop(subscription);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !watchers.is_empty() {
            assert!(Instant::now() < deadline, "idle watcher still running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn missing_stream_and_consumer_are_reported_as_such() {
        let limit = Duration::from_secs(10);
        let mut s = Snapshot::default();
        s.record(Reading::StreamNotFound, Instant::now());
        assert!(matches!(
            s.evaluate(&key(), limit).unwrap(),
            Err(ScalerError::StreamNotFound { .. })
        ));
        assert!(s.record(Reading::ConsumerNotFound, Instant::now()));
        assert!(matches!(
            s.evaluate(&key(), limit).unwrap(),
            Err(ScalerError::ConsumerNotFound { .. })
        ));
    }
}
