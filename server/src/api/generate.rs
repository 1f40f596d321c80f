//! The transport-independent generate call: validates a request, queues it
//! on its model's engine and yields `GenerateResponse` messages. gRPC and
//! NATS both serve requests through this.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::{mpsc, Notify};
use torchwire_proto::v1 as pb;
use tracing::Span;

use super::breaker::Breaker;
use super::limits::LimitsConfig;
use super::metrics::RequestMetrics;
use super::models::Models;
use super::{span, validate};
use crate::engine::request::{Chunk, Event, Finish, FinishReason};
use crate::engine::Engine;
use crate::error::ServerError;
use crate::fault::{self, Fault};
use crate::session::turn::Sessions;

/// Generates for every transport; tracks streams in flight for shutdown.
#[derive(Clone)]
pub struct Generator {
    models: Arc<Models>,
    draining: Arc<AtomicBool>,
    in_flight: Arc<InFlight>,
    limits: Arc<LimitsConfig>,
    breaker: Arc<Breaker>,
    sessions: Arc<Sessions>,
}

#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl Generator {
    pub fn new(models: Arc<Models>) -> Self {
        Self {
            models,
            draining: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::default(),
            limits: Arc::default(),
            breaker: Arc::new(Breaker::new(0)),
            sessions: Arc::new(Sessions::Off(
                "sessions are not served: this server has no nats.url".into(),
            )),
        }
    }

    /// Serves chat turns with a `session_id` from `sessions` from now on.
    pub fn with_sessions(mut self, sessions: Sessions) -> Self {
        self.sessions = Arc::new(sessions);
        self
    }

    /// Where conversations are kept, if anywhere.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Applies the prompt size and queue wait limits from now on.
    pub fn with_limits(mut self, limits: &LimitsConfig) -> Self {
        self.limits = Arc::new(limits.clone());
        self
    }

    /// The request limits in force.
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Trips [`breaker`](Self::breaker) after `limit` engine failures in a row (0: never).
    pub fn with_failure_limit(mut self, limit: u32) -> Self {
        self.breaker = Arc::new(Breaker::new(limit));
        self
    }

    /// Whether the engines still work; see [`Breaker`].
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub fn models(&self) -> &Models {
        &self.models
    }

    /// Validates and queues a request; the stream yields its responses.
    /// `span` (see [`span::request_span`]) covers the request until the
    /// stream is dropped, and `metrics` are recorded when it ends; a refusal
    /// is recorded on both at once.
    pub async fn generate(
        &self,
        req: &pb::GenerateRequest,
        span: Span,
        mut metrics: RequestMetrics,
    ) -> Result<ResponseStream, ServerError> {
        let accepted = self.accept(req, &span, &mut metrics).await;
        self.stream(accepted, span, metrics)
    }

    /// The stream of an accepted request, or its refusal recorded on the
    /// span and the metrics.
    pub(crate) fn stream(
        &self,
        accepted: Result<Accepted, ServerError>,
        span: Span,
        metrics: RequestMetrics,
    ) -> Result<ResponseStream, ServerError> {
        match accepted {
            Ok(parts) => Ok(parts.into_stream(
                span,
                metrics,
                InFlightGuard::new(&self.in_flight),
                self.breaker.clone(),
            )),
            Err(e) => Err(self.refused(e, &span, metrics)),
        }
    }

    /// Records a request refused before it was queued, on the breaker, the
    /// span and the metrics; returns the error.
    pub(crate) fn refused(
        &self,
        err: ServerError,
        span: &Span,
        metrics: RequestMetrics,
    ) -> ServerError {
        self.breaker.failure(&err);
        span::record_error(span, &err);
        metrics.failed(&err);
        err
    }

    async fn accept(
        &self,
        req: &pb::GenerateRequest,
        span: &Span,
        metrics: &mut RequestMetrics,
    ) -> Result<Accepted, ServerError> {
        let (engine, request_id) = self.begin(&req.model, &req.request_id, span, metrics)?;
        let max_prompt_bytes = self.limits.prompt_bytes(engine.info.context_length);
        let checked = validate::check(req, max_prompt_bytes)?;
        let prompt =
            validate::tokenize(engine.tokenizer.clone(), "prompt", req.prompt.clone(), true)
                .await?;
        let prompt = validate::Prompt {
            ids: prompt.get_ids().to_vec(),
            field: "prompt",
            what: "is",
        };
        // Prompts are user data: only at debug level, never on the span.
        tracing::debug!(request_id = %request_id, model = %engine.info.name, prompt = %req.prompt, prompt_tokens = prompt.ids.len(), "request accepted");
        self.submit(engine, checked, prompt, request_id, span, metrics)
    }

    /// Checks that requests are taken, and picks the model and the request id.
    pub(crate) fn begin(
        &self,
        model: &str,
        request_id: &str,
        span: &Span,
        metrics: &mut RequestMetrics,
    ) -> Result<(&Engine, String), ServerError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ServerError::ShuttingDown);
        }
        let request_id = if request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            request_id.to_string()
        };
        span.record("torchwire.request_id", request_id.as_str());
        metrics.request_id(&request_id);
        let engine = self.models.get(model)?;
        metrics.model(&engine.info.name);
        Ok((engine, request_id))
    }

    /// Builds the job of a checked request and its tokenized prompt, and
    /// queues it on `engine`.
    pub(crate) fn submit(
        &self,
        engine: &Engine,
        checked: validate::Checked,
        prompt: validate::Prompt,
        request_id: String,
        span: &Span,
        metrics: &mut RequestMetrics,
    ) -> Result<Accepted, ServerError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = validate::job(checked, prompt, &engine.info, request_id.clone(), tx)?;
        let arrived = job.arrived;
        span::record_accepted(
            span,
            &request_id,
            &engine.info.name,
            job.prompt_ids.len(),
            job.max_new_tokens,
        );
        let prompt_tokens = job.prompt_ids.len();
        if fault::active(&Fault::FailGenerate) {
            let _ = job.events.send(Event::Failed(ServerError::Compute {
                model: engine.info.name.clone(),
                message: format!("injected fault ({}=fail-generate)", fault::ENV),
            }));
        } else {
            engine.submit(job)?;
        }
        metrics.accepted(prompt_tokens);
        Ok(Accepted {
            events: rx,
            request_id,
            model: engine.info.name.clone(),
            queue_limit: self.limits.max_queue_wait().map(|limit| (arrived, limit)),
        })
    }

    /// Whether new requests are refused (the server is shutting down).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Refuses new requests from now on (UNAVAILABLE).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.breaker.disarm();
    }

    /// Generations still streaming.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::SeqCst)
    }

    /// Waits until no generation is in flight, at most `grace`. Returns how
    /// many were still running when it gave up.
    pub async fn drain(&self, grace: Duration) -> usize {
        let wait = async {
            loop {
                let idle = self.in_flight.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(grace, wait).await;
        self.in_flight()
    }
}

/// A queued request, before its stream exists.
pub(crate) struct Accepted {
    events: mpsc::UnboundedReceiver<Event>,
    request_id: String,
    model: String,
    /// When the request arrived and how long it may wait for its first token.
    queue_limit: Option<(Instant, Duration)>,
}

impl Accepted {
    fn into_stream(
        self,
        span: Span,
        metrics: RequestMetrics,
        guard: InFlightGuard,
        breaker: Arc<Breaker>,
    ) -> ResponseStream {
        ResponseStream {
            events: self.events,
            request_id: self.request_id,
            model: self.model,
            queue_wait: self.queue_limit.map(|(arrived, limit)| QueueWait {
                arrived,
                limit,
                timer: Box::pin(tokio::time::sleep_until((arrived + limit).into())),
            }),
            done: false,
            span,
            metrics,
            breaker,
            _guard: guard,
        }
    }
}

struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(in_flight: &Arc<InFlight>) -> Self {
        in_flight.count.fetch_add(1, Ordering::SeqCst);
        Self(in_flight.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.notify_waiters();
    }
}

/// The responses of one request. Events already waiting are merged into one
/// message, so a slow reader gets fewer, larger messages rather than a
/// growing backlog. Dropping it cancels the request at the next engine step.
pub struct ResponseStream {
    events: mpsc::UnboundedReceiver<Event>,
    request_id: String,
    model: String,
    /// Until the first event: how long the request may still wait.
    queue_wait: Option<QueueWait>,
    done: bool,
    /// Ends when the stream is dropped. Declared before the guard, so that
    /// the span is ended (and queued for export) before shutdown's drain sees
    /// this request gone and flushes.
    span: Span,
    /// Recorded once, when the request ends (on drop, if it had not).
    metrics: RequestMetrics,
    breaker: Arc<Breaker>,
    _guard: InFlightGuard,
}

/// The limit on how long a request waits for its first token.
struct QueueWait {
    arrived: Instant,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl ResponseStream {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Ends the stream with `err`, recorded on the span.
    fn fail(&mut self, err: ServerError) -> ServerError {
        self.done = true;
        self.breaker.failure(&err);
        span::record_error(&self.span, &err);
        self.metrics.failed(&err);
        err
    }

    fn message(&self, chunk: Chunk, finish: Option<Finish>) -> pb::GenerateResponse {
        let mut msg = pb::GenerateResponse {
            request_id: self.request_id.clone(),
            model: self.model.clone(),
            text: chunk.text,
            token_ids: chunk.token_ids,
            logprobs: chunk
                .logprobs
                .into_iter()
                .map(|l| pb::TokenLogprob {
                    token_id: l.token_id,
                    logprob: l.logprob,
                    top: l
                        .top
                        .into_iter()
                        .map(|(token_id, token, logprob)| pb::TopLogprob {
                            token_id,
                            token,
                            logprob,
                        })
                        .collect(),
                })
                .collect(),
            ..Default::default()
        };
        if let Some(f) = finish {
            msg.finish_reason = match f.reason {
                FinishReason::Length => pb::FinishReason::Length,
                FinishReason::StopSequence => pb::FinishReason::StopSequence,
                FinishReason::EndOfSequence => pb::FinishReason::EndOfSequence,
            } as i32;
            msg.stop_sequence = f.stop_sequence.unwrap_or_default();
            msg.usage = Some(pb::Usage {
                prompt_tokens: f.prompt_tokens as u32,
                completion_tokens: f.completion_tokens as u32,
            });
            msg.timings = Some(pb::Timings {
                queue_ms: f.queue.as_secs_f64() * 1e3,
                time_to_first_token_ms: f.time_to_first_token.as_secs_f64() * 1e3,
                total_ms: f.total.as_secs_f64() * 1e3,
            });
        }
        msg
    }
}

impl Stream for ResponseStream {
    type Item = Result<pb::GenerateResponse, ServerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let (mut chunk, mut finish) = match self.events.poll_recv(cx) {
            Poll::Pending => {
                // Ending the stream drops the receiver: the engine skips the
                // request when it reaches it, or cancels it at its next step.
                let expired = self
                    .queue_wait
                    .as_mut()
                    .is_some_and(|w| w.timer.as_mut().poll(cx).is_ready());
                if let Some(wait) = self.queue_wait.take_if(|_| expired) {
                    let err = ServerError::QueueTimeout {
                        model: self.model.clone(),
                        waited_ms: wait.arrived.elapsed().as_millis() as u64,
                        limit_ms: wait.limit.as_millis() as u64,
                    };
                    return Poll::Ready(Some(Err(self.fail(err))));
                }
                return Poll::Pending;
            }
            Poll::Ready(None) => {
                let err = ServerError::EngineStopped(self.model.clone());
                return Poll::Ready(Some(Err(self.fail(err))));
            }
            Poll::Ready(Some(Event::Failed(e))) => return Poll::Ready(Some(Err(self.fail(e)))),
            Poll::Ready(Some(Event::Step { chunk, finish })) => (chunk, finish),
        };
        self.queue_wait = None;
        // Merge whatever else is ready into this message.
        while finish.is_none() {
            match self.events.try_recv() {
                Ok(Event::Step {
                    chunk: more,
                    finish: f,
                }) => {
                    chunk.token_ids.extend(more.token_ids);
                    chunk.text.push_str(&more.text);
                    chunk.logprobs.extend(more.logprobs);
                    finish = f;
                }
                Ok(Event::Failed(e)) => return Poll::Ready(Some(Err(self.fail(e)))),
                Err(_) => break,
            }
        }
        self.metrics.streamed(chunk.token_ids.len());
        if let Some(f) = &finish {
            span::record_finish(&self.span, f);
            self.breaker.success();
            self.metrics.finished(f);
        }
        self.done = finish.is_some();
        Poll::Ready(Some(Ok(self.message(chunk, finish))))
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if !self.done {
            span::record_cancelled(&self.span);
            self.metrics.cancelled();
        }
    }
}
