//! torchwire-server: parse config, start logging and tracing, serve until
//! SIGTERM/SIGINT, flush the last spans.

use std::process::ExitCode;

use clap::Parser;
use torchwire_server::config::{Cli, Config};
use torchwire_server::{app, model, threads};

/// Exit status for a bad configuration (EX_USAGE), as linkerd does.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::load(&cli, &env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("torchwire-server: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cuda = model::load_cuda_runtime();
    // libtorch would default to every core of the host, ignoring a CPU
    // limit: default to the CPUs this process may really use.
    let cpus = threads::CpuBudget::current();
    let intra_op = config
        .threads
        .map_or_else(|| cpus.default_threads(), |t| t as usize);
    tch::set_num_threads(intra_op as i32);
    let cuda_available = tch::Cuda::is_available();
    // Devices were checked when the config was loaded.
    let devices = config
        .models
        .values()
        .filter_map(|m| model::DeviceChoice::parse(&m.device).ok());
    let compute = threads::compute_threads(devices, cuda_available, intra_op);
    let runtime_threads = config
        .runtime_threads
        .map_or_else(|| cpus.default_runtime_threads(compute), |t| t as usize);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("torchwire-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The span exporter's gRPC channel runs on the runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        torchwire_telemetry::init(
            "torchwire-server",
            config.log_format,
            config.otlp_endpoint.as_deref(),
            // /metrics is served from the admin port.
            matches!(config.admin_addr(), Ok(Some(_))),
        )
    };
    tracing::info!(
        cuda_runtime = cuda,
        cuda_available,
        threads = tch::get_num_threads(),
        runtime_threads,
        usable_cpus = cpus.usable,
        online_cpus = cpus.online,
        "starting"
    );
    let code = match runtime.block_on(app::run(config, shutdown_signal())) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("torchwire-server: {e:#}");
            1
        }
    };
    // _exit skips every destructor: the spans still batched go out now,
    // within a bounded time, while the runtime their channel needs lives.
    telemetry.shutdown();
    exit_now(code)
}

/// Ends the process without running libtorch's static destructors. The
/// model threads were stopped and joined, but one that did not stop in time
/// may still be inside a tch call, and tearing libtorch (and its OpenMP and
/// CUDA state) down under it can crash or hang.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process at once; everything that had to be
    // delivered (gRPC streams, NATS acks) was flushed before run() returned.
    unsafe { libc::_exit(code) }
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
