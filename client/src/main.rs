//! `torchwire`: the command line for a torchwire server. Generate text,
//! inspect models, tokenizer and engine counters, check health, and
//! benchmark the server under load.

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.run().await {
        Ok(code) => code,
        Err(err) => cli::report(&err),
    }
}
