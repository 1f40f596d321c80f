//! `torchwire generate`: one streamed generation, text (or JSON lines) to
//! stdout as it arrives, a summary to stderr.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use torchwire_client::proto::{FinishReason, GenerateRequest, GenerateResponse, GenerationOptions};
use torchwire_client::Client;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt; `-` reads it from standard input.
    pub prompt: String,
    /// Model name (default: the server's default model).
    #[arg(long, default_value = "", hide_default_value = true)]
    model: String,
    #[command(flatten)]
    options: OptionsArgs,
    /// Request id echoed on every response (default: the server makes one).
    #[arg(long, default_value = "", hide_default_value = true)]
    request_id: String,
    /// Print each response message as one line of canonical protobuf JSON.
    #[arg(long)]
    pub json: bool,
    /// No summary on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The generation options, shared by `generate` and `chat`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Generation")]
pub struct OptionsArgs {
    /// Tokens to generate at most (default: the server's).
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Nucleus sampling threshold in (0, 1] (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Drop tokens below min_p times the top probability (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Penalty for tokens already seen (1 or 0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Seed for sampling: same seed and request, same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Return this many top alternatives (and the chosen token's logprob) per token.
    #[arg(long, default_value_t = 0)]
    logprobs: u32,
}

impl OptionsArgs {
    /// The options these flags describe.
    pub fn options(&self) -> GenerationOptions {
        GenerationOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
        }
    }
}

impl GenerateArgs {
    /// The request these flags describe, for `prompt`. The options travel
    /// in the flat fields, which every server version reads.
    pub fn request(&self, prompt: String) -> GenerateRequest {
        let o = self.options.options();
        GenerateRequest {
            model: self.model.clone(),
            prompt,
            request_id: self.request_id.clone(),
            max_new_tokens: o.max_new_tokens,
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            min_p: o.min_p,
            repetition_penalty: o.repetition_penalty,
            seed: o.seed,
            stop: o.stop,
            ignore_eos: o.ignore_eos,
            logprobs: o.logprobs,
            options: None,
        }
    }
}

pub async fn run(client: &Client, args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let prompt = super::text_or_stdin(args.prompt.clone())?;
    let request = args.request(prompt);
    let start = Instant::now();
    let mut stream = client.generate(request).await?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut first_token: Option<Duration> = None;
    let mut last: Option<GenerateResponse> = None;
    let mut ends_with_newline = true;
    while let Some(message) = stream
        .message()
        .await
        .map_err(torchwire_client::Error::from)?
    {
        if first_token.is_none() && !message.token_ids.is_empty() {
            first_token = Some(start.elapsed());
        }
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&message)?)?;
        } else if !message.text.is_empty() {
            out.write_all(message.text.as_bytes())?;
            ends_with_newline = message.text.ends_with('\n');
        }
        out.flush()?;
        last = Some(message);
    }
    let elapsed = start.elapsed();
    if !args.json && !ends_with_newline && std::io::stdout().is_terminal() {
        writeln!(out)?;
    }
    if !args.quiet {
        eprintln!("{}", summary(last.as_ref(), first_token, elapsed));
    }
    Ok(ExitCode::SUCCESS)
}

/// One line for stderr: token counts, time to first token, speed, and why
/// generation stopped.
pub(super) fn summary(
    last: Option<&GenerateResponse>,
    first_token: Option<Duration>,
    elapsed: Duration,
) -> String {
    let usage = last.and_then(|m| m.usage).unwrap_or_default();
    let ttft = first_token.map_or("-".to_string(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    });
    let rate = usage.completion_tokens as f64 / elapsed.as_secs_f64().max(1e-9);
    let finish = last.map_or("none".to_string(), |m| finish_reason(m.finish_reason()));
    let stop = last
        .filter(|m| !m.stop_sequence.is_empty())
        .map(|m| format!(" ({:?})", m.stop_sequence));
    format!(
        "[prompt tokens: {}, completion tokens: {}, time to first token: {ttft}, {rate:.1} tokens/s over {:.2} s, finish reason: {finish}{}]",
        usage.prompt_tokens,
        usage.completion_tokens,
        elapsed.as_secs_f64(),
        stop.unwrap_or_default(),
    )
}

/// `FINISH_REASON_STOP_SEQUENCE` → `stop_sequence`.
fn finish_reason(reason: FinishReason) -> String {
    reason
        .as_str_name()
        .trim_start_matches("FINISH_REASON_")
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use torchwire_client::proto::Usage;

    use super::*;

    #[test]
    fn summary_names_counts_speed_and_reason() {
        let last = GenerateResponse {
            finish_reason: FinishReason::StopSequence as i32,
            stop_sequence: "\n".into(),
            usage: Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 20,
            }),
            ..Default::default()
        };
        let line = summary(
            Some(&last),
            Some(Duration::from_millis(25)),
            Duration::from_secs(2),
        );
        assert!(line.contains("prompt tokens: 5"), "{line}");
        assert!(line.contains("completion tokens: 20"), "{line}");
        assert!(line.contains("time to first token: 25.0 ms"), "{line}");
        assert!(line.contains("10.0 tokens/s"), "{line}");
        assert!(
            line.contains("finish reason: stop_sequence (\"\\n\")"),
            "{line}"
        );
    }

    #[test]
    fn response_json_is_canonical_protobuf_json() {
        let message = GenerateResponse {
            request_id: "r".into(),
            text: "hi".into(),
            token_ids: vec![1, 2],
            finish_reason: FinishReason::Length as i32,
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            }),
            ..Default::default()
        };
        let json: serde_json::Value = serde_json::to_value(&message).unwrap();
        assert_eq!(json["requestId"], "r");
        assert_eq!(json["tokenIds"], serde_json::json!([1, 2]));
        assert_eq!(json["finishReason"], "FINISH_REASON_LENGTH");
        assert_eq!(json["usage"]["completionTokens"], 2);
    }
}
