//! Ladders (`ws2s sweep`): every model of `[sweep] models` as a weak supervisor of every
//! stronger one. Each strong model is one run of the classification pipeline whose weak set is
//! every model below it: the single-weak methods give one cell per (weak, strong) pair, the
//! multi-weak methods one cell per strong model (when at least two models are below it). A
//! model's features and its stages (weak labels, ceiling) are computed once for the whole ladder
//! (the caches are keyed by model, data and settings, not by run).
//!
//! Outputs: `sweep.json`, `sweep.md` (PGR matrices with intervals, median PGR per method),
//! `ladder.svg/png` (test accuracy against the strong model, one line per weak model, the
//! ceiling dashed), `pgr.svg/png` (heatmaps) and `sweep.parquet` (one row per cell); every
//! run's own outputs under `runs/`.

use super::classify::{self, RunResults};
use crate::config::{ExperimentConfig, LadderOrder, Method, ModelSpec};
use crate::data::Dataset;
use crate::eval::paired::Estimate;
use crate::eval::summary::Summary;
use crate::home::Home;
use crate::report::parquet::ColumnData;
use crate::report::plot::{heatmap, line_chart, side_by_side, svg_to_png, Series, PALETTE};
use crate::report::table::Table;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// One cell of the ladder: a method's student on one strong model, taught by one weak model
/// (single-weak methods) or by every model below the strong one (multi-weak methods).
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub method: String,
    /// The teacher, or "all below" for a multi-weak method.
    pub weak: String,
    pub strong: String,
    /// Test accuracy of the student: mean over seeds [95% bootstrap interval over seeds].
    pub accuracy: Option<Summary>,
    /// The teacher's test accuracy (the mean of the weak models' for multi-weak methods).
    pub weak_accuracy: f64,
    pub ceiling_accuracy: f64,
    /// PGR against the teacher (multi-weak: the mean weak model), 95% two-way bootstrap
    /// interval over test examples and seeds.
    pub pgr: Option<Estimate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepResults {
    pub name: String,
    /// The models from weakest to strongest.
    pub ladder: Vec<String>,
    /// How the order was chosen: "listed", or "ceiling" (each model's cross-validated log-loss
    /// on ground-truth training labels, mean over seeds; no test data).
    pub order: String,
    /// The cross-validated log-loss of each model of `ladder` ("ceiling" order only).
    pub strength: Option<Vec<f64>>,
    /// Each model's accuracy when trained on ground truth: its weak-model accuracy (weak_train
    /// labels) for the weakest, its ceiling (strong_train labels) for the others.
    pub ground_truth_accuracy: Vec<f64>,
    pub cells: Vec<Cell>,
    /// Median over the cells of each method of the PGR point estimates.
    pub median_pgr: Vec<(String, Option<f64>)>,
    pub seeds: Vec<u64>,
    pub cpu: String,
    pub precision: String,
    pub seconds: f64,
}

/// The run of one rung: the strong model `ladder[s]` supervised by every model below it.
fn rung_config(
    config: &ExperimentConfig,
    ladder: &[ModelSpec],
    s: usize,
    methods: (&[Method], &[Method]),
) -> ExperimentConfig {
    let mut rung = config.clone();
    rung.sweep = None;
    rung.weak = ladder[..s].to_vec();
    rung.strong = Some(ladder[s].clone());
    rung.methods.list = methods.0.to_vec();
    if s >= 2 {
        rung.methods.list.extend_from_slice(methods.1);
    }
    rung.name = format!("{}: -> {}", config.name, ladder[s].label());
    rung
}

/// The ladder's models from weakest to strongest, with their measured strength when ordered
/// by it.
fn order_models(
    config: &ExperimentConfig,
    datasets: &[Dataset],
    (home, progress): (&Home, bool),
) -> Result<(Vec<ModelSpec>, Option<Vec<f64>>)> {
    let sweep = config.sweep.as_ref().context("the config has no [sweep]")?;
    let models = sweep.models.clone();
    match sweep.order {
        LadderOrder::Listed => Ok((models, None)),
        LadderOrder::Ceiling => {
            let mut probe = config.clone();
            probe.sweep = None;
            probe.weak = models.clone();
            let cv = classify::ground_truth_cv(&probe, datasets, (home, progress))?;
            let mut ranked: Vec<(ModelSpec, f64)> = models.into_iter().zip(cv).collect();
            // Higher held-out log-loss = weaker: weakest first.
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let (models, cv) = ranked.into_iter().unzip();
            Ok((models, Some(cv)))
        }
    }
}

fn accuracy_of(results: &RunResults, row: &str) -> Option<Summary> {
    results
        .summary
        .get(row)
        .and_then(|r| r.get("accuracy"))
        .cloned()
        .flatten()
}

/// The cells of one rung's results.
fn rung_cells(results: &RunResults, strong: &str, weak_labels: &[String]) -> Vec<Cell> {
    let mean = |row: &str| accuracy_of(results, row).map_or(f64::NAN, |s| s.mean);
    let ceiling = mean("ceiling");
    let weak_accuracy: Vec<f64> = weak_labels
        .iter()
        .map(|w| mean(&format!("weak[{w}]")))
        .collect();
    results
        .paired
        .rows
        .iter()
        .map(|row| {
            let teacher = weak_labels.iter().position(|w| *w == row.reference);
            Cell {
                method: row
                    .method
                    .split_once('[')
                    .map_or(row.method.as_str(), |(m, _)| m)
                    .to_string(),
                weak: teacher.map_or("all below".to_string(), |j| weak_labels[j].clone()),
                strong: strong.to_string(),
                accuracy: accuracy_of(results, &row.method),
                weak_accuracy: match teacher {
                    Some(j) => weak_accuracy[j],
                    None => weak_accuracy.iter().sum::<f64>() / weak_accuracy.len().max(1) as f64,
                },
                ceiling_accuracy: ceiling,
                pgr: row.pgr,
            }
        })
        .collect()
}

fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Runs the ladder on its datasets (one per seed, shared by every rung) and writes its outputs
/// into `out`.
pub fn run(
    config: &ExperimentConfig,
    datasets: &[Dataset],
    out: &Path,
    (home, progress): (&Home, bool),
) -> Result<SweepResults> {
    let started = std::time::Instant::now();
    let sweep = config.sweep.as_ref().context("the config has no [sweep]")?;
    let (ladder, strength) = order_models(config, datasets, (home, progress))?;
    let labels: Vec<String> = ladder.iter().map(ModelSpec::label).collect();
    eprintln!("ladder, weakest first: {}", labels.join(" < "));
    let mut cells = Vec::new();
    let mut ground_truth = vec![f64::NAN; ladder.len()];
    let mut last: Option<RunResults> = None;
    for s in 1..ladder.len() {
        let rung = rung_config(config, &ladder, s, (&sweep.single, &sweep.multi));
        eprintln!(
            "rung {s}/{}: {} supervised by {}",
            ladder.len() - 1,
            labels[s],
            labels[..s].join(", ")
        );
        let dir = out
            .join("runs")
            .join(format!("{s}-{}", file_name(&labels[s])));
        let results = classify::run(&rung, datasets, &dir, (home, progress))
            .with_context(|| format!("rung {s} ({})", labels[s]))?;
        let weak_labels = rung.weak_labels();
        ground_truth[s] = accuracy_of(&results, "ceiling").map_or(f64::NAN, |a| a.mean);
        if s == 1 {
            ground_truth[0] = accuracy_of(&results, &format!("weak[{}]", weak_labels[0]))
                .map_or(f64::NAN, |a| a.mean);
        }
        cells.extend(rung_cells(&results, &labels[s], &weak_labels));
        last = Some(results);
    }
    let mut methods: Vec<String> = Vec::new();
    for c in &cells {
        if !methods.contains(&c.method) {
            methods.push(c.method.clone());
        }
    }
    let median_pgr = methods
        .iter()
        .map(|m| {
            let mut values: Vec<f64> = cells
                .iter()
                .filter(|c| &c.method == m)
                .filter_map(|c| c.pgr.map(|p| p.value))
                .collect();
            (m.clone(), median(&mut values))
        })
        .collect();
    let last = last.context("a ladder needs at least two models")?;
    let results = SweepResults {
        name: config.name.clone(),
        ladder: labels,
        order: match sweep.order {
            LadderOrder::Listed => "listed",
            LadderOrder::Ceiling => "ceiling",
        }
        .into(),
        strength,
        ground_truth_accuracy: ground_truth,
        cells,
        median_pgr,
        seeds: config.seeds.clone(),
        cpu: last.cpu.clone(),
        precision: last.precision.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };
    write_outputs(out, &results)?;
    Ok(results)
}

/// A model label as a folder name.
fn file_name(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn estimate_text(e: &Option<Estimate>) -> String {
    match e {
        Some(e) => format!("{:+.2} [{:+.2}, {:+.2}]", e.value, e.lo, e.hi),
        None => "undefined".into(),
    }
}

/// The methods of the cells, in order of first appearance, and whether each is single-weak.
fn methods_of(results: &SweepResults) -> Vec<(String, bool)> {
    let mut methods: Vec<(String, bool)> = Vec::new();
    for c in &results.cells {
        if !methods.iter().any(|(m, _)| *m == c.method) {
            methods.push((c.method.clone(), c.weak != "all below"));
        }
    }
    methods
}

fn cell<'a>(results: &'a SweepResults, method: &str, weak: &str, strong: &str) -> Option<&'a Cell> {
    results
        .cells
        .iter()
        .find(|c| c.method == method && c.weak == weak && c.strong == strong)
}

pub fn markdown(results: &SweepResults) -> String {
    let l = &results.ladder;
    let mut md = format!(
        "# {}\n\nLadder, weakest first ({} order): {}.\nSeeds {:?}; {}; {}; {:.0} s.\n\n\
         PGR = (student - teacher) / (ceiling - teacher) on test accuracy; intervals are 95% two-way \
         bootstrap intervals over test examples and seeds. Multi-weak methods learn from every model \
         below the strong one, their teacher is the mean of those models.\n\n",
        results.name,
        results.order,
        l.join(" < "),
        results.seeds,
        results.cpu,
        results.precision,
        results.seconds
    );
    md.push_str("## Median PGR per method\n\n");
    let mut medians = Table::new(&[
        "method",
        "median PGR",
        "cells",
        "cells with PGR > 0 resolved",
    ]);
    for (method, value) in &results.median_pgr {
        let of: Vec<&Cell> = results
            .cells
            .iter()
            .filter(|c| &c.method == method)
            .collect();
        let resolved = of
            .iter()
            .filter(|c| c.pgr.is_some_and(|p| p.lo > 0.0))
            .count();
        medians.row([
            method.to_string(),
            value.map_or("undefined".into(), |v| format!("{v:.3}")),
            of.len().to_string(),
            resolved.to_string(),
        ]);
    }
    md.push_str(&medians.render());
    md.push_str("\n## Accuracy on ground truth\n\n");
    let mut accuracy = Table::new(&["model", "test accuracy"]);
    for (model, acc) in l.iter().zip(&results.ground_truth_accuracy) {
        accuracy.row([model.to_string(), format!("{acc:.3}")]);
    }
    md.push_str(&accuracy.render());
    for (method, single) in methods_of(results) {
        if single {
            md.push_str(&format!(
                "\n## {method}: PGR, weak (rows) -> strong (columns)\n\n"
            ));
            let header: Vec<&str> = std::iter::once("weak \\ strong")
                .chain(l[1..].iter().map(String::as_str))
                .collect();
            let mut matrix = Table::new(&header);
            for w in &l[..l.len() - 1] {
                matrix.row(std::iter::once(w.to_string()).chain(l[1..].iter().map(|s| {
                    cell(results, &method, w, s)
                        .map_or("—".to_string(), |c| estimate_text(&c.pgr))
                })));
            }
            md.push_str(&matrix.render());
        } else {
            md.push_str(&format!(
                "\n## {method} (every model below): PGR vs the mean weak model\n\n"
            ));
            let mut cells = Table::new(&["strong", "accuracy", "mean weak", "ceiling", "PGR"]);
            for c in results.cells.iter().filter(|c| c.method == method) {
                cells.row([
                    c.strong.clone(),
                    c.accuracy
                        .as_ref()
                        .map_or("undefined".into(), |a| format!("{:.3}", a.mean)),
                    format!("{:.3}", c.weak_accuracy),
                    format!("{:.3}", c.ceiling_accuracy),
                    estimate_text(&c.pgr),
                ]);
            }
            md.push_str(&cells.render());
        }
    }
    md.push_str("\nPlots: [ladder.svg](ladder.svg), [pgr.svg](pgr.svg). Every cell: `sweep.parquet`, `sweep.json`; each rung's run: `runs/`.\n");
    md
}

/// One ladder panel per single-weak method: test accuracy against the strong model, one line
/// per weak model (starting at its own ground-truth accuracy), the ceiling dashed.
fn ladder_svg(results: &SweepResults) -> String {
    let l = &results.ladder;
    let panels: Vec<String> = methods_of(results)
        .into_iter()
        .filter(|(_, single)| *single)
        .map(|(method, _)| {
            let mut series = vec![Series {
                label: "trained on ground truth".into(),
                points: results
                    .ground_truth_accuracy
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| (i as f64, a))
                    .collect(),
                color: "#333333",
                dashed: true,
                markers: true,
            }];
            for (j, w) in l[..l.len() - 1].iter().enumerate() {
                let mut points = vec![(j as f64, results.ground_truth_accuracy[j])];
                for (s, strong) in l.iter().enumerate().skip(j + 1) {
                    if let Some(a) =
                        cell(results, &method, w, strong).and_then(|c| c.accuracy.as_ref())
                    {
                        points.push((s as f64, a.mean));
                    }
                }
                series.push(Series {
                    label: format!("weak: {w}"),
                    points,
                    color: PALETTE[j % PALETTE.len()],
                    dashed: false,
                    markers: true,
                });
            }
            line_chart(
                &format!("{method}: test accuracy along the ladder"),
                ("strong model (weakest to strongest)", "test accuracy"),
                &series,
                Some(l),
            )
        })
        .collect();
    side_by_side(&panels)
}

/// PGR heatmaps: one per single-weak method (weak x strong), and one of the multi-weak methods
/// (method x strong).
fn pgr_svg(results: &SweepResults) -> String {
    let l = &results.ladder;
    let value = |c: Option<&Cell>| c.and_then(|c| c.pgr).map(|p| p.value);
    let mut panels = Vec::new();
    let mut multi = Vec::new();
    for (method, single) in methods_of(results) {
        if !single {
            multi.push(method);
            continue;
        }
        let values: Vec<Vec<Option<f64>>> = l[..l.len() - 1]
            .iter()
            .map(|w| {
                l[1..]
                    .iter()
                    .map(|s| value(cell(results, &method, w, s)))
                    .collect()
            })
            .collect();
        panels.push(heatmap(
            &format!("{method}: PGR"),
            ("weak model", "strong model"),
            (&l[..l.len() - 1], &l[1..]),
            &values,
            (-1.0, 1.0),
        ));
    }
    if !multi.is_empty() {
        let values: Vec<Vec<Option<f64>>> = multi
            .iter()
            .map(|m| {
                l[1..]
                    .iter()
                    .map(|s| value(cell(results, m, "all below", s)))
                    .collect()
            })
            .collect();
        panels.push(heatmap(
            "multi-weak: PGR vs mean weak",
            ("method", "strong model"),
            (&multi, &l[1..]),
            &values,
            (-1.0, 1.0),
        ));
    }
    side_by_side(&panels)
}

fn parquet_columns(results: &SweepResults) -> Vec<(String, ColumnData)> {
    let cells = &results.cells;
    let text = |f: &dyn Fn(&Cell) -> String| ColumnData::Utf8(cells.iter().map(f).collect());
    let num = |f: &dyn Fn(&Cell) -> Option<f64>| {
        ColumnData::OptionalDouble(cells.iter().map(f).collect())
    };
    let ci = |c: &Cell, hi: bool| {
        c.accuracy
            .as_ref()
            .and_then(|a| a.ci95)
            .map(|(lo, h)| if hi { h } else { lo })
    };
    vec![
        ("method".into(), text(&|c| c.method.clone())),
        ("weak".into(), text(&|c| c.weak.clone())),
        ("strong".into(), text(&|c| c.strong.clone())),
        (
            "accuracy".into(),
            num(&|c| c.accuracy.as_ref().map(|a| a.mean)),
        ),
        ("accuracy_lo".into(), num(&|c| ci(c, false))),
        ("accuracy_hi".into(), num(&|c| ci(c, true))),
        ("weak_accuracy".into(), num(&|c| Some(c.weak_accuracy))),
        (
            "ceiling_accuracy".into(),
            num(&|c| Some(c.ceiling_accuracy)),
        ),
        ("pgr".into(), num(&|c| c.pgr.map(|p| p.value))),
        ("pgr_lo".into(), num(&|c| c.pgr.map(|p| p.lo))),
        ("pgr_hi".into(), num(&|c| c.pgr.map(|p| p.hi))),
    ]
}

fn write_outputs(out: &Path, results: &SweepResults) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::io::write_atomic(
        &out.join("sweep.json"),
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    crate::io::write_atomic(&out.join("sweep.md"), markdown(results).as_bytes())?;
    crate::report::parquet::write(&out.join("sweep.parquet"), &parquet_columns(results))?;
    for (name, svg) in [("ladder", ladder_svg(results)), ("pgr", pgr_svg(results))] {
        crate::io::write_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
        crate::io::write_atomic(&out.join(format!("{name}.png")), &svg_to_png(&svg)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [0.3, -0.1, 0.9]), Some(0.3));
        assert_eq!(median(&mut [0.4, 0.1, 0.2, 0.3]), Some(0.25));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn each_rung_learns_from_every_model_below_and_multi_weak_needs_two() {
        let text = r#"
name = "l"
[task]
name = "sciq"
[sweep]
[[sweep.models]]
model = "a"
[[sweep.models]]
model = "b"
[[sweep.models]]
model = "c"
"#;
        let config = ExperimentConfig::parse(text, Path::new("l.toml")).unwrap();
        let sweep = config.sweep.clone().unwrap();
        assert_eq!(sweep.single, [Method::Xent, Method::Logconf]);
        let methods = (&sweep.single[..], &sweep.multi[..]);
        let first = rung_config(&config, &sweep.models, 1, methods);
        assert_eq!(first.weak_labels(), ["a"]);
        assert_eq!(first.strong.as_ref().unwrap().label(), "b");
        assert_eq!(first.methods.list, [Method::Xent, Method::Logconf]);
        assert!(first.sweep.is_none());
        let top = rung_config(&config, &sweep.models, 2, methods);
        assert_eq!(top.weak_labels(), ["a", "b"]);
        assert_eq!(
            top.methods.list,
            [
                Method::Xent,
                Method::Logconf,
                Method::Naive,
                Method::JointDawidSkene,
                Method::Edl
            ]
        );
    }

    #[test]
    fn folder_names_are_safe() {
        assert_eq!(file_name("Qwen2.5-Coder-1.5B"), "Qwen2.5-Coder-1.5B");
        assert_eq!(file_name("a/b c"), "a_b_c");
    }
}
