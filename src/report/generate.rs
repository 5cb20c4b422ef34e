//! A generation run's results and their report: the result types (per seed, per method, the
//! preference stage), summaries over seeds, results.md, the plots, the weak labels and the
//! preference pairs as JSONL and Parquet.

use crate::eval::slurp::SlurpMetrics;
use crate::eval::summary::{Summary, SummaryBuilder, SummaryTable};
use crate::experiment::config::{ExperimentConfig, ModelSpec};
use crate::generation::tasks::DpoEpochLog;
use crate::report::parquet::ColumnData;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Test results of one model: the SLURP metrics, the unparsable outputs, the predictions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenEval {
    pub metrics: SlurpMetrics,
    /// Outputs that were not a JSON object of strings (scored as no slots).
    pub unparsable: usize,
    pub predictions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenMethodResult {
    pub method: String,
    pub test: GenEval,
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
    pub before: GenMethodResult,
    pub after_dpo: GenMethodResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenSeedResult {
    pub seed: u64,
    pub data_hash: String,
    pub sizes: [usize; 4],
    pub weak: Vec<GenEval>,
    pub weights: Vec<f64>,
    pub ceiling: GenEval,
    pub methods: Vec<GenMethodResult>,
    pub dpo: Option<DpoReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenRunResults {
    pub config: ExperimentConfig,
    pub provenance: String,
    pub models: Vec<(String, String)>,
    pub seeds: Vec<GenSeedResult>,
    pub summary: SummaryTable,
    /// Wall-clock seconds of the whole run (cached stages take almost none).
    pub wall_seconds: f64,
}

const METRICS: [&str; 4] = ["slu_f1", "span_f1", "exact_match", "unparsable"];

fn metric(e: &GenEval, name: &str) -> f64 {
    match name {
        "slu_f1" => e.metrics.slu_f1,
        "span_f1" => e.metrics.span_f1,
        "exact_match" => e.metrics.exact_match,
        _ => e.unparsable as f64,
    }
}

pub(crate) fn summarise(config: &ExperimentConfig, seeds: &[GenSeedResult]) -> SummaryTable {
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
            let column = |f: &dyn Fn(&GenMethodResult) -> Option<f64>| -> Vec<f64> {
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

fn cell(summary: Option<&Option<Summary>>) -> String {
    crate::report::classify::cell(summary)
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
pub fn markdown(results: &GenRunResults) -> String {
    let c = &results.config;
    let sizes = results.seeds.first().map(|s| s.sizes).unwrap_or_default();
    let mut out = format!(
        "# {}\n\nTask `{}`: weak_train {}, strong_train {}, test {}; seeds {:?}.\n{}.\n\n\
         Test decoding: beam {}; weak labels: {}-best lists. SLU-F1 as the official SLURP scorer \
         defines it; an unparsable output counts as no slots. Cells: mean ± std over seeds [95% \
         bootstrap interval of the mean]. PGR = (student - weak) / (ceiling - weak) on SLU-F1, \
         against the mean of the weak models and against the best one. Unparsable: outputs (of \
         {}) that are not a JSON object of strings. Wall time of the run: {:.0} s.\n\n",
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
        results.wall_seconds
    );
    let row = |name: &str| results.summary.get(name);
    out.push_str("| model | SLU-F1 | span F1 | exact match | unparsable | weight |\n|---|---|---|---|---|---|\n");
    for label in c.weak_labels() {
        let r = row(&format!("weak[{label}]"));
        out.push_str(&format!(
            "| weak: {label} | {} | {} | {} | {} | {} |\n",
            cell(r.and_then(|r| r.get("slu_f1"))),
            cell(r.and_then(|r| r.get("span_f1"))),
            cell(r.and_then(|r| r.get("exact_match"))),
            count_cell(r.and_then(|r| r.get("unparsable"))),
            cell(r.and_then(|r| r.get("weight"))),
        ));
    }
    let strong = c.strong.as_ref().map(ModelSpec::label).unwrap_or_default();
    let r = row("ceiling");
    out.push_str(&format!(
        "| ceiling: {strong} on ground truth | {} | {} | {} | {} | |\n\n",
        cell(r.and_then(|r| r.get("slu_f1"))),
        cell(r.and_then(|r| r.get("span_f1"))),
        cell(r.and_then(|r| r.get("exact_match"))),
        count_cell(r.and_then(|r| r.get("unparsable"))),
    ));
    out.push_str("| method | SLU-F1 | span F1 | exact match | unparsable | PGR vs mean weak | PGR vs best weak |\n|---|---|---|---|---|---|---|\n");
    if let Some(first) = results.seeds.first() {
        for method in &first.methods {
            let r = row(&method.method);
            let get = |m: &str| cell(r.and_then(|r| r.get(m)));
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                method.method,
                get("slu_f1"),
                get("span_f1"),
                get("exact_match"),
                count_cell(r.and_then(|r| r.get("unparsable"))),
                get("pgr_vs_mean_weak"),
                get("pgr_vs_best_weak"),
            ));
        }
    }
    for s in &results.seeds {
        if let Some(d) = &s.dpo {
            out.push_str(&format!(
                "\n## Preference stage (seed {})\n\nConservative DPO after `{}`: {} pairs, {} prompts skipped (tie).\n\n\
                 | student | SLU-F1 | span F1 | exact match | unparsable |\n|---|---|---|---|---|\n",
                s.seed, d.after, d.pairs, d.skipped_ties,
            ));
            for (label, r) in [("before", &d.before), ("after", &d.after_dpo)] {
                let m = &r.test.metrics;
                out.push_str(&format!(
                    "| {label} ({}) | {:.4} | {:.4} | {:.4} | {} |\n",
                    r.method, m.slu_f1, m.span_f1, m.exact_match, r.test.unparsable
                ));
            }
            out.push_str(
                "\n| epoch | reward margin | chosen log-prob | rejected log-prob | pairs ordered |\n|---|---|---|---|---|\n",
            );
            for e in &d.epochs {
                out.push_str(&format!(
                    "| {} | {:.4} | {:.3} | {:.3} | {:.3} |\n",
                    e.epoch, e.reward_margin, e.chosen_logprob, e.rejected_logprob, e.accuracy
                ));
            }
        }
    }
    out
}

fn plots(results: &GenRunResults) -> Vec<(&'static str, String)> {
    let methods: Vec<String> = results
        .seeds
        .first()
        .map(|s| s.methods.iter().map(|m| m.method.clone()).collect())
        .unwrap_or_default();
    crate::report::classify::metric_plots(
        &results.summary,
        &results.config.weak_labels(),
        &methods,
        ("slu_f1", "Test SLU-F1 per method", "SLU-F1"),
    )
}

/// The type of a Parquet column taken from JSON rows.
#[derive(Clone, Copy)]
enum Col {
    Int,
    Text,
    Num,
}

/// Parquet columns from JSON rows: (column name, type, JSON pointer of the value in a row).
/// Missing values read as 0, "" and NaN.
fn json_columns(
    rows: &[serde_json::Value],
    spec: &[(String, Col, String)],
) -> Vec<(String, ColumnData)> {
    spec.iter()
        .map(|(name, col, pointer)| {
            let values = rows.iter().map(|r| r.pointer(pointer));
            let data = match col {
                Col::Int => ColumnData::Int64(
                    values
                        .map(|v| v.and_then(|v| v.as_i64()).unwrap_or(0))
                        .collect(),
                ),
                Col::Text => ColumnData::Utf8(
                    values
                        .map(|v| v.and_then(|v| v.as_str()).unwrap_or("").to_string())
                        .collect(),
                ),
                Col::Num => ColumnData::Double(
                    values
                        .map(|v| v.and_then(|v| v.as_f64()).unwrap_or(f64::NAN))
                        .collect(),
                ),
            };
            (name.clone(), data)
        })
        .collect()
}

/// A top-level field as a column of the same name.
fn field(name: &str, col: Col) -> (String, Col, String) {
    (name.to_string(), col, format!("/{name}"))
}

pub(crate) fn write_outputs(
    out: &Path,
    results: &GenRunResults,
    label_rows: &[serde_json::Value],
    pair_rows: &[serde_json::Value],
    log: &[crate::train::log::LogLine],
) -> Result<()> {
    super::write_run_folder(out, results, markdown(results), log)?;
    super::write_jsonl(&out.join("weak_labels.jsonl"), label_rows)?;
    let mut spec = vec![
        field("seed", Col::Int),
        field("id", Col::Text),
        field("text", Col::Text),
        field("label", Col::Text),
    ];
    for name in results.config.weak_labels() {
        let escaped = name.replace('~', "~0").replace('/', "~1");
        spec.push((
            format!("weak:{name}"),
            Col::Text,
            format!("/weak/{escaped}"),
        ));
    }
    spec.push(field("joint", Col::Text));
    crate::report::parquet::write(
        &out.join("weak_labels.parquet"),
        &json_columns(label_rows, &spec),
    )?;
    if !pair_rows.is_empty() {
        super::write_jsonl(&out.join("preference_pairs.jsonl"), pair_rows)?;
        let spec = [
            field("seed", Col::Int),
            field("id", Col::Text),
            field("prompt", Col::Text),
            field("chosen", Col::Text),
            field("rejected", Col::Text),
            field("chosen_score", Col::Num),
            field("rejected_score", Col::Num),
        ];
        crate::report::parquet::write(
            &out.join("preference_pairs.parquet"),
            &json_columns(pair_rows, &spec),
        )?;
    }
    for (name, svg) in plots(results) {
        crate::io::write_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
        crate::io::write_atomic(
            &out.join(format!("{name}.png")),
            &crate::report::plot::svg_to_png(&svg)?,
        )?;
    }
    Ok(())
}
