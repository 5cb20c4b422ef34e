//! A generation run's results and their report: the result types (per seed, per method, the
//! preference stage), summaries over seeds, results.md, the plots, the weak labels and the
//! preference pairs as JSONL and Parquet.

use crate::config::{ExperimentConfig, ModelSpec};
use crate::eval::slurp::SlurpMetrics;
use crate::eval::summary::{Summary, SummaryBuilder, SummaryTable};
use crate::report::cell;
use crate::report::parquet::{named, seed_column, text_column, ColumnData};
use crate::report::table::Table;
use crate::seq2seq::tasks::DpoEpochLog;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Test results of one model: the SLURP metrics, the unparsable outputs, the predictions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Eval {
    pub metrics: SlurpMetrics,
    /// Outputs that were not a JSON object of strings (scored as no slots).
    pub unparsable: usize,
    pub predictions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    pub method: String,
    pub test: Eval,
    pub pgr_vs_mean_weak: Option<f64>,
    pub pgr_vs_best_weak: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DpoReport {
    pub after: String,
    pub pairs: usize,
    /// Prompts skipped because the best and worst candidates scored the same.
    pub skipped_ties: usize,
    pub epochs: Vec<DpoEpochLog>,
    pub before: MethodResult,
    pub after_dpo: MethodResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    pub data_hash: String,
    pub sizes: [usize; 4],
    pub weak: Vec<Eval>,
    pub weights: Vec<f64>,
    pub ceiling: Eval,
    pub methods: Vec<MethodResult>,
    pub dpo: Option<DpoReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResults {
    pub config: ExperimentConfig,
    pub provenance: String,
    pub models: Vec<(String, String)>,
    pub seeds: Vec<SeedResult>,
    pub summary: SummaryTable,
    /// Wall-clock seconds of the whole run (cached stages take almost none).
    pub wall_seconds: f64,
    /// The precision of inference's products (decoding, rescoring) with its kernel ("f32
    /// (gemm-f32+...)", "bf16x2 (amx-bf16)"); training computes in f32.
    pub decode_precision: String,
}

const METRICS: [&str; 4] = ["slu_f1", "span_f1", "exact_match", "unparsable"];

fn metric(e: &Eval, name: &str) -> f64 {
    match name {
        "slu_f1" => e.metrics.slu_f1,
        "span_f1" => e.metrics.span_f1,
        "exact_match" => e.metrics.exact_match,
        _ => e.unparsable as f64,
    }
}

pub(crate) fn summarise(config: &ExperimentConfig, seeds: &[SeedResult]) -> SummaryTable {
    let mut b = SummaryBuilder::new(config.seeds.first().copied().unwrap_or(0));
    for (j, label) in config.weak_labels().iter().enumerate() {
        let name = format!("weak[{label}]");
        for m in METRICS {
            b.add(
                &name,
                m,
                seeds.iter().map(|s| metric(&s.weak[j], m)).collect(),
            );
        }
        b.add(
            &name,
            "weight",
            seeds.iter().map(|s| s.weights[j]).collect(),
        );
    }
    for m in METRICS {
        b.add(
            "ceiling",
            m,
            seeds.iter().map(|s| metric(&s.ceiling, m)).collect(),
        );
    }
    if let Some(first) = seeds.first() {
        for (k, method) in first.methods.iter().enumerate() {
            let column = |f: &dyn Fn(&MethodResult) -> Option<f64>| -> Vec<f64> {
                seeds.iter().filter_map(|s| f(&s.methods[k])).collect()
            };
            let name = &method.method;
            for m in METRICS {
                b.add(name, m, column(&|r| Some(metric(&r.test, m))));
            }
            b.add(name, "pgr_vs_mean_weak", column(&|r| r.pgr_vs_mean_weak));
            b.add(name, "pgr_vs_best_weak", column(&|r| r.pgr_vs_best_weak));
        }
    }
    b.table
}

/// A count over seeds: an integer when it is one (one seed, or every seed the same).
fn count_cell(summary: Option<&Option<Summary>>) -> String {
    match summary.and_then(Option::as_ref) {
        Some(s) if s.values.iter().all(|v| *v == s.mean && v.fract() == 0.0) => {
            format!("{}", s.mean as i64)
        }
        _ => cell(summary),
    }
}

/// The table a paper would print.
pub fn markdown(results: &RunResults) -> String {
    let c = &results.config;
    let sizes = results.seeds.first().map(|s| s.sizes).unwrap_or_default();
    let mut out = format!(
        "# {}\n\nTask `{}`: weak_train {}, strong_train {}, test {}; seeds {:?}.\n{}.\n\n\
         Test decoding: beam {}; weak labels: {}-best lists. SLU-F1 as the official SLURP scorer \
         defines it; an unparsable output counts as no slots. Cells: mean ± std over seeds [95% \
         bootstrap interval of the mean]. PGR = (student - weak) / (ceiling - weak) on SLU-F1, \
         against the mean of the weak models and against the best one. Unparsable: outputs (of \
         {}) that are not a JSON object of strings. Inference's products (decoding, rescoring): \
         {}; training: f32. Wall time of the run: {:.0} s.\n\n",
        c.name,
        c.task.name,
        sizes[0],
        sizes[1],
        sizes[2],
        c.seeds,
        results.provenance,
        c.generation.test_beams,
        c.generation.weak_beams,
        sizes[2],
        results.decode_precision,
        results.wall_seconds
    );
    let row = |name: &str| results.summary.get(name);
    // The SLURP metrics of a summary row, then its unparsable count.
    let metrics = |name: &str| {
        let r = row(name);
        let get = |m: &str| cell(r.and_then(|r| r.get(m)));
        [
            get("slu_f1"),
            get("span_f1"),
            get("exact_match"),
            count_cell(r.and_then(|r| r.get("unparsable"))),
        ]
    };
    let mut models = Table::new(&[
        "model",
        "SLU-F1",
        "span F1",
        "exact match",
        "unparsable",
        "weight",
    ]);
    for label in c.weak_labels() {
        let name = format!("weak[{label}]");
        let weight = cell(row(&name).and_then(|r| r.get("weight")));
        models.row(
            std::iter::once(format!("weak: {label}"))
                .chain(metrics(&name))
                .chain([weight]),
        );
    }
    let strong = c.strong.as_ref().map(ModelSpec::label).unwrap_or_default();
    models.row(
        std::iter::once(format!("ceiling: {strong} on ground truth")).chain(metrics("ceiling")),
    );
    out.push_str(&models.render());
    out.push('\n');
    let mut students = Table::new(&[
        "method",
        "SLU-F1",
        "span F1",
        "exact match",
        "unparsable",
        "PGR vs mean weak",
        "PGR vs best weak",
    ]);
    if let Some(first) = results.seeds.first() {
        for method in &first.methods {
            let pgr = |m: &str| cell(row(&method.method).and_then(|r| r.get(m)));
            students.row(
                std::iter::once(method.method.clone())
                    .chain(metrics(&method.method))
                    .chain([pgr("pgr_vs_mean_weak"), pgr("pgr_vs_best_weak")]),
            );
        }
    }
    out.push_str(&students.render());
    for s in &results.seeds {
        if let Some(d) = &s.dpo {
            out.push_str(&format!(
                "\n## Preference stage (seed {})\n\nConservative DPO after `{}`: {} pairs, {} prompts skipped (tie).\n\n",
                s.seed, d.after, d.pairs, d.skipped_ties,
            ));
            let mut students =
                Table::new(&["student", "SLU-F1", "span F1", "exact match", "unparsable"]);
            for (label, r) in [("before", &d.before), ("after", &d.after_dpo)] {
                let m = &r.test.metrics;
                students.row([
                    format!("{label} ({})", r.method),
                    format!("{:.4}", m.slu_f1),
                    format!("{:.4}", m.span_f1),
                    format!("{:.4}", m.exact_match),
                    r.test.unparsable.to_string(),
                ]);
            }
            out.push_str(&students.render());
            let mut epochs = Table::new(&[
                "epoch",
                "reward margin",
                "chosen log-prob",
                "rejected log-prob",
                "pairs ordered",
            ]);
            for e in &d.epochs {
                epochs.row([
                    e.epoch.to_string(),
                    format!("{:.4}", e.reward_margin),
                    format!("{:.3}", e.chosen_logprob),
                    format!("{:.3}", e.rejected_logprob),
                    format!("{:.3}", e.accuracy),
                ]);
            }
            out.push('\n');
            out.push_str(&epochs.render());
        }
    }
    out
}

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
        ("slu_f1", "Test SLU-F1 per method", "SLU-F1"),
    )
}

/// One weak-labelled strong_train example of a generation run (a line of weak_labels.jsonl, a
/// row of weak_labels.parquet). Fields in alphabetical order, as the JSON lines have always had
/// them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelRow {
    pub id: String,
    /// The ensemble's joint target.
    pub joint: String,
    /// The ground truth (absent for unlabelled examples).
    pub label: Option<String>,
    pub seed: u64,
    pub text: String,
    /// Each weak model's top hypothesis, by model name.
    pub weak: std::collections::BTreeMap<String, String>,
}

/// One preference pair of the DPO stage (preference_pairs.jsonl / .parquet), fields in
/// alphabetical order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairRow {
    pub chosen: String,
    pub chosen_score: f64,
    pub id: String,
    pub prompt: String,
    pub rejected: String,
    pub rejected_score: f64,
    pub seed: u64,
}

/// weak_labels.parquet's columns: seed, id, text, label, one per weak model, joint.
fn label_columns(rows: &[LabelRow], weak_names: &[String]) -> Vec<(String, ColumnData)> {
    let mut columns = vec![
        named("seed", seed_column(rows, |r| r.seed)),
        named("id", text_column(rows, |r| &r.id)),
        named("text", text_column(rows, |r| &r.text)),
        named(
            "label",
            text_column(rows, |r| r.label.as_deref().unwrap_or("")),
        ),
    ];
    for name in weak_names {
        columns.push(named(
            format!("weak:{name}"),
            text_column(rows, |r| r.weak.get(name).map_or("", String::as_str)),
        ));
    }
    columns.push(named("joint", text_column(rows, |r| &r.joint)));
    columns
}

/// preference_pairs.parquet's columns.
fn pair_columns(rows: &[PairRow]) -> Vec<(String, ColumnData)> {
    let score = |f: fn(&PairRow) -> f64| ColumnData::Double(rows.iter().map(f).collect());
    vec![
        named("seed", seed_column(rows, |r| r.seed)),
        named("id", text_column(rows, |r| &r.id)),
        named("prompt", text_column(rows, |r| &r.prompt)),
        named("chosen", text_column(rows, |r| &r.chosen)),
        named("rejected", text_column(rows, |r| &r.rejected)),
        named("chosen_score", score(|r| r.chosen_score)),
        named("rejected_score", score(|r| r.rejected_score)),
    ]
}

pub(crate) fn write_outputs(
    out: &Path,
    results: &RunResults,
    label_rows: &[LabelRow],
    pair_rows: &[PairRow],
    log: &[crate::train::log::LogLine],
) -> Result<()> {
    super::write_run_folder(out, results, markdown(results), log)?;
    super::write_jsonl(&out.join("weak_labels.jsonl"), label_rows)?;
    crate::report::parquet::write(
        &out.join("weak_labels.parquet"),
        &label_columns(label_rows, &results.config.weak_labels()),
    )?;
    if !pair_rows.is_empty() {
        super::write_jsonl(&out.join("preference_pairs.jsonl"), pair_rows)?;
        crate::report::parquet::write(
            &out.join("preference_pairs.parquet"),
            &pair_columns(pair_rows),
        )?;
    }
    super::write_plots(out, &plots(results))
}
