//! `torchwire publish`: the same request as `generate`, sent through the NATS
//! JetStream work queue instead of gRPC. The responses come back on a private
//! inbox (named in the `Torchwire-Reply-To` header) and are printed as
//! `generate` prints them.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use torchwire_client::proto::GenerateResponse;
use torchwire_client::Header;
use torchwire_nats::async_nats::{self, jetstream};
use torchwire_nats::{codec, headers, Encoding, NatsConfig};

use super::generate::{self, GenerateArgs};

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    request: GenerateArgs,
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "TORCHWIRE_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// Subject of the work queue.
    #[arg(
        long,
        env = "TORCHWIRE_NATS_SUBJECT",
        default_value = "torchwire.generate"
    )]
    nats_subject: String,
    /// User for user/password authentication.
    #[arg(long, env = "TORCHWIRE_NATS_USER")]
    nats_user: Option<String>,
    /// Password for user/password authentication.
    #[arg(long, env = "TORCHWIRE_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// Token authentication.
    #[arg(long, env = "TORCHWIRE_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// NATS credentials (.creds) file.
    #[arg(long, value_name = "FILE")]
    nats_creds: Option<PathBuf>,
    /// PEM CA certificate of the NATS server (turns TLS on).
    #[arg(long, value_name = "PEM")]
    nats_tls_ca: Option<PathBuf>,
    /// Seconds to wait for the final response.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

pub async fn run(args: PublishArgs, extra_headers: &[Header]) -> anyhow::Result<ExitCode> {
    let prompt = super::text_or_stdin(args.request.prompt.clone())?;
    let request = args.request.request(prompt);
    let config = NatsConfig {
        url: Some(args.nats_url.clone()),
        user: args.nats_user.clone(),
        password: args.nats_password.clone(),
        token: args.nats_token.clone(),
        credentials_file: args.nats_creds.clone(),
        tls_ca: args.nats_tls_ca.clone(),
        subject: args.nats_subject.clone(),
        ..NatsConfig::default()
    };
    config.validate()?;
    let client = config.connect_as("torchwire-cli").await?;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client.flush().await?;

    let mut h = async_nats::HeaderMap::new();
    for header in extra_headers {
        h.insert(header.name(), header.value());
    }
    h.insert(headers::REPLY_TO, inbox.as_str());
    h.insert(headers::CONTENT_TYPE, headers::PROTOBUF);
    if !request.request_id.is_empty() {
        h.insert(headers::REQUEST_ID, request.request_id.as_str());
        // JetStream drops a second publish of the same id (within its window).
        h.insert("Nats-Msg-Id", request.request_id.as_str());
    }
    let start = Instant::now();
    let js = jetstream::new(client.clone());
    let ack = js
        .publish_with_headers(
            args.nats_subject.clone(),
            h,
            codec::encode_request(&request, Encoding::Protobuf),
        )
        .await
        .map_err(|e| anyhow::anyhow!("publishing to {}: {e}", args.nats_subject))?
        .await
        .map_err(|e| publish_error(&args.nats_subject, e))?;
    if !args.request.quiet {
        eprintln!("[queued as {} #{}]", ack.stream, ack.sequence);
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut first_token = None;
    let mut last: Option<GenerateResponse> = None;
    loop {
        let msg = match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(msg)) => msg,
            Ok(None) => anyhow::bail!("the NATS connection closed before the final response"),
            Err(_) => anyhow::bail!(
                "no final response within {} s (the request stays queued)",
                args.timeout
            ),
        };
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        if header(headers::SEQUENCE).as_deref() == Some("0") && last.is_some() {
            eprintln!("\n[the request was redelivered to another server; its output starts again]");
        }
        let response =
            codec::decode_response(&msg.payload, Encoding::from_headers(msg.headers.as_ref()))?;
        if let Some(err) = &response.error {
            return Err(torchwire_client::Error::from(tonic::Status::new(
                err.code.into(),
                err.message.clone(),
            ))
            .into());
        }
        if first_token.is_none() && !response.token_ids.is_empty() {
            first_token = Some(start.elapsed());
        }
        if args.request.json {
            writeln!(out, "{}", serde_json::to_string(&response)?)?;
        } else {
            out.write_all(response.text.as_bytes())?;
        }
        out.flush()?;
        let is_final = header(headers::FINAL).as_deref() == Some(headers::TRUE);
        last = Some(response);
        if is_final {
            break;
        }
    }
    if !args.request.json {
        writeln!(out)?;
    }
    if !args.request.quiet {
        eprintln!(
            "{}",
            generate::summary(last.as_ref(), first_token, start.elapsed())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What a refused publish means for the user: the queue is full (discard
/// policy `new`), or there is no work queue at all.
fn publish_error(subject: &str, e: jetstream::context::PublishError) -> anyhow::Error {
    use jetstream::context::PublishErrorKind;
    let api = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<jetstream::Error>());
    if let Some(api) = api.filter(|a| a.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED) {
        return anyhow::anyhow!(
            "the work queue on {subject} is full and refused the request ({api}); \
             nothing was queued: retry later (limits: nats.max_msgs, nats.max_bytes)"
        );
    }
    match e.kind() {
        PublishErrorKind::StreamNotFound => anyhow::anyhow!(
            "publishing to {subject}: no JetStream stream takes this subject \
             (a server started with --nats-url creates the work queue)"
        ),
        _ => anyhow::anyhow!("publishing to {subject}: {e}"),
    }
}
