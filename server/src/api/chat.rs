//! The transport-independent chat call: checks the messages, renders them
//! with the model's chat template (off the async runtime), and queues the
//! prompt like Generate. gRPC (and the session layer) serve chat through this.

use std::sync::Arc;
use torchwire_proto::v1 as pb;
use tracing::Span;

use super::generate::{Accepted, Generator, ResponseStream};
use super::metrics::RequestMetrics;
use super::validate::{self, Prompt};
use crate::chat::{self, ChatTemplate, Rendered};
use crate::engine::Engine;
use crate::error::ServerError;

/// One chat turn: the whole conversation to render.
#[derive(Debug, Clone, Copy)]
pub struct ChatTurn<'a> {
    /// Empty selects the default model.
    pub model: &'a str,
    /// Empty: the server makes one.
    pub request_id: &'a str,
    pub messages: &'a [pb::ChatMessage],
    pub options: Option<&'a pb::GenerationOptions>,
}

impl<'a> ChatTurn<'a> {
    /// The turn a stateless ChatRequest asks for.
    pub fn of_request(req: &'a pb::ChatRequest) -> Self {
        Self {
            model: &req.model,
            request_id: &req.request_id,
            messages: &req.messages,
            options: req.options.as_ref(),
        }
    }
}

impl Generator {
    /// Validates, renders and queues a chat turn; the stream yields its
    /// responses as [`Generator::generate`]'s does.
    pub async fn chat(
        &self,
        turn: ChatTurn<'_>,
        span: Span,
        mut metrics: RequestMetrics,
    ) -> Result<ResponseStream, ServerError> {
        span.record("gen_ai.operation.name", "chat");
        let accepted = self.accept_chat(turn, &span, &mut metrics).await;
        self.stream(accepted, span, metrics)
    }

    async fn accept_chat(
        &self,
        turn: ChatTurn<'_>,
        span: &Span,
        metrics: &mut RequestMetrics,
    ) -> Result<Accepted, ServerError> {
        let (engine, request_id) = self.begin(turn.model, turn.request_id, span, metrics)?;
        let max_prompt_bytes = self.limits().prompt_bytes(engine.info.context_length);
        let checked = validate::check_chat(
            turn.request_id,
            turn.options,
            message_bytes(turn.messages),
            max_prompt_bytes,
        )?;
        let rendered = self.render_on(engine, turn.messages).await?;
        // Prompts are user data: only at debug level, never on the span.
        tracing::debug!(request_id = %request_id, model = %engine.info.name, prompt = %rendered.prompt, prompt_tokens = rendered.token_ids.len(), "chat accepted");
        let prompt = Prompt {
            ids: rendered.token_ids,
            field: "messages",
            what: "render to",
        };
        self.submit(engine, checked, prompt, request_id, span, metrics)
    }

    /// The prompt and token ids `messages` become for `model` (RenderChat).
    pub async fn render(
        &self,
        model: &str,
        messages: &[pb::ChatMessage],
    ) -> Result<Rendered, ServerError> {
        if self.is_draining() {
            return Err(ServerError::ShuttingDown);
        }
        let engine = self.models().get(model)?;
        let max_prompt_bytes = self.limits().prompt_bytes(engine.info.context_length);
        validate::text_size("messages", message_bytes(messages), max_prompt_bytes)?;
        self.render_on(engine, messages).await
    }

    /// Checks `messages` and renders them with `engine`'s template, on the
    /// blocking pool (at most as many renders and tokenizations at once as
    /// there are cores), never on the async runtime.
    pub(crate) async fn render_on(
        &self,
        engine: &Engine,
        messages: &[pb::ChatMessage],
    ) -> Result<Rendered, ServerError> {
        chat::validate_messages(messages)?;
        let template: Arc<ChatTemplate> = engine
            .chat_template
            .clone()
            .map_err(ServerError::NoChatTemplate)?;
        let tokenizer = engine.tokenizer.clone();
        let name = engine.info.name.clone();
        let messages = messages.to_vec();
        let render_name = name.clone();
        let _permit = validate::cpu_permit().await?;
        tokio::task::spawn_blocking(move || {
            chat::render(&render_name, &template, &tokenizer, &messages)
        })
        .await
        .map_err(|e| ServerError::ChatTemplate {
            model: name,
            message: format!("the render task failed: {e}"),
        })?
    }
}

/// The bytes of text in `messages` (what the prompt size limit counts).
pub(crate) fn message_bytes(messages: &[pb::ChatMessage]) -> usize {
    messages
        .iter()
        .map(|m| {
            m.role.len()
                + m.content.len()
                + m.name.as_ref().map_or(0, String::len)
                + m.tool_call_id.as_ref().map_or(0, String::len)
        })
        .sum()
}
