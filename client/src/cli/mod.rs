//! Command-line definitions (clap derive), the dispatch to each command,
//! and how errors become messages and exit codes.

mod bench;
mod chat;
mod generate;
mod info;
mod publish;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tonic::Code;
use torchwire_client::{code_name, Client, Error, Header, TlsOptions, DEFAULT_ADDR};

const EXIT_CODES: &str = "\
Exit codes:
  0  success (health: the server is SERVING)
  1  local failure (reading input, writing a results file)
  2  bad command line or connection options (address, TLS files, token)
  3  server unreachable or unavailable (UNAVAILABLE)
  4  request refused as invalid (INVALID_ARGUMENT, OUT_OF_RANGE, NOT_FOUND,
     FAILED_PRECONDITION, ALREADY_EXISTS)
  5  server overloaded (RESOURCE_EXHAUSTED)
  6  deadline exceeded, cancelled or aborted
  7  not authorized (UNAUTHENTICATED, PERMISSION_DENIED)
  8  server-side failure (INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS)
  9  health: the server answered but is not SERVING

Errors are printed to stderr as `error: <gRPC code>: <message>`.";

/// Talk to a torchwire inference server over gRPC.
#[derive(Debug, Parser)]
#[command(name = "torchwire", version, after_long_help = EXIT_CODES, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

/// Where the server is and how to reach it.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
struct ConnectionArgs {
    /// Server address: http://host:port, https://host:port or host:port.
    #[arg(long, global = true, env = "TORCHWIRE_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// PEM CA certificate to verify the server with (turns TLS on).
    #[arg(long, global = true, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS (needs --tls-key).
    #[arg(long, global = true, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Server name to verify the certificate against, if not the address's host.
    #[arg(long, global = true, value_name = "NAME")]
    tls_domain: Option<String>,
    /// Bearer token sent as `authorization` metadata with every call. Prefer
    /// the variable or --token-file: a flag shows in the process list.
    #[arg(
        long,
        global = true,
        env = "TORCHWIRE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<Token>,
    /// File whose first line is the bearer token (wins over --token).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Metadata sent with every call, e.g. `-H 'traceparent: 00-...-01'`
    /// (NATS message headers for `publish`); repeatable.
    #[arg(
        short = 'H',
        long = "header",
        global = true,
        value_name = "NAME: VALUE"
    )]
    headers: Vec<Header>,
}

impl ConnectionArgs {
    fn tls(&self) -> TlsOptions {
        TlsOptions {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            domain: self.tls_domain.clone(),
        }
    }

    /// The bearer token from --token-file, else --token / TORCHWIRE_TOKEN.
    fn token(&self) -> Result<Option<String>, Error> {
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::TokenFile {
                path: path.clone(),
                source,
            })?;
            let line = text.lines().map(str::trim).find(|l| !l.is_empty());
            return match line {
                Some(token) => Ok(Some(token.to_string())),
                None => Err(Error::Token("the token file is empty")),
            };
        }
        Ok(self.token.as_ref().map(|t| t.0.clone()))
    }

    async fn connect(&self) -> Result<Client, Error> {
        let token = self.token()?;
        let mut client = Client::connect(&self.addr, &self.tls())
            .await?
            .with_headers(&self.headers);
        if let Some(token) = token {
            client = client.with_token(&token)?;
        }
        Ok(client)
    }
}

/// A bearer token from the command line; `Debug` never shows it.
#[derive(Clone)]
struct Token(String);

impl std::str::FromStr for Token {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text, streaming it to stdout as tokens arrive.
    Generate(generate::GenerateArgs),
    /// Hold a conversation: the model's chat template, answers streamed;
    /// `--messages FILE` for one scripted turn.
    Chat(chat::ChatArgs),
    /// List the models the server has loaded.
    Models(info::ModelsArgs),
    /// Show the token ids of a text, as the model's tokenizer splits it.
    Tokenize(info::TokenizeArgs),
    /// Check the server's gRPC health; exit 0 if and only if SERVING.
    Health(info::HealthArgs),
    /// Show engine counters: batch sizes, queue depth, tokens generated.
    Stats(info::StatsArgs),
    /// Load-test the server: a sweep of concurrencies or arrival rates.
    Bench(bench::BenchArgs),
    /// Send a generate request through the NATS JetStream work queue and
    /// stream the responses, as `generate` does.
    Publish(publish::PublishArgs),
}

impl Cli {
    /// Runs the chosen command; the exit code on success (health may fail
    /// without an error).
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let conn = &self.connection;
        match self.command {
            Command::Generate(args) => generate::run(&conn.connect().await?, args).await,
            Command::Chat(args) => chat::run(&conn.connect().await?, args).await,
            Command::Models(args) => info::models(&conn.connect().await?, args).await,
            Command::Tokenize(args) => info::tokenize(&conn.connect().await?, args).await,
            Command::Health(args) => info::health(conn, args).await,
            Command::Stats(args) => info::stats(&conn.connect().await?, args).await,
            Command::Bench(args) => bench::run(&conn.connect().await?, &conn.addr, args).await,
            Command::Publish(args) => publish::run(args, &conn.headers).await,
        }
    }
}

/// Prints `err` to stderr and returns the exit code for its class.
pub fn report(err: &anyhow::Error) -> ExitCode {
    match err.downcast_ref::<Error>() {
        Some(Error::Write { .. }) | None => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
        Some(client_err) => {
            eprintln!("error: {}: {client_err}", code_name(client_err.code()));
            ExitCode::from(exit_code(client_err))
        }
    }
}

/// The exit code documented in `EXIT_CODES` for a client error.
fn exit_code(err: &Error) -> u8 {
    match err {
        Error::InvalidAddress { .. }
        | Error::TlsFile { .. }
        | Error::TlsOptions(_)
        | Error::Token(_)
        | Error::TokenFile { .. }
        | Error::Tls { .. } => 2,
        Error::Write { .. } => 1,
        Error::Connect { .. } => 3,
        Error::Status(status) => match status.code() {
            Code::Ok => 0,
            Code::Unavailable => 3,
            Code::InvalidArgument
            | Code::OutOfRange
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists => 4,
            Code::ResourceExhausted => 5,
            Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => 6,
            Code::Unauthenticated | Code::PermissionDenied => 7,
            Code::Internal | Code::Unknown | Code::Unimplemented | Code::DataLoss => 8,
        },
    }
}

/// The exit code for a server that answered health but is not SERVING.
const EXIT_NOT_SERVING: u8 = 9;

/// `text` itself, or all of stdin when it is `-`.
fn text_or_stdin(text: String) -> anyhow::Result<String> {
    if text != "-" {
        return Ok(text);
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| anyhow::anyhow!("cannot read the prompt from stdin: {e}"))?;
    Ok(input)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("torchwire").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn generate_takes_every_request_field() {
        let cli = parse(&[
            "generate",
            "hello",
            "--model",
            "m",
            "--max-new-tokens",
            "9",
            "--temperature",
            "0.7",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--min-p",
            "0.05",
            "--repetition-penalty",
            "1.1",
            "--seed",
            "42",
            "--stop",
            "\n",
            "--stop",
            "END",
            "--ignore-eos",
            "--logprobs",
            "3",
            "--request-id",
            "r1",
            "--json",
        ])
        .unwrap();
        let Command::Generate(args) = cli.command else {
            panic!("not generate")
        };
        assert!(args.json);
        let req = args.request("hello".into());
        assert_eq!(req.model, "m");
        assert_eq!(req.max_new_tokens, Some(9));
        assert_eq!(req.temperature, 0.7);
        assert_eq!(req.top_k, 40);
        assert_eq!(req.top_p, 0.9);
        assert_eq!(req.min_p, 0.05);
        assert_eq!(req.repetition_penalty, 1.1);
        assert_eq!(req.seed, Some(42));
        assert_eq!(req.stop, vec!["\n".to_string(), "END".to_string()]);
        assert!(req.ignore_eos);
        assert_eq!(req.logprobs, 3);
        assert_eq!(req.request_id, "r1");
    }

    #[test]
    fn negative_numbers_reach_the_server_for_validation() {
        let cli = parse(&["generate", "hi", "--temperature", "-1"]).unwrap();
        let Command::Generate(args) = cli.command else {
            panic!("not generate")
        };
        assert_eq!(args.request("hi".into()).temperature, -1.0);
    }

    #[test]
    fn connection_flags_go_anywhere() {
        let cli = parse(&[
            "models",
            "--addr",
            "http://10.0.0.1:9",
            "--tls-domain",
            "example.com",
        ])
        .unwrap();
        assert_eq!(cli.connection.addr, "http://10.0.0.1:9");
        assert!(cli.connection.tls().is_set());
        assert!(
            parse(&["--tls-cert", "c.pem", "models"]).is_err(),
            "a certificate needs its key"
        );
    }

    #[test]
    fn the_token_comes_from_the_flag_or_a_file_and_is_never_shown() {
        let cli = parse(&["models", "--token", "0123456789abcdef"]).unwrap();
        assert_eq!(
            cli.connection.token().unwrap().as_deref(),
            Some("0123456789abcdef")
        );
        assert!(!format!("{cli:?}").contains("0123456789abcdef"));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "\nfedcba9876543210\n").unwrap();
        let path = file.path().to_str().unwrap();
        let cli = parse(&["models", "--token", "x", "--token-file", path]).unwrap();
        assert_eq!(
            cli.connection.token().unwrap().as_deref(),
            Some("fedcba9876543210")
        );
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("TORCHWIRE_TOKEN"));
    }

    #[test]
    fn exit_codes_follow_the_documented_classes() {
        let status = |code| exit_code(&Error::Status(tonic::Status::new(code, "x")));
        assert_eq!(status(Code::InvalidArgument), 4);
        assert_eq!(status(Code::ResourceExhausted), 5);
        assert_eq!(status(Code::Unavailable), 3);
        assert_eq!(status(Code::Internal), 8);
        assert_eq!(exit_code(&Error::TlsOptions("x")), 2);
        for n in 0..=9 {
            assert!(
                EXIT_CODES.contains(&format!("\n  {n}  ")),
                "exit code {n} is documented"
            );
        }
    }
}
