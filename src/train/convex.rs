//! Linear probes as optimisation problems solved to convergence in f64.
//!
//! A probe maps standardised features x (d values) to class logits. Binary problems use one
//! weight vector (logits [0, w.x + b], the logistic model); K > 2 classes use K vectors (the
//! symmetric multinomial model). The objective for a regularisation strength C is
//!
//!   F(W, b) = (1 / n) sum_i loss_i(z_i) + ||W||^2 / (2 C n)        (the bias is not penalised),
//!
//! the convention of scikit-learn's `LogisticRegression` divided by n. It is minimised with
//! L-BFGS (memory 10, strong-Wolfe line search; in variables scaled by a diagonal estimate of
//! the curvature, [`jacobi_scale`]) until the largest absolute gradient entry is at most `tol`.
//! The loss is any function of the logits with its gradient ([`Objective`]); losses
//! whose target depends on the student itself or on the training progress (logconf, product,
//! EDL's annealed KL, edl_step) are minimised by *continuation*: stages s = 0..=S with progress
//! s / S, each solved to convergence from the previous stage's solution, the self-referential
//! part of the target frozen at that stage's starting logits (the `anchor`).
//!
//! The strength is chosen by k-fold cross-validation ([`fit_cv`]) on the training rows' own
//! targets: held-out cross-entropy between the target distribution and the predicted
//! probabilities, averaged over folds; the grid is walked from the strongest regularisation to
//! the weakest, each fit warm-started from the previous one (the optimum does not depend on the
//! start for convex losses); ties go to the stronger regularisation. The chosen C is then refit
//! on all rows.

use super::lbfgs::dot;
pub use super::lbfgs::SolveReport;
pub use crate::losses::native::{log_sum_exp, softmax};
use crate::ops::simd::{axpy_f64, axpy_many_f64, dot_many_f64};
use crate::rng::Rng;
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A row-major matrix of f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Result<Self> {
        if data.len() != rows * cols {
            bail!(
                "a {rows} x {cols} matrix needs {} values, got {}",
                rows * cols,
                data.len()
            );
        }
        Ok(Matrix { rows, cols, data })
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn select_rows(&self, rows: &[usize]) -> Matrix {
        let mut data = Vec::with_capacity(rows.len() * self.cols);
        for &i in rows {
            data.extend_from_slice(self.row(i));
        }
        Matrix {
            rows: rows.len(),
            cols: self.cols,
            data,
        }
    }
}

/// Per-feature standardisation x' = (x - mean) / sqrt(var + 1e-6), fitted on training rows
/// (population variance; the 1e-6 keeps constant features at 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
}

impl Standardizer {
    pub fn fit(x: &Matrix) -> Standardizer {
        let n = x.rows.max(1) as f64;
        let mut mean = vec![0.0; x.cols];
        for i in 0..x.rows {
            for (m, v) in mean.iter_mut().zip(x.row(i)) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        let mut var = vec![0.0; x.cols];
        for i in 0..x.rows {
            for ((s, v), m) in var.iter_mut().zip(x.row(i)).zip(&mean) {
                *s += (v - m) * (v - m);
            }
        }
        let scale = var.iter().map(|s| (s / n + 1e-6).sqrt()).collect();
        Standardizer { mean, scale }
    }

    pub fn apply(&self, x: &Matrix) -> Matrix {
        let mut out = x.clone();
        for row in out.data.chunks_mut(x.cols.max(1)) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.scale) {
                *v = (*v - m) / s;
            }
        }
        out
    }
}

/// Where a loss is evaluated: which training rows (indices into the learner's training set, in
/// the order of the logits), how far along the continuation, and the frozen logits that a
/// self-referential target is built from (same shape as the logits).
pub struct EvalPoint<'a> {
    pub rows: &'a [usize],
    pub progress: f64,
    pub anchor: &'a [f64],
}

/// A loss of the logits at one point of the continuation: the mean over the rows and its
/// gradient with respect to the logits (row-major [rows, K]).
pub enum StageLoss<'a> {
    /// A function of all rows' logits at once: (mean loss, gradient).
    Batch(BatchLoss<'a>),
    /// A mean of per-row terms: `f(first, logits, grad)` gets the logits of the rows from
    /// `first` on ([len, K]), returns their terms' sum divided by the number of rows of the
    /// mean and writes their gradient (likewise divided) to `grad`. The solver then takes each
    /// few rows' logits, loss and gradient contribution in one pass over their features while
    /// they are in cache, instead of two passes over all rows.
    Rows(RowsLoss<'a>),
}

/// See [`StageLoss::Batch`].
pub type BatchLoss<'a> = Box<dyn Fn(&[f64]) -> Result<(f64, Vec<f64>)> + 'a>;

/// See [`StageLoss::Rows`].
pub type RowsLoss<'a> = Box<dyn Fn(usize, &[f64], &mut [f64]) -> f64 + Sync + 'a>;

impl StageLoss<'_> {
    /// The mean loss and its gradient at `logits` (every row).
    pub fn eval(&self, logits: &[f64]) -> Result<(f64, Vec<f64>)> {
        match self {
            StageLoss::Batch(f) => f(logits),
            StageLoss::Rows(f) => {
                let mut grad = vec![0.0; logits.len()];
                let value = f(0, logits, &mut grad);
                Ok((value, grad))
            }
        }
    }
}

/// A loss of the logits: the mean over the rows and its gradient with respect to the logits
/// (row-major [rows, K]).
pub trait Objective: Sync {
    /// The loss at `point` as a function of the logits alone: whatever depends only on the point
    /// (targets built from the anchor, weights of the progress) is computed here, once per stage
    /// of the continuation rather than once per evaluation.
    fn stage<'a>(&'a self, point: &'a EvalPoint<'a>) -> Result<StageLoss<'a>>;

    /// The loss and its gradient at `logits`.
    fn loss(&self, logits: &[f64], point: &EvalPoint) -> Result<(f64, Vec<f64>)> {
        self.stage(point)?.eval(logits)
    }

    /// Whether the loss depends on `progress` or `anchor` (then it is solved by continuation).
    fn staged(&self) -> bool;
}

/// Soft-label cross-entropy -sum_k y_k log softmax(z)_k, averaged over rows (targets by row).
pub struct SoftXent<'a> {
    pub targets: &'a [Vec<f64>],
}

impl Objective for SoftXent<'_> {
    fn stage<'a>(&'a self, point: &'a EvalPoint<'a>) -> Result<StageLoss<'a>> {
        let n = point.rows.len() as f64;
        // Classes per row: the targets' width (the anchor may be empty for a loss that is not
        // staged).
        let k = self.targets.first().map_or(1, Vec::len).max(1);
        Ok(StageLoss::Rows(Box::new(
            move |first: usize, logits: &[f64], grad: &mut [f64]| {
                let target = |r: usize| &self.targets[point.rows[first + r]][..];
                crate::losses::native::xent_rows(logits, k, target, n, grad)
            },
        )))
    }

    fn staged(&self) -> bool {
        false
    }
}

/// An orthonormal basis of the row space of `x` (r <= min(n, d) rows of length d, Gram-Schmidt
/// with re-orthogonalisation) and the coordinates of every row of `x` in it ([n, r]). A model
/// with an L2 penalty on its weights has its optimum in that row space (the loss gradient is a
/// combination of the rows and the penalty removes any other component), so it can be solved on
/// the coordinates and mapped back exactly: w = w_r Q.
pub fn row_space(x: &Matrix) -> (Matrix, Matrix) {
    let d = x.cols;
    let mut basis: Vec<f64> = Vec::new();
    let mut coords: Vec<Vec<f64>> = Vec::with_capacity(x.rows);
    for i in 0..x.rows {
        let row = x.row(i);
        let norm0 = dot(row, row).sqrt();
        let mut v = row.to_vec();
        let r = basis.len() / d.max(1);
        let mut c = vec![0.0; r];
        for _ in 0..2 {
            let proj: Vec<f64> = basis.par_chunks(d).map(|q| dot(q, &v)).collect();
            for (j, q) in basis.chunks(d).enumerate() {
                let a = proj[j];
                c[j] += a;
                axpy_f64(&mut v, -a, q);
            }
        }
        let norm = dot(&v, &v).sqrt();
        if norm > 1e-9 * norm0.max(1e-300) {
            v.iter_mut().for_each(|vi| *vi /= norm);
            basis.extend_from_slice(&v);
            c.push(norm);
        }
        coords.push(c);
    }
    let r = basis.len() / d.max(1);
    let mut data = vec![0.0; x.rows * r];
    for (i, c) in coords.iter().enumerate() {
        data[i * r..i * r + c.len()].copy_from_slice(c);
    }
    (
        Matrix {
            rows: r,
            cols: d,
            data: basis,
        },
        Matrix {
            rows: x.rows,
            cols: r,
            data,
        },
    )
}

impl LinearModel {
    /// The model on the original features of a model fitted on row-space coordinates
    /// ([`row_space`]): w = w_r Q.
    pub fn lift(&self, basis: &Matrix) -> LinearModel {
        let p = outputs(self.classes);
        let d = basis.cols;
        let mut weights = vec![0.0; p * d];
        for o in 0..p {
            let wr = &self.weights[o * self.dim..(o + 1) * self.dim];
            let w = &mut weights[o * d..(o + 1) * d];
            for (a, q) in wr.iter().zip(basis.data.chunks(d)) {
                w.iter_mut().zip(q).for_each(|(wi, qi)| *wi += a * qi);
            }
        }
        LinearModel {
            classes: self.classes,
            dim: d,
            weights,
            bias: self.bias.clone(),
        }
    }
}

/// A linear probe on standardised features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearModel {
    pub classes: usize,
    pub dim: usize,
    /// [outputs, dim], outputs = 1 for two classes (the logit of class 1 against class 0).
    pub weights: Vec<f64>,
    pub bias: Vec<f64>,
}

impl LinearModel {
    pub fn zeros(classes: usize, dim: usize) -> LinearModel {
        let p = outputs(classes);
        LinearModel {
            classes,
            dim,
            weights: vec![0.0; p * dim],
            bias: vec![0.0; p],
        }
    }

    fn from_params(classes: usize, dim: usize, theta: &[f64]) -> LinearModel {
        let p = outputs(classes);
        LinearModel {
            classes,
            dim,
            weights: theta[..p * dim].to_vec(),
            bias: theta[p * dim..].to_vec(),
        }
    }

    fn params(&self) -> Vec<f64> {
        let mut theta = self.weights.clone();
        theta.extend_from_slice(&self.bias);
        theta
    }

    /// Logits [rows, classes] of standardised features.
    pub fn logits(&self, x: &Matrix) -> Vec<f64> {
        logits_of(&self.params(), x, None, self.classes)
    }

    /// Class probabilities, one row per example.
    pub fn probs(&self, x: &Matrix) -> Vec<Vec<f64>> {
        self.logits(x).chunks(self.classes).map(softmax).collect()
    }
}

fn outputs(classes: usize) -> usize {
    if classes == 2 {
        1
    } else {
        classes
    }
}

const ROW_BLOCK: usize = 64;

/// Products of fewer multiply-adds than this run their row blocks on one thread (the folds of
/// cross-validation are parallel already; splitting a ~30 us product costs more than it saves).
/// Either way the blocks and their order are the same, and so are the values.
const PAR_MIN: usize = 1 << 18;

/// Whether a product over `x` runs its row blocks one after the other on one thread.
fn in_order(x: &Matrix) -> bool {
    x.rows * x.cols < PAR_MIN
}

/// The smallest number of row blocks per task for a product over `x`.
fn min_blocks(x: &Matrix) -> usize {
    if in_order(x) {
        usize::MAX
    } else {
        1
    }
}

/// Index after the last non-zero value of each row. Coordinates in a row space ([`row_space`])
/// are lower-triangular, so about half of them are zeros; the products skip them exactly (a
/// zero term changes no lane of [`dot`], nor any element of an axpy).
fn supports(x: &Matrix) -> Vec<usize> {
    (0..x.rows)
        .map(|i| {
            x.row(i)
                .iter()
                .rposition(|&v| v != 0.0)
                .map_or(0, |p| p + 1)
        })
        .collect()
}

/// Logits [rows, classes] of `theta` on the rows of `x`, each row's product over its support
/// (`support[i]` values; the whole row where `None`).
fn logits_of(theta: &[f64], x: &Matrix, support: Option<&[usize]>, classes: usize) -> Vec<f64> {
    let d = x.cols;
    let mut z = vec![0.0; x.rows * classes];
    z.par_chunks_mut(ROW_BLOCK * classes)
        .with_min_len(min_blocks(x))
        .enumerate()
        .for_each(|(block, out)| {
            let mut rows = [&[][..]; ROW_BLOCK];
            let n = block_rows(x, support, block_range(x, block), &mut rows);
            rows_logits(theta, d, &rows[..n], classes, out);
        });
    z
}

/// The logits [rows.len(), classes] of `theta` (outputs of `d` weights, then the biases) on
/// `rows` (each over its own length), into `z`.
fn rows_logits(theta: &[f64], d: usize, rows: &[&[f64]], classes: usize, z: &mut [f64]) {
    let p = outputs(classes);
    let (w, b) = theta.split_at(p * d);
    let mut dots = [0.0; ROW_BLOCK];
    let dots = &mut dots[..rows.len()];
    for o in 0..p {
        dot_many_f64(&w[o * d..(o + 1) * d], rows, dots);
        for (zr, v) in z.chunks_mut(classes).zip(dots.iter()) {
            if classes == 2 {
                zr[0] = 0.0;
                zr[1] = v + b[0];
            } else {
                zr[o] = v + b[o];
            }
        }
    }
}

/// Adds the gradient contributions of `rows` (their logits' gradient `dz`, [rows.len(),
/// classes]) to `acc` (outputs of `d` weights, then the biases), row after row. Rows of a zero
/// coefficient add exact zeros (finite features): no change.
fn add_rows_gradient(acc: &mut [f64], d: usize, rows: &[&[f64]], dz: &[f64], classes: usize) {
    let p = outputs(classes);
    let mut coefs = [0.0; ROW_BLOCK];
    let coefs = &mut coefs[..rows.len()];
    for o in 0..p {
        // Binary logits are [0, s]: the gradient of s.
        for (c, g) in coefs.iter_mut().zip(dz.chunks(classes)) {
            *c = if classes == 2 { g[1] } else { g[o] };
        }
        axpy_many_f64(&mut acc[o * d..(o + 1) * d], coefs, rows);
        for c in coefs.iter() {
            acc[p * d + o] += c;
        }
    }
}

/// The rows `range` of `x` (at most ROW_BLOCK), each over its support (whole where `None`),
/// into `rows`; returns how many.
fn block_rows<'x>(
    x: &'x Matrix,
    support: Option<&[usize]>,
    range: std::ops::Range<usize>,
    rows: &mut [&'x [f64]; ROW_BLOCK],
) -> usize {
    for (slot, r) in rows.iter_mut().zip(range.clone()) {
        *slot = &x.row(r)[..support.map_or(x.cols, |s| s[r])];
    }
    range.len()
}

/// The row range of block `block` of `x`.
fn block_range(x: &Matrix, block: usize) -> std::ops::Range<usize> {
    block * ROW_BLOCK..((block + 1) * ROW_BLOCK).min(x.rows)
}

/// Sums the row blocks' contributions, `each(block, acc)` writing block `block`'s into a zeroed
/// `acc` and returning its loss value: the blocks' gradients summed in block order, plus the
/// penalty's gradient on the weights (`theta`'s first `weights` values). Small products run
/// their blocks one after the other through one accumulator (no allocation per block), larger
/// ones side by side; the values are the same either way.
fn sum_blocks(
    x: &Matrix,
    theta: &[f64],
    (weights, penalty): (usize, f64),
    each: impl Fn(usize, &mut [f64]) -> f64 + Sync,
) -> (f64, Vec<f64>) {
    let blocks = x.rows.div_ceil(ROW_BLOCK);
    let mut grad = vec![0.0; theta.len()];
    let mut value = 0.0;
    if in_order(x) {
        let mut acc = vec![0.0; theta.len()];
        for block in 0..blocks {
            acc.iter_mut().for_each(|a| *a = 0.0);
            value += each(block, &mut acc);
            for (g, v) in grad.iter_mut().zip(&acc) {
                *g += v;
            }
        }
    } else {
        let parts: Vec<(f64, Vec<f64>)> = (0..blocks)
            .into_par_iter()
            .map(|block| {
                let mut acc = vec![0.0; theta.len()];
                let v = each(block, &mut acc);
                (v, acc)
            })
            .collect();
        for (v, acc) in &parts {
            value += v;
            for (g, a) in grad.iter_mut().zip(acc) {
                *g += a;
            }
        }
    }
    for j in 0..weights {
        grad[j] += penalty * theta[j];
    }
    (value, grad)
}

/// Gradient of F with respect to theta from dLoss/dz [rows, classes].
fn param_grad(
    theta: &[f64],
    (x, support): (&Matrix, &[usize]),
    classes: usize,
    dz: &[f64],
    penalty: f64,
) -> Vec<f64> {
    let d = x.cols;
    let weights = outputs(classes) * d;
    let (_, grad) = sum_blocks(x, theta, (weights, penalty), |block, acc| {
        let range = block_range(x, block);
        let mut rows = [&[][..]; ROW_BLOCK];
        let n = block_rows(x, Some(support), range.clone(), &mut rows);
        let dz = &dz[range.start * classes..range.end * classes];
        add_rows_gradient(acc, d, &rows[..n], dz, classes);
        0.0
    });
    grad
}

/// Rows whose logits, loss terms and gradient contributions [`one_pass`] takes together: their
/// features (8 rows of up to ~450 coordinates, ~29 KB) stay in L1 between the two products.
const PASS_ROWS: usize = 8;

/// The mean loss of a per-row objective and the gradient of F without the penalty's value:
/// for each few rows, their logits, their loss terms and their part of the gradient, in one
/// pass over their features. The gradient has the same values as [`param_grad`] on the
/// logits' gradient (same blocks, same row order, same groups of four rows within a block).
fn one_pass(
    theta: &[f64],
    (x, support): (&Matrix, &[usize]),
    classes: usize,
    loss: &RowsLoss,
    penalty: f64,
) -> (f64, Vec<f64>) {
    let d = x.cols;
    let weights = outputs(classes) * d;
    sum_blocks(x, theta, (weights, penalty), |block, acc| {
        let mut value = 0.0;
        let mut z_all = vec![0.0; PASS_ROWS * classes];
        let mut dz_all = vec![0.0; PASS_ROWS * classes];
        let range = block_range(x, block);
        let mut rows = [&[][..]; ROW_BLOCK];
        let n = block_rows(x, Some(support), range.clone(), &mut rows);
        for (chunk, first) in rows[..n].chunks(PASS_ROWS).zip(range.step_by(PASS_ROWS)) {
            let len = chunk.len() * classes;
            let (z, dz) = (&mut z_all[..len], &mut dz_all[..len]);
            rows_logits(theta, d, chunk, classes, z);
            value += loss(first, z, dz);
            add_rows_gradient(acc, d, chunk, dz, classes);
        }
        value
    })
}

/// The curvature per unit of logit that [`jacobi_scale`] assumes: the binary cross-entropy's
/// largest, p (1 - p) at p = 1/2.
const CURVATURE: f64 = 0.25;

/// The solver's change of variables u = s * theta (elementwise), s_j = sqrt(h_j) with h_j an
/// estimate of F's curvature along theta_j (Jacobi preconditioning): CURVATURE times
/// mean_i x_ij^2, plus the penalty, for a weight on feature j (each output alike); CURVATURE
/// for a bias. Row-space coordinates have columns of very different sizes (the first carries
/// most of the variance); in u every direction has about the same curvature, and L-BFGS needs
/// ~17% fewer evaluations for the demo's probes. The optimum and the stopping test (on F's
/// gradient in theta) are unchanged.
fn jacobi_scale(x: &Matrix, support: &[usize], classes: usize, penalty: f64) -> Vec<f64> {
    let mut squares = vec![0.0; x.cols];
    for (i, &len) in support.iter().enumerate() {
        for (c, v) in squares.iter_mut().zip(&x.row(i)[..len]) {
            *c += v * v;
        }
    }
    let p = outputs(classes);
    let per_output = squares
        .iter()
        .map(|c| (CURVATURE * c / x.rows.max(1) as f64 + penalty).sqrt());
    let mut scale: Vec<f64> = (0..p).flat_map(|_| per_output.clone()).collect();
    scale.extend(std::iter::repeat_n(CURVATURE.sqrt(), p));
    scale
}

/// How a probe is solved and its strength chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SolverConfig {
    /// Folds of the cross-validation that chooses C (>= 2).
    pub folds: usize,
    /// The grid of C (inverse regularisation strength): `c_steps` values log-spaced from `c_min`
    /// to `c_max`.
    pub c_min: f64,
    pub c_max: f64,
    pub c_steps: usize,
    /// Convergence: the largest absolute gradient entry of F.
    pub tol: f64,
    /// L-BFGS iterations per solve.
    pub max_iter: usize,
    /// Continuation stages for losses that change with training progress or with the student's
    /// own predictions (logconf, product, EDL, edl_step).
    pub stages: usize,
}

impl Default for SolverConfig {
    fn default() -> Self {
        SolverConfig {
            folds: 5,
            c_min: 1e-5,
            c_max: 1.0,
            c_steps: 11,
            tol: 1e-5,
            max_iter: 500,
            stages: 4,
        }
    }
}

impl SolverConfig {
    /// The C grid, ascending (strongest regularisation first).
    pub fn grid(&self) -> Vec<f64> {
        if self.c_steps == 1 {
            return vec![self.c_min];
        }
        let (lo, hi) = (self.c_min.log10(), self.c_max.log10());
        (0..self.c_steps)
            .map(|i| 10f64.powf(lo + (hi - lo) * i as f64 / (self.c_steps - 1) as f64))
            .collect()
    }

    /// Errors naming the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.folds < 2 {
            bail!("solver.folds must be at least 2, got {}", self.folds);
        }
        if !(self.c_min > 0.0 && self.c_min.is_finite()) {
            bail!("solver.c_min must be a positive number, got {}", self.c_min);
        }
        if !(self.c_max >= self.c_min && self.c_max.is_finite()) {
            bail!(
                "solver.c_max must be at least solver.c_min ({}), got {}",
                self.c_min,
                self.c_max
            );
        }
        if self.c_steps == 0 {
            bail!("solver.c_steps must be at least 1");
        }
        if self.tol.is_nan() || self.tol <= 0.0 {
            bail!("solver.tol must be positive, got {}", self.tol);
        }
        if self.max_iter == 0 {
            bail!("solver.max_iter must be at least 1");
        }
        Ok(())
    }
}

/// Minimises F for one C on `x` (rows `rows` of the training set, same order), starting from
/// `start`, by continuation when the objective is staged.
pub fn solve(
    x: &Matrix,
    rows: &[usize],
    classes: usize,
    objective: &dyn Objective,
    c: f64,
    start: &LinearModel,
    config: &SolverConfig,
) -> Result<(LinearModel, SolveReport)> {
    solve_logged(x, rows, classes, objective, (c, start), config, false)
}

/// [`solve`], with every L-BFGS iteration recorded in the training log when `log` is set.
fn solve_logged(
    x: &Matrix,
    rows: &[usize],
    classes: usize,
    objective: &dyn Objective,
    (c, start): (f64, &LinearModel),
    config: &SolverConfig,
    log: bool,
) -> Result<(LinearModel, SolveReport)> {
    if x.rows != rows.len() {
        bail!(
            "internal: {} feature rows for {} examples",
            x.rows,
            rows.len()
        );
    }
    if x.rows == 0 {
        bail!("cannot fit a probe on no examples");
    }
    let penalty = 1.0 / (c * x.rows as f64);
    let stages = if objective.staged() {
        config.stages.max(1)
    } else {
        0
    };
    let mut theta = start.params();
    let support = supports(x);
    let scale = jacobi_scale(x, &support, classes, penalty);
    let mut total = SolveReport::default();
    let started = std::time::Instant::now();
    for s in 0..=stages {
        let progress = if stages == 0 {
            1.0
        } else {
            s as f64 / stages as f64
        };
        let anchor = logits_of(&theta, x, Some(&support), classes);
        let point = EvalPoint {
            rows,
            progress,
            anchor: &anchor,
        };
        let stage_loss = objective.stage(&point)?;
        let f = |u: &[f64]| -> Result<(f64, Vec<f64>)> {
            let t: Vec<f64> = u.iter().zip(&scale).map(|(a, s)| a / s).collect();
            let t = &t[..];
            let (loss, grad) = match &stage_loss {
                StageLoss::Batch(loss) => {
                    let z = logits_of(t, x, Some(&support), classes);
                    let (loss, dz) = loss(&z)?;
                    (loss, param_grad(t, (x, &support), classes, &dz, penalty))
                }
                StageLoss::Rows(loss) => one_pass(t, (x, &support), classes, loss, penalty),
            };
            let p = outputs(classes) * x.cols;
            let reg: f64 = t[..p].iter().map(|v| v * v).sum::<f64>() * penalty / 2.0;
            let grad = grad.iter().zip(&scale).map(|(g, s)| g / s).collect();
            Ok((loss + reg, grad))
        };
        let theta_u: Vec<f64> = theta.iter().zip(&scale).map(|(a, s)| a * s).collect();
        let t0 = std::time::Instant::now();
        let done = total.iterations;
        let mut on_iteration = |iteration: usize, objective: f64, grad_max: f64| {
            if log {
                crate::train::log::record(crate::train::log::Step {
                    epoch: s + 1,
                    step: done + iteration,
                    loss: objective,
                    lr: None,
                    grad_norm: grad_max,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
        };
        let (next, report) = super::lbfgs::lbfgs_traced(
            f,
            theta_u,
            (config.tol, config.max_iter),
            &scale,
            &mut on_iteration,
        )?;
        let next: Vec<f64> = next.iter().zip(&scale).map(|(a, s)| a / s).collect();
        if std::env::var_os("WS2S_SOLVER_TRACE").is_some() {
            eprintln!(
                "solve n={} d={} c={c:.1e} stage={s} iters={} evals={} gmax={:.1e} {:.0} ms",
                x.rows,
                x.cols,
                report.iterations,
                report.evaluations,
                report.grad_max,
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        theta = next;
        total.iterations += report.iterations;
        total.evaluations += report.evaluations;
        total.grad_max = report.grad_max;
        total.converged = report.converged;
        total.objective = report.objective;
    }
    Ok((LinearModel::from_params(classes, x.cols, &theta), total))
}

/// Cross-validation of C and the refit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvReport {
    pub grid: Vec<f64>,
    /// Mean held-out cross-entropy against the targets, per C (lower is better).
    pub scores: Vec<f64>,
    pub chosen_c: f64,
    /// The refit on all rows.
    pub refit: SolveReport,
    /// Solves done (every fold and C, and the refit).
    pub solves: usize,
    /// Of these, the solves that stopped (at `max_iter` or a failed line search) before `tol`.
    pub unconverged: usize,
}

impl CvReport {
    /// The mean held-out score at the chosen C.
    pub fn chosen_score(&self) -> f64 {
        let k = self
            .grid
            .iter()
            .position(|&c| c == self.chosen_c)
            .unwrap_or(0);
        self.scores[k]
    }
}

/// Fold of each row: stratified by `strata` (e.g. the argmax of the target), seeded.
pub fn stratified_folds(strata: &[usize], folds: usize, seed: u64) -> Vec<usize> {
    let mut fold = vec![0; strata.len()];
    let groups = strata.iter().max().map_or(0, |m| m + 1);
    let mut rng = Rng::derived(seed, "cv-folds");
    let mut next = 0;
    for g in 0..groups {
        let mut members: Vec<usize> = (0..strata.len()).filter(|&i| strata[i] == g).collect();
        rng.shuffle(&mut members);
        for i in members {
            fold[i] = next % folds;
            next += 1;
        }
    }
    fold
}

/// Mean cross-entropy -sum_k y_k log p_k of held-out rows (probabilities clipped at 1e-15).
pub fn held_out_log_loss(logits: &[f64], classes: usize, targets: &[&Vec<f64>]) -> f64 {
    let n = targets.len().max(1) as f64;
    logits
        .chunks(classes)
        .zip(targets)
        .map(|(z, y)| {
            let p = softmax(z);
            -y.iter()
                .zip(&p)
                .map(|(t, q)| {
                    if *t == 0.0 {
                        0.0
                    } else {
                        t * q.max(1e-15).ln()
                    }
                })
                .sum::<f64>()
        })
        .sum::<f64>()
        / n
}

/// Chooses C by k-fold cross-validation (`fold[i]` the fold of row i) on the held-out
/// cross-entropy against `targets`, then refits on all rows. `x` is standardised.
pub fn fit_cv(
    x: &Matrix,
    classes: usize,
    objective: &dyn Objective,
    targets: &[Vec<f64>],
    fold: &[usize],
    config: &SolverConfig,
) -> Result<(LinearModel, CvReport)> {
    config.validate()?;
    if targets.len() != x.rows || fold.len() != x.rows {
        bail!(
            "internal: {} feature rows, {} targets, {} fold ids",
            x.rows,
            targets.len(),
            fold.len()
        );
    }
    let grid = config.grid();
    let folds = fold.iter().max().map_or(0, |m| m + 1);
    let per_fold: Vec<(Vec<f64>, usize)> = (0..folds)
        .into_par_iter()
        .map(|f| -> Result<(Vec<f64>, usize)> {
            let train: Vec<usize> = (0..x.rows).filter(|&i| fold[i] != f).collect();
            let held: Vec<usize> = (0..x.rows).filter(|&i| fold[i] == f).collect();
            if train.is_empty() || held.is_empty() {
                bail!("cross-validation fold {f} is empty: too few examples for {folds} folds");
            }
            let xt = x.select_rows(&train);
            let xh = x.select_rows(&held);
            let held_targets: Vec<&Vec<f64>> = held.iter().map(|&i| &targets[i]).collect();
            let mut model = LinearModel::zeros(classes, x.cols);
            let mut scores = Vec::with_capacity(grid.len());
            let mut unconverged = 0;
            for &c in &grid {
                let start = if objective.staged() {
                    LinearModel::zeros(classes, x.cols)
                } else {
                    model.clone()
                };
                let (fitted, report) = solve(&xt, &train, classes, objective, c, &start, config)?;
                unconverged += usize::from(!report.converged);
                scores.push(held_out_log_loss(
                    &fitted.logits(&xh),
                    classes,
                    &held_targets,
                ));
                model = fitted;
            }
            Ok((scores, unconverged))
        })
        .collect::<Result<_>>()?;
    let scores: Vec<f64> = (0..grid.len())
        .map(|j| per_fold.iter().map(|(s, _)| s[j]).sum::<f64>() / folds as f64)
        .collect();
    let mut best = 0;
    for j in 1..grid.len() {
        if scores[j] < scores[best] {
            best = j;
        }
    }
    let all: Vec<usize> = (0..x.rows).collect();
    let (model, refit) = solve_logged(
        x,
        &all,
        classes,
        objective,
        (grid[best], &LinearModel::zeros(classes, x.cols)),
        config,
        true,
    )?;
    let n_grid = grid.len();
    Ok((
        model,
        CvReport {
            chosen_c: grid[best],
            grid,
            scores,
            solves: folds * n_grid + 1,
            unconverged: per_fold.iter().map(|(_, u)| u).sum::<usize>()
                + usize::from(!refit.converged),
            refit,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass evaluation of a per-row loss equals logits, loss and gradient taken in two
    /// passes: the gradient bit for bit, the value to rounding (its sum is taken in parts).
    #[test]
    fn one_pass_equals_two_passes() {
        let mut rng = Rng::new(4);
        for classes in [2, 3] {
            // 150 rows (three blocks of 64, the last partial) of lower-triangular supports.
            let (n, d) = (150, 70);
            let data: Vec<f64> = (0..n * d)
                .map(|i| {
                    if i % d <= i / d {
                        rng.next_f64() - 0.5
                    } else {
                        0.0
                    }
                })
                .collect();
            let x = Matrix::new(n, d, data).unwrap();
            let support = supports(&x);
            let p = outputs(classes);
            let theta: Vec<f64> = (0..p * d + p).map(|_| rng.next_f64() - 0.5).collect();
            let targets: Vec<Vec<f64>> = (0..n)
                .map(|_| (0..classes).map(|_| rng.next_f64()).collect())
                .collect();
            let rows: Vec<usize> = (0..n).collect();
            let anchor = vec![0.0; n * classes];
            let point = EvalPoint {
                rows: &rows,
                progress: 1.0,
                anchor: &anchor,
            };
            let objective = SoftXent { targets: &targets };
            let StageLoss::Rows(loss) = objective.stage(&point).unwrap() else {
                panic!("SoftXent is a per-row loss");
            };
            let (v1, g1) = one_pass(&theta, (&x, &support), classes, &loss, 0.3);
            let z = logits_of(&theta, &x, Some(&support), classes);
            let (v2, dz) = objective.loss(&z, &point).unwrap();
            let g2 = param_grad(&theta, (&x, &support), classes, &dz, 0.3);
            assert!((v1 - v2).abs() <= 1e-14 * v2.abs(), "{v1} {v2}");
            let bits = |g: &[f64]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&g1), bits(&g2), "{classes} classes");
        }
    }
}
