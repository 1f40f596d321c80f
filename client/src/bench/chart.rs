//! The SVG chart `--chart` writes: output throughput (left) and latency
//! percentiles (right, log scale) against concurrency or arrival rate. The
//! x axis has a tick at each measured level only, the latency axis at
//! 1-2-5 steps, and each throughput point carries its value.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{BenchReport, Load, Percentiles};
use crate::Error;

const FONT: &str = "sans-serif";

/// Writes the chart of `report` to `path` (SVG; the extension must be `.svg`).
pub fn write(report: &BenchReport, path: &Path) -> Result<(), Error> {
    let fail = |message: String| Error::Write {
        path: path.to_path_buf(),
        message,
    };
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("svg") => {}
        _ => return Err(fail("only .svg charts are supported".into())),
    }
    draw(report, path).map_err(|e| fail(e.to_string()))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(report: &BenchReport, path: &Path) -> DrawResult {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = match &report.label {
        Some(label) => format!("torchwire bench: {label}"),
        None => "torchwire bench".to_string(),
    };
    let subtitle = format!(
        "{} prompt tokens, {} output tokens, {}",
        report.prompt_tokens_actual,
        report.config.output_tokens,
        report
            .model_info
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("default model"),
    );
    let root = root.titled(&format!("{title}  ({subtitle})"), (FONT, 20))?;
    let (left, right) = root.split_horizontally(600);

    let x_desc = match report.levels.first().map(|l| l.load) {
        Some(Load::Rate(_)) => "request rate (req/s)",
        _ => "concurrency",
    };
    let xs: Vec<f64> = report.levels.iter().map(|l| l.load.x()).collect();
    let (x_lo, x_hi) = padded_log_range(&xs);
    let x_axis = || (x_lo..x_hi).log_scale().with_key_points(xs.clone());

    // Throughput.
    let tps: Vec<(f64, f64)> = report
        .levels
        .iter()
        .map(|l| (l.load.x(), l.output_tokens_per_s))
        .collect();
    let y_max = tps.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption("output throughput", (FONT, 16))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_axis(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("output tokens/s")
        .x_label_formatter(&|x| tick_label(*x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(TRANSPARENT)
        .draw()?;
    series(&mut chart, &tps, BLUE, "output tokens/s")?;
    let value_style = (FONT, 13)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(tps.iter().map(|&(x, y)| {
        EmptyElement::at((x, y)) + Text::new(format!("{y:.0}"), (0, -8), value_style.clone())
    }))?;
    legend(&mut chart)?;

    // Latency.
    let pick = |f: fn(&super::LevelResult) -> Option<Percentiles>,
                p: fn(&Percentiles) -> f64|
     -> Vec<(f64, f64)> {
        report
            .levels
            .iter()
            .filter_map(|l| f(l).map(|v| (l.load.x(), p(&v))))
            .filter(|&(_, y)| y > 0.0)
            .collect()
    };
    let lines = [
        ("TTFT p50", pick(|l| l.ttft_ms, |p| p.p50), RED),
        ("TTFT p99", pick(|l| l.ttft_ms, |p| p.p99), MAGENTA),
        ("TPOT p50", pick(|l| l.tpot_ms, |p| p.p50), GREEN),
        ("ITL p99", pick(|l| l.itl_ms, |p| p.p99), CYAN),
    ];
    let ys: Vec<f64> = lines
        .iter()
        .flat_map(|(_, pts, _)| pts.iter().map(|p| p.1))
        .collect();
    let (y_lo, y_hi) = padded_log_range(&ys);
    let mut chart = ChartBuilder::on(&right)
        .caption("latency (client side)", (FONT, 16))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            x_axis(),
            (y_lo..y_hi)
                .log_scale()
                .with_key_points(ticks_1_2_5(y_lo, y_hi)),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("milliseconds")
        .x_label_formatter(&|x| tick_label(*x))
        .y_label_formatter(&|y| tick_label(*y))
        .draw()?;
    for (name, points, color) in &lines {
        series(&mut chart, points, *color, name)?;
    }
    legend(&mut chart)?;

    root.present()?;
    Ok(())
}

/// The legend, boxed, in the upper left corner.
fn legend<'a, DB, X, Y>(chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>) -> DrawResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A line with a dot at each point, and its legend entry.
fn series<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    points: &[(f64, f64)],
    color: RGBColor,
    name: &str,
) -> DrawResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    Ok(())
}

/// The values 1, 2, 5 times a power of ten that lie in `lo..=hi`.
fn ticks_1_2_5(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    if !(lo > 0.0 && hi >= lo) {
        return ticks;
    }
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for step in [1.0, 2.0, 5.0] {
            let tick = decade * step;
            if (lo..=hi).contains(&tick) {
                ticks.push(tick);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// A tick value without trailing zeros: 16, 0.5, 2.5.
fn tick_label(v: f64) -> String {
    let text = format!("{v:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A positive range around `values` with some room on each side, wide
/// enough for a log axis even with a single value.
fn padded_log_range(values: &[f64]) -> (f64, f64) {
    let positive = values.iter().copied().filter(|v| *v > 0.0);
    let lo = positive.clone().fold(f64::INFINITY, f64::min);
    let hi = positive.fold(0.0, f64::max);
    if !lo.is_finite() || hi <= 0.0 {
        return (0.1, 10.0);
    }
    (lo / 1.5, hi * 1.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample_report;

    #[test]
    fn writes_an_svg_with_both_panels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        write(&sample_report(), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("output throughput"));
        assert!(svg.contains("TTFT p50"));
        assert!(svg.contains("concurrency"));
    }

    #[test]
    fn refuses_other_formats() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(&sample_report(), &dir.path().join("bench.png")).unwrap_err();
        assert!(err.to_string().contains(".svg"), "{err}");
    }

    #[test]
    fn latency_ticks_step_1_2_5_and_labels_are_short() {
        assert_eq!(
            ticks_1_2_5(0.8, 60.0),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0]
        );
        assert_eq!(ticks_1_2_5(0.15, 0.6), vec![0.2, 0.5]);
        assert!(ticks_1_2_5(0.0, 1.0).is_empty());
        assert_eq!(tick_label(16.0), "16");
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(200.0), "200");
    }

    #[test]
    fn log_ranges_are_never_empty() {
        assert_eq!(padded_log_range(&[]), (0.1, 10.0));
        let (lo, hi) = padded_log_range(&[4.0]);
        assert!(lo < 4.0 && hi > 4.0);
        let (lo, hi) = padded_log_range(&[0.0, 1.0, 16.0]);
        assert!(lo > 0.0 && lo < 1.0 && hi > 16.0);
    }
}
