//! A finished run: the JSON document `--json` writes and the table printed
//! at the end.

use std::fmt::Write as _;

use serde::Serialize;
use torchwire_proto::v1::ModelInfo;

use super::{BenchConfig, LevelResult, Percentiles};

/// Everything one `torchwire bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub label: Option<String>,
    /// When the run finished, in seconds since the Unix epoch.
    pub started_unix_s: u64,
    pub config: BenchConfig,
    /// The prompt length the server's tokenizer counted (the target may not
    /// be reachable exactly with some tokenizers).
    pub prompt_tokens_actual: u32,
    /// The benchmarked model as ListModels described it.
    pub model_info: Option<ModelInfo>,
    pub levels: Vec<LevelResult>,
}

impl BenchReport {
    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    /// A fixed-width table, one row per level, followed by error counts.
    pub fn table(&self) -> String {
        let header = [
            "load",
            "ok",
            "failed",
            "out tok/s",
            "req/s",
            "TTFT ms p50/p90/p99",
            "TPOT ms p50/p90/p99",
            "ITL ms p50/p90/p99",
        ];
        let rows: Vec<[String; 8]> = self
            .levels
            .iter()
            .map(|l| {
                [
                    l.load.to_string(),
                    l.requests.to_string(),
                    l.failed.to_string(),
                    format!("{:.1}", l.output_tokens_per_s),
                    format!("{:.2}", l.requests_per_s),
                    triple(l.ttft_ms),
                    triple(l.tpot_ms),
                    triple(l.itl_ms),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[&str]| {
            let mut text = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                // Left-align the load, right-align the numbers.
                if i == 0 {
                    let _ = write!(text, "{cell:<w$}");
                } else {
                    let _ = write!(text, "  {cell:>w$}");
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut out, &header);
        for row in &rows {
            line(&mut out, &row.each_ref().map(String::as_str));
        }
        for l in self.levels.iter().filter(|l| !l.errors.is_empty()) {
            let counts: Vec<String> = l
                .errors
                .iter()
                .map(|(code, n)| format!("{code} x{n}"))
                .collect();
            let _ = writeln!(out, "errors at {}: {}", l.load, counts.join(", "));
        }
        out
    }
}

fn triple(p: Option<Percentiles>) -> String {
    match p {
        Some(p) => format!("{}/{}/{}", short(p.p50), short(p.p90), short(p.p99)),
        None => "-".to_string(),
    }
}

/// Three significant digits or so: 0.123, 1.23, 12.3, 123.
fn short(ms: f64) -> String {
    match ms {
        m if m < 1.0 => format!("{m:.3}"),
        m if m < 10.0 => format!("{m:.2}"),
        m if m < 100.0 => format!("{m:.1}"),
        m => format!("{m:.0}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::{Load, RequestRecord, StopAfter};

    pub(crate) fn sample_report() -> BenchReport {
        let record = |ttft: u64| RequestRecord {
            ttft: Some(Duration::from_millis(ttft)),
            e2e: Duration::from_millis(ttft + 30),
            inter_token: vec![Duration::from_millis(10); 3],
            output_tokens: 4,
            prompt_tokens: 8,
            error: None,
        };
        let mut second = vec![record(20), record(40)];
        second.push(RequestRecord::failed(
            tonic::Code::ResourceExhausted,
            Duration::from_millis(1),
        ));
        BenchReport {
            label: Some("test".into()),
            started_unix_s: 0,
            config: BenchConfig {
                addr: "http://127.0.0.1:1".into(),
                model: String::new(),
                label: Some("test".into()),
                levels: vec![Load::Concurrency(1), Load::Concurrency(4)],
                stop_after: StopAfter::Requests(2),
                warmup: 1,
                prompt_tokens: 8,
                output_tokens: 4,
                temperature: 0.0,
                arrival_seed: 0,
            },
            prompt_tokens_actual: 8,
            model_info: Some(ModelInfo {
                name: "tiny".into(),
                max_batch_size: 8,
                ..Default::default()
            }),
            levels: vec![
                LevelResult::summarize(
                    Load::Concurrency(1),
                    &[record(10), record(12)],
                    Duration::from_millis(100),
                ),
                LevelResult::summarize(Load::Concurrency(4), &second, Duration::from_millis(50)),
            ],
        }
    }

    #[test]
    fn json_carries_config_and_every_level() {
        let json: serde_json::Value = serde_json::from_str(&sample_report().to_json()).unwrap();
        assert_eq!(json["config"]["levels"][1]["concurrency"], 4);
        assert_eq!(json["config"]["stop_after"]["requests"], 2);
        assert_eq!(json["model_info"]["name"], "tiny");
        assert_eq!(json["model_info"]["maxBatchSize"], 8);
        let levels = json["levels"].as_array().unwrap();
        assert_eq!(levels.len(), 2);
        assert_eq!(levels[0]["load"]["concurrency"], 1);
        assert_eq!(levels[0]["output_tokens"], 8);
        assert_eq!(levels[0]["output_tokens_per_s"], 80.0);
        assert_eq!(levels[1]["errors"]["RESOURCE_EXHAUSTED"], 1);
        assert_eq!(levels[1]["ttft_ms"]["p50"], 30.0);
        assert_eq!(levels[1]["tpot_ms"]["p50"], 10.0);
    }

    #[test]
    fn table_has_a_row_per_level_and_lists_errors() {
        let table = sample_report().table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("load"), "{table}");
        assert!(lines[1].starts_with("c=1 "), "{table}");
        assert!(lines[2].starts_with("c=4 "), "{table}");
        assert!(lines[1].contains("80.0"), "{table}");
        assert!(lines[1].contains("11.0/11.8/12.0"), "{table}");
        assert_eq!(lines[3], "errors at c=4: RESOURCE_EXHAUSTED x1");
    }

    #[test]
    fn short_keeps_about_three_digits() {
        assert_eq!(short(0.1234), "0.123");
        assert_eq!(short(4.5678), "4.57");
        assert_eq!(short(42.42), "42.4");
        assert_eq!(short(1234.4), "1234");
    }
}
