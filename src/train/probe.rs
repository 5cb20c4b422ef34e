//! The linear-probe path: a probe on cached frozen features, standardised with the training
//! rows' mean and standard deviation (hidden states of language models have a few very large
//! coordinates), solved to convergence in f64 with its L2 strength chosen by cross-validation on
//! the training rows' own targets ([`super::convex`]). Any loss of METHOD.md section 3 written
//! with candle operations can be the objective: its gradient with respect to the logits comes
//! from candle's autograd in f64.

use super::convex::{
    fit_cv, row_space, stratified_folds, CvReport, EvalPoint, LinearModel, Matrix, Objective,
    SolverConfig, StageLoss, Standardizer,
};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Where a batch loss is evaluated.
pub struct Step<'a> {
    /// Indices of the batch's examples in the training set, in the order of the logits' rows.
    pub batch: &'a [usize],
    /// Fraction of training done, in [0, 1] (schedules of auxiliary weights).
    pub progress: f64,
    /// Frozen logits that self-referential targets (logconf, product, edl_step) are built from;
    /// `None`: the current logits, detached.
    pub anchor: Option<&'a Tensor>,
}

/// The loss of a batch: logits [B, K] -> mean loss.
pub type ProbeLoss<'a> = dyn Fn(&Tensor, &Step) -> Result<Tensor> + Sync + 'a;

/// A candle loss as an objective of the convex solver: evaluated in f64, its gradient with
/// respect to the logits taken by candle's autograd.
pub struct TensorObjective<'a> {
    pub loss: &'a ProbeLoss<'a>,
    pub classes: usize,
    /// Whether the loss changes with the progress or uses the anchor.
    pub staged: bool,
}

impl Objective for TensorObjective<'_> {
    fn stage<'a>(&'a self, point: &'a EvalPoint<'a>) -> Result<StageLoss<'a>> {
        let shape = (point.rows.len(), self.classes);
        let anchor = Tensor::from_slice(point.anchor, shape, &Device::Cpu)?;
        Ok(StageLoss::Batch(Box::new(move |logits: &[f64]| {
            let z = Var::from_vec(logits.to_vec(), shape, &Device::Cpu)?;
            let step = Step {
                batch: point.rows,
                progress: point.progress,
                anchor: Some(&anchor),
            };
            let value = (self.loss)(z.as_tensor(), &step)?;
            let grads = value.backward()?;
            let grad = match grads.get(z.as_tensor()) {
                Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                None => vec![0.0; logits.len()],
            };
            Ok((value.to_dtype(DType::F64)?.to_scalar::<f64>()?, grad))
        })))
    }

    fn staged(&self) -> bool {
        self.staged
    }
}

/// A fitted probe: standardisation and linear model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinearProbe {
    pub standardizer: Standardizer,
    pub model: LinearModel,
}

/// Features [N, H] as an f64 matrix.
pub fn matrix_of(features: &Tensor) -> Result<Matrix> {
    let (n, h) = features.dims2()?;
    let data = features
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Matrix::new(n, h, data)
}

impl LinearProbe {
    /// Logits [N, K] (f64) of raw features [N, H].
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let x = self.standardizer.apply(&matrix_of(features)?);
        let z = self.model.logits(&x);
        Ok(Tensor::from_vec(
            z,
            (x.rows, self.model.classes),
            features.device(),
        )?)
    }

    /// Class probabilities [N, K].
    pub fn probs(&self, features: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax(
            &self.logits(features)?,
            candle_core::D::Minus1,
        )?)
    }
}

/// Training features made ready for the solver: standardised, and with fewer examples than
/// features, replaced by their coordinates in the rows' span (exact, cheaper to solve on). The
/// same training rows give the same preparation for every loss fitted on them, so a caller
/// fitting several losses on one set of rows prepares it once.
pub struct Prepared {
    pub standardizer: Standardizer,
    /// What the solver sees: the standardised rows, or their row-space coordinates.
    pub x: Matrix,
    /// The row space's orthonormal basis when `x` holds coordinates.
    pub basis: Option<Matrix>,
}

/// Standardises `features` [N, H] (and takes their row space when N < H).
pub fn prepare(features: &Tensor) -> Result<Prepared> {
    let raw = matrix_of(features)?;
    let standardizer = Standardizer::fit(&raw);
    let x = standardizer.apply(&raw);
    Ok(if x.rows < x.cols {
        let (basis, coords) = row_space(&x);
        Prepared {
            standardizer,
            x: coords,
            basis: Some(basis),
        }
    } else {
        Prepared {
            standardizer,
            x,
            basis: None,
        }
    })
}

/// Fits a probe with `classes` outputs on features made ready by [`prepare`]: the loss is
/// minimised to convergence for each C of the grid on k - 1 folds, C chosen by the held-out
/// cross-entropy against `targets` (one distribution per row: what the probe learns from), then
/// refit on all rows. Folds are stratified by the targets' argmax and drawn with `seed`.
pub fn fit(
    prepared: &Prepared,
    classes: usize,
    objective: &dyn Objective,
    targets: &[Vec<f64>],
    config: &SolverConfig,
    seed: u64,
) -> Result<(LinearProbe, CvReport)> {
    let x = &prepared.x;
    let strata: Vec<usize> = targets
        .iter()
        .map(|t| crate::eval::classify::argmax(t))
        .collect();
    let folds = stratified_folds(&strata, config.folds.min(x.rows.max(2)), seed);
    let (model, report) =
        fit_cv(x, classes, objective, targets, &folds, config).context("fitting a linear probe")?;
    let model = match &prepared.basis {
        Some(basis) => model.lift(basis),
        None => model,
    };
    Ok((
        LinearProbe {
            standardizer: prepared.standardizer.clone(),
            model,
        },
        report,
    ))
}
