//! Chat: a conversation turned into the prompt a model expects, with the
//! model's own chat template (see [`template`]), and the checks on the
//! messages a client sends.

pub mod template;

use std::sync::Arc;

use serde::Serialize;
use torchwire_proto::v1::ChatMessage;

use crate::error::ServerError;
pub use template::{ChatTemplate, RenderError, SpecialTokens, TemplateOrigin};

/// The roles a message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];
/// Messages in one request at most.
pub const MAX_MESSAGES: usize = 4096;
/// Bytes of a message's `name` or `tool_call_id` at most.
pub const MAX_NAME_BYTES: usize = 256;

/// One message as a template sees it: `name` and `tool_call_id` only when
/// set, as transformers drops keys whose value is None.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TemplateMessage<'a> {
    pub role: &'a str,
    pub content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<&'a str>,
}

/// Checks a request's messages; errors name the field (`messages[2].role`).
pub fn validate_messages(messages: &[ChatMessage]) -> Result<(), ServerError> {
    if messages.is_empty() {
        return Err(ServerError::invalid(
            "messages",
            "must not be empty: a conversation needs at least one message",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ServerError::invalid(
            "messages",
            format!("at most {MAX_MESSAGES} messages, got {}", messages.len()),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ServerError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "must be one of {}, got {:?}",
                    ROLES.join(", "),
                    truncated(&m.role)
                ),
            ));
        }
        for (field, value) in [("name", &m.name), ("tool_call_id", &m.tool_call_id)] {
            if value.as_ref().is_some_and(|v| v.len() > MAX_NAME_BYTES) {
                return Err(ServerError::invalid(
                    format!("messages[{i}].{field}"),
                    format!("at most {MAX_NAME_BYTES} bytes"),
                ));
            }
        }
    }
    Ok(())
}

/// The messages as the template gets them.
pub fn template_messages(messages: &[ChatMessage]) -> Vec<TemplateMessage<'_>> {
    messages
        .iter()
        .map(|m| TemplateMessage {
            role: &m.role,
            content: &m.content,
            name: m.name.as_deref(),
            tool_call_id: m.tool_call_id.as_deref(),
        })
        .collect()
}

/// A rendered conversation: the prompt text and its token ids.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub prompt: String,
    pub token_ids: Vec<u32>,
}

/// Renders `messages` with `template` (ending with the assistant's turn
/// header) and tokenizes the result as transformers does for a chat: with no
/// special tokens added, since the template writes its own. Blocking: call
/// it off the async runtime.
pub fn render(
    model: &str,
    template: &ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
    messages: &[ChatMessage],
) -> Result<Rendered, ServerError> {
    let prompt = template
        .render(&template_messages(messages), true)
        .map_err(|e| match e {
            RenderError::Raised(message) => ServerError::invalid(
                "messages",
                format!("the chat template of model {model:?} refused them: {message}"),
            ),
            RenderError::Failed(message) => ServerError::ChatTemplate {
                model: model.to_string(),
                message,
            },
        })?;
    let token_ids = tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| ServerError::invalid("messages", format!("cannot be tokenized: {e}")))?
        .get_ids()
        .to_vec();
    Ok(Rendered { prompt, token_ids })
}

/// A model's chat template, or why it has none (reported as
/// FAILED_PRECONDITION to chat requests).
pub type ChatSupport = Result<Arc<ChatTemplate>, String>;

/// Loads a model's template (see [`template::load`]). A model without one,
/// or whose own one does not compile, still serves Generate (and Chat is
/// refused); a configured template that cannot be used is a config error.
pub fn load_support(
    name: &str,
    dir: &std::path::Path,
    configured: Option<&std::path::Path>,
) -> Result<ChatSupport, ServerError> {
    match template::load(dir, configured) {
        Ok(Some(t)) => {
            tracing::info!(model = name, template = %t.origin(), "chat template loaded");
            Ok(Ok(Arc::new(t)))
        }
        Ok(None) => Ok(Err(format!(
            "model {name:?} has no chat template (no chat_template in tokenizer_config.json, \
             no chat_template.jinja); configure models.{name}.chat_template"
        ))),
        Err(e) if configured.is_some() => Err(ServerError::config(
            format!("models.{name}.chat_template"),
            e,
        )),
        Err(e) => {
            tracing::warn!(model = name, error = %e, "chat template unusable; Chat is refused for this model");
            Ok(Err(format!(
                "model {name:?} has no usable chat template: {e}"
            )))
        }
    }
}

/// Keeps error messages short when echoing client input.
fn truncated(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: "x".into(),
            ..Default::default()
        }
    }

    fn field_of(err: ServerError) -> String {
        match err {
            ServerError::InvalidArgument { field, .. } => field.into_owned(),
            other => panic!("not an invalid argument: {other:?}"),
        }
    }

    #[test]
    fn bad_messages_are_named() {
        assert_eq!(field_of(validate_messages(&[]).unwrap_err()), "messages");
        let err = validate_messages(&[msg("user"), msg("wizard")]).unwrap_err();
        assert_eq!(field_of(err), "messages[1].role");
        let mut long = msg("tool");
        long.tool_call_id = Some("x".repeat(300));
        assert_eq!(
            field_of(validate_messages(&[long]).unwrap_err()),
            "messages[0].tool_call_id"
        );
        validate_messages(&ROLES.map(msg)).unwrap();
    }

    #[test]
    fn unset_optional_fields_are_absent_for_the_template() {
        let mut m = msg("user");
        m.name = Some("ann".into());
        let v = serde_json::to_value(template_messages(&[m])).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"role": "user", "content": "x", "name": "ann"}])
        );
    }
}
