//! A classification run's results and their report: the result types (per seed, per method),
//! summaries over seeds, the paired bootstrap comparisons and the paper's claims, results.md,
//! the plots, the weak labels as Parquet, and the files of the run folder.

use crate::config::{ExperimentConfig, ModelSpec};
use crate::eval::classify::ClassifyMetrics;
use crate::eval::paired::{average, Estimate, Outcomes, Resampler};
use crate::eval::summary::{SummaryBuilder, SummaryTable};
use crate::report::cell;
use crate::report::parquet::{named, seed_column, text_column, ColumnData};
use crate::report::table::Table;
use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;

type Rows = Vec<Vec<f64>>;

/// How many probe solves a stage ran, and how many stopped before the gradient tolerance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Convergence {
    pub solves: usize,
    pub unconverged: usize,
}

impl Convergence {
    pub(crate) fn of(cv: Option<&crate::train::convex::CvReport>) -> Self {
        cv.map_or_else(Self::default, |cv| Convergence {
            solves: cv.solves,
            unconverged: cv.unconverged,
        })
    }

    pub(crate) fn add(&mut self, other: Convergence) {
        self.solves += other.solves;
        self.unconverged += other.unconverged;
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MethodResult {
    pub method: String,
    pub test: ClassifyMetrics,
    pub pgr_vs_mean_weak: Option<f64>,
    pub pgr_vs_best_weak: Option<f64>,
    /// The probe's C, chosen by cross-validation on the weak labels it learns from.
    pub chosen_c: Option<f64>,
}

/// Test-set probabilities of every model of one seed (written to `test_predictions.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct SeedPredictions {
    pub seed: u64,
    pub test_ids: Vec<String>,
    pub labels: Vec<usize>,
    pub weak: Vec<Rows>,
    pub ceiling: Rows,
    /// In the order of the seed's `methods`.
    pub methods: Vec<Rows>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    pub data_hash: String,
    pub sizes: [usize; 4],
    pub weak: Vec<ClassifyMetrics>,
    /// The weak models' labels on strong_train scored against its ground truth (calibration:
    /// ECE, Brier; ground truth used for this report only).
    pub weak_on_strong_train: Vec<ClassifyMetrics>,
    /// C of each weak model's probe, chosen by cross-validation on weak_train.
    pub weak_chosen_c: Vec<Option<f64>>,
    /// Each weak model's cross-validated log-loss on weak_train at that C.
    pub weak_cv_log_loss: Vec<Option<f64>>,
    /// Dawid-Skene accuracies estimated on strong_train without ground truth, per weak model.
    pub learned_reliability: Vec<f64>,
    /// The weights used by the multi-weak methods.
    pub weights: Vec<f64>,
    pub ceiling: ClassifyMetrics,
    pub ceiling_chosen_c: Option<f64>,
    /// Probe solves of this seed (all folds, grid values and refits) and how many stopped
    /// before the gradient tolerance.
    pub probe_solves: Convergence,
    pub methods: Vec<MethodResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResults {
    pub config: ExperimentConfig,
    pub provenance: String,
    pub models: Vec<(String, String)>,
    pub seeds: Vec<SeedResult>,
    pub summary: SummaryTable,
    pub paired: PairedReport,
    /// The CPU the run used (model name, vector extensions, threads).
    pub cpu: String,
    /// The number type of the frozen forward passes, and its kernel.
    pub precision: String,
    /// Wall time of each stage (feature extraction per model, the probes of all seeds).
    pub timings: Vec<Timing>,
    /// Users' files with string labels: class k is label_names[k] (sorted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_names: Option<Vec<String>>,
}

impl RunResults {
    /// The strong ceiling's margin over the best weak model, mean over seeds: how much room
    /// the run leaves for weak-to-strong.
    pub fn ceiling_margin(&self) -> f64 {
        let margins: Vec<f64> = self
            .seeds
            .iter()
            .map(|s| {
                s.ceiling.accuracy
                    - s.weak
                        .iter()
                        .map(|w| w.accuracy)
                        .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect();
        margins.iter().sum::<f64>() / margins.len().max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub stage: String,
    pub seconds: f64,
    /// Read from the cache instead of computed.
    pub cached: bool,
}

/// One method's paired comparisons (differences of test accuracy, 95% two-way bootstrap
/// intervals over test examples and seeds).
#[derive(Debug, Clone, Serialize)]
pub struct PairedRow {
    pub method: String,
    /// Its weak teacher (single-weak methods) or "mean weak" (multi-weak methods).
    pub reference: String,
    pub vs_reference: Option<Estimate>,
    /// PGR against the reference: (student - reference) / (ceiling - reference).
    pub pgr: Option<Estimate>,
    pub vs_naive: Option<Estimate>,
    pub vs_best_single: Option<Estimate>,
}

/// A claim of the paper with the measured difference it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub claim: String,
    /// "a - b" of the methods compared.
    pub comparison: String,
    pub estimate: Option<Estimate>,
    /// holds / not resolved / contradicted (interval above / across / below zero).
    pub verdict: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PairedReport {
    pub resamples: usize,
    /// "crossed" (one test set shared by all seeds) or "nested".
    pub design: String,
    /// The single-weak xent student whose teacher has the lowest cross-validated log-loss on
    /// weak_train (chosen without test data).
    pub best_single: Option<String>,
    pub rows: Vec<PairedRow>,
    pub claims: Vec<Claim>,
}

const PAIRED_RESAMPLES: usize = 2000;

fn correctness(probs: &Rows, labels: &[usize]) -> Vec<f64> {
    probs
        .iter()
        .zip(labels)
        .map(|(p, &y)| f64::from(crate::eval::classify::argmax(p) == y))
        .collect()
}

/// The teacher of a single-weak method `name[weak]`.
fn teacher_of(method: &str, weak_names: &[String]) -> Option<usize> {
    let inner = method.split_once('[')?.1.strip_suffix(']')?;
    weak_names.iter().position(|w| w == inner)
}

pub(crate) fn paired_statistics(
    config: &ExperimentConfig,
    seeds: &[SeedResult],
    predictions: &[SeedPredictions],
) -> PairedReport {
    let Some(first) = predictions.first() else {
        return PairedReport::default();
    };
    let weak_names = config.weak_labels();
    let shared = predictions.iter().all(|p| p.test_ids == first.test_ids);
    let sampler = Resampler::new(
        predictions.iter().map(|p| p.labels.len()).collect(),
        shared,
        PAIRED_RESAMPLES,
        config.seeds.first().copied().unwrap_or(0),
    );
    let outcomes = |pick: &dyn Fn(&SeedPredictions) -> &Rows| -> Outcomes {
        predictions
            .iter()
            .map(|p| correctness(pick(p), &p.labels))
            .collect()
    };
    let weak: Vec<Outcomes> = (0..weak_names.len())
        .map(|j| outcomes(&|p| &p.weak[j]))
        .collect();
    let mean_weak = average(&weak.iter().collect::<Vec<_>>());
    let ceiling = outcomes(&|p| &p.ceiling);
    let names: Vec<String> = seeds[0].methods.iter().map(|m| m.method.clone()).collect();
    let methods: Vec<Outcomes> = (0..names.len())
        .map(|k| outcomes(&|p| &p.methods[k]))
        .collect();
    let find = |name: &str| names.iter().position(|n| n == name);
    // The best single-weak student is chosen without test data: the xent student of the weak
    // model with the lowest cross-validated log-loss on weak_train (mean over seeds).
    let cv_of = |j: usize| -> f64 {
        let values: Vec<f64> = seeds
            .iter()
            .filter_map(|s| s.weak_cv_log_loss.get(j).copied().flatten())
            .collect();
        if values.is_empty() {
            f64::INFINITY
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        }
    };
    let best_single = names
        .iter()
        .enumerate()
        .filter_map(|(k, n)| {
            n.starts_with("xent[")
                .then(|| teacher_of(n, &weak_names))
                .flatten()
                .map(|j| (k, cv_of(j)))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| k);
    let naive = find("naive");
    // Each row's bootstraps on their own thread (2,000 resamples of ~5,000 outcomes each).
    let rows: Vec<PairedRow> = names
        .par_iter()
        .enumerate()
        .map(|(k, name)| {
            let teacher = teacher_of(name, &weak_names);
            let (reference, reference_outcomes) = match teacher {
                Some(j) => (weak_names[j].clone(), &weak[j]),
                None => ("mean weak".to_string(), &mean_weak),
            };
            PairedRow {
                method: name.clone(),
                reference,
                vs_reference: sampler.difference(&methods[k], reference_outcomes),
                pgr: sampler.pgr(&methods[k], reference_outcomes, &ceiling),
                vs_naive: naive
                    .filter(|&n| n != k)
                    .and_then(|n| sampler.difference(&methods[k], &methods[n])),
                vs_best_single: best_single
                    .filter(|&b| b != k)
                    .and_then(|b| sampler.difference(&methods[k], &methods[b])),
            }
        })
        .collect();
    // Every claim is one of the rows' comparisons (the same bootstrap, not drawn again).
    let row = |name: &str| find(name).map(|k| &rows[k]);
    let claim = |text: String, comparison: String, estimate: Option<Estimate>| Claim {
        claim: text,
        comparison,
        verdict: estimate.map_or("undefined", |e| e.verdict()).into(),
        estimate,
    };
    let best_name = best_single.map(|k| names[k].as_str());
    let mut claims = Vec::new();
    for (text, a, b, pick) in [
        (
            "Bayesian multi-weak beats naive multi-weak",
            "edl",
            Some("naive"),
            (|r: &PairedRow| r.vs_naive) as fn(&PairedRow) -> Option<Estimate>,
        ),
        (
            "Naive multi-weak beats the best single-weak student",
            "naive",
            best_name,
            |r: &PairedRow| r.vs_best_single,
        ),
        (
            "Bayesian multi-weak beats the best single-weak student",
            "edl",
            best_name,
            |r: &PairedRow| r.vs_best_single,
        ),
        // The classification counterpart of joint decoding. The weighted-average joint label is
        // not used here: the cross-entropy is linear in its target, so with weights summing to 1
        // it is the naive loss exactly.
        (
            "Joint labels (Dawid-Skene posterior) beat naive multi-weak (classification counterpart of joint decoding)",
            "joint_dawid_skene",
            Some("naive"),
            |r: &PairedRow| r.vs_naive,
        ),
    ] {
        if let (Some(r), Some(b)) = (row(a), b) {
            if find(b).is_some() {
                claims.push(claim(text.into(), format!("{a} - {b}"), pick(r)));
            }
        }
    }
    for r in rows
        .iter()
        .filter(|r| r.method.starts_with("xent[") || r.method == "edl")
    {
        claims.push(claim(
            format!(
                "{} recovers part of the gap (beats {})",
                r.method, r.reference
            ),
            format!("{} - {}", r.method, r.reference),
            r.vs_reference,
        ));
    }
    PairedReport {
        resamples: PAIRED_RESAMPLES,
        design: if shared { "crossed" } else { "nested" }.into(),
        best_single: best_single.map(|k| names[k].clone()),
        rows,
        claims,
    }
}

fn estimate_cell(e: &Option<Estimate>) -> String {
    match e {
        Some(e) => format!("{:+.3} [{:+.3}, {:+.3}]", e.value, e.lo, e.hi),
        None => "undefined".into(),
    }
}

pub(crate) fn summarise(config: &ExperimentConfig, seeds: &[SeedResult]) -> SummaryTable {
    let mut b = SummaryBuilder::new(config.seeds.first().copied().unwrap_or(0));
    for (j, label) in config.weak_labels().iter().enumerate() {
        let name = format!("weak[{label}]");
        b.add(
            &name,
            "accuracy",
            seeds.iter().map(|s| s.weak[j].accuracy).collect(),
        );
        b.add(
            &name,
            "strong_train_ece",
            seeds
                .iter()
                .map(|s| s.weak_on_strong_train[j].ece)
                .collect(),
        );
        b.add(
            &name,
            "strong_train_brier",
            seeds
                .iter()
                .map(|s| s.weak_on_strong_train[j].brier)
                .collect(),
        );
        b.add(
            &name,
            "strong_train_accuracy",
            seeds
                .iter()
                .map(|s| s.weak_on_strong_train[j].accuracy)
                .collect(),
        );
        b.add(
            &name,
            "learned_reliability",
            seeds.iter().map(|s| s.learned_reliability[j]).collect(),
        );
    }
    b.add(
        "ceiling",
        "accuracy",
        seeds.iter().map(|s| s.ceiling.accuracy).collect(),
    );
    if let Some(first) = seeds.first() {
        for (k, method) in first.methods.iter().enumerate() {
            let column = |f: &dyn Fn(&MethodResult) -> Option<f64>| -> Vec<f64> {
                seeds.iter().filter_map(|s| f(&s.methods[k])).collect()
            };
            let name = &method.method;
            b.add(name, "accuracy", column(&|m| Some(m.test.accuracy)));
            b.add(name, "auroc", column(&|m| m.test.auroc));
            b.add(name, "ece", column(&|m| Some(m.test.ece)));
            b.add(name, "pgr_vs_mean_weak", column(&|m| m.pgr_vs_mean_weak));
            b.add(name, "pgr_vs_best_weak", column(&|m| m.pgr_vs_best_weak));
        }
    }
    b.table
}

/// The table a paper would print.
pub fn markdown(results: &RunResults) -> String {
    let c = &results.config;
    let sizes = results.seeds.first().map(|s| s.sizes).unwrap_or_default();
    let mut out = format!(
        "# {}\n\nTask `{}`: weak_train {}, strong_train {}, test {}; seeds {:?}.\n{}.\n\n\
         Linear probes on frozen features. Cells: mean ± std over seeds [95% bootstrap interval of the mean].\n\
         PGR = (student - weak) / (ceiling - weak), against the mean of the weak models' test accuracies and against the best one.\n\n",
        c.name, c.task.name, sizes[0], sizes[1], sizes[2], c.seeds, results.provenance
    );
    let chosen = |pick: &dyn Fn(&SeedResult) -> Option<f64>| -> String {
        let mut values: Vec<f64> = results.seeds.iter().filter_map(pick).collect();
        if values.is_empty() {
            return String::new();
        }
        values.sort_by(f64::total_cmp);
        format!("{:.2e}", values[values.len() / 2])
    };
    out.push_str(
        "Weak models: probes trained on weak_train (C chosen by 5-fold cross-validation on its ground truth; \
         median over seeds). Their labels on strong_train are what the students learn from; their \
         calibration there is measured against strong_train's ground truth (for this report only: \
         no student sees it).\n\n",
    );
    let mut weak = Table::new(&[
        "model",
        "test accuracy",
        "C",
        "strong_train accuracy",
        "strong_train ECE",
        "strong_train Brier",
        "learned reliability (Dawid-Skene)",
    ]);
    for (j, label) in c.weak_labels().iter().enumerate() {
        let row = &results.summary[&format!("weak[{label}]")];
        weak.row([
            format!("weak: {label}"),
            cell(row.get("accuracy")),
            chosen(&|s| s.weak_chosen_c.get(j).copied().flatten()),
            cell(row.get("strong_train_accuracy")),
            cell(row.get("strong_train_ece")),
            cell(row.get("strong_train_brier")),
            cell(row.get("learned_reliability")),
        ]);
    }
    let strong = c.strong.as_ref().map(ModelSpec::label).unwrap_or_default();
    weak.row([
        format!("ceiling: {strong} on ground truth"),
        cell(results.summary["ceiling"].get("accuracy")),
        chosen(&|s| s.ceiling_chosen_c),
    ]);
    out.push_str(&weak.render());
    out.push('\n');
    out.push_str(&grid_edge_note(results));
    let mut solves = Convergence::default();
    for s in &results.seeds {
        solves.add(s.probe_solves);
    }
    if solves.solves > 0 {
        out.push_str(&format!(
            "Solver: {} probe solves (every fold, grid value and refit), {} of them stopped before \
             the gradient tolerance {:.0e} (at max_iter {} or a failed line search).\n\n",
            solves.solves, solves.unconverged, c.solver.tol, c.solver.max_iter
        ));
    }
    out.push_str("Students: the strong model's probe trained on the weak labels alone, C chosen by cross-validation on those labels.\n\n");
    let mut students = Table::new(&[
        "method",
        "test accuracy",
        "C",
        "AUROC",
        "ECE",
        "PGR vs mean weak",
        "PGR vs best weak",
    ]);
    if let Some(first) = results.seeds.first() {
        for (k, method) in first.methods.iter().enumerate() {
            let row = &results.summary[&method.method];
            students.row([
                method.method.clone(),
                cell(row.get("accuracy")),
                chosen(&|s| s.methods.get(k).and_then(|m| m.chosen_c)),
                cell(row.get("auroc")),
                cell(row.get("ece")),
                cell(row.get("pgr_vs_mean_weak")),
                cell(row.get("pgr_vs_best_weak")),
            ]);
        }
    }
    out.push_str(&students.render());
    if !results.timings.is_empty() {
        out.push_str(&format!(
            "\nRan on: {}; frozen forward passes in {}.\n\n",
            results.cpu, results.precision
        ));
        let mut stages = Table::new(&["stage", "wall time"]);
        for t in &results.timings {
            stages.row([
                t.stage.clone(),
                if t.cached {
                    "cached".to_string()
                } else {
                    format!("{:.0} s", t.seconds)
                },
            ]);
        }
        out.push_str(&stages.render());
    }
    out.push_str(&paired_markdown(&results.paired));
    out
}

/// A note naming the probes whose C was chosen at an edge of the solver's grid (empty when
/// none was).
fn grid_edge_note(results: &RunResults) -> String {
    let c = &results.config;
    let mut out = String::new();
    let grid = c.solver.grid();
    let edge = |v: Option<f64>| {
        v.is_some_and(|v| grid.len() > 1 && (v == grid[0] || v == grid[grid.len() - 1]))
    };
    // Probe name -> the seeds where its C landed on the grid's edge.
    let mut edge_seeds: Vec<(String, Vec<u64>)> = Vec::new();
    let mut mark = |name: String, seed: u64| match edge_seeds.iter_mut().find(|(n, _)| *n == name) {
        Some((_, seeds)) => seeds.push(seed),
        None => edge_seeds.push((name, vec![seed])),
    };
    for s in &results.seeds {
        let weak = c.weak_labels();
        for (j, v) in s.weak_chosen_c.iter().enumerate() {
            if edge(*v) {
                mark(format!("weak {}", weak[j]), s.seed);
            }
        }
        if edge(s.ceiling_chosen_c) {
            mark("ceiling".into(), s.seed);
        }
        for m in &s.methods {
            if edge(m.chosen_c) {
                mark(m.method.clone(), s.seed);
            }
        }
    }
    let at_edge: Vec<String> = edge_seeds
        .iter()
        .map(|(name, seeds)| format!("{name} (seeds {seeds:?})"))
        .collect();
    if !at_edge.is_empty() {
        out.push_str(&format!(
            "Note: C was chosen at the edge of the grid [{:.1e}, {:.1e}] for {}; widen `[solver]` c_min / c_max to see whether the optimum lies beyond it.\n\n",
            grid[0],
            grid[grid.len() - 1],
            at_edge.join(", ")
        ));
    }
    out
}

/// The paired differences of every method and the paper's claims, as markdown sections.
fn paired_markdown(p: &PairedReport) -> String {
    let mut out = String::new();
    if !p.rows.is_empty() {
        out.push_str(&format!(
            "\n## Paired differences\n\nDifferences of test accuracy, computed per test example and seed \
             (the same examples for every model), with 95% percentile intervals of a two-way bootstrap \
             ({} resamples; seeds and test examples drawn with replacement, design: {}). \
             Reference: the student's weak teacher, or the mean of the weak models for multi-weak methods. \
             Best single-weak student: {}, the student of the weak model with the lowest cross-validated \
             log-loss on weak_train (chosen without test data).\n\n",
            p.resamples,
            p.design,
            p.best_single.as_deref().unwrap_or("none")
        ));
        let mut table = Table::new(&[
            "method",
            "reference",
            "vs reference",
            "PGR vs reference",
            "vs naive",
            "vs best single-weak",
        ]);
        for r in &p.rows {
            table.row([
                r.method.clone(),
                r.reference.clone(),
                estimate_cell(&r.vs_reference),
                estimate_cell(&r.pgr),
                estimate_cell(&r.vs_naive),
                estimate_cell(&r.vs_best_single),
            ]);
        }
        out.push_str(&table.render());
    }
    if !p.claims.is_empty() {
        out.push_str(
            "\n## Claims\n\nEach claim of the paper as a paired difference of test accuracy \
             (95% interval as above): holds when the interval is above zero, contradicted when it \
             is below, not resolved when it contains zero.\n\n",
        );
        let mut table = Table::new(&[
            "claim",
            "comparison",
            "difference [95% interval]",
            "verdict",
        ]);
        for claim in &p.claims {
            table.row([
                claim.claim.clone(),
                claim.comparison.clone(),
                estimate_cell(&claim.estimate),
                claim.verdict.to_string(),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

/// Accuracy per method (with the weak models and the ceiling as reference lines) and PGR per
/// method, error bars the 95% bootstrap intervals over seeds.
fn plots(results: &RunResults) -> Vec<(&'static str, String)> {
    let methods: Vec<String> = results
        .seeds
        .first()
        .map(|s| s.methods.iter().map(|m| m.method.clone()).collect())
        .unwrap_or_default();
    super::metric_plots(
        &results.summary,
        &results.config.weak_labels(),
        &methods,
        ("accuracy", "Test accuracy per method", "test accuracy"),
    )
}

/// One weak-labelled strong_train example of a classification run (a line of
/// weak_labels.jsonl, a row of weak_labels.parquet). Fields in alphabetical order, as the JSON
/// lines have always had them.
#[derive(Debug, Clone, Serialize)]
pub struct LabelRow {
    /// The Bayesian (EDL) student's confidence, when that method ran.
    pub bayesian_confidence: Option<Vec<f64>>,
    /// The Dawid-Skene posterior.
    pub dawid_skene: Vec<f64>,
    pub id: String,
    /// The joint (weighted average) label.
    pub joint: Vec<f64>,
    /// The ground-truth class (absent for unlabelled examples).
    pub label: Option<usize>,
    pub seed: u64,
    pub text: String,
    /// Each weak model's probabilities, by model name.
    pub weak: std::collections::BTreeMap<String, Vec<f64>>,
}

/// The weak labels as flat columns: seed, id, text, label, then one probability column per
/// weak model and class (`weak:{name}:p{k}`), the joint label, the Dawid-Skene posterior and the
/// Bayesian (EDL) confidence.
fn label_columns(results: &RunResults, rows: &[LabelRow]) -> Vec<(String, ColumnData)> {
    let classes = rows.first().map_or(0, |r| r.joint.len());
    let prob = |v: &[f64], k: usize| v.get(k).copied().unwrap_or(f64::NAN);
    let mut columns = vec![
        named("seed", seed_column(rows, |r| r.seed)),
        named("id", text_column(rows, |r| &r.id)),
        named("text", text_column(rows, |r| &r.text)),
        (
            "label".to_string(),
            ColumnData::OptionalInt64(rows.iter().map(|r| r.label.map(|c| c as i64)).collect()),
        ),
    ];
    for name in results.config.weak_labels() {
        for k in 0..classes {
            let values = rows
                .iter()
                .map(|r| r.weak.get(&name).map_or(f64::NAN, |v| prob(v, k)))
                .collect();
            columns.push((format!("weak:{name}:p{k}"), ColumnData::Double(values)));
        }
    }
    for (field, joint) in [("joint", true), ("dawid_skene", false)] {
        for k in 0..classes {
            let values = rows
                .iter()
                .map(|r| prob(if joint { &r.joint } else { &r.dawid_skene }, k))
                .collect();
            columns.push((format!("{field}:p{k}"), ColumnData::Double(values)));
        }
    }
    for k in 0..classes {
        let values = rows
            .iter()
            .map(|r| {
                r.bayesian_confidence
                    .as_ref()
                    .and_then(|c| c.get(k).copied())
            })
            .collect();
        columns.push((
            format!("bayesian_confidence:p{k}"),
            ColumnData::OptionalDouble(values),
        ));
    }
    columns
}

pub(crate) fn write_outputs(
    out: &Path,
    results: &RunResults,
    label_rows: &[LabelRow],
    predictions: &[SeedPredictions],
    log: &[crate::train::log::LogLine],
) -> Result<()> {
    super::write_run_folder(out, results, markdown(results), log)?;
    super::write_jsonl(&out.join("weak_labels.jsonl"), label_rows)?;
    super::write_jsonl(&out.join("test_predictions.jsonl"), predictions)?;
    crate::report::parquet::write(
        &out.join("weak_labels.parquet"),
        &label_columns(results, label_rows),
    )?;
    super::write_plots(out, &plots(results))
}
