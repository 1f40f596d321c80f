//! `torchwire bench`: flags → `BenchConfig`, then the table on stdout and
//! the JSON and chart files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use torchwire_client::bench::{self, BenchConfig, Load, StopAfter};
use torchwire_client::{Client, Error};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model name (default: the server's default model).
    #[arg(long, default_value = "", hide_default_value = true)]
    model: String,
    /// Closed-loop levels: requests kept in flight, e.g. 1,4,16 (a sweep).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "rate")]
    concurrency: Vec<u32>,
    /// Open-loop levels: Poisson arrivals at this many requests/s, e.g. 2,8.
    #[arg(long, value_delimiter = ',', value_parser = positive_f64)]
    rate: Vec<f64>,
    /// Measured requests per level [default: 32 unless --duration or --rounds is given].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with_all = ["duration", "rounds"])]
    requests: Option<u64>,
    /// Measured requests per level = ROUNDS x concurrency (x rate, rounded up).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "duration")]
    rounds: Option<u64>,
    /// Send requests for this many seconds per level instead of a count.
    #[arg(long, value_name = "SECS", value_parser = positive_f64)]
    duration: Option<f64>,
    /// Unmeasured requests before the first level.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Prompt length in tokens (checked against the server's tokenizer).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    prompt_tokens: u32,
    /// Tokens generated per request (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    output_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the Poisson arrival times (--rate).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the results (config and every level) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw throughput and latency against load into this .svg file.
    #[arg(long, value_name = "FILE")]
    chart: Option<PathBuf>,
    /// A name for this run, stored in the JSON and shown on the chart.
    #[arg(long)]
    label: Option<String>,
    /// No progress bar on stderr.
    #[arg(long)]
    no_progress: bool,
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a positive number".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl BenchArgs {
    /// The run these flags describe.
    pub fn config(&self, addr: &str) -> BenchConfig {
        let levels = if !self.rate.is_empty() {
            self.rate.iter().map(|&r| Load::Rate(r)).collect()
        } else if !self.concurrency.is_empty() {
            self.concurrency
                .iter()
                .map(|&c| Load::Concurrency(c))
                .collect()
        } else {
            vec![Load::Concurrency(1)]
        };
        let stop_after = match (self.requests, self.duration, self.rounds) {
            (_, Some(secs), _) => StopAfter::DurationS(secs),
            (_, None, Some(rounds)) => StopAfter::Rounds(rounds),
            (requests, None, None) => StopAfter::Requests(requests.unwrap_or(32)),
        };
        BenchConfig {
            addr: addr.to_string(),
            model: self.model.clone(),
            label: self.label.clone(),
            levels,
            stop_after,
            warmup: self.warmup,
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            temperature: self.temperature,
            arrival_seed: self.seed,
        }
    }
}

pub async fn run(client: &Client, addr: &str, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let config = args.config(addr);
    let report = bench::run(client, &config, !args.no_progress).await?;
    if report.prompt_tokens_actual != config.prompt_tokens {
        eprintln!(
            "warning: the tokenizer allowed no prompt of exactly {} tokens; used {}",
            config.prompt_tokens, report.prompt_tokens_actual
        );
    }
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json()).map_err(|e| Error::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.chart {
        bench::chart::write(&report, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::*;

    fn bench_args(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let cli = Cli::try_parse_from(["torchwire", "bench"].iter().chain(args).copied())?;
        match cli.command {
            Command::Bench(b) => Ok(b),
            _ => panic!("not bench"),
        }
    }

    #[test]
    fn a_concurrency_list_is_a_sweep() {
        let config = bench_args(&["--concurrency", "1,4,16", "--requests", "8"])
            .unwrap()
            .config("a");
        assert_eq!(
            config.levels,
            vec![
                Load::Concurrency(1),
                Load::Concurrency(4),
                Load::Concurrency(16)
            ]
        );
        assert_eq!(config.stop_after, StopAfter::Requests(8));
        assert_eq!(
            (
                config.prompt_tokens,
                config.output_tokens,
                config.temperature
            ),
            (32, 128, 0.0)
        );
    }

    #[test]
    fn rounds_scale_with_each_level() {
        let config = bench_args(&["--concurrency", "1,16", "--rounds", "3"])
            .unwrap()
            .config("a");
        assert_eq!(config.stop_after, StopAfter::Rounds(3));
        assert_eq!(
            config.stop_after.for_level(Load::Concurrency(1)),
            StopAfter::Requests(3)
        );
        assert_eq!(
            config.stop_after.for_level(Load::Concurrency(16)),
            StopAfter::Requests(48)
        );
        assert_eq!(
            config.stop_after.for_level(Load::Rate(2.5)),
            StopAfter::Requests(9)
        );
    }

    #[test]
    fn rate_and_duration_make_an_open_loop_run() {
        let config = bench_args(&["--rate", "2.5", "--duration", "10"])
            .unwrap()
            .config("a");
        assert_eq!(config.levels, vec![Load::Rate(2.5)]);
        assert_eq!(config.stop_after, StopAfter::DurationS(10.0));
    }

    #[test]
    fn defaults_and_conflicts() {
        let config = bench_args(&[]).unwrap().config("a");
        assert_eq!(config.levels, vec![Load::Concurrency(1)]);
        assert_eq!(config.stop_after, StopAfter::Requests(32));
        assert!(bench_args(&["--concurrency", "1", "--rate", "2"]).is_err());
        assert!(bench_args(&["--requests", "1", "--duration", "2"]).is_err());
        assert!(bench_args(&["--requests", "1", "--rounds", "2"]).is_err());
        assert!(bench_args(&["--concurrency", "0"]).is_err());
        assert!(bench_args(&["--rate", "-1"]).is_err());
        assert!(bench_args(&["--output-tokens", "0"]).is_err());
    }
}
