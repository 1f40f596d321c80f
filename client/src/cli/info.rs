//! The small read-only commands: models, tokenize, health and stats.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use tonic_health::pb::health_check_response::ServingStatus;
use torchwire_client::proto::{ListModelsResponse, ModelStats};
use torchwire_client::Client;

use super::{ConnectionArgs, EXIT_NOT_SERVING};

#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print the ListModels response as canonical protobuf JSON.
    #[arg(long)]
    json: bool,
}

pub async fn models(client: &Client, args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let response = client.models().await?;
    if args.json {
        println!("{}", serde_json::to_string(&response)?);
    } else {
        print!("{}", models_table(&response));
    }
    Ok(ExitCode::SUCCESS)
}

fn models_table(response: &ListModelsResponse) -> String {
    let header = [
        "name",
        "arch",
        "device",
        "dtype",
        "quant",
        "weights MiB",
        "kv dtype",
        "kv MiB",
        "params",
        "context",
        "vocab",
        "max batch",
        "default",
    ];
    let rows: Vec<Vec<String>> = response
        .models
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.architecture.clone(),
                m.device.clone(),
                m.dtype.clone(),
                if m.quantization.is_empty() {
                    "none".into()
                } else {
                    m.quantization.clone()
                },
                format!("{:.1}", m.weight_bytes as f64 / 1048576.0),
                if m.kv_cache_dtype.is_empty() {
                    "-".into()
                } else {
                    m.kv_cache_dtype.clone()
                },
                format!("{:.1}", m.kv_cache_bytes as f64 / 1048576.0),
                m.parameters.to_string(),
                m.context_length.to_string(),
                m.vocab_size.to_string(),
                m.max_batch_size.to_string(),
                if m.is_default {
                    "*".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Columns padded to their widest cell, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The text; `-` reads it from standard input.
    text: String,
    /// Model whose tokenizer to use (default: the server's default model).
    #[arg(long, default_value = "", hide_default_value = true)]
    model: String,
    /// Leave out the special tokens (e.g. BOS) that Generate adds.
    #[arg(long)]
    no_special_tokens: bool,
    /// Print the Tokenize response as canonical protobuf JSON.
    #[arg(long)]
    json: bool,
}

pub async fn tokenize(client: &Client, args: TokenizeArgs) -> anyhow::Result<ExitCode> {
    let text = super::text_or_stdin(args.text)?;
    let response = client
        .tokenize(&args.model, &text, !args.no_special_tokens)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string(&response)?);
    } else {
        let ids: Vec<String> = response.token_ids.iter().map(u32::to_string).collect();
        println!("count: {}", response.count);
        println!("ids: {}", ids.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The service to check ("" = the whole server).
    #[arg(long, default_value = "", hide_default_value = true)]
    service: String,
    /// Keep trying for up to this many seconds until SERVING (also while the
    /// server is not reachable yet).
    #[arg(long, value_name = "SECS")]
    wait: Option<f64>,
}

pub async fn health(conn: &ConnectionArgs, args: HealthArgs) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.wait.unwrap_or(0.0).max(0.0));
    loop {
        let result = match conn.connect().await {
            Ok(client) => client.health(&args.service).await,
            Err(err) => Err(err),
        };
        let done = Instant::now() >= deadline;
        match result {
            Ok(ServingStatus::Serving) => {
                println!("SERVING");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(status) if done => {
                println!("{}", status.as_str_name());
                return Ok(ExitCode::from(EXIT_NOT_SERVING));
            }
            Err(err) if done => return Err(err.into()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this model (default: every model).
    #[arg(long, default_value = "", hide_default_value = true)]
    model: String,
    /// Print the GetStats response as canonical protobuf JSON.
    #[arg(long)]
    json: bool,
}

pub async fn stats(client: &Client, args: StatsArgs) -> anyhow::Result<ExitCode> {
    let response = client.stats(&args.model).await?;
    if args.json {
        println!("{}", serde_json::to_string(&response)?);
    } else {
        for model in &response.models {
            print!("{}", stats_text(model));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn stats_text(s: &ModelStats) -> String {
    let fields: [(&str, String); 18] = [
        ("running", s.running.to_string()),
        ("prefilling", s.prefilling.to_string()),
        ("waiting", s.waiting.to_string()),
        ("free slots", s.free_slots.to_string()),
        ("max batch size", s.max_batch_size.to_string()),
        ("peak batch size", s.peak_batch_size.to_string()),
        ("decode steps", s.decode_steps.to_string()),
        ("prefills", s.prefills.to_string()),
        ("tokens generated", s.tokens_generated.to_string()),
        ("requests finished", s.requests_finished.to_string()),
        ("requests cancelled", s.requests_cancelled.to_string()),
        ("requests rejected", s.requests_rejected.to_string()),
        ("prefix hits", s.prefix_cache_hits.to_string()),
        ("prefix misses", s.prefix_cache_misses.to_string()),
        ("prefix tokens", s.prefix_cache_tokens_reused.to_string()),
        ("prefix evictions", s.prefix_cache_evictions.to_string()),
        ("prefix cache bytes", s.prefix_cache_bytes.to_string()),
        ("prefix entries", s.prefix_cache_entries.to_string()),
    ];
    let mut out = format!("{}\n", s.model);
    for (name, value) in &fields {
        out.push_str(&format!("  {:<20}{value}\n", format!("{name}:")));
    }
    out
}

#[cfg(test)]
mod tests {
    use torchwire_client::proto::ModelInfo;

    use super::*;

    #[test]
    fn models_table_marks_the_default() {
        let response = ListModelsResponse {
            models: vec![ModelInfo {
                name: "torchwire-tiny".into(),
                architecture: "llama".into(),
                device: "cpu".into(),
                dtype: "float32".into(),
                parameters: 6_800_000,
                context_length: 512,
                vocab_size: 8192,
                max_batch_size: 16,
                is_default: true,
                quantization: "int8".into(),
                weight_bytes: 3 * 1048576,
                kv_cache_dtype: "float16".into(),
                kv_cache_bytes: 5 * 1048576,
            }],
        };
        let text = models_table(&response);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("name"));
        assert!(lines[1].starts_with("torchwire-tiny  llama"), "{text}");
        assert!(
            lines[1].contains("int8")
                && lines[1].contains("3.0")
                && lines[1].contains("float16")
                && lines[1].contains("5.0"),
            "{text}"
        );
        assert!(lines[1].ends_with('*'), "{text}");
    }

    #[test]
    fn stats_text_lists_every_counter() {
        let s = ModelStats {
            model: "m".into(),
            tokens_generated: 77,
            ..Default::default()
        };
        let text = stats_text(&s);
        assert!(text.starts_with("m\n"));
        assert!(text.contains("tokens generated:   77"), "{text}");
        assert_eq!(text.lines().count(), 19);
    }
}
