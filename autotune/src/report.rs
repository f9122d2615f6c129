//! The tuning report: the table of candidates as CSV and JSON, and a plot (SVG) of the
//! measured time of each candidate against its tile configuration.

use crate::cache::TrialRecord;
use attnc_codegen::BackendOptions;
use plotters::prelude::*;
use std::path::Path;

/// Writes `tune.csv`, `tune.json` and `tune.svg` into `dir`.
pub fn write<O: BackendOptions>(dir: &Path, title: &str, trials: &[TrialRecord<O>]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut csv = String::from("candidate,block_q,block_k,tiled,chunk,options,predicted_ms,median_ms,best_ms,status\n");
    for t in trials {
        let s = t.options.schedule();
        csv.push_str(&format!(
            "{},{},{},{},{},{},{:.4},{},{},{}\n",
            t.name,
            s.block_q,
            s.block_k,
            s.tiled,
            s.chunk,
            t.options.describe().replace(", ", " ").replace(',', ";"),
            t.predicted_s * 1e3,
            t.median_s.map_or(String::new(), |m| format!("{:.4}", m * 1e3)),
            t.best_s.map_or(String::new(), |m| format!("{:.4}", m * 1e3)),
            t.status.replace(',', ";")
        ));
    }
    std::fs::write(dir.join("tune.csv"), csv).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("tune.json"), serde_json::to_string_pretty(trials).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    plot(&dir.join("tune.svg"), title, trials)
}

fn plot<O>(path: &Path, title: &str, trials: &[TrialRecord<O>]) -> Result<(), String> {
    let timed: Vec<(usize, f64, &str)> = trials.iter().enumerate().filter_map(|(n, t)| t.median_s.map(|m| (n, m * 1e3, t.name.as_str()))).collect();
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let ymax = timed.iter().map(|t| t.1).fold(1e-3, f64::max) * 1.15;
    let n = trials.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(110)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
        .map_err(|e| e.to_string())?;
    let names: Vec<String> = trials.iter().map(|t| t.name.clone()).collect();
    chart
        .configure_mesh()
        .y_desc("median time (ms)")
        .x_labels(n)
        .x_label_formatter(&|x| names.get(x.round().max(0.0) as usize).cloned().unwrap_or_default())
        .x_label_style(("sans-serif", 11).into_font().transform(FontTransform::Rotate90))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(timed.iter().map(|(x, y, _)| Rectangle::new([(*x as f64 - 0.35, 0.0), (*x as f64 + 0.35, *y)], BLUE.mix(0.6).filled())))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
