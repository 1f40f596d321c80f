//! Creating (or checking) the JetStream work queue: a `WorkQueue`-retention
//! stream on the request subject and one durable pull consumer that every
//! server pulls from, with explicit acks.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::context::{
    ConsumerInfoErrorKind, Context, GetStreamError, GetStreamErrorKind,
};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy};
use async_nats::jetstream::ErrorCode;

use crate::{Discard, NatsConfig, NatsError};

/// Gets or creates the work-queue stream and its durable pull consumer as
/// `config` describes them. An existing stream must have work-queue retention
/// and cover `config.subject`; an existing consumer must be a pull consumer
/// with explicit acks (its ack wait and max deliveries are updated to match).
pub async fn ensure_work_queue(
    js: &Context,
    config: &NatsConfig,
) -> Result<PullConsumer, NatsError> {
    let stream = ensure_stream(js, config).await?;
    ensure_consumer(&stream, config).await
}

async fn ensure_stream(js: &Context, config: &NatsConfig) -> Result<stream::Stream, NatsError> {
    let what = || format!("stream {}", config.stream);
    match js.get_stream(&config.stream).await {
        Ok(stream) => {
            let existing = &stream.cached_info().config;
            if existing.retention != RetentionPolicy::WorkQueue {
                return Err(NatsError::Incompatible {
                    what: what(),
                    reason: format!("its retention is {:?}, not WorkQueue", existing.retention),
                });
            }
            if !existing
                .subjects
                .iter()
                .any(|pattern| subject_matches(pattern, &config.subject))
            {
                return Err(NatsError::Incompatible {
                    what: what(),
                    reason: format!(
                        "its subjects {:?} do not include {}",
                        existing.subjects, config.subject
                    ),
                });
            }
            let wanted = stream_config(config);
            let limits = |c: &stream::Config| (c.max_messages, c.max_bytes, c.max_age, c.discard);
            if limits(existing) != limits(&wanted) {
                // The stream belongs to whoever created it: say so, change nothing.
                tracing::warn!(stream = %config.stream, existing = ?limits(existing), configured = ?limits(&wanted),
                    "the existing stream's limits (max_msgs, max_bytes, max_age, discard) differ from the config; keeping them");
            }
            Ok(stream)
        }
        Err(err) if is_stream_not_found(&err) => {
            tracing::info!(stream = %config.stream, subject = %config.subject, max_msgs = config.max_msgs,
                max_bytes = config.max_bytes, max_age_secs = config.max_age_secs, discard = ?config.discard,
                "creating work-queue stream");
            js.create_stream(stream_config(config))
                .await
                .map_err(|e| NatsError::jetstream(format!("create {}", what()), e))
        }
        Err(err) => Err(NatsError::jetstream(format!("get {}", what()), err)),
    }
}

/// The stream a new work queue gets: work-queue retention on the request
/// subject, with the configured limits (0 = none, which JetStream spells -1).
pub fn stream_config(config: &NatsConfig) -> stream::Config {
    let limit = |v: i64| if v > 0 { v } else { -1 };
    stream::Config {
        name: config.stream.clone(),
        subjects: vec![config.subject.clone()],
        retention: RetentionPolicy::WorkQueue,
        max_messages: limit(config.max_msgs),
        max_bytes: limit(config.max_bytes),
        max_age: Duration::from_secs(config.max_age_secs),
        discard: match config.discard {
            Discard::New => DiscardPolicy::New,
            Discard::Old => DiscardPolicy::Old,
        },
        ..Default::default()
    }
}

async fn ensure_consumer(
    stream: &stream::Stream,
    config: &NatsConfig,
) -> Result<PullConsumer, NatsError> {
    let what = || format!("consumer {} on stream {}", config.consumer, config.stream);
    let wanted = pull::Config {
        durable_name: Some(config.consumer.clone()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait(),
        max_deliver: config.max_deliver,
        filter_subject: config.subject.clone(),
        ..Default::default()
    };
    match stream.consumer_info(&config.consumer).await {
        Ok(info) => {
            let existing = &info.config;
            if let Some(deliver) = &existing.deliver_subject {
                return Err(NatsError::Incompatible {
                    what: what(),
                    reason: format!(
                        "it is a push consumer (delivers to {deliver}), not a pull consumer"
                    ),
                });
            }
            if existing.ack_policy != AckPolicy::Explicit {
                return Err(NatsError::Incompatible {
                    what: what(),
                    reason: format!("its ack policy is {:?}, not Explicit", existing.ack_policy),
                });
            }
            let filters: Vec<&String> = std::iter::once(&existing.filter_subject)
                .chain(&existing.filter_subjects)
                .filter(|s| !s.is_empty())
                .collect();
            if !filters.is_empty() && !filters.iter().any(|f| subject_matches(f, &config.subject)) {
                return Err(NatsError::Incompatible {
                    what: what(),
                    reason: format!("it filters {filters:?}, which excludes {}", config.subject),
                });
            }
            if existing.ack_wait != wanted.ack_wait || existing.max_deliver != wanted.max_deliver {
                tracing::info!(consumer = %config.consumer, ack_wait_secs = config.ack_wait_secs,
                    max_deliver = config.max_deliver, "updating work-queue consumer");
                let update = pull::Config {
                    filter_subject: existing.filter_subject.clone(),
                    filter_subjects: existing.filter_subjects.clone(),
                    ..wanted
                };
                stream
                    .update_consumer(update)
                    .await
                    .map_err(|e| NatsError::jetstream(format!("update {}", what()), e))?;
            }
            stream
                .get_consumer(&config.consumer)
                .await
                .map_err(|e| NatsError::jetstream(format!("get {}", what()), e))
        }
        Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => {
            tracing::info!(consumer = %config.consumer, stream = %config.stream, "creating work-queue consumer");
            stream
                .create_consumer(wanted)
                .await
                .map_err(|e| NatsError::jetstream(format!("create {}", what()), e))
        }
        Err(err) => Err(NatsError::jetstream(format!("get {}", what()), err)),
    }
}

fn is_stream_not_found(err: &GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Whether the subject `pattern` (with `*` and `>` wildcards) matches the
/// literal `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut subject = subject.split('.');
    loop {
        match (pattern.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("torchwire.generate", "torchwire.generate"));
        assert!(subject_matches("torchwire.*", "torchwire.generate"));
        assert!(subject_matches("torchwire.>", "torchwire.generate"));
        assert!(subject_matches(">", "torchwire.generate"));
        assert!(!subject_matches("torchwire.*", "torchwire.generate.x"));
        assert!(subject_matches("torchwire.>", "torchwire.generate.x"));
        assert!(!subject_matches("torchwire.>", "torchwire"));
        assert!(!subject_matches(
            "torchwire.generate",
            "torchwire.generated"
        ));
        assert!(!subject_matches(
            "torchwire.generate.x",
            "torchwire.generate"
        ));
    }
}
