//! Report writers: a JSON document, a markdown table and a plot of quality per round.

use super::Quality;
use plotters::prelude::*;
use serde::Serialize;
use std::path::Path;

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file system refused.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// JSON encoding failed.
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The plotting library failed.
    #[error("cannot draw {path}: {reason}")]
    Plot {
        /// The file.
        path: String,
        /// The cause.
        reason: String,
    },
}

/// One method's row of the quality table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodRow {
    /// Method name (`popularity`, `centralized_mf`, …).
    pub method: String,
    /// Its quality.
    pub quality: Quality,
}

/// A line of the per-round plot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// Legend.
    pub name: String,
    /// (round, value) points.
    pub points: Vec<(u32, f64)>,
}

/// The quality table in markdown, one row per method, in the given order.
pub fn markdown_table(rows: &[MethodRow]) -> String {
    let mut s = String::from(
        "| method | HR@10 | NDCG@10 | full HR@10 | full NDCG@10 | users |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let q = &r.quality;
        s.push_str(&format!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {} |\n",
            r.method, q.hr10, q.ndcg10, q.full_hr10, q.full_ndcg10, q.users
        ));
    }
    s
}

/// Writes `value` as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ReportError> {
    let text = serde_json::to_string_pretty(value)?;
    write_text(path, &text)
}

/// Writes a text file, creating its folder.
pub fn write_text(path: &Path, text: &str) -> Result<(), ReportError> {
    let io = |source| ReportError::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(path, text).map_err(io)
}

/// Draws `series` (quality per round) and horizontal `references` (baselines) as an SVG.
/// The legend sits in a panel right of the plot, so it never covers a curve; the round axis
/// has integer ticks.
pub fn plot_rounds(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    references: &[(String, f64)],
) -> Result<(), ReportError> {
    let err = |e: &dyn std::fmt::Display| ReportError::Plot {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|source| ReportError::Io { path: dir.display().to_string(), source })?;
    }
    let x_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(1, u32::max);
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(references.iter().map(|r| r.1));
    let y_max = (ys.fold(0.0f64, f64::max) * 1.1).clamp(0.1, 1.0);

    let root = SVGBackend::new(path, (1100, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (plot_area, legend_area) = root.split_horizontally(820);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    // At most ~10 ticks, each a round number (1, 2, 5 × 10^k rounds apart).
    let step = [1u32, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000]
        .into_iter()
        .find(|s| x_max / s <= 10)
        .unwrap_or(x_max.max(1));
    chart
        .configure_mesh()
        .x_desc("federation round")
        .y_desc(y_label)
        .x_labels((x_max / step + 1) as usize)
        .x_label_formatter(&|x| x.to_string())
        .draw()
        .map_err(|e| err(&e))?;
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK, RGBColor(230, 120, 0)];
    let mut legend: Vec<(String, ShapeStyle)> = Vec::new();
    for (i, s) in series.iter().enumerate() {
        let style = palette[i % palette.len()].stroke_width(2);
        chart.draw_series(LineSeries::new(s.points.iter().copied(), style)).map_err(|e| err(&e))?;
        legend.push((s.name.clone(), style));
    }
    for (i, (name, y)) in references.iter().enumerate() {
        let color = palette[(series.len() + i) % palette.len()];
        let style = ShapeStyle { color: color.mix(0.7), filled: false, stroke_width: 1 };
        chart
            .draw_series(DashedLineSeries::new([(0, *y), (x_max, *y)], 6, 4, style))
            .map_err(|e| err(&e))?;
        legend.push((format!("{name}: {y:.3}"), style));
    }
    for (i, (name, style)) in legend.iter().enumerate() {
        let y = 60 + 26 * i as i32;
        legend_area.draw(&PathElement::new(vec![(8, y), (40, y)], *style)).map_err(|e| err(&e))?;
        legend_area
            .draw(&Text::new(name.clone(), (48, y - 8), ("sans-serif", 15)))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, hr10: f64) -> MethodRow {
        MethodRow {
            method: method.into(),
            quality: Quality { hr10, users: 3, ..Default::default() },
        }
    }

    #[test]
    fn markdown_table_has_a_row_per_method_in_order() {
        let t = markdown_table(&[row("popularity", 0.4), row("federated", 0.71234)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| method | HR@10"));
        assert_eq!(lines[2], "| popularity | 0.4000 | 0.0000 | 0.0000 | 0.0000 | 3 |");
        assert!(lines[3].starts_with("| federated | 0.7123 |"));
    }

    #[test]
    fn json_and_plot_files_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("out/report.json");
        write_json(&json, &vec![row("popularity", 0.4)]).expect("json");
        assert!(std::fs::read_to_string(&json).expect("read").contains("\"hr10\": 0.4"));
        let svg = dir.path().join("out/quality.svg");
        let s = Series { name: "federated".into(), points: vec![(1, 0.2), (2, 0.5), (177, 0.6)] };
        plot_rounds(&svg, "HR@10 per round", "HR@10", &[s], &[("centralized_mf".into(), 0.65)])
            .expect("plot");
        let text = std::fs::read_to_string(&svg).expect("read");
        assert!(text.starts_with("<svg") && text.contains("federated"));
        assert!(text.contains("centralized_mf: 0.650"), "the legend names every line");
        // Round ticks are whole numbers.
        let labels: Vec<&str> = text.lines().map(str::trim).collect();
        assert!(labels.contains(&"50") && labels.contains(&"100"), "integer round ticks");
        assert!(!labels.contains(&"50.0"), "no fractional round ticks");
    }
}
