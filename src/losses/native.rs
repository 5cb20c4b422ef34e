//! The classification losses of METHOD.md section 3 on f64 rows, each with its gradient with
//! respect to the logits written out. The linear-probe solver evaluates a loss hundreds of
//! thousands of times on [~450, K] logits, where building and differentiating a candle graph
//! costs far more than the arithmetic. Each function here is the same formula as its candle
//! form in [`super`] (tests/losses.rs compares values and gradients with candle's autograd, and
//! the gradients with finite differences).
//!
//! Logits are row-major [rows, k]; every loss is the mean over rows, and so is its gradient
//! (each row's gradient divided by the number of rows).

use super::Evidence;
use crate::eval::classify::argmax;
use crate::ops::special::{lgamma_digamma, lgamma_scalar, trigamma_scalar};

/// log sum_k exp(z_k), stable (a row of -inf gives -inf).
pub fn log_sum_exp(z: &[f64]) -> f64 {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// softmax(z).
pub fn softmax(z: &[f64]) -> Vec<f64> {
    let lse = log_sum_exp(z);
    z.iter().map(|v| (v - lse).exp()).collect()
}

/// Soft cross-entropy mean_r [-sum_k y_rk log softmax(z_r)_k], y_r = `target(r)` (need not sum
/// to 1: the gradient of a row is (sum_m y_m) p_k - y_k).
pub fn xent<'t>(logits: &[f64], k: usize, target: impl Fn(usize) -> &'t [f64]) -> (f64, Vec<f64>) {
    let mut grad = vec![0.0; logits.len()];
    let rows = logits.len() / k.max(1);
    let value = xent_rows(logits, k, target, rows as f64, &mut grad);
    (value, grad)
}

/// The terms of [`xent`] for some rows: returns their sum divided by `n` (the number of rows
/// the mean is over) and writes their gradient (divided by `n`) to `grad`.
pub fn xent_rows<'t>(
    logits: &[f64],
    k: usize,
    target: impl Fn(usize) -> &'t [f64],
    n: f64,
    grad: &mut [f64],
) -> f64 {
    let rows = logits.len() / k.max(1);
    let mut total = 0.0;
    if k == 2 {
        // With d = z_1 - z_0 and e = exp(-|d|): log-sum-exp = max(z) + ln(1 + e), and the
        // larger logit's probability is 1 / (1 + e) (one exponential and one logarithm a row).
        for r in 0..rows {
            let (z0, z1) = (logits[2 * r], logits[2 * r + 1]);
            let y = target(r);
            let e = (-(z1 - z0).abs()).exp();
            let lse = z0.max(z1) + e.ln_1p();
            let big = 1.0 / (1.0 + e);
            let (p0, p1) = if z1 >= z0 {
                (e * big, big)
            } else {
                (big, e * big)
            };
            let mass = y[0] + y[1];
            total -= y[0] * (z0 - lse) + y[1] * (z1 - lse);
            grad[2 * r] = (mass * p0 - y[0]) / n;
            grad[2 * r + 1] = (mass * p1 - y[1]) / n;
        }
        return total / n;
    }
    for r in 0..rows {
        let z = &logits[r * k..(r + 1) * k];
        let y = target(r);
        let lse = log_sum_exp(z);
        let mass: f64 = y.iter().sum();
        for c in 0..k {
            total -= y[c] * (z[c] - lse);
            grad[r * k + c] = (mass * (z[c] - lse).exp() - y[c]) / n;
        }
    }
    total / n
}

/// The student's predictions hardened to one-hot rows with the weak labels' class balance
/// (the definition of [`super::balanced_hard_predictions`]): binary: class 1 where p_1 is above
/// the (1 - r) quantile of p_1 over the rows, r the mean weak probability of class 1 (linear
/// interpolation between order statistics); K > 2: the argmax (the first on ties, as candle's).
/// `probs`, `weak`: [rows, k].
pub fn balanced_hard(probs: &[f64], weak: &[f64], k: usize) -> Vec<f64> {
    let rows = probs.len() / k.max(1);
    let mut hard = vec![0.0; rows * k];
    if k == 2 {
        let rate = (0..rows).map(|r| weak[r * 2 + 1]).sum::<f64>() / rows.max(1) as f64;
        let mut p1: Vec<f64> = (0..rows).map(|r| probs[r * 2 + 1]).collect();
        p1.sort_by(f64::total_cmp);
        let threshold = crate::eval::summary::quantile_sorted(&p1, (1.0 - rate).clamp(0.0, 1.0));
        for r in 0..rows {
            hard[r * 2 + usize::from(probs[r * 2 + 1] > threshold)] = 1.0;
        }
    } else {
        for r in 0..rows {
            hard[r * k + argmax(&probs[r * k..(r + 1) * k])] = 1.0;
        }
    }
    hard
}

/// Softmax of every row of `logits` [rows, k].
pub fn softmax_rows(logits: &[f64], k: usize) -> Vec<f64> {
    logits.chunks(k.max(1)).flat_map(softmax).collect()
}

/// The target of the auxiliary-confidence loss (logconf): (1 - a) y + a hard(softmax(anchor)).
pub fn logconf_targets(anchor: &[f64], weak: &[f64], k: usize, aux_weight: f64) -> Vec<f64> {
    let hard = balanced_hard(&softmax_rows(anchor, k), weak, k);
    weak.iter()
        .zip(&hard)
        .map(|(y, h)| y * (1.0 - aux_weight) + h * aux_weight)
        .collect()
}

/// The target of the product loss: softmax(anchor) * y, renormalised per row (norm clamped at
/// 1e-30).
pub fn product_targets(anchor: &[f64], weak: &[f64], k: usize) -> Vec<f64> {
    let mut joint: Vec<f64> = softmax_rows(anchor, k)
        .iter()
        .zip(weak)
        .map(|(p, y)| p * y)
        .collect();
    for row in joint.chunks_mut(k.max(1)) {
        let norm = row.iter().sum::<f64>().max(1e-30);
        row.iter_mut().for_each(|v| *v /= norm);
    }
    joint
}

/// Each weak label mixed with the anchor's argmax (`edl_step`): (1 - a) y + a onehot(argmax).
pub fn step_targets(anchor: &[f64], weak: &[f64], k: usize, aux_weight: f64) -> Vec<f64> {
    let mut mixed: Vec<f64> = weak.iter().map(|y| y * (1.0 - aux_weight)).collect();
    for (r, z) in anchor.chunks(k.max(1)).enumerate() {
        mixed[r * k + argmax(z)] += aux_weight;
    }
    mixed
}

/// Dirichlet parameters alpha = evidence(z) + 1 of one logit, with d alpha / dz.
pub fn alpha_of(z: f64, evidence: Evidence) -> (f64, f64) {
    match evidence {
        Evidence::Exp { clamp } => {
            let e = z.clamp(-clamp, clamp).exp();
            // The clamp passes the gradient inside, half of it at the bounds (as candle's
            // maximum / minimum), none outside.
            let pass = if z.abs() < clamp {
                1.0
            } else if z.abs() == clamp {
                0.5
            } else {
                0.0
            };
            (e + 1.0, e * pass)
        }
        Evidence::Softplus => {
            let e = z.max(0.0) + (-z.abs()).exp().ln_1p();
            (e + 1.0, 1.0 / (1.0 + (-z).exp()))
        }
    }
}

/// KL(Dir(a) || Dir(1)) of one row, its gradient with respect to a written to `grad`:
/// KL = lgamma(S) - lgamma(K) - sum lgamma(a_k) + sum (a_k - 1)(psi(a_k) - psi(S)),
/// dKL/da_k = (a_k - 1) psi'(a_k) - psi'(S) sum_m (a_m - 1). `lgamma_k` is lgamma(K), K =
/// a.len() (the same for every row).
pub fn kl_to_uniform(a: &[f64], lgamma_k: f64, grad: &mut [f64]) -> f64 {
    let s: f64 = a.iter().sum();
    let (lgamma_s, psi_s) = lgamma_digamma(s);
    let tri_s = trigamma_scalar(s);
    let excess: f64 = a.iter().map(|v| v - 1.0).sum();
    let mut value = lgamma_s - lgamma_k;
    for (g, &ak) in grad.iter_mut().zip(a) {
        let (lgamma_a, psi_a) = lgamma_digamma(ak);
        value += (ak - 1.0) * (psi_a - psi_s) - lgamma_a;
        *g = (ak - 1.0) * trigamma_scalar(ak) - tri_s * excess;
    }
    value
}

/// The Bayesian multi-weak (EDL) loss: mean_r sum_j w_j [A(y_j, alpha) + lambda KL_j], with
/// A = sum_k y_k (log S - log alpha_k) and KL_j = KL(Dir(y_j + (1 - y_j) alpha) || Dir(1)),
/// alpha = evidence(z) + 1 (METHOD.md 3.4; [`super::edl`]). `weak[j]`: [rows, k].
pub fn edl(
    logits: &[f64],
    k: usize,
    (weak, weights): (&[Vec<f64>], &[f64]),
    lambda: f64,
    evidence: Evidence,
) -> (f64, Vec<f64>) {
    let mut grad = vec![0.0; logits.len()];
    let n = (logits.len() / k.max(1)) as f64;
    let value = edl_rows(
        logits,
        k,
        (weak, weights, 0),
        (lambda, evidence),
        n,
        &mut grad,
    );
    (value, grad)
}

/// The terms of [`edl`] for the rows from `first` on (`weak[j]` holds every row; `logits` and
/// `grad` only these): their sum divided by `n`, their gradient (divided by `n`) written to
/// `grad`.
pub fn edl_rows(
    logits: &[f64],
    k: usize,
    (weak, weights, first): (&[Vec<f64>], &[f64], usize),
    (lambda, evidence): (f64, Evidence),
    n: f64,
    grad: &mut [f64],
) -> f64 {
    let rows = logits.len() / k.max(1);
    grad.iter_mut().for_each(|g| *g = 0.0);
    let mut total = 0.0;
    let mut scratch = vec![0.0; 5 * k];
    let (alpha, rest) = scratch.split_at_mut(k);
    let (dalpha, rest) = rest.split_at_mut(k);
    let (log_alpha, rest) = rest.split_at_mut(k);
    let (tilde, dkl) = rest.split_at_mut(k);
    let lgamma_k = lgamma_scalar(k as f64);
    for r in 0..rows {
        for c in 0..k {
            (alpha[c], dalpha[c]) = alpha_of(logits[r * k + c], evidence);
            log_alpha[c] = alpha[c].ln();
        }
        let s: f64 = alpha.iter().sum();
        let log_s = s.ln();
        let g = &mut grad[r * k..(r + 1) * k];
        for (y, &w) in weak.iter().zip(weights) {
            let y = &y[(first + r) * k..(first + r + 1) * k];
            let mass: f64 = y.iter().sum();
            for c in 0..k {
                total += w * y[c] * (log_s - log_alpha[c]);
                g[c] += w * (mass / s - y[c] / alpha[c]);
            }
            if lambda != 0.0 {
                for c in 0..k {
                    tilde[c] = y[c] + (1.0 - y[c]) * alpha[c];
                }
                let kl = kl_to_uniform(tilde, lgamma_k, dkl);
                total += w * lambda * kl;
                for c in 0..k {
                    g[c] += w * lambda * dkl[c] * (1.0 - y[c]);
                }
            }
        }
        for c in 0..k {
            g[c] *= dalpha[c] / n;
        }
    }
    total / n
}

/// Dirichlet-multinomial negative log-likelihood of the weak hard-label counts n [rows, k]
/// (METHOD.md 3.5; [`super::dirichlet_multinomial`]):
/// mean_r -[lgamma(S) - lgamma(S + J) + sum_k (lgamma(alpha_k + n_k) - lgamma(alpha_k))].
pub fn dirichlet_multinomial(
    logits: &[f64],
    k: usize,
    counts: &[f64],
    evidence: Evidence,
) -> (f64, Vec<f64>) {
    let mut grad = vec![0.0; logits.len()];
    let n = (logits.len() / k.max(1)) as f64;
    let value = dirichlet_multinomial_rows(logits, k, (counts, 0), evidence, n, &mut grad);
    (value, grad)
}

/// The terms of [`dirichlet_multinomial`] for the rows from `first` on (`counts` holds every
/// row): their sum divided by `n`, their gradient (divided by `n`) written to `grad`.
pub fn dirichlet_multinomial_rows(
    logits: &[f64],
    k: usize,
    (counts, first): (&[f64], usize),
    evidence: Evidence,
    n: f64,
    grad: &mut [f64],
) -> f64 {
    let rows = logits.len() / k.max(1);
    let mut total = 0.0;
    let mut alpha = vec![0.0; k];
    let mut dalpha = vec![0.0; k];
    for r in 0..rows {
        for c in 0..k {
            (alpha[c], dalpha[c]) = alpha_of(logits[r * k + c], evidence);
        }
        let counts = &counts[(first + r) * k..(first + r + 1) * k];
        let s: f64 = alpha.iter().sum();
        let j: f64 = counts.iter().sum();
        let ((lgamma_s, psi_s), (lgamma_sj, psi_sj)) = (lgamma_digamma(s), lgamma_digamma(s + j));
        let shared = psi_s - psi_sj;
        total -= lgamma_s - lgamma_sj;
        for c in 0..k {
            let (a, m) = (alpha[c], counts[c]);
            let ((lgamma_am, psi_am), (lgamma_a, psi_a)) =
                (lgamma_digamma(a + m), lgamma_digamma(a));
            total -= lgamma_am - lgamma_a;
            let d = shared + psi_am - psi_a;
            grad[r * k + c] = -d * dalpha[c] / n;
        }
    }
    total / n
}
