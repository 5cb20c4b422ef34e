//! Reports: what every run folder holds (results.json, results.md, the training log, JSON lines,
//! plots as SVG and PNG) and the cells and plots both run kinds share; the kinds' own tables and
//! rows in `classify` and `generate`.

pub mod classify;
pub mod generate;
pub mod loss;
pub mod parquet;
pub mod plot;
pub mod table;

use crate::eval::summary::{Summary, SummaryTable};
use anyhow::{Context, Result};
use std::path::Path;

/// The files every run folder starts with: `results.json`, the training log with its loss
/// curves, and `results.md` (the report's `markdown` followed by the log's section).
pub(crate) fn write_run_folder(
    out: &Path,
    results: &impl serde::Serialize,
    markdown: String,
    log: &[crate::train::log::LogLine],
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::io::write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    let training = loss::write(out, log)?;
    crate::io::write_atomic(&out.join("results.md"), (markdown + &training).as_bytes())
}

/// Rows as JSON lines, written atomically.
pub(crate) fn write_jsonl(path: &Path, rows: &[impl serde::Serialize]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row)?);
        text.push('\n');
    }
    crate::io::write_atomic(path, text.as_bytes())
}

/// Each plot of a run as `name.svg` and `name.png` (the same SVG rasterised).
pub(crate) fn write_plots(out: &Path, plots: &[(&'static str, String)]) -> Result<()> {
    for (name, svg) in plots {
        crate::io::write_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
        crate::io::write_atomic(&out.join(format!("{name}.png")), &plot::svg_to_png(svg)?)?;
    }
    Ok(())
}

/// A table cell of a metric over seeds: mean ± std [95% interval], the mean alone for one seed,
/// `undefined` where no seed defines it.
pub(crate) fn cell(summary: Option<&Option<Summary>>) -> String {
    match summary.and_then(Option::as_ref) {
        None => "undefined".into(),
        Some(s) => match (s.std, s.ci95) {
            (Some(std), Some((lo, hi))) => {
                format!("{:.3} ± {:.3} [{:.3}, {:.3}]", s.mean, std, lo, hi)
            }
            _ => format!("{:.3}", s.mean),
        },
    }
}

/// Two plots of a run: `metric` per method with the strong ceiling, the best and the mean weak
/// model as reference lines (file name = the metric), and PGR against the best weak model per
/// method (`pgr`); error bars are the 95% bootstrap intervals over seeds.
pub(crate) fn metric_plots(
    summary: &SummaryTable,
    weak_labels: &[String],
    methods: &[String],
    (metric, title, y_label): (&'static str, &str, &str),
) -> Vec<(&'static str, String)> {
    use crate::report::plot::{bar_chart, Bar, Reference};
    let mean_of = |name: &str, m: &str| {
        summary
            .get(name)
            .and_then(|r| r.get(m))
            .and_then(Option::as_ref)
            .map(|s| (s.mean, s.ci95))
    };
    let bars = |m: &str| -> Vec<Bar> {
        methods
            .iter()
            .filter_map(|name| {
                mean_of(name, m).map(|(value, interval)| Bar {
                    label: name.clone(),
                    value,
                    interval,
                })
            })
            .collect()
    };
    let weak: Vec<f64> = weak_labels
        .iter()
        .filter_map(|l| mean_of(&format!("weak[{l}]"), metric).map(|v| v.0))
        .collect();
    let mut references = Vec::new();
    if let Some((ceiling, _)) = mean_of("ceiling", metric) {
        references.push(Reference {
            label: "strong ceiling".into(),
            value: ceiling,
            color: "#d62728",
        });
    }
    if !weak.is_empty() {
        references.push(Reference {
            label: "best weak".into(),
            value: weak.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            color: "#2ca02c",
        });
        references.push(Reference {
            label: "mean weak".into(),
            value: weak.iter().sum::<f64>() / weak.len() as f64,
            color: "#ff7f0e",
        });
    }
    vec![
        (
            metric,
            bar_chart(title, y_label, &bars(metric), &references),
        ),
        (
            "pgr",
            bar_chart(
                "Performance gap recovered (vs best weak)",
                "PGR vs best weak",
                &bars("pgr_vs_best_weak"),
                &[
                    Reference {
                        label: "weak".into(),
                        value: 0.0,
                        color: "#2ca02c",
                    },
                    Reference {
                        label: "ceiling".into(),
                        value: 1.0,
                        color: "#d62728",
                    },
                ],
            ),
        ),
    ]
}
