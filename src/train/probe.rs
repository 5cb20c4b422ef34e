//! The linear-probe path: a probe on cached frozen features, standardised with the training
//! rows' mean and standard deviation (hidden states of language models have a few very large
//! coordinates), solved to convergence in f64 with its L2 strength chosen by cross-validation on
//! the training rows' own targets ([`super::convex`]). Any loss of METHOD.md section 3 written
//! with candle operations can be the objective: its gradient with respect to the logits comes
//! from candle's autograd in f64.

use super::convex::{
    fit_cv, row_space, stratified_folds, CvReport, EvalPoint, LinearModel, Matrix, Objective,
    SolverConfig, Standardizer,
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
    fn loss(&self, logits: &[f64], point: &EvalPoint) -> Result<(f64, Vec<f64>)> {
        let shape = (point.rows.len(), self.classes);
        let z = Var::from_vec(logits.to_vec(), shape, &Device::Cpu)?;
        let anchor = Tensor::from_slice(point.anchor, shape, &Device::Cpu)?;
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

/// Fits a probe with `classes` outputs on `features` [N, H]: the loss is minimised to
/// convergence for each C of the grid on k - 1 folds, C chosen by the held-out cross-entropy
/// against `targets` (one distribution per row: what the probe learns from), then refit on all
/// rows. Folds are stratified by the targets' argmax and drawn with `seed`.
pub fn fit(
    features: &Tensor,
    classes: usize,
    objective: &dyn Objective,
    targets: &[Vec<f64>],
    config: &SolverConfig,
    seed: u64,
) -> Result<(LinearProbe, CvReport)> {
    let raw = matrix_of(features)?;
    let standardizer = Standardizer::fit(&raw);
    let x = standardizer.apply(&raw);
    let strata: Vec<usize> = targets
        .iter()
        .map(|t| crate::eval::classify::argmax(t))
        .collect();
    let folds = stratified_folds(&strata, config.folds.min(x.rows.max(2)), seed);
    // Fewer examples than features: solve on the coordinates in the rows' span (exact, cheaper).
    let (model, report) = if x.rows < x.cols {
        let (basis, coords) = row_space(&x);
        let (model, report) = fit_cv(&coords, classes, objective, targets, &folds, config)
            .context("fitting a linear probe")?;
        (model.lift(&basis), report)
    } else {
        fit_cv(&x, classes, objective, targets, &folds, config).context("fitting a linear probe")?
    };
    Ok((
        LinearProbe {
            standardizer,
            model,
        },
        report,
    ))
}
