//! Checks a request's generation options against the model's limits and
//! turns a prompt into a job. Every error names the request field at fault,
//! and every bad field of a request is reported at once.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::{mpsc, Semaphore, SemaphorePermit};
use torchwire_proto::v1::{GenerateRequest, GenerationOptions};

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
pub struct Violations(Vec<(Cow<'static, str>, String)>);

impl Violations {
    /// Records that `field` is bad.
    pub fn add(&mut self, field: impl Into<Cow<'static, str>>, message: impl Into<String>) {
        self.0.push((field.into(), message.into()));
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

/// Generation options and the prefix their field names take in errors:
/// `""` for GenerateRequest's flat fields, `"options."` for the nested message.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    pub options: Cow<'a, GenerationOptions>,
    pub prefix: &'static str,
}

impl<'a> Options<'a> {
    /// The options nested in a request (`options` left unset = defaults).
    pub fn nested(options: Option<&'a GenerationOptions>) -> Self {
        Self {
            options: options
                .map_or_else(|| Cow::Owned(GenerationOptions::default()), Cow::Borrowed),
            prefix: "options.",
        }
    }

    /// The options of a GenerateRequest: `options`, or the deprecated flat
    /// fields; both at once is an error naming `options`.
    pub fn of_generate(req: &'a GenerateRequest) -> Result<Self, ServerError> {
        let flat = GenerationOptions {
            max_new_tokens: req.max_new_tokens,
            temperature: req.temperature,
            top_k: req.top_k,
            top_p: req.top_p,
            min_p: req.min_p,
            repetition_penalty: req.repetition_penalty,
            seed: req.seed,
            stop: req.stop.clone(),
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
        };
        match &req.options {
            None => Ok(Self {
                options: Cow::Owned(flat),
                prefix: "",
            }),
            Some(_) if flat != GenerationOptions::default() => Err(ServerError::invalid(
                "options",
                "set either options or the deprecated flat generation fields \
                 (max_new_tokens, temperature, ...), not both",
            )),
            Some(o) => Ok(Self::nested(Some(o))),
        }
    }

    fn field(&self, name: &'static str) -> Cow<'static, str> {
        if self.prefix.is_empty() {
            Cow::Borrowed(name)
        } else {
            Cow::Owned(format!("{}{name}", self.prefix))
        }
    }

    /// Checks the sampling fields (everything that does not need the tokenizer).
    pub fn sampling_params(&self) -> Result<SamplingParams, ServerError> {
        let o = &*self.options;
        let mut bad = Violations::default();
        let t = o.temperature;
        if !t.is_finite() || t < 0.0 {
            bad.add(
                self.field("temperature"),
                format!("must be >= 0 (0 = greedy), got {t}"),
            );
        }
        let top_p = match o.top_p {
            0.0 => 1.0,
            p if p.is_finite() && p > 0.0 && p <= 1.0 => p,
            p => {
                bad.add(
                    self.field("top_p"),
                    format!("must be in (0, 1] (0 = off), got {p}"),
                );
                1.0
            }
        };
        let min_p = o.min_p;
        if !min_p.is_finite() || !(0.0..=1.0).contains(&min_p) {
            bad.add(
                self.field("min_p"),
                format!("must be in [0, 1], got {min_p}"),
            );
        }
        let repetition_penalty = match o.repetition_penalty {
            0.0 => 1.0,
            r if r.is_finite() && r > 0.0 => r,
            r => {
                bad.add(
                    self.field("repetition_penalty"),
                    format!("must be > 0 (1 = off), got {r}"),
                );
                1.0
            }
        };
        if o.logprobs > MAX_LOGPROBS {
            bad.add(
                self.field("logprobs"),
                format!("must be at most {MAX_LOGPROBS}, got {}", o.logprobs),
            );
        }
        bad.into_result(|| SamplingParams {
            temperature: t,
            top_k: o.top_k as usize,
            top_p,
            min_p,
            repetition_penalty,
            seed: o.seed.unwrap_or_else(rand::random),
            logprobs: o.logprobs as usize,
        })
    }

    /// Checks the stop sequences.
    pub fn stop_sequences(&self) -> Result<Vec<String>, ServerError> {
        let stop = &self.options.stop;
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(ServerError::invalid(
                self.field("stop"),
                format!(
                    "at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
                    stop.len()
                ),
            ));
        }
        for (i, s) in stop.iter().enumerate() {
            if s.is_empty() {
                return Err(ServerError::invalid(
                    self.field("stop"),
                    format!("stop sequence {i} is empty"),
                ));
            }
            if s.len() > MAX_STOP_BYTES {
                return Err(ServerError::invalid(
                    self.field("stop"),
                    format!(
                        "stop sequence {i} is {} bytes, at most {MAX_STOP_BYTES}",
                        s.len()
                    ),
                ));
            }
        }
        Ok(stop.clone())
    }
}

/// Checks a client-chosen request id.
pub fn request_id(id: &str) -> Result<(), ServerError> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(ServerError::invalid(
            "request_id",
            format!("at most {MAX_REQUEST_ID_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Checks that a text to tokenize is at most `max_bytes` bytes, before any
/// tokenizer (or template) work is spent on it.
pub fn text_size(field: &'static str, size: usize, max_bytes: usize) -> Result<(), ServerError> {
    if size > max_bytes {
        return Err(ServerError::invalid(
            field,
            format!(
                "is {size} bytes; at most {max_bytes} bytes are accepted (limits.max_prompt_bytes)"
            ),
        ));
    }
    Ok(())
}

/// The fields of a request checked before tokenizing, every bad one reported.
pub struct Checked {
    params: SamplingParams,
    stops: Vec<String>,
    max_new_tokens: Option<u32>,
    max_new_tokens_field: Cow<'static, str>,
    ignore_eos: bool,
    arrived: Instant,
}

impl Checked {
    /// The tokens asked for, if the request set a number.
    pub fn max_new_tokens(&self) -> Option<u32> {
        self.max_new_tokens
    }
}

/// Checks the request id and generation options into `bad`.
fn check_options(
    request_id: &str,
    options: Option<Options<'_>>,
    arrived: Instant,
    bad: &mut Violations,
) -> Option<Checked> {
    bad.check(self::request_id(request_id));
    let options = options?;
    let params = bad.check(options.sampling_params());
    let stops = bad.check(options.stop_sequences());
    if options.options.max_new_tokens == Some(0) {
        bad.add(options.field("max_new_tokens"), "must be at least 1");
    }
    Some(Checked {
        params: params?,
        stops: stops?,
        max_new_tokens: options.options.max_new_tokens,
        max_new_tokens_field: options.field("max_new_tokens"),
        ignore_eos: options.options.ignore_eos,
        arrived,
    })
}

/// Checks everything of a GenerateRequest that does not need the
/// tokenizer, the prompt's size included; every bad field is reported.
pub fn check(req: &GenerateRequest, max_prompt_bytes: usize) -> Result<Checked, ServerError> {
    let arrived = Instant::now();
    let mut bad = Violations::default();
    if req.prompt.is_empty() {
        bad.add("prompt", "must not be empty");
    }
    bad.check(text_size("prompt", req.prompt.len(), max_prompt_bytes));
    let options = bad.check(Options::of_generate(req));
    let checked = check_options(&req.request_id, options, arrived, &mut bad);
    let Some(checked) = checked else {
        return bad.into_result(|| unreachable!("a check failed"));
    };
    bad.into_result(|| checked)
}

/// Checks the request id and options of a chat turn, and that its
/// messages' text is at most `max_prompt_bytes` bytes; every bad field is
/// reported (the messages themselves are checked by
/// [`crate::chat::validate_messages`]).
pub fn check_chat(
    request_id: &str,
    options: Option<&GenerationOptions>,
    message_bytes: usize,
    max_prompt_bytes: usize,
) -> Result<Checked, ServerError> {
    let arrived = Instant::now();
    let mut bad = Violations::default();
    bad.check(text_size("messages", message_bytes, max_prompt_bytes));
    let checked = check_options(
        request_id,
        Some(Options::nested(options)),
        arrived,
        &mut bad,
    );
    let Some(checked) = checked else {
        return bad.into_result(|| unreachable!("a check failed"));
    };
    bad.into_result(|| checked)
}

/// A permit to run tokenizer or template work on the blocking pool: at
/// most as many run at once as there are cores.
pub async fn cpu_permit() -> Result<SemaphorePermit<'static>, ServerError> {
    static POOL: OnceLock<Semaphore> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    });
    pool.acquire().await.map_err(|_| ServerError::ShuttingDown)
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
    let _permit = cpu_permit().await?;
    tokio::task::spawn_blocking(move || tokenizer.encode(text.as_str(), add_special_tokens))
        .await
        .map_err(|e| ServerError::invalid(field, format!("cannot be tokenized: {e}")))?
        .map_err(|e| ServerError::invalid(field, format!("cannot be tokenized: {e}")))
}

/// A tokenized prompt and how errors about it name it.
pub struct Prompt {
    pub ids: Vec<u32>,
    /// The request field the prompt comes from (`prompt`, `messages`).
    pub field: &'static str,
    /// How the error message continues after the field ("is", "render to").
    pub what: &'static str,
}

/// Checks a tokenized prompt against the context and builds the job of a
/// checked request.
pub fn job(
    checked: Checked,
    prompt: Prompt,
    info: &ModelInfo,
    request_id: String,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Job, ServerError> {
    let Prompt {
        ids: prompt_ids,
        field,
        what,
    } = prompt;
    let context = info.context_length;
    if prompt_ids.is_empty() {
        return Err(ServerError::invalid(field, "tokenizes to no tokens"));
    }
    if prompt_ids.len() >= context {
        return Err(ServerError::invalid(
            field,
            format!(
                "{what} {} tokens; the model's context is {context} tokens, so at most {} fit",
                prompt_ids.len(),
                context - 1
            ),
        ));
    }
    let room = context - prompt_ids.len();
    let max_new_tokens = match checked.max_new_tokens {
        None => info.default_max_new_tokens.min(room),
        Some(0) => {
            return Err(ServerError::invalid(
                checked.max_new_tokens_field,
                "must be at least 1",
            ))
        }
        Some(n) if n as usize > room => {
            return Err(ServerError::invalid(
                checked.max_new_tokens_field,
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
        ignore_eos: checked.ignore_eos,
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

    fn flat(r: &GenerateRequest) -> Options<'_> {
        Options::of_generate(r).unwrap()
    }

    fn field_of(err: ServerError) -> String {
        match err {
            ServerError::InvalidArgument { field, .. } => field.into_owned(),
            other => panic!("not an invalid argument: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_greedy_without_filters() {
        let p = flat(&GenerateRequest {
            seed: Some(3),
            ..req()
        })
        .sampling_params()
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
            assert_eq!(field_of(flat(&r).sampling_params().unwrap_err()), field);
        }
    }

    #[test]
    fn stop_sequences_are_bounded() {
        let many = GenerateRequest {
            stop: vec!["x".into(); 9],
            ..req()
        };
        assert_eq!(field_of(flat(&many).stop_sequences().unwrap_err()), "stop");
        let long = GenerateRequest {
            stop: vec!["x".repeat(129)],
            ..req()
        };
        assert_eq!(field_of(flat(&long).stop_sequences().unwrap_err()), "stop");
        let empty = GenerateRequest {
            stop: vec![String::new()],
            ..req()
        };
        assert_eq!(field_of(flat(&empty).stop_sequences().unwrap_err()), "stop");
        let ok = GenerateRequest {
            stop: vec!["\n".into(), "x".repeat(128)],
            ..req()
        };
        assert_eq!(flat(&ok).stop_sequences().unwrap().len(), 2);
    }

    #[test]
    fn nested_options_are_named_with_their_prefix() {
        let r = GenerateRequest {
            options: Some(GenerationOptions {
                top_p: 2.0,
                ..Default::default()
            }),
            ..req()
        };
        let err = Options::of_generate(&r)
            .unwrap()
            .sampling_params()
            .unwrap_err();
        assert_eq!(field_of(err), "options.top_p");
    }

    #[test]
    fn options_and_flat_fields_together_are_refused() {
        let r = GenerateRequest {
            temperature: 0.5,
            options: Some(GenerationOptions::default()),
            ..req()
        };
        assert_eq!(field_of(Options::of_generate(&r).unwrap_err()), "options");
        // Nested options alone carry their values through.
        let r = GenerateRequest {
            options: Some(GenerationOptions {
                seed: Some(9),
                temperature: 0.5,
                ..Default::default()
            }),
            ..req()
        };
        let p = Options::of_generate(&r).unwrap().sampling_params().unwrap();
        assert_eq!((p.seed, p.temperature), (9, 0.5));
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
        let chat = GenerationOptions {
            top_p: 2.0,
            stop: vec![String::new()],
            ..Default::default()
        };
        let err = check_chat("", Some(&chat), 11, 10).err().expect("invalid");
        let fields: Vec<_> = err.field_violations().iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, ["messages", "options.top_p", "options.stop"]);
        assert!(check_chat("", None, 10, 10).is_ok());
    }
}
