//! Checks a GenerateRequest against the model's limits and turns it into a
//! job. Every error names the request field at fault.

use std::time::Instant;

use tokio::sync::mpsc;
use torchwire_proto::v1::GenerateRequest;

use crate::engine::request::{Event, Job};
use crate::engine::sampler::SamplingParams;
use crate::engine::ModelInfo;
use crate::error::ServerError;

pub const MAX_LOGPROBS: u32 = 20;
pub const MAX_STOP_SEQUENCES: usize = 8;
pub const MAX_STOP_BYTES: usize = 128;
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Checks the sampling fields (everything that does not need the tokenizer).
pub fn sampling_params(req: &GenerateRequest) -> Result<SamplingParams, ServerError> {
    let t = req.temperature;
    if !t.is_finite() || t < 0.0 {
        return Err(ServerError::invalid(
            "temperature",
            format!("must be >= 0 (0 = greedy), got {t}"),
        ));
    }
    let top_p = match req.top_p {
        0.0 => 1.0,
        p if p.is_finite() && p > 0.0 && p <= 1.0 => p,
        p => {
            return Err(ServerError::invalid(
                "top_p",
                format!("must be in (0, 1] (0 = off), got {p}"),
            ))
        }
    };
    let min_p = req.min_p;
    if !min_p.is_finite() || !(0.0..=1.0).contains(&min_p) {
        return Err(ServerError::invalid(
            "min_p",
            format!("must be in [0, 1], got {min_p}"),
        ));
    }
    let repetition_penalty = match req.repetition_penalty {
        0.0 => 1.0,
        r if r.is_finite() && r > 0.0 => r,
        r => {
            return Err(ServerError::invalid(
                "repetition_penalty",
                format!("must be > 0 (1 = off), got {r}"),
            ))
        }
    };
    if req.logprobs > MAX_LOGPROBS {
        return Err(ServerError::invalid(
            "logprobs",
            format!("must be at most {MAX_LOGPROBS}, got {}", req.logprobs),
        ));
    }
    Ok(SamplingParams {
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

/// Validates the whole request for `info`'s model and builds the job.
pub fn job(
    req: &GenerateRequest,
    info: &ModelInfo,
    tokenizer: &tokenizers::Tokenizer,
    request_id: String,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Job, ServerError> {
    let arrived = Instant::now();
    if req.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(ServerError::invalid(
            "request_id",
            format!("at most {MAX_REQUEST_ID_BYTES} bytes"),
        ));
    }
    if req.prompt.is_empty() {
        return Err(ServerError::invalid("prompt", "must not be empty"));
    }
    let params = sampling_params(req)?;
    let stops = stop_sequences(req)?;
    let prompt_ids = tokenizer
        .encode(req.prompt.as_str(), true)
        .map_err(|e| ServerError::invalid("prompt", format!("cannot be tokenized: {e}")))?
        .get_ids()
        .to_vec();
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
        params,
        max_new_tokens,
        stops,
        ignore_eos: req.ignore_eos,
        arrived,
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
