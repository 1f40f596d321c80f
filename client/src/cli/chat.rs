//! `torchwire chat`: a conversation in the terminal, one line per user turn,
//! the answers streamed as they arrive; or, with `--messages`, one turn for
//! scripts, the conversation read as JSON.
//!
//! Without `--session` the CLI keeps the conversation and sends all of it
//! every turn; with `--session ID` the server keeps it and each turn sends
//! only the new message.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use tonic::Code;
use torchwire_client::proto::{
    ChatMessage, ChatRequest, GenerateResponse, RenderChatRequest, SessionMode,
};
use torchwire_client::{Client, Error};

use super::generate::{summary, OptionsArgs};

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Model name (default: the server's default model).
    #[arg(long, default_value = "", hide_default_value = true)]
    model: String,
    /// A system message that opens the conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Keep the conversation on the server under this id, and continue it
    /// if it exists.
    #[arg(long, value_name = "ID")]
    session: Option<String>,
    /// With --session: when the conversation outgrows the model's context,
    /// let the server drop its oldest turns (the system message stays)
    /// instead of refusing the turn.
    #[arg(long, requires = "session")]
    truncate_history: bool,
    /// One turn for scripts: read the messages from FILE (`-` = stdin), as a
    /// JSON array of {"role", "content"} objects or a ChatRequest object
    /// (canonical protobuf JSON), print the answer and exit.
    #[arg(long, value_name = "FILE")]
    messages: Option<PathBuf>,
    /// With --messages: print the prompt the model would see (RenderChat)
    /// instead of generating; its token count goes to stderr.
    #[arg(long, requires = "messages")]
    render: bool,
    #[command(flatten)]
    options: OptionsArgs,
    /// Print each response message as one line of canonical protobuf JSON.
    #[arg(long)]
    json: bool,
    /// No summary on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// The commands of an interactive conversation.
const HELP: &str = "Type a message and press Enter. /new starts a new conversation, /quit (or end of input) quits.";

pub async fn run(client: &Client, args: ChatArgs) -> anyhow::Result<ExitCode> {
    match &args.messages {
        Some(path) => one_turn(client, &args, path).await,
        None => interactive(client, &args).await,
    }
}

/// `--messages`: one request from JSON.
async fn one_turn(client: &Client, args: &ChatArgs, path: &PathBuf) -> anyhow::Result<ExitCode> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| anyhow::anyhow!("cannot read the messages from stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
    };
    let mut request = parse_messages(&text)?;
    if request.model.is_empty() {
        request.model = args.model.clone();
    }
    if let Some(system) = &args.system {
        request.messages.insert(0, message("system", system));
    }
    if request.options.is_none() {
        request.options = Some(args.options.options());
    }
    if let Some(id) = &args.session {
        request.session_id = id.clone();
    }
    request.truncate_history |= args.truncate_history;
    if args.render {
        let rendered = client
            .render_chat(RenderChatRequest {
                model: request.model,
                messages: request.messages,
                session_id: request.session_id,
            })
            .await?;
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&rendered)?)?;
        } else {
            out.write_all(rendered.prompt.as_bytes())?;
        }
        if !args.quiet {
            eprintln!(
                "[model: {}, prompt tokens: {}]",
                rendered.model, rendered.count
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    stream_answer(client, request, args).await?;
    Ok(ExitCode::SUCCESS)
}

/// The messages file: a JSON array of messages, or a whole ChatRequest.
fn parse_messages(text: &str) -> anyhow::Result<ChatRequest> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("the messages are not valid JSON: {e}"))?;
    let request = if value.is_array() {
        serde_json::from_value(serde_json::json!({ "messages": value }))
    } else {
        serde_json::from_value(value)
    };
    request.map_err(|e| {
        anyhow::anyhow!(
            "the messages must be a JSON array of {{\"role\", \"content\"}} objects or a ChatRequest object: {e}"
        )
    })
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

/// The interactive loop: one line of stdin per user turn.
async fn interactive(client: &Client, args: &ChatArgs) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdin().is_terminal();
    let mut conversation = Conversation::new(args);
    if let Some(id) = &args.session {
        conversation.resume(client, id).await?;
    }
    if terminal {
        eprintln!("{HELP}");
    }
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if terminal {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| anyhow::anyhow!("cannot read stdin: {e}"))?;
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/new" => {
                conversation.restart();
                if terminal {
                    eprintln!("(new conversation)");
                }
                continue;
            }
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            _ => {}
        }
        let request = conversation.turn(&line);
        match stream_answer(client, request, args).await {
            Ok(answer) => conversation.answered(answer),
            // A refused turn (bad input, full queue...) leaves the
            // conversation as it was; the user may try again.
            Err(e) if terminal && is_retryable_refusal(&e) => {
                conversation.refused();
                eprintln!("error: {e:#}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn is_retryable_refusal(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Error>().is_some_and(|e| {
        matches!(
            e.code(),
            Code::InvalidArgument | Code::ResourceExhausted | Code::Aborted | Code::OutOfRange
        )
    })
}

/// What the CLI keeps of a conversation between turns.
struct Conversation {
    model: String,
    system: Option<String>,
    options: torchwire_client::proto::GenerationOptions,
    session: Option<String>,
    truncate_history: bool,
    /// Stateless: every message so far. With a session: the messages of
    /// the turn being sent (the server has the rest).
    messages: Vec<ChatMessage>,
    /// With a session: how the next turn treats the stored conversation.
    mode: SessionMode,
    /// Whether the next turn opens the conversation (gets the system message).
    opening: bool,
}

impl Conversation {
    fn new(args: &ChatArgs) -> Self {
        Self {
            model: args.model.clone(),
            system: args.system.clone(),
            options: args.options.options(),
            session: args.session.clone(),
            truncate_history: args.truncate_history,
            messages: vec![],
            mode: SessionMode::Auto,
            opening: true,
        }
    }

    /// Continues a stored session if the server has it.
    async fn resume(&mut self, client: &Client, id: &str) -> anyhow::Result<()> {
        match client.get_session(id).await {
            Ok(found) => {
                let count = found.session.map_or(0, |s| s.messages.len());
                eprintln!("(continuing session {id}: {count} messages)");
                self.opening = false;
                self.mode = SessionMode::Continue;
            }
            Err(e) if e.code() == Code::NotFound => {
                eprintln!("(new session {id})");
                self.mode = SessionMode::New;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn restart(&mut self) {
        self.messages.clear();
        self.opening = true;
        if self.session.is_some() {
            self.mode = SessionMode::New;
        }
    }

    /// The request for the user's next message.
    fn turn(&mut self, text: &str) -> ChatRequest {
        if self.session.is_some() {
            self.messages.clear();
        }
        if self.opening {
            if let Some(system) = &self.system {
                self.messages.push(message("system", system));
            }
        }
        self.messages.push(message("user", text));
        ChatRequest {
            model: self.model.clone(),
            messages: self.messages.clone(),
            options: Some(self.options.clone()),
            session_id: self.session.clone().unwrap_or_default(),
            session_mode: self.mode as i32,
            truncate_history: self.truncate_history,
            ..Default::default()
        }
    }

    fn answered(&mut self, answer: String) {
        self.opening = false;
        if self.session.is_some() {
            self.mode = SessionMode::Continue;
        } else {
            self.messages.push(message("assistant", &answer));
        }
    }

    /// Takes back the turn's messages after the server refused it.
    fn refused(&mut self) {
        self.messages.pop();
        if self.opening && self.system.is_some() {
            self.messages.pop();
        }
    }
}

/// Sends one turn and streams the answer to stdout; returns its text.
async fn stream_answer(
    client: &Client,
    request: ChatRequest,
    args: &ChatArgs,
) -> anyhow::Result<String> {
    let start = Instant::now();
    let mut stream = client.chat(request).await?;
    let mut out = std::io::stdout().lock();
    let mut answer = String::new();
    let mut first_token: Option<Duration> = None;
    let mut last: Option<GenerateResponse> = None;
    while let Some(msg) = stream.message().await.map_err(Error::from)? {
        if first_token.is_none() && !msg.token_ids.is_empty() {
            first_token = Some(start.elapsed());
        }
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&msg)?)?;
        } else {
            out.write_all(msg.text.as_bytes())?;
        }
        out.flush()?;
        answer.push_str(&msg.text);
        last = Some(msg);
    }
    if !args.json {
        writeln!(out)?;
    }
    if !args.quiet {
        eprintln!("{}", summary(last.as_ref(), first_token, start.elapsed()));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_an_array_or_a_chat_request() {
        let r = parse_messages(r#"[{"role":"user","content":"hi"}]"#).unwrap();
        assert_eq!(r.messages, vec![message("user", "hi")]);
        let r = parse_messages(
            r#"{"model":"m","messages":[{"role":"system","content":"s"}],"options":{"maxNewTokens":3}}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.options.unwrap().max_new_tokens, Some(3));
        let err = parse_messages(r#"{"messages": 3}"#).unwrap_err();
        assert!(err.to_string().contains("JSON array"), "{err}");
        assert!(parse_messages("nope").is_err());
    }
}
