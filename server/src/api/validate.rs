//! Checks a GenerateRequest against the model's limits and turns it into a
//! job. Every error names the request field at fault.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::{mpsc, Semaphore};
use torchwire_proto::v1::GenerateRequest;

use crate::engine::request::{Event, Job};
use crate::engine::sampler::SamplingParams;
use crate::engine::ModelInfo;
use crate::error::ServerError;

pub const MAX_LOGPROBS: u32 = 20;
pub const MAX_STOP_SEQUENCES: usize = 8;
pub const MAX_STOP_BYTES: usize = 128;
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Collects every bad field of a request, so that the caller learns of
/// all of them at once (one `google.rpc.BadRequest` field violation each).
#[derive(Debug, Default)]
pub struct Violations(Vec<(&'static str, String)>);

impl Violations {
    /// Records that `field` is bad.
    pub fn add(&mut self, field: &'static str, message: impl Into<String>) {
        self.0.push((field, message.into()));
    }

    /// Records the error of a check that returns one.
    pub fn check<T>(&mut self, result: Result<T, ServerError>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(ServerError::InvalidArgument { field, message }) => {
                self.add(field, message);
                None
            }
            Err(ServerError::InvalidArguments(all)) => {
                self.0.extend(all);
                None
            }
            Err(other) => {
                self.add("request", other.to_string());
                None
            }
        }
    }

    /// `Ok(value)` when nothing was recorded, else the error naming each field.
    pub fn into_result<T>(mut self, value: impl FnOnce() -> T) -> Result<T, ServerError> {
        match self.0.len() {
            0 => Ok(value()),
            1 => {
                let (field, message) = self.0.remove(0);
                Err(ServerError::InvalidArgument { field, message })
            }
            _ => Err(ServerError::InvalidArguments(self.0)),
        }
    }
}

/// Checks the sampling fields (everything that does not need the tokenizer).
pub fn sampling_params(req: &GenerateRequest) -> Result<SamplingParams, ServerError> {
    let mut bad = Violations::default();
    let t = req.temperature;
    if !t.is_finite() || t < 0.0 {
        bad.add("temperature", format!("must be >= 0 (0 = greedy), got {t}"));
    }
    let top_p = match req.top_p {
        0.0 => 1.0,
        p if p.is_finite() && p > 0.0 && p <= 1.0 => p,
        p => {
            bad.add("top_p", format!("must be in (0, 1] (0 = off), got {p}"));
            1.0
        }
    };
    let min_p = req.min_p;
    if !min_p.is_finite() || !(0.0..=1.0).contains(&min_p) {
        bad.add("min_p", format!("must be in [0, 1], got {min_p}"));
    }
    let repetition_penalty = match req.repetition_penalty {
        0.0 => 1.0,
        r if r.is_finite() && r > 0.0 => r,
        r => {
            bad.add(
                "repetition_penalty",
                format!("must be > 0 (1 = off), got {r}"),
            );
            1.0
        }
    };
    if req.logprobs > MAX_LOGPROBS {
        bad.add(
            "logprobs",
            format!("must be at most {MAX_LOGPROBS}, got {}", req.logprobs),
        );
    }
    bad.into_result(|| SamplingParams {
        temperature: t,
        top_k: req.top_k as usize,
        top_p,
        min_p,
        repetition_penalty,
        seed: req.seed.unwrap_or_else(rand::random),
        logprobs: req.logprobs as usize,
    })
}

/// Checks the stop sequences.
pub fn stop_sequences(req: &GenerateRequest) -> Result<Vec<String>, ServerError> {
    if req.stop.len() > MAX_STOP_SEQUENCES {
        return Err(ServerError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
                req.stop.len()
            ),
        ));
    }
    for (i, s) in req.stop.iter().enumerate() {
        if s.is_empty() {
            return Err(ServerError::invalid(
                "stop",
                format!("stop sequence {i} is empty"),
            ));
        }
        if s.len() > MAX_STOP_BYTES {
            return Err(ServerError::invalid(
                "stop",
                format!(
                    "stop sequence {i} is {} bytes, at most {MAX_STOP_BYTES}",
                    s.len()
                ),
            ));
        }
    }
    Ok(req.stop.clone())
}

/// Checks that a text to tokenize is not empty and at most `max_bytes`
/// bytes, before any tokenizer work is spent on it.
pub fn text_size(field: &'static str, text: &str, max_bytes: usize) -> Result<(), ServerError> {
    if text.len() > max_bytes {
        return Err(ServerError::invalid(
            field,
            format!(
                "is {} bytes; at most {max_bytes} bytes are accepted (limits.max_prompt_bytes)",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// The fields of a request checked before tokenizing, every bad one reported.
pub struct Checked {
    params: SamplingParams,
    stops: Vec<String>,
    arrived: Instant,
}

/// Checks everything that does not need the tokenizer, the prompt's size
/// included; every bad field is reported.
pub fn check(req: &GenerateRequest, max_prompt_bytes: usize) -> Result<Checked, ServerError> {
    let arrived = Instant::now();
    let mut bad = Violations::default();
    if req.request_id.len() > MAX_REQUEST_ID_BYTES {
        bad.add(
            "request_id",
            format!("at most {MAX_REQUEST_ID_BYTES} bytes"),
        );
    }
    if req.prompt.is_empty() {
        bad.add("prompt", "must not be empty");
    }
    bad.check(text_size("prompt", &req.prompt, max_prompt_bytes));
    let params = bad.check(sampling_params(req));
    let stops = bad.check(stop_sequences(req));
    if req.max_new_tokens == Some(0) {
        bad.add("max_new_tokens", "must be at least 1");
    }
    let (Some(params), Some(stops)) = (params, stops) else {
        return bad.into_result(|| unreachable!("a check failed"));
    };
    bad.into_result(|| Checked {
        params,
        stops,
        arrived,
    })
}

/// Tokenizes `text` on the blocking pool, never on the async runtime's
/// workers: a long text takes milliseconds of CPU. At most as many texts
/// are tokenized at once as there are cores.
pub async fn tokenize(
    tokenizer: Arc<tokenizers::Tokenizer>,
    field: &'static str,
    text: String,
    add_special_tokens: bool,
) -> Result<tokenizers::Encoding, ServerError> {
    static POOL: OnceLock<Semaphore> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    });
    let _permit = pool
        .acquire()
        .await
        .map_err(|_| ServerError::ShuttingDown)?;
    tokio::task::spawn_blocking(move || tokenizer.encode(text.as_str(), add_special_tokens))
        .await
        .map_err(|e| ServerError::invalid(field, format!("cannot be tokenized: {e}")))?
        .map_err(|e| ServerError::invalid(field, format!("cannot be tokenized: {e}")))
}

/// Builds the job of a checked request from its prompt's tokens.
pub fn job(
    req: &GenerateRequest,
    checked: Checked,
    prompt_ids: Vec<u32>,
    info: &ModelInfo,
    request_id: String,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Job, ServerError> {
    let context = info.context_length;
    if prompt_ids.is_empty() {
        return Err(ServerError::invalid("prompt", "tokenizes to no tokens"));
    }
    if prompt_ids.len() >= context {
        return Err(ServerError::invalid(
            "prompt",
            format!(
                "is {} tokens; the model's context is {context} tokens, so at most {} fit",
                prompt_ids.len(),
                context - 1
            ),
        ));
    }
    let room = context - prompt_ids.len();
    let max_new_tokens = match req.max_new_tokens {
        None => info.default_max_new_tokens.min(room),
        Some(0) => return Err(ServerError::invalid("max_new_tokens", "must be at least 1")),
        Some(n) if n as usize > room => {
            return Err(ServerError::invalid(
                "max_new_tokens",
                format!(
                    "{n} tokens after a {}-token prompt exceed the model's context of {context} tokens (at most {room})",
                    prompt_ids.len()
                ),
            ))
        }
        Some(n) => n as usize,
    };
    Ok(Job {
        request_id,
        prompt_ids,
        params: checked.params,
        max_new_tokens,
        stops: checked.stops,
        ignore_eos: req.ignore_eos,
        arrived: checked.arrived,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> GenerateRequest {
        GenerateRequest {
            prompt: "hi".into(),
            ..Default::default()
        }
    }

    fn field_of(err: ServerError) -> &'static str {
        match err {
            ServerError::InvalidArgument { field, .. } => field,
            other => panic!("not an invalid argument: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_greedy_without_filters() {
        let p = sampling_params(&GenerateRequest {
            seed: Some(3),
            ..req()
        })
        .unwrap();
        assert_eq!(
            p,
            SamplingParams {
                seed: 3,
                ..Default::default()
            }
        );
    }

    #[test]
    fn each_bad_sampling_field_is_named() {
        let cases: Vec<(GenerateRequest, &str)> = vec![
            (
                GenerateRequest {
                    temperature: -0.5,
                    ..req()
                },
                "temperature",
            ),
            (
                GenerateRequest {
                    temperature: f32::NAN,
                    ..req()
                },
                "temperature",
            ),
            (
                GenerateRequest {
                    top_p: 1.5,
                    ..req()
                },
                "top_p",
            ),
            (
                GenerateRequest {
                    top_p: -0.1,
                    ..req()
                },
                "top_p",
            ),
            (
                GenerateRequest {
                    min_p: 1.1,
                    ..req()
                },
                "min_p",
            ),
            (
                GenerateRequest {
                    repetition_penalty: -1.0,
                    ..req()
                },
                "repetition_penalty",
            ),
            (
                GenerateRequest {
                    logprobs: 21,
                    ..req()
                },
                "logprobs",
            ),
        ];
        for (r, field) in cases {
            assert_eq!(field_of(sampling_params(&r).unwrap_err()), field);
        }
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let r = GenerateRequest {
            prompt: "x".repeat(11),
            top_p: 2.0,
            min_p: -1.0,
            max_new_tokens: Some(0),
            ..Default::default()
        };
        let err = check(&r, 10).err().expect("invalid");
        let fields: Vec<_> = err.field_violations().iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, ["prompt", "top_p", "min_p", "max_new_tokens"]);
        assert!(check(&req(), 10).is_ok());
    }

    #[test]
    fn stop_sequences_are_bounded() {
        let many = GenerateRequest {
            stop: vec!["x".into(); 9],
            ..req()
        };
        assert_eq!(field_of(stop_sequences(&many).unwrap_err()), "stop");
        let long = GenerateRequest {
            stop: vec!["x".repeat(129)],
            ..req()
        };
        assert_eq!(field_of(stop_sequences(&long).unwrap_err()), "stop");
        let empty = GenerateRequest {
            stop: vec![String::new()],
            ..req()
        };
        assert_eq!(field_of(stop_sequences(&empty).unwrap_err()), "stop");
        let ok = GenerateRequest {
            stop: vec!["\n".into(), "x".repeat(128)],
            ..req()
        };
        assert_eq!(stop_sequences(&ok).unwrap().len(), 2);
    }
}
