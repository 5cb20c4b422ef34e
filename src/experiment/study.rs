//! `ws2s study prompt-pooling`: which text format and which pooling give the most useful frozen
//! features, measured on SciQ's official *valid* split (never test, never the train pool).
//!
//! For each model and each text format (`Q: {question} A: {answer}`, and the same followed by
//! "Is this answer correct?"), one forward pass per batch gives both last-token and mean-pooled
//! features; for each pooling a logistic-regression probe is cross-validated on the valid
//! examples (k folds, C chosen on the held-out log-loss as in `ws2s run`), and the held-out
//! accuracy and log-loss of the folds at the chosen C are reported.

use crate::data::{self, ChoiceOptions, SplitSizes, TaskSpec};
use crate::eval::classify::argmax;
use crate::models::features::{extract_pooled, FeatureOptions};
use crate::models::heads::Pooling;
use crate::models::params::Trainable;
use crate::models::{resolve_model, Model};
use crate::report::table::Table;
use crate::train::convex::{
    fit_cv, row_space, solve, stratified_folds, LinearModel, SoftXent, SolverConfig, Standardizer,
};
use crate::train::probe::matrix_of;
use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct StudyRow {
    pub model: String,
    pub prompt: String,
    pub pooling: String,
    pub examples: usize,
    pub chosen_c: f64,
    /// Held-out accuracy over the folds at the chosen C.
    pub cv_accuracy: f64,
    /// Held-out log-loss over the folds at the chosen C (mean of the folds).
    pub cv_log_loss: f64,
    pub seconds: f64,
}

/// Runs the study for `models` (fetched names or paths) on `n` valid questions.
pub fn prompt_pooling(
    models: &[String],
    n: usize,
    seed: u64,
    solver: &SolverConfig,
    progress: bool,
) -> Result<Vec<StudyRow>> {
    let mut rows = Vec::new();
    for model_name in models {
        let path = resolve_model(model_name)?;
        let model = Model::load(&path, Trainable::Frozen, 0, &Device::Cpu)
            .with_context(|| format!("loading {model_name}"))?;
        for (prompt, ask) in [("qa", false), ("qa+ask", true)] {
            let (texts, labels) = sciq_valid(n, seed, ask)?;
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let started = std::time::Instant::now();
            let poolings = [Pooling::LastToken, Pooling::Mean];
            let feature_options = FeatureOptions {
                progress,
                ..Default::default()
            };
            let features =
                extract_pooled(&model, &texts, &poolings, &feature_options, &Device::Cpu)?;
            let seconds = started.elapsed().as_secs_f64();
            for (pooling, features) in poolings.iter().zip(&features) {
                let (accuracy, log_loss, chosen_c) =
                    cross_validate(&matrix_of(features)?, &labels, solver, seed)?;
                let row = StudyRow {
                    model: model_name.clone(),
                    prompt: prompt.into(),
                    pooling: pooling.as_str().into(),
                    examples: labels.len(),
                    chosen_c,
                    cv_accuracy: accuracy,
                    cv_log_loss: log_loss,
                    seconds,
                };
                eprintln!(
                    "{} {} {}: accuracy {:.3}, log-loss {:.4} (C {:.1e})",
                    row.model, row.prompt, row.pooling, accuracy, log_loss, chosen_c
                );
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// The texts and labels of `n` examples of SciQ's official valid split (`ask`: the text ends
/// by asking whether the answer is correct).
pub(crate) fn sciq_valid(n: usize, seed: u64, ask: bool) -> Result<(Vec<String>, Vec<usize>)> {
    let options = ChoiceOptions {
        pairs: false,
        support: false,
        ask,
    };
    let sizes = SplitSizes {
        weak_train: Some(0),
        strong_train: Some(0),
        test: Some(0),
        valid: Some(n),
    };
    let dataset = data::load(
        &data::default_data_dir(),
        &TaskSpec::Sciq(options),
        &sizes,
        seed,
    )?;
    let texts = dataset.valid.iter().map(|e| e.input.clone()).collect();
    let labels = dataset
        .valid
        .iter()
        .map(|e| e.label.class().unwrap_or(0))
        .collect();
    Ok((texts, labels))
}

/// Held-out accuracy, held-out log-loss and C of a cross-validated probe.
fn cross_validate(
    raw: &crate::train::convex::Matrix,
    labels: &[usize],
    solver: &SolverConfig,
    seed: u64,
) -> Result<(f64, f64, f64)> {
    let (accuracy, log_loss, c, _) = cross_validate_predictions(raw, labels, solver, seed)?;
    Ok((accuracy, log_loss, c))
}

/// [`cross_validate`], with each example's held-out predicted class.
pub(crate) fn cross_validate_predictions(
    raw: &crate::train::convex::Matrix,
    labels: &[usize],
    solver: &SolverConfig,
    seed: u64,
) -> Result<(f64, f64, f64, Vec<usize>)> {
    let x = Standardizer::fit(raw).apply(raw);
    let x = if x.rows < x.cols { row_space(&x).1 } else { x };
    let targets: Vec<Vec<f64>> = labels
        .iter()
        .map(|&y| (0..2).map(|c| f64::from(c == y)).collect())
        .collect();
    let folds = stratified_folds(labels, solver.folds, seed);
    let objective = SoftXent { targets: &targets };
    let (_, report) = fit_cv(&x, 2, &objective, &targets, &folds, solver)?;
    let mut predicted = vec![0usize; labels.len()];
    for f in 0..solver.folds {
        let train: Vec<usize> = (0..x.rows).filter(|&i| folds[i] != f).collect();
        let held: Vec<usize> = (0..x.rows).filter(|&i| folds[i] == f).collect();
        let (model, _) = solve(
            &x.select_rows(&train),
            &train,
            2,
            &objective,
            report.chosen_c,
            &LinearModel::zeros(2, x.cols),
            solver,
        )?;
        for (p, &i) in model.probs(&x.select_rows(&held)).iter().zip(&held) {
            predicted[i] = argmax(p);
        }
    }
    let chosen = report
        .grid
        .iter()
        .position(|&c| c == report.chosen_c)
        .unwrap_or(0);
    let correct = predicted.iter().zip(labels).filter(|(p, y)| p == y).count();
    Ok((
        correct as f64 / labels.len() as f64,
        report.scores[chosen],
        report.chosen_c,
        predicted,
    ))
}

/// The study's table in Markdown.
pub fn markdown(rows: &[StudyRow]) -> String {
    let mut table = Table::new(&[
        "model",
        "text",
        "pooling",
        "valid examples",
        "C",
        "CV accuracy",
        "CV log-loss",
        "extraction s",
    ]);
    for r in rows {
        table.row([
            r.model.to_string(),
            r.prompt.to_string(),
            r.pooling.to_string(),
            r.examples.to_string(),
            format!("{:.1e}", r.chosen_c),
            format!("{:.3}", r.cv_accuracy),
            format!("{:.4}", r.cv_log_loss),
            format!("{:.0}", r.seconds),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_one_row_per_setting_with_the_stated_digits() {
        let row = StudyRow {
            model: "m".into(),
            prompt: "question".into(),
            pooling: "mean".into(),
            examples: 100,
            chosen_c: 0.01,
            cv_accuracy: 0.81234,
            cv_log_loss: 0.456789,
            seconds: 12.6,
        };
        assert_eq!(
            markdown(&[row]),
            "| model | text | pooling | valid examples | C | CV accuracy | CV log-loss | extraction s |\n\
             |---|---|---|---|---|---|---|---|\n\
             | m | question | mean | 100 | 1.0e-2 | 0.812 | 0.4568 | 13 |\n"
        );
    }
}
