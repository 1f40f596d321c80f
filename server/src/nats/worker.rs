//! Serving one work-queue message: decode, generate, publish each response
//! with a sequence number, keep the message alive with progress acks, and
//! settle it: ack after the final response, term for a request that can
//! never succeed, nak for one that could succeed elsewhere or later.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use torchwire_nats::async_nats::jetstream::{self, AckKind};
use torchwire_nats::async_nats::{self, HeaderMap};
use torchwire_nats::{codec, headers, Encoding};
use torchwire_proto::v1 as pb;
use torchwire_telemetry::opentelemetry::propagation::Extractor;

use super::Phase;
use crate::api::metrics::RequestMetrics;
use crate::api::span::{self, request_span, Transport};
use crate::api::Generator;
use crate::error::ServerError;

/// Extra header on responses: which delivery of the request produced them
/// (1 = first), so subscribers recognise a redelivered request.
pub const DELIVERY: &str = "Torchwire-Delivery";

/// Delay before a request refused for load is offered again.
const OVERLOAD_RETRY: Duration = Duration::from_millis(200);

pub struct Worker {
    pub client: async_nats::Client,
    pub generator: Generator,
    pub ack_wait: Duration,
    pub phase: watch::Receiver<Phase>,
}

/// How a message is settled once its work is over.
enum Settle {
    Ack,
    Term,
    Nak(Option<Duration>),
}

impl Worker {
    pub async fn serve(mut self, msg: jetstream::Message) {
        let settle = self.handle(&msg).await;
        let result = match settle {
            Settle::Ack => msg.double_ack().await,
            Settle::Term => msg.ack_with(AckKind::Term).await,
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
        let metrics = RequestMetrics::new(transport);
        let span = request_span(transport, &NatsHeaders(msg.headers.as_ref()));
        let encoding = Encoding::from_headers(msg.headers.as_ref());
        let delivery = msg.info().map(|i| i.delivered).unwrap_or(1);
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let Some(reply_to) = header(headers::REPLY_TO).filter(|s| !s.is_empty()) else {
            tracing::warn!(subject = %msg.subject, "NATS: request without a {} header; terminated", headers::REPLY_TO);
            let err = ServerError::invalid("message", format!("no {} header", headers::REPLY_TO));
            span::record_error(&span, &err);
            metrics.failed(&err);
            return Settle::Term;
        };
        let header_id = header(headers::REQUEST_ID).unwrap_or_default();
        let mut out = Publisher {
            client: &self.client,
            reply_to,
            encoding,
            request_id: header_id.clone(),
            delivery,
            seq: 0,
        };

        let mut request = match codec::decode_request(&msg.payload, encoding) {
            Ok(r) => r,
            Err(e) => {
                let err = ServerError::invalid("message", e.to_string());
                span::record_error(&span, &err);
                metrics.failed(&err);
                out.error(&err).await;
                return Settle::Term;
            }
        };
        if request.request_id.is_empty() {
            request.request_id = header_id;
        }
        // Errors before generation starts carry the id too.
        out.request_id = request.request_id.clone();
        if delivery > 1 {
            tracing::info!(request_id = %request.request_id, delivery, "NATS: redelivered request");
        }
        let mut stream = match self.generator.generate(&request, span, metrics).await {
            Ok(s) => s,
            Err(e) => return out.refused(e).await,
        };
        out.request_id = stream.request_id().to_string();

        // Progress acks well inside ack_wait, so a long generation never expires.
        let mut progress =
            tokio::time::interval((self.ack_wait / 3).max(Duration::from_millis(100)));
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
                    Some(Err(e)) => return out.failed(e).await,
                    None => return Settle::Nak(None),
                },
                _ = progress.tick() => {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::warn!(error = %e, "NATS: progress ack failed");
                    }
                }
                () = aborted(&mut self.phase) => {
                    tracing::warn!(request_id = %out.request_id, "NATS: grace period over; request given back to the queue");
                    return Settle::Nak(None);
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
        let response = pb::GenerateResponse {
            request_id: self.request_id.clone(),
            error: Some(pb::Error {
                code: err.code() as i32,
                message: err.to_string(),
            }),
            ..Default::default()
        };
        self.send(&response, true).await;
        self.flush().await;
    }

    /// The request was not accepted: load and shutdown are retried (elsewhere
    /// or later); anything else is the request's own fault and final.
    async fn refused(&mut self, err: ServerError) -> Settle {
        match err {
            ServerError::Overloaded { .. } => Settle::Nak(Some(OVERLOAD_RETRY)),
            ServerError::ShuttingDown | ServerError::EngineStopped(_) => Settle::Nak(None),
            other => {
                self.error(&other).await;
                Settle::Term
            }
        }
    }

    /// Generation failed midway (e.g. out of memory): another replica may do
    /// better, and max_deliver bounds the retries.
    async fn failed(&mut self, err: ServerError) -> Settle {
        tracing::warn!(request_id = %self.request_id, error = %err, "NATS: generation failed; request given back");
        Settle::Nak(None)
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
