//! `ws2s study precision`: whether a narrower number type for the frozen forward keeps what the
//! experiments need, measured on SciQ's official *valid* split (never test, never the train pool).
//!
//! For each model, f32 (the reference) against each other precision:
//! 1. probes: the demo's text ("Q: .. A: ..\nIs this answer correct?") and pooling (last token),
//!    features of `n` valid examples, a cross-validated logistic probe on each precision's
//!    features (the same folds and C grid as `ws2s study prompt-pooling`): held-out accuracy,
//!    log-loss, and the share of examples whose held-out prediction is the same;
//! 2. decoders: greedy continuations (`new_tokens` tokens) of the first `prompts` valid texts,
//!    the share that are identical, and the differences of the per-token log-probabilities over
//!    each pair's common prefix (same context on both sides).

use super::study::{cross_validate_predictions, sciq_valid};
use crate::models::decode::{generate, DecodeOptions};
use crate::models::features::{extract, FeatureOptions};
use crate::models::heads::Pooling;
use crate::models::params::Trainable;
use crate::models::{resolve_model, Model};
use crate::ops::Precision;
use crate::report::table::Table;
use crate::train::convex::SolverConfig;
use crate::train::probe::matrix_of;
use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct PrecisionRow {
    pub model: String,
    pub precision: String,
    pub examples: usize,
    pub cv_accuracy: f64,
    pub cv_log_loss: f64,
    /// cv_accuracy - f32's.
    pub accuracy_change: f64,
    /// Share of examples whose held-out prediction equals f32's.
    pub same_prediction: f64,
    pub extraction_s: f64,
    /// Decoders: greedy continuations identical to f32's (share of `prompts`).
    pub greedy_identical: Option<f64>,
    pub prompts: usize,
    /// Decoders: |log p - log p_f32| over the tokens of the common prefixes: mean, 99th
    /// percentile and maximum.
    pub logprob_mean_abs: Option<f64>,
    pub logprob_p99_abs: Option<f64>,
    pub logprob_max_abs: Option<f64>,
}

/// A continuation's tokens and their log-probabilities.
type Continuation = (Vec<u32>, Vec<f32>);

/// Greedy continuations of `prompts` (token ids) in chunks.
fn greedy(model: &Model, prompts: &[Vec<u32>], new_tokens: usize) -> Result<Vec<Continuation>> {
    let options = DecodeOptions {
        max_new_tokens: new_tokens,
        eos_ids: model.tokenizer()?.eos_ids.clone(),
        ..DecodeOptions::default()
    };
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(25) {
        for hyps in generate(&model.network, chunk, &options, &Device::Cpu)? {
            let h = hyps.into_iter().next().context("no hypothesis")?;
            out.push((h.tokens, h.logprobs));
        }
    }
    Ok(out)
}

/// Runs the study for `models` on `n` valid examples and `prompts` greedy prompts.
pub fn precision_study(
    models: &[String],
    precisions: &[Precision],
    (n, prompts, new_tokens): (usize, usize, usize),
    seed: u64,
    progress: bool,
) -> Result<Vec<PrecisionRow>> {
    let solver = SolverConfig::default();
    let (texts, labels) = sciq_valid(n, seed, true)?;
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut rows = Vec::new();
    for name in models {
        let path = resolve_model(name)?;
        let mut model = Model::load(&path, Trainable::Frozen, 0, &Device::Cpu)
            .with_context(|| format!("loading {name}"))?;
        let prompt_ids: Vec<Vec<u32>> = texts
            .iter()
            .take(prompts)
            .map(|t| model.tokenizer()?.encode(t))
            .collect::<Result<_>>()?;
        // The reference decodes with the whole f32 head (no int8 screen).
        model.network.set_head_screen(Some(false));
        let mut reference: Option<(Vec<usize>, f64, Option<Vec<Continuation>>)> = None;
        for &precision in std::iter::once(&Precision::F32).chain(precisions) {
            if precision == Precision::F32 && reference.is_some() {
                continue;
            }
            model.network.set_precision(precision)?;
            let started = std::time::Instant::now();
            let feature_options = FeatureOptions {
                pooling: Pooling::LastToken,
                progress,
                precision,
                ..Default::default()
            };
            let features = extract(&model, &texts, &feature_options, &Device::Cpu)?;
            let extraction_s = started.elapsed().as_secs_f64();
            let (accuracy, log_loss, _, predictions) =
                cross_validate_predictions(&matrix_of(&features)?, &labels, &solver, seed)?;
            let decoded = if model.network.is_decoder() && prompts > 0 {
                Some(greedy(&model, &prompt_ids, new_tokens)?)
            } else {
                None
            };
            let Some((ref_predictions, ref_accuracy, ref_decoded)) = &reference else {
                rows.push(PrecisionRow {
                    model: name.clone(),
                    precision: precision.name().into(),
                    examples: labels.len(),
                    cv_accuracy: accuracy,
                    cv_log_loss: log_loss,
                    accuracy_change: 0.0,
                    same_prediction: 1.0,
                    extraction_s,
                    greedy_identical: decoded.as_ref().map(|_| 1.0),
                    prompts: prompt_ids.len(),
                    logprob_mean_abs: decoded.as_ref().map(|_| 0.0),
                    logprob_p99_abs: decoded.as_ref().map(|_| 0.0),
                    logprob_max_abs: decoded.as_ref().map(|_| 0.0),
                });
                reference = Some((predictions, accuracy, decoded));
                continue;
            };
            let same = predictions
                .iter()
                .zip(ref_predictions)
                .filter(|(a, b)| a == b)
                .count() as f64
                / labels.len() as f64;
            let mut row = PrecisionRow {
                model: name.clone(),
                precision: precision.name().into(),
                examples: labels.len(),
                cv_accuracy: accuracy,
                cv_log_loss: log_loss,
                accuracy_change: accuracy - ref_accuracy,
                same_prediction: same,
                extraction_s,
                greedy_identical: None,
                prompts: prompt_ids.len(),
                logprob_mean_abs: None,
                logprob_p99_abs: None,
                logprob_max_abs: None,
            };
            if let (Some(d), Some(r)) = (&decoded, ref_decoded) {
                compare_decoded(d, r, &mut row);
            }
            report(&row);
            rows.push(row);
        }
        // The int8-screened head of f32 decoding (ops::head) against the unscreened one: the
        // features take no head, so the probe columns are f32's.
        let Some((_, _, Some(ref_decoded))) = &reference else {
            continue;
        };
        model.network.set_precision(Precision::F32)?;
        model.network.set_head_screen(Some(true));
        let decoded = greedy(&model, &prompt_ids, new_tokens)?;
        model.network.set_head_screen(None);
        let mut row = PrecisionRow {
            precision: "f32, head screened in int8".into(),
            ..rows
                .iter()
                .find(|r| &r.model == name && r.precision == Precision::F32.name())
                .context("the f32 row")?
                .clone()
        };
        compare_decoded(&decoded, ref_decoded, &mut row);
        report(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// Greedy continuations against the reference's: the share identical, and the absolute
/// differences of the log-probabilities of the same tokens after the same context (mean, 99th
/// percentile, maximum).
fn compare_decoded(decoded: &[Continuation], reference: &[Continuation], row: &mut PrecisionRow) {
    let (mut identical, mut diffs) = (0usize, Vec::new());
    for ((tokens, lps), (ref_tokens, ref_lps)) in decoded.iter().zip(reference) {
        identical += usize::from(tokens == ref_tokens);
        for i in 0..tokens.len().min(ref_tokens.len()) {
            diffs.push((lps[i] - ref_lps[i]).abs() as f64);
            if tokens[i] != ref_tokens[i] {
                break;
            }
        }
    }
    diffs.sort_by(f64::total_cmp);
    row.greedy_identical = Some(identical as f64 / decoded.len().max(1) as f64);
    if !diffs.is_empty() {
        let pick = |q: f64| diffs[((diffs.len() - 1) as f64 * q).round() as usize];
        row.logprob_mean_abs = Some(diffs.iter().sum::<f64>() / diffs.len() as f64);
        row.logprob_p99_abs = Some(pick(0.99));
        row.logprob_max_abs = Some(pick(1.0));
    }
}

fn report(r: &PrecisionRow) {
    eprintln!(
        "{} {}: accuracy {:.4} ({:+.4}), same predictions {:.3}, greedy identical {:?}",
        r.model,
        r.precision,
        r.cv_accuracy,
        r.accuracy_change,
        r.same_prediction,
        r.greedy_identical
    );
}

/// The study's table in Markdown.
pub fn markdown(rows: &[PrecisionRow]) -> String {
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    let mut table = Table::new(&[
        "model",
        "precision",
        "valid examples",
        "CV accuracy",
        "change vs f32",
        "same predictions",
        "CV log-loss",
        "extraction s",
        "greedy identical",
        "log-prob abs diff mean / p99 / max",
    ]);
    for r in rows {
        table.row([
            r.model.to_string(),
            r.precision.to_string(),
            r.examples.to_string(),
            format!("{:.4}", r.cv_accuracy),
            format!("{:+.4}", r.accuracy_change),
            format!("{:.3}", r.same_prediction),
            format!("{:.4}", r.cv_log_loss),
            format!("{:.0}", r.extraction_s),
            r.greedy_identical.map_or("-".into(), |g| {
                format!("{:.0}% of {}", 100.0 * g, r.prompts)
            }),
            format!(
                "{} / {} / {}",
                opt(r.logprob_mean_abs),
                opt(r.logprob_p99_abs),
                opt(r.logprob_max_abs)
            ),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_shows_decoder_checks_and_dashes_for_encoders() {
        let encoder = PrecisionRow {
            model: "e".into(),
            precision: "int8".into(),
            examples: 50,
            cv_accuracy: 0.8,
            cv_log_loss: 0.41234,
            accuracy_change: -0.01,
            same_prediction: 0.98,
            extraction_s: 3.2,
            greedy_identical: None,
            prompts: 0,
            logprob_mean_abs: None,
            logprob_p99_abs: None,
            logprob_max_abs: None,
        };
        let decoder = PrecisionRow {
            model: "d".into(),
            precision: "bf16".into(),
            greedy_identical: Some(0.97),
            prompts: 100,
            logprob_mean_abs: Some(0.00123),
            logprob_p99_abs: Some(0.01),
            logprob_max_abs: Some(0.2),
            accuracy_change: 0.0,
            ..encoder.clone()
        };
        let md = markdown(&[encoder, decoder]);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1], "|---|---|---|---|---|---|---|---|---|---|");
        assert_eq!(
            lines[2],
            "| e | int8 | 50 | 0.8000 | -0.0100 | 0.980 | 0.4123 | 3 | - | - / - / - |"
        );
        assert_eq!(
            lines[3],
            "| d | bf16 | 50 | 0.8000 | +0.0000 | 0.980 | 0.4123 | 3 | 97% of 100 | 0.0012 / 0.0100 / 0.2000 |"
        );
    }
}
