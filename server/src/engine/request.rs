//! What travels between the API and a model thread: a validated job in,
//! events (token chunks, the finish, or a failure) out.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::sampler::SamplingParams;
use crate::error::ServerError;

/// A validated generation request, ready for the engine.
#[derive(Debug)]
pub struct Job {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub max_new_tokens: usize,
    pub stops: Vec<String>,
    pub ignore_eos: bool,
    /// When the request reached the server.
    pub arrived: Instant,
    /// Where this request's events go; closed when the client is gone.
    pub events: mpsc::UnboundedSender<Event>,
}

/// Output of the engine for one request.
#[derive(Debug)]
pub enum Event {
    /// New tokens; `finish` is set on the last event of the request.
    Step {
        chunk: Chunk,
        finish: Option<Finish>,
    },
    /// The request failed; no more events follow.
    Failed(ServerError),
}

/// Tokens produced since the previous event, and their text.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Chunk {
    pub token_ids: Vec<u32>,
    pub text: String,
    /// One entry per token id, when log-probabilities were asked for.
    pub logprobs: Vec<TokenLogprob>,
}

/// A token's log-probability and the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// (id, token text, logprob), best first.
    pub top: Vec<(u32, String, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    StopSequence,
    EndOfSequence,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::StopSequence => "stop_sequence",
            Self::EndOfSequence => "end_of_sequence",
        }
    }
}

/// The summary sent with the last chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub stop_sequence: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
}
