//! The ScaledObject trigger's `metadata`, as KEDA passes it in
//! `ScaledObjectRef.scalerMetadata`, parsed and checked. Unknown keys are
//! errors so that a typo does not silently scale on defaults.

use std::collections::HashMap;

use crate::error::ScalerError;

/// Keys KEDA itself reads from the same metadata map (scaler address and
/// TLS to this scaler); they arrive here too and are ignored.
const KEDA_KEYS: &[&str] = &[
    "scalerAddress",
    "enableTLS",
    "unsafeSsl",
    "tlsCertFile",
    "caCert",
    "tlsClientCert",
    "tlsClientKey",
];

/// Default backlog one replica should hold.
pub const DEFAULT_TARGET_PER_REPLICA: f64 = 4.0;

/// One trigger's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// JetStream stream of the work queue (`stream`).
    pub stream: String,
    /// Durable consumer whose backlog is measured (`consumer`).
    pub consumer: String,
    /// Backlog one replica should hold (`targetPerReplica`, > 0).
    pub target_per_replica: f64,
    /// The deployment is active while backlog > this (`activationThreshold`, >= 0).
    pub activation_threshold: f64,
    /// Count delivered-but-unacked requests as backlog (`includeInFlight`).
    pub include_in_flight: bool,
    /// NATS server to ask (`natsUrl`); the scaler's own unless overridden.
    pub nats_url: String,
}

/// What the scaler falls back to for keys a trigger leaves out.
#[derive(Debug, Clone)]
pub struct TriggerDefaults {
    /// The scaler's `nats.stream`.
    pub stream: String,
    /// The scaler's `nats.consumer`.
    pub consumer: String,
    /// The scaler's `nats.url`.
    pub nats_url: String,
    /// URLs a trigger may name in `natsUrl` besides `nats_url`: the scaler
    /// sends its NATS credentials there, so they must be trusted servers.
    pub allowed_nats_urls: Vec<String>,
}

impl Trigger {
    /// Parses and checks `metadata`; errors name the offending key.
    pub fn parse(
        metadata: &HashMap<String, String>,
        defaults: &TriggerDefaults,
    ) -> Result<Self, ScalerError> {
        let mut trigger = Trigger {
            stream: defaults.stream.clone(),
            consumer: defaults.consumer.clone(),
            target_per_replica: DEFAULT_TARGET_PER_REPLICA,
            activation_threshold: 0.0,
            include_in_flight: true,
            nats_url: defaults.nats_url.clone(),
        };
        // Sorted, so that with several bad keys the error is deterministic.
        let mut entries: Vec<(&String, &String)> = metadata.iter().collect();
        entries.sort();
        for (key, raw) in entries {
            let value = raw.trim();
            match key.as_str() {
                "stream" => trigger.stream = name(key, value)?,
                "consumer" => trigger.consumer = name(key, value)?,
                "targetPerReplica" => {
                    trigger.target_per_replica = number(key, value)?;
                    if trigger.target_per_replica <= 0.0 {
                        return Err(ScalerError::metadata(key, format!("must be > 0, got {value}")));
                    }
                }
                "activationThreshold" => {
                    trigger.activation_threshold = number(key, value)?;
                    if trigger.activation_threshold < 0.0 {
                        return Err(ScalerError::metadata(key, format!("must be >= 0, got {value}")));
                    }
                }
                "includeInFlight" => {
                    trigger.include_in_flight = match value.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(ScalerError::metadata(key, format!("must be true or false, got {raw:?}"))),
                    }
                }
                "natsUrl" => trigger.nats_url = nats_url(key, value, defaults)?,
                k if KEDA_KEYS.contains(&k) => {}
                _ => {
                    return Err(ScalerError::metadata(
                        key,
                        "unknown key (expected stream, consumer, targetPerReplica, activationThreshold, includeInFlight, natsUrl)",
                    ))
                }
            }
        }
        Ok(trigger)
    }

    /// The backlog this trigger scales on.
    pub fn backlog(&self, counts: &crate::backlog::Counts) -> u64 {
        if self.include_in_flight {
            counts.pending + counts.in_flight
        } else {
            counts.pending
        }
    }

    /// Whether the deployment should have at least one replica.
    pub fn is_active(&self, counts: &crate::backlog::Counts) -> bool {
        self.backlog(counts) as f64 > self.activation_threshold
    }
}

fn name(key: &str, value: &str) -> Result<String, ScalerError> {
    if value.is_empty() {
        return Err(ScalerError::metadata(key, "is empty"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(ScalerError::metadata(
            key,
            format!("{value:?} contains {c:?}, which NATS names may not"),
        ));
    }
    Ok(value.to_string())
}

fn number(key: &str, value: &str) -> Result<f64, ScalerError> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(ScalerError::metadata(
            key,
            format!("{value:?} is not a number"),
        )),
    }
}

fn nats_url(key: &str, value: &str, defaults: &TriggerDefaults) -> Result<String, ScalerError> {
    if value == defaults.nats_url || defaults.allowed_nats_urls.iter().any(|u| u == value) {
        return Ok(value.to_string());
    }
    Err(ScalerError::metadata(
        key,
        format!("{value:?} is not this scaler's NATS URL nor in its allowed_nats_urls (it would receive the scaler's credentials)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backlog::Counts;

    fn defaults() -> TriggerDefaults {
        TriggerDefaults {
            stream: "TORCHWIRE".into(),
            consumer: "torchwire-server".into(),
            nats_url: "nats://nats:4222".into(),
            allowed_nats_urls: vec!["nats://other:4222".into()],
        }
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<Trigger, ScalerError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Trigger::parse(&map, &defaults())
    }

    fn bad_key(pairs: &[(&str, &str)]) -> String {
        match parse(pairs).unwrap_err() {
            ScalerError::InvalidMetadata { key, .. } => key,
            other => panic!("expected invalid metadata, got {other}"),
        }
    }

    #[test]
    fn defaults_apply_and_keda_keys_are_ignored() {
        let t = parse(&[("scalerAddress", "scaler:50052"), ("enableTLS", "true")]).unwrap();
        assert_eq!(t.stream, "TORCHWIRE");
        assert_eq!(t.consumer, "torchwire-server");
        assert_eq!(t.target_per_replica, DEFAULT_TARGET_PER_REPLICA);
        assert_eq!(t.activation_threshold, 0.0);
        assert!(t.include_in_flight);
        assert_eq!(t.nats_url, "nats://nats:4222");
    }

    #[test]
    fn values_parse() {
        let t = parse(&[
            ("stream", "JOBS"),
            ("consumer", "workers"),
            ("targetPerReplica", "2.5"),
            ("activationThreshold", " 3 "),
            ("includeInFlight", "False"),
            ("natsUrl", "nats://other:4222"),
        ])
        .unwrap();
        assert_eq!(
            (t.stream.as_str(), t.consumer.as_str()),
            ("JOBS", "workers")
        );
        assert_eq!((t.target_per_replica, t.activation_threshold), (2.5, 3.0));
        assert!(!t.include_in_flight);
        assert_eq!(t.nats_url, "nats://other:4222");
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(bad_key(&[("targetPerReplica", "0")]), "targetPerReplica");
        assert_eq!(bad_key(&[("targetPerReplica", "lots")]), "targetPerReplica");
        assert_eq!(bad_key(&[("targetPerReplica", "NaN")]), "targetPerReplica");
        assert_eq!(
            bad_key(&[("activationThreshold", "-1")]),
            "activationThreshold"
        );
        assert_eq!(bad_key(&[("includeInFlight", "yes")]), "includeInFlight");
        assert_eq!(bad_key(&[("stream", "a.b")]), "stream");
        assert_eq!(bad_key(&[("consumer", "")]), "consumer");
        assert_eq!(bad_key(&[("natsUrl", "nats://evil:4222")]), "natsUrl");
        assert_eq!(bad_key(&[("targetPerReplca", "4")]), "targetPerReplca");
    }

    #[test]
    fn backlog_and_activation_follow_the_settings() {
        let counts = Counts {
            pending: 3,
            in_flight: 2,
            ..Default::default()
        };
        let t = parse(&[]).unwrap();
        assert_eq!(t.backlog(&counts), 5);
        assert!(t.is_active(&counts));
        let t = parse(&[("includeInFlight", "false"), ("activationThreshold", "3")]).unwrap();
        assert_eq!(t.backlog(&counts), 3);
        assert!(!t.is_active(&counts));
        assert!(!parse(&[]).unwrap().is_active(&Counts::default()));
    }

    mod fuzz {
        //! KEDA's trigger metadata as a broken or hostile ScaledObject
        //! could set it: a trigger within its bounds, or INVALID_ARGUMENT
        //! naming the key, never a panic. `scripts/fuzz.sh` runs these with
        //! many more cases.

        use super::*;
        use proptest::prelude::*;
        use tonic::{Code, Status};

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::sample::select(
                    &[
                        "stream",
                        "consumer",
                        "targetPerReplica",
                        "activationThreshold",
                        "includeInFlight",
                        "natsUrl",
                        "scalerAddress",
                        "enableTLS",
                        "targetPerReplca",
                    ][..]
                )
                .prop_map(String::from),
                "\\PC{0,16}",
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                "\\PC{0,24}",
                any::<f64>().prop_map(|v| v.to_string()),
                any::<i64>().prop_map(|v| format!(" {v} ")),
                proptest::sample::select(
                    &[
                        "true",
                        "FALSE",
                        "yes",
                        "NaN",
                        "inf",
                        "-inf",
                        "1e309",
                        "-0",
                        "0",
                        "nats://nats:4222",
                        "nats://other:4222",
                        "nats://evil:4222",
                        "a.b",
                        "a b",
                        "",
                    ][..]
                )
                .prop_map(String::from),
            ]
        }

        proptest! {
            #[test]
            fn any_metadata_parses_or_names_its_key(
                metadata in proptest::collection::hash_map(key(), value(), 0..8)
            ) {
                match Trigger::parse(&metadata, &defaults()) {
                    Ok(t) => {
                        prop_assert!(t.target_per_replica.is_finite() && t.target_per_replica > 0.0);
                        prop_assert!(t.activation_threshold.is_finite() && t.activation_threshold >= 0.0);
                        prop_assert!(!t.stream.is_empty() && !t.consumer.is_empty());
                        let d = defaults();
                        prop_assert!(t.nats_url == d.nats_url || d.allowed_nats_urls.contains(&t.nats_url));
                    }
                    Err(err) => {
                        let ScalerError::InvalidMetadata { key, message } = &err else {
                            return Err(TestCaseError::fail(format!("not invalid metadata: {err}")));
                        };
                        prop_assert!(metadata.contains_key(key), "{err}");
                        prop_assert!(!message.is_empty());
                        let prefix = format!("scalerMetadata.{key}: ");
                        let status = Status::from(err);
                        prop_assert_eq!(status.code(), Code::InvalidArgument);
                        prop_assert!(status.message().starts_with(&prefix), "{}", status.message());
                    }
                }
            }
        }
    }
}
