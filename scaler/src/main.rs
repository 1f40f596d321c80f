//! torchwire-scaler: parse config, start logging and tracing, serve until
//! SIGTERM/SIGINT, flush the last spans.

use std::process::ExitCode;

use clap::Parser;
use torchwire_scaler::app;
use torchwire_scaler::config::{Cli, Config};

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
    let telemetry = torchwire_telemetry::init(
        "torchwire-scaler",
        config.log_format,
        config.otlp_endpoint.as_deref(),
        // /metrics is served from the admin port.
        matches!(config.admin_addr(), Ok(Some(_))),
    );
    let code = match app::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("torchwire-scaler: {e}");
            ExitCode::FAILURE
        }
    };
    // The flush blocks (bounded): off the runtime's workers, which its
    // export still needs.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
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
