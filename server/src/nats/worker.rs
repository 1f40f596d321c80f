//! Serving one work-queue message: decode, generate, publish each response
//! with a sequence number, keep the message alive with progress acks, and
//! settle it: ack after the final response, term for a request that can
//! never succeed, nak for one that could succeed elsewhere or later.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use torchwire_nats::async_nats::jetstream::{self, AckKind};
use torchwire_nats::async_nats::{self, HeaderMap};
use torchwire_nats::{codec, headers, Encoding, NatsConfig, NatsError};
use torchwire_proto::v1 as pb;
use torchwire_telemetry::opentelemetry::metrics::Counter;
use torchwire_telemetry::opentelemetry::propagation::Extractor;
use torchwire_telemetry::opentelemetry::{global, KeyValue};

use super::Phase;
use crate::api::span::{self, Transport};
use crate::api::Generator;
use crate::error::ServerError;
use crate::session::turn::ChatStream;

/// A request message's body, by its `Torchwire-Method` header.
enum Work {
    Generate(pb::GenerateRequest),
    Chat(pb::ChatRequest),
}

impl Work {
    fn decode(
        method: headers::Method,
        body: &[u8],
        encoding: Encoding,
    ) -> Result<Self, ServerError> {
        let bad = |e: NatsError| ServerError::invalid("message", e.to_string());
        Ok(match method {
            headers::Method::Generate => {
                Self::Generate(codec::decode_request(body, encoding).map_err(bad)?)
            }
            headers::Method::Chat => {
                Self::Chat(codec::decode_chat_request(body, encoding).map_err(bad)?)
            }
        })
    }

    fn request_id(&self) -> &str {
        match self {
            Self::Generate(r) => &r.request_id,
            Self::Chat(r) => &r.request_id,
        }
    }

    fn request_id_mut(&mut self) -> &mut String {
        match self {
            Self::Generate(r) => &mut r.request_id,
            Self::Chat(r) => &mut r.request_id,
        }
    }
}

/// Extra header on responses: which delivery of the request produced them
/// (1 = first), so subscribers recognise a redelivered request.
pub const DELIVERY: &str = "Torchwire-Delivery";

/// Counter of work-queue messages by how they were settled.
pub const MESSAGES: &str = "torchwire.nats.messages";
const OUTCOME: &str = "torchwire.nats.outcome";

/// Delay before a request refused for load is offered again.
const OVERLOAD_RETRY: Duration = Duration::from_millis(200);

pub struct Worker {
    pub client: async_nats::Client,
    pub generator: Generator,
    pub config: Arc<NatsConfig>,
    pub phase: watch::Receiver<Phase>,
}

/// How a message is settled once its work is over.
enum Settle {
    /// Answered (final response published): remove it.
    Ack,
    /// Answered with a final error: never deliver it again.
    Term,
    /// No final answer was possible: never deliver it again.
    Unanswerable,
    /// Offer it again, to this or another replica, after the delay.
    Nak(Option<Duration>),
}

impl Settle {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Ack => "acked",
            Self::Term => "terminated",
            Self::Unanswerable => "unanswerable",
            Self::Nak(_) => "retried",
        }
    }
}

fn messages_counter() -> &'static Counter<u64> {
    static COUNTER: OnceLock<Counter<u64>> = OnceLock::new();
    COUNTER.get_or_init(|| {
        global::meter("torchwire-server")
            .u64_counter(MESSAGES)
            .with_unit("{message}")
            .with_description("Work-queue messages settled, by outcome")
            .build()
    })
}

/// A value from a message that is refused, as an INVALID_ARGUMENT naming it.
fn invalid(err: NatsError) -> ServerError {
    match err {
        NatsError::Invalid { what, reason } => ServerError::invalid(what, reason),
        other => ServerError::invalid("message", other.to_string()),
    }
}

impl Worker {
    pub async fn serve(mut self, msg: jetstream::Message) {
        let settle = self.handle(&msg).await;
        messages_counter().add(1, &[KeyValue::new(OUTCOME, settle.outcome())]);
        let result = match settle {
            Settle::Ack => msg.double_ack().await,
            Settle::Term | Settle::Unanswerable => msg.ack_with(AckKind::Term).await,
            Settle::Nak(delay) => msg.ack_with(AckKind::Nak(delay)).await,
        };
        if let Err(e) = result {
            // The message will be redelivered after ack_wait: nothing is lost.
            tracing::warn!(error = %e, "NATS: settling a message failed");
        }
    }

    async fn handle(&mut self, msg: &jetstream::Message) -> Settle {
        let transport = Transport::Nats {
            subject: msg.subject.as_str(),
        };
        let (span, mut metrics) =
            span::start_request(transport, &NatsHeaders(msg.headers.as_ref()));
        let encoding = Encoding::from_headers(msg.headers.as_ref());
        let delivery = msg.info().map(|i| i.delivered).unwrap_or(1);
        let reply_to = match headers::reply_subject(
            msg.headers.as_ref(),
            self.config.reply_prefix.as_deref(),
            &self.config.subject,
        ) {
            Ok(subject) => subject,
            Err(e) => {
                // No final answer can reach the publisher: retrying cannot help.
                tracing::warn!(subject = %msg.subject, error = %e, "NATS: request cannot be answered; terminated");
                let err = invalid(e);
                span::record_error(&span, &err);
                metrics.failed(&err);
                return Settle::Unanswerable;
            }
        };
        let mut out = Publisher {
            client: &self.client,
            reply_to,
            encoding,
            request_id: String::new(),
            delivery,
            last_delivery: delivery >= self.config.max_deliver,
            seq: 0,
        };
        // Until the ids are checked, responses carry none: no header injection.
        let header_id = headers::request_id(msg.headers.as_ref());
        if let Ok(Some(id)) = &header_id {
            metrics.request_id(id);
        }
        let refuse = |err: ServerError| {
            span::record_error(&span, &err);
            metrics.failed(&err);
            err
        };
        let header_id = match header_id {
            Ok(id) => id.unwrap_or_default(),
            Err(e) => return out.reject(refuse(invalid(e))).await,
        };
        let work = headers::method(msg.headers.as_ref())
            .map_err(invalid)
            .and_then(|method| Work::decode(method, &msg.payload, encoding));
        let mut work = match work {
            Ok(w) => w,
            Err(e) => {
                out.request_id = header_id;
                return out.reject(refuse(e)).await;
            }
        };
        if let Err(e) = headers::check_request_id("request_id", work.request_id()) {
            out.request_id = header_id;
            return out.reject(refuse(invalid(e))).await;
        }
        if work.request_id().is_empty() {
            *work.request_id_mut() = header_id;
        }
        // Errors before generation starts carry the id too.
        out.request_id = work.request_id().to_string();
        if delivery > 1 {
            tracing::info!(request_id = %out.request_id, delivery, "NATS: redelivered request");
        }
        if self.generator.breaker().is_tripped() {
            // Pulled just before this replica took itself out of service.
            return out.retry(refuse(ServerError::ShuttingDown), None).await;
        }
        let backoff = self.config.retry_delay(delivery);
        let started = match &work {
            Work::Generate(request) => self
                .generator
                .generate(request, span, metrics)
                .await
                .map(|s| (s.request_id().to_string(), Box::pin(s) as ChatStream)),
            Work::Chat(request) => self
                .generator
                .chat_turn(request, span, metrics)
                .await
                .map(|turn| (turn.request_id, turn.stream)),
        };
        let mut stream = match started {
            Ok((request_id, stream)) => {
                out.request_id = request_id;
                stream
            }
            Err(e) => {
                return match e {
                    ServerError::Overloaded { .. } => out.retry(e, Some(OVERLOAD_RETRY)).await,
                    ServerError::ShuttingDown => out.retry(e, None).await,
                    // Left for a replica that serves the model (or whose
                    // engine works, or that reaches the session store).
                    ServerError::ModelNotFound(_)
                    | ServerError::EngineStopped(_)
                    | ServerError::SessionStore(_) => out.retry(e, Some(backoff)).await,
                    other => out.reject(other).await,
                };
            }
        };

        // Progress acks well inside ack_wait, so a long generation never expires.
        let mut progress =
            tokio::time::interval((self.config.ack_wait() / 3).max(Duration::from_millis(100)));
        progress.tick().await;
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Ok(response)) => {
                        let last = response.finish_reason != pb::FinishReason::Unspecified as i32;
                        out.send(&response, last).await;
                        if last {
                            return if out.flush().await { Settle::Ack } else { Settle::Nak(None) };
                        }
                    }
                    // Another turn of the session was stored first: the
                    // publisher decides whether to send this one again.
                    Some(Err(e @ ServerError::SessionConflict(_))) => return out.reject(e).await,
                    // Generation failed midway (e.g. out of memory): another
                    // replica may do better, later; max_deliver bounds the tries.
                    Some(Err(e)) => return out.retry(e, Some(backoff)).await,
                    None => {
                        let e = ServerError::EngineStopped(self.generator.models().default_name().to_string());
                        return out.retry(e, Some(backoff)).await;
                    }
                },
                _ = progress.tick() => {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::warn!(error = %e, "NATS: progress ack failed");
                    }
                }
                () = aborted(&mut self.phase) => {
                    tracing::warn!(request_id = %out.request_id, "NATS: grace period over; request given back to the queue");
                    return out.retry(ServerError::ShuttingDown, None).await;
                }
            }
        }
    }
}

/// NATS message headers as a trace-context carrier. Header names are
/// matched case-insensitively: publishers spell `traceparent` either way.
struct NatsHeaders<'a>(Option<&'a HeaderMap>);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0?
            .iter()
            .find(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.first())
            .map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|h| {
                h.iter()
                    .map(|(name, _)| AsRef::<str>::as_ref(name))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Publishes the responses of one request to its reply subject.
struct Publisher<'a> {
    client: &'a async_nats::Client,
    reply_to: String,
    encoding: Encoding,
    request_id: String,
    delivery: i64,
    /// This is the consumer's last delivery (max_deliver): nothing may be
    /// given back, every outcome is final.
    last_delivery: bool,
    seq: u64,
}

impl Publisher<'_> {
    async fn send(&mut self, response: &pb::GenerateResponse, last: bool) {
        let mut h = HeaderMap::new();
        h.insert(headers::SEQUENCE, self.seq.to_string().as_str());
        h.insert(headers::CONTENT_TYPE, self.encoding.content_type());
        h.insert(headers::REQUEST_ID, self.request_id.as_str());
        h.insert(DELIVERY, self.delivery.to_string().as_str());
        if last {
            h.insert(headers::FINAL, headers::TRUE);
        }
        self.seq += 1;
        let body = codec::encode_response(response, self.encoding);
        if let Err(e) = self
            .client
            .publish_with_headers(self.reply_to.clone(), h, body)
            .await
        {
            tracing::warn!(error = %e, reply_to = %self.reply_to, "NATS: publishing a response failed");
        }
    }

    /// Publishes a final error response.
    async fn error(&mut self, err: &ServerError) {
        tracing::info!(request_id = %self.request_id, code = ?err.code(), error = %err, "NATS: request failed");
        self.send_error(err.code(), err.to_string()).await;
    }

    async fn send_error(&mut self, code: tonic::Code, message: String) {
        let response = pb::GenerateResponse {
            request_id: self.request_id.clone(),
            error: Some(pb::Error {
                code: code as i32,
                message,
            }),
            ..Default::default()
        };
        self.send(&response, true).await;
        self.flush().await;
    }

    /// The request can never succeed: a final error, and the message is
    /// terminated.
    async fn reject(&mut self, err: ServerError) -> Settle {
        self.error(&err).await;
        Settle::Term
    }

    /// The request may succeed elsewhere or later: give it back after
    /// `delay`, unless this was its last delivery; then the publisher gets
    /// `err` as the final answer and the message is terminated.
    async fn retry(&mut self, err: ServerError, delay: Option<Duration>) -> Settle {
        if !self.last_delivery {
            tracing::warn!(request_id = %self.request_id, delivery = self.delivery, retry_in_ms = delay.map(|d| d.as_millis() as u64),
                error = %err, "NATS: request given back to the queue");
            return Settle::Nak(delay);
        }
        tracing::warn!(request_id = %self.request_id, delivery = self.delivery, error = %err,
            "NATS: last delivery (nats.max_deliver) failed; answering with the error");
        let code = err.code();
        let message = format!(
            "{err} (gave up after {} deliveries, nats.max_deliver)",
            self.delivery
        );
        self.send_error(code, message).await;
        Settle::Term
    }

    async fn flush(&self) -> bool {
        match self.client.flush().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "NATS: flush failed");
                false
            }
        }
    }
}

/// Resolves once shutdown's grace period is over (or the sender is gone).
async fn aborted(phase: &mut watch::Receiver<Phase>) {
    // The guard `wait_for` returns is not Send: drop it here, not in select!.
    let _ = phase.wait_for(|p| *p == Phase::Abort).await.map(|_| ());
}
