//! A chat turn with a session: read the stored conversation, append the new
//! messages, check that the whole fits the model's context (or drop the
//! oldest turns when the client asks), generate, and store the conversation
//! with the answer before the final response is sent, against the revision
//! that was read. The final response therefore means "stored"; a turn that
//! fails, is cancelled or loses a race stores nothing.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use torchwire_proto::v1 as pb;
use tracing::Span;

use super::{id, SessionStore, Stored};
use crate::api::chat::{message_bytes, ChatTurn};
use crate::api::generate::Generator;
use crate::api::metrics::RequestMetrics;
use crate::api::validate::{self, Prompt};
use crate::chat::{self, Rendered};
use crate::engine::Engine;
use crate::error::ServerError;

/// Where conversations are kept.
pub enum Sessions {
    /// Not served; says why (no NATS, or turned off).
    Off(String),
    On(Box<SessionStore>),
}

/// The responses of a chat turn, as any transport sends them.
pub type ChatStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, ServerError>> + Send>>;

/// A chat turn queued on its engine.
pub struct ChatResponses {
    pub request_id: String,
    pub stream: ChatStream,
}

/// What is stored when the turn's answer is complete.
struct Pending {
    store: SessionStore,
    session: pb::Session,
    revision: u64,
}

impl Generator {
    /// A chat turn on any transport: stateless, or continuing the session it
    /// names (see the module docs).
    pub async fn chat_turn(
        &self,
        req: &pb::ChatRequest,
        span: Span,
        metrics: RequestMetrics,
    ) -> Result<ChatResponses, ServerError> {
        if req.session_id.is_empty() {
            let stream = self.chat(ChatTurn::of_request(req), span, metrics).await?;
            return Ok(ChatResponses {
                request_id: stream.request_id().to_string(),
                stream: Box::pin(stream),
            });
        }
        span.record("gen_ai.operation.name", "chat");
        let mut metrics = metrics;
        match self.accept_session_turn(req, &span, &mut metrics).await {
            Ok((accepted, pending)) => {
                let stream = self.stream(Ok(accepted), span, metrics)?;
                Ok(ChatResponses {
                    request_id: stream.request_id().to_string(),
                    stream: pending.store_when_finished(stream),
                })
            }
            Err(e) => Err(self.refused(e, &span, metrics)),
        }
    }

    async fn accept_session_turn(
        &self,
        req: &pb::ChatRequest,
        span: &Span,
        metrics: &mut RequestMetrics,
    ) -> Result<(crate::api::generate::Accepted, Pending), ServerError> {
        if self.is_draining() {
            return Err(ServerError::ShuttingDown);
        }
        id::check("session_id", &req.session_id)?;
        let mode = pb::SessionMode::try_from(req.session_mode).map_err(|_| {
            ServerError::invalid(
                "session_mode",
                format!("unknown session mode {}", req.session_mode),
            )
        })?;
        // The new messages are checked on their own, so errors name their index.
        chat::validate_messages(&req.messages)?;
        let store = self.store()?;
        let stored = store.load(&req.session_id).await?;
        let history = match (mode, stored.session) {
            (pb::SessionMode::New, _) => None,
            (pb::SessionMode::Continue, None) => {
                return Err(ServerError::SessionNotFound(req.session_id.clone()))
            }
            (_, session) => session,
        };
        let model = model_of(req, history.as_ref())?.to_string();
        let (engine, request_id) = self.begin(&model, &req.request_id, span, metrics)?;
        let max_prompt_bytes = self.limits().prompt_bytes(engine.info.context_length);
        let checked = validate::check_chat(
            &req.request_id,
            req.options.as_ref(),
            message_bytes(&req.messages),
            max_prompt_bytes,
        )?;
        let mut messages = history.map(|s| s.messages).unwrap_or_default();
        let stored_count = messages.len();
        messages.extend(req.messages.iter().cloned());
        let needed_after = checked.max_new_tokens().unwrap_or(1) as usize;
        let rendered = self
            .fit(
                engine,
                &req.session_id,
                &mut messages,
                stored_count,
                req.truncate_history,
                needed_after,
            )
            .await?;
        tracing::debug!(request_id = %request_id, session_id = %req.session_id, model = %engine.info.name,
            messages = messages.len(), prompt_tokens = rendered.token_ids.len(), "session turn accepted");
        let prompt = Prompt {
            ids: rendered.token_ids,
            field: "messages",
            what: "render to",
        };
        let accepted = self.submit(engine, checked, prompt, request_id, span, metrics)?;
        let pending = Pending {
            store: store.clone(),
            session: pb::Session {
                session_id: req.session_id.clone(),
                model: engine.info.name.clone(),
                messages,
                ..Default::default()
            },
            revision: stored.revision,
        };
        Ok((accepted, pending))
    }

    /// Renders `messages`; while the prompt plus `needed_after` tokens do not
    /// fit the context, drops the oldest stored turn if `truncate` (system
    /// messages and the new messages are kept), else refuses the turn.
    async fn fit(
        &self,
        engine: &Engine,
        session_id: &str,
        messages: &mut Vec<pb::ChatMessage>,
        mut stored: usize,
        truncate: bool,
        needed_after: usize,
    ) -> Result<Rendered, ServerError> {
        let context = engine.info.context_length;
        let max_bytes = self.limits().prompt_bytes(context);
        loop {
            let bytes = message_bytes(messages);
            let why = if bytes > max_bytes {
                format!("its text is {bytes} bytes, more than the {max_bytes} allowed for a prompt (limits.max_prompt_bytes)")
            } else {
                let rendered = self.render_on(engine, messages).await?;
                let tokens = rendered.token_ids.len();
                if tokens + needed_after <= context {
                    return Ok(rendered);
                }
                format!(
                    "it renders to {tokens} tokens and the answer needs at least {needed_after} more, \
                     beyond the model's context of {context} tokens"
                )
            };
            if !truncate {
                return Err(ServerError::SessionRefused(format!(
                    "session {session_id:?} no longer fits with this turn: {why}; start a new session \
                     (session_mode NEW) or set truncate_history to drop its oldest turns"
                )));
            }
            if !drop_oldest_turn(messages, &mut stored) {
                return Err(ServerError::SessionRefused(format!(
                    "session {session_id:?}: even with every older turn dropped the conversation \
                     does not fit: {why}"
                )));
            }
        }
    }

    /// The stored conversation of `session_id` (GetSession).
    pub async fn get_session(&self, session_id: &str) -> Result<pb::Session, ServerError> {
        id::check("session_id", session_id)?;
        self.store()?
            .load(session_id)
            .await?
            .session
            .ok_or_else(|| ServerError::SessionNotFound(session_id.to_string()))
    }

    /// Forgets `session_id`; false if there was no such session (DeleteSession).
    pub async fn delete_session(&self, session_id: &str) -> Result<bool, ServerError> {
        id::check("session_id", session_id)?;
        self.store()?.delete(session_id).await
    }

    /// RenderChat: `messages` after the stored conversation of
    /// `session_id` (if any), and the model to render for.
    pub async fn with_history(
        &self,
        session_id: &str,
        model: &str,
        messages: &[pb::ChatMessage],
    ) -> Result<(String, Vec<pb::ChatMessage>), ServerError> {
        if session_id.is_empty() {
            return Ok((model.to_string(), messages.to_vec()));
        }
        id::check("session_id", session_id)?;
        let Stored { session, .. } = self.store()?.load(session_id).await?;
        let Some(session) = session else {
            return Ok((model.to_string(), messages.to_vec()));
        };
        let model = if model.is_empty() {
            session.model.clone()
        } else {
            model.to_string()
        };
        let mut all = session.messages;
        all.extend_from_slice(messages);
        Ok((model, all))
    }

    fn store(&self) -> Result<&SessionStore, ServerError> {
        match self.sessions() {
            Sessions::On(store) => Ok(store),
            Sessions::Off(why) => Err(ServerError::SessionsOff(why.clone())),
        }
    }
}

/// The model a session turn runs on: the session's own when the request
/// names none; another one is refused (the cached prefix and the template
/// belong to the model the conversation was held with).
fn model_of<'a>(
    req: &'a pb::ChatRequest,
    history: Option<&'a pb::Session>,
) -> Result<&'a str, ServerError> {
    match history {
        Some(s) if req.model.is_empty() => Ok(&s.model),
        Some(s) if req.model != s.model => Err(ServerError::SessionRefused(format!(
            "session {:?} is held with model {:?}, not {:?}: leave model empty or start a new session",
            req.session_id, s.model, req.model
        ))),
        _ => Ok(&req.model),
    }
}

/// Drops the oldest stored message that is not a system message, and then
/// any stored answers and tool results left before the next user message,
/// so the conversation still starts with a user turn. `stored` counts the
/// stored messages at the front. False when nothing can be dropped.
fn drop_oldest_turn(messages: &mut Vec<pb::ChatMessage>, stored: &mut usize) -> bool {
    let droppable = |m: &pb::ChatMessage| m.role != "system";
    let Some(first) = messages[..*stored].iter().position(droppable) else {
        return false;
    };
    messages.remove(first);
    *stored -= 1;
    while first < *stored && messages[first].role != "user" && droppable(&messages[first]) {
        messages.remove(first);
        *stored -= 1;
    }
    true
}

impl Pending {
    /// Passes the responses on, holding back the final one until the
    /// conversation and its answer are stored; a conflict or a store error
    /// ends the stream with that error instead.
    fn store_when_finished(
        self,
        stream: impl Stream<Item = Result<pb::GenerateResponse, ServerError>> + Send + Unpin + 'static,
    ) -> ChatStream {
        let state = Some((stream, self, String::new()));
        Box::pin(futures::stream::unfold(state, |state| async move {
            let (mut stream, pending, mut answer) = state?;
            match stream.next().await? {
                Ok(response) if response.finish_reason == pb::FinishReason::Unspecified as i32 => {
                    answer.push_str(&response.text);
                    Some((Ok(response), Some((stream, pending, answer))))
                }
                Ok(response) => {
                    answer.push_str(&response.text);
                    let request_id = response.request_id.clone();
                    let stored = pending.store(answer).await;
                    drop(stream);
                    match stored {
                        Ok(()) => Some((Ok(response), None)),
                        Err(e) => {
                            tracing::warn!(request_id = %request_id, error = %e, "session turn not stored");
                            Some((Err(e), None))
                        }
                    }
                }
                Err(e) => Some((Err(e), None)),
            }
        }))
    }

    async fn store(mut self, answer: String) -> Result<(), ServerError> {
        self.session.messages.push(pb::ChatMessage {
            role: "assistant".into(),
            content: answer,
            ..Default::default()
        });
        self.session.updated_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.store
            .save(&self.session.session_id, &self.session, self.revision)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(roles: &[&str]) -> Vec<pb::ChatMessage> {
        roles
            .iter()
            .enumerate()
            .map(|(i, r)| pb::ChatMessage {
                role: r.to_string(),
                content: i.to_string(),
                ..Default::default()
            })
            .collect()
    }

    fn roles(m: &[pb::ChatMessage]) -> Vec<&str> {
        m.iter().map(|m| m.role.as_str()).collect()
    }

    #[test]
    fn truncation_drops_whole_turns_and_keeps_the_system_prompt() {
        let mut m = msgs(&[
            "system",
            "user",
            "assistant",
            "user",
            "tool",
            "assistant",
            "user",
        ]);
        let mut stored = 6;
        assert!(drop_oldest_turn(&mut m, &mut stored));
        assert_eq!(roles(&m), ["system", "user", "tool", "assistant", "user"]);
        assert_eq!(stored, 4);
        assert_eq!(m[1].content, "3");
        assert!(drop_oldest_turn(&mut m, &mut stored));
        assert_eq!(roles(&m), ["system", "user"]);
        assert_eq!(stored, 1);
        // Only the system prompt and the new message are left.
        assert!(!drop_oldest_turn(&mut m, &mut stored));
        assert_eq!(m[1].content, "6");
    }
}
