//! The probe objectives of the classification methods whose targets change along the
//! continuation (logconf, product, EDL, edl_step) or that are not a cross-entropy
//! (Dirichlet-multinomial), evaluated in f64 by the formulas of [`crate::losses::native`].
//! What depends only on the stage (targets built from the frozen anchor, the ramped weights) is
//! computed once per stage. Each is the same loss as its candle form in [`crate::losses`], which
//! fine-tuning uses (tests/losses.rs compares the two).

use super::convex::{EvalPoint, Objective, RowsLoss, StageLoss};
use crate::losses::{native, ramp, Evidence};
use anyhow::{bail, Result};

/// Rows `rows` of `table` ([n][k]) as one row-major [rows, k] vector.
fn gather(table: &[Vec<f64>], rows: &[usize]) -> Vec<f64> {
    rows.iter()
        .flat_map(|&i| table[i].iter().copied())
        .collect()
}

/// The cross-entropy against fixed target rows [rows, k] (the solve's rows), as per-row terms.
fn xent_of<'a>(targets: Vec<f64>, k: usize, n: f64) -> RowsLoss<'a> {
    Box::new(move |first: usize, z: &[f64], grad: &mut [f64]| {
        native::xent_rows(z, k, |r| &targets[(first + r) * k..][..k], n, grad)
    })
}

/// A classification method's loss on the weak labels of the training rows.
pub enum MethodObjective<'a> {
    /// Auxiliary confidence: CE((1 - a) y + a hard(p_anchor), p), a = ramp(progress, a_max,
    /// warmup).
    Logconf {
        weak: &'a [Vec<f64>],
        a_max: f64,
        warmup: f64,
    },
    /// CE(normalise(p_anchor * y), p).
    Product { weak: &'a [Vec<f64>] },
    /// Bayesian multi-weak: sum_j w_j [A(y_j, alpha) + lambda KL_j], lambda = ramp(progress, c,
    /// 1); with `step = Some((a_max, warmup))` each y_j first mixed with the anchor's argmax.
    Edl {
        weak: &'a [Vec<Vec<f64>>],
        weights: &'a [f64],
        c: f64,
        evidence: Evidence,
        step: Option<(f64, f64)>,
    },
    /// Dirichlet-multinomial likelihood of the weak hard-label counts.
    DirichletMultinomial {
        counts: &'a [Vec<f64>],
        evidence: Evidence,
    },
}

impl MethodObjective<'_> {
    /// Classes per row (the width of the label rows).
    fn classes(&self) -> Result<usize> {
        let first = match self {
            MethodObjective::Logconf { weak, .. } | MethodObjective::Product { weak } => {
                weak.first()
            }
            MethodObjective::Edl { weak, .. } => weak.first().and_then(|w| w.first()),
            MethodObjective::DirichletMultinomial { counts, .. } => counts.first(),
        };
        match first {
            Some(row) if !row.is_empty() => Ok(row.len()),
            _ => bail!("internal: a probe objective without label rows"),
        }
    }
}

impl Objective for MethodObjective<'_> {
    fn stage<'a>(&'a self, point: &'a EvalPoint<'a>) -> Result<StageLoss<'a>> {
        let k = self.classes()?;
        let (rows, progress, anchor) = (point.rows, point.progress, point.anchor);
        if self.staged() && anchor.len() != rows.len() * k {
            bail!(
                "internal: an anchor of {} logits for {} rows of {k} classes",
                anchor.len(),
                rows.len()
            );
        }
        let n = rows.len() as f64;
        let rows_loss: RowsLoss<'a> = match *self {
            MethodObjective::Logconf {
                weak,
                a_max,
                warmup,
            } => {
                let a = ramp(progress, a_max, warmup);
                xent_of(
                    native::logconf_targets(anchor, &gather(weak, rows), k, a),
                    k,
                    n,
                )
            }
            MethodObjective::Product { weak } => xent_of(
                native::product_targets(anchor, &gather(weak, rows), k),
                k,
                n,
            ),
            MethodObjective::Edl {
                weak,
                weights,
                c,
                evidence,
                step,
            } => {
                let lambda = ramp(progress, c, 1.0);
                let ys: Vec<Vec<f64>> = weak
                    .iter()
                    .map(|labels| {
                        let y = gather(labels, rows);
                        match step {
                            Some((a_max, warmup)) => {
                                native::step_targets(anchor, &y, k, ramp(progress, a_max, warmup))
                            }
                            None => y,
                        }
                    })
                    .collect();
                Box::new(move |first: usize, z: &[f64], grad: &mut [f64]| {
                    native::edl_rows(z, k, (&ys, weights, first), (lambda, evidence), n, grad)
                })
            }
            MethodObjective::DirichletMultinomial { counts, evidence } => {
                let counts = gather(counts, rows);
                Box::new(move |first: usize, z: &[f64], grad: &mut [f64]| {
                    native::dirichlet_multinomial_rows(z, k, (&counts, first), evidence, n, grad)
                })
            }
        };
        Ok(StageLoss::Rows(rows_loss))
    }

    fn staged(&self) -> bool {
        !matches!(self, MethodObjective::DirichletMultinomial { .. })
    }
}
