//! torchwire-scaler: parse config, start logging, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use torchwire_scaler::config::{Cli, Config};
use torchwire_scaler::{app, telemetry};

/// Exit status for a bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::load(&cli, &env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("torchwire-scaler: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(config.log_format);
    match app::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("torchwire-scaler: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
