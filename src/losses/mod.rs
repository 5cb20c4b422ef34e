//! The losses of METHOD.md sections 3-5, one small function each, with the formula in its doc
//! comment. All are written with differentiable candle operations, take logits (and targets as
//! probability tensors), and return the mean over the batch (or over real tokens).

pub mod native;
pub mod special;

use candle_core::{DType, Result, Tensor, D};
use candle_nn::ops::log_softmax;
use special::{digamma, lgamma};

/// Linear ramp of an auxiliary weight: a_max * min(1, progress / warmup), progress in [0, 1].
pub fn ramp(progress: f64, a_max: f64, warmup: f64) -> f64 {
    if warmup <= 0.0 {
        return a_max;
    }
    a_max * (progress / warmup).clamp(0.0, 1.0)
}

/// Soft-label cross-entropy: mean_b [ -sum_k y_bk log softmax(z_b)_k ]. z, y: [B, K].
pub fn xent(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax(logits, D::Minus1)?;
    (targets * logp)?.sum(D::Minus1)?.neg()?.mean_all()
}

/// The student's own predictions hardened to one-hot, with the weak labels' class balance:
/// binary: class 1 where p_1 is above the (1 - r) quantile of p_1 over the batch, r the mean weak
/// probability of class 1 (linear interpolation between order statistics); K > 2: argmax.
pub fn balanced_hard_predictions(probs: &Tensor, weak: &Tensor) -> Result<Tensor> {
    let (b, k) = probs.dims2()?;
    let flat = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    let hard = native::balanced_hard(&flat(probs)?, &flat(weak)?, k);
    Tensor::from_vec(hard, (b, k), probs.device())?.to_dtype(probs.dtype())
}

/// Auxiliary-confidence loss (Burns et al.): CE(t, p) with t = (1 - a) y + a hard(p), hard(p)
/// the detached, class-balanced hardening of the student's predictions, a = `aux_weight` (ramp it
/// with [`ramp`]: 0 -> a_max over the first w of training).
pub fn logconf(logits: &Tensor, weak: &Tensor, aux_weight: f64) -> Result<Tensor> {
    logconf_anchored(logits, logits, weak, aux_weight)
}

/// [`logconf`] with the hardened predictions taken from `anchor` (detached logits of the same
/// shape: a solver's frozen iterate) instead of the current logits.
pub fn logconf_anchored(
    logits: &Tensor,
    anchor: &Tensor,
    weak: &Tensor,
    aux_weight: f64,
) -> Result<Tensor> {
    let probs = candle_nn::ops::softmax(&anchor.detach(), D::Minus1)?;
    let hard = balanced_hard_predictions(&probs, weak)?;
    let target = ((weak * (1.0 - aux_weight))? + (hard * aux_weight)?)?;
    xent(logits, &target)
}

/// Product loss: t proportional to p * y (detached, renormalised), loss CE(t, p).
pub fn product(logits: &Tensor, weak: &Tensor) -> Result<Tensor> {
    product_anchored(logits, logits, weak)
}

/// [`product`] with p taken from `anchor` (detached logits of the same shape).
pub fn product_anchored(logits: &Tensor, anchor: &Tensor, weak: &Tensor) -> Result<Tensor> {
    let probs = candle_nn::ops::softmax(&anchor.detach(), D::Minus1)?;
    let joint = (probs * weak)?;
    let norm = joint.sum_keepdim(D::Minus1)?.clamp(1e-30, f64::MAX)?;
    xent(logits, &joint.broadcast_div(&norm)?)
}

/// Naive multi-weak loss: sum_j w_j CE(y_j, p), one soft label tensor [B, K] per weak model.
pub fn naive_multi(logits: &Tensor, weak: &[Tensor], weights: &[f64]) -> Result<Tensor> {
    let mut total = Tensor::zeros((), logits.dtype(), logits.device())?;
    for (y, &w) in weak.iter().zip(weights) {
        total = (total + (xent(logits, y)? * w)?)?;
    }
    Ok(total)
}

/// How logits become Dirichlet evidence.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    /// e = exp(clamp(z, -c, c)).
    Exp { clamp: f64 },
    /// e = softplus(z).
    Softplus,
}

/// Dirichlet parameters alpha = evidence(z) + 1.
pub fn dirichlet_alpha(logits: &Tensor, evidence: Evidence) -> Result<Tensor> {
    let e = match evidence {
        Evidence::Exp { clamp } => logits.clamp(-clamp, clamp)?.exp()?,
        Evidence::Softplus => softplus(logits)?,
    };
    e + 1.0
}

/// softplus(x) = max(x, 0) + log(1 + exp(-|x|)), stable for large |x|.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// KL( Dir(alpha) || Dir(1) ) per row of alpha [.., K]:
/// lgamma(S) - lgamma(K) - sum_k lgamma(alpha_k) + sum_k (alpha_k - 1)(psi(alpha_k) - psi(S)).
pub fn kl_to_uniform_dirichlet(alpha: &Tensor) -> Result<Tensor> {
    let k = alpha.dim(D::Minus1)? as f64;
    let s = alpha.sum_keepdim(D::Minus1)?;
    let lgamma_k =
        lgamma(&Tensor::new(&[k], alpha.device())?.to_dtype(alpha.dtype())?)?.squeeze(0)?;
    let first = (lgamma(&s)?.squeeze(D::Minus1)?.broadcast_sub(&lgamma_k))?;
    let second = lgamma(alpha)?.sum(D::Minus1)?;
    let third = ((alpha - 1.0)? * digamma(alpha)?.broadcast_sub(&digamma(&s)?)?)?.sum(D::Minus1)?;
    (first - second)? + third
}

/// Evidential (EDL) loss of one soft label y [.., K] against Dirichlet alpha [.., K], per row:
/// A = sum_k y_k (log S - log alpha_k) (type-II maximum likelihood) plus lambda * KL(Dir(alpha~) ||
/// Dir(1)) with alpha~ = y + (1 - y) alpha (the labelled evidence removed).
pub fn edl_terms(alpha: &Tensor, y: &Tensor, lambda: f64) -> Result<Tensor> {
    let s = alpha.sum_keepdim(D::Minus1)?;
    let fit = (y * alpha.log()?.broadcast_sub(&s.log()?)?.neg()?)?.sum(D::Minus1)?;
    if lambda == 0.0 {
        return Ok(fit);
    }
    let alpha_tilde = (y + ((1.0 - y)? * alpha)?)?;
    fit + (kl_to_uniform_dirichlet(&alpha_tilde)? * lambda)?
}

/// Bayesian multi-weak loss: mean_b sum_j w_j [A(y_j, alpha) + lambda KL_j], alpha from the logits;
/// lambda = c min(1, t) with t the fraction of training done (compute it with [`ramp`](c, 1)).
pub fn edl(
    logits: &Tensor,
    weak: &[Tensor],
    weights: &[f64],
    lambda: f64,
    evidence: Evidence,
) -> Result<Tensor> {
    let alpha = dirichlet_alpha(logits, evidence)?;
    let mut total = Tensor::zeros((), logits.dtype(), logits.device())?;
    for (y, &w) in weak.iter().zip(weights) {
        total = (total + (edl_terms(&alpha, y, lambda)?.mean_all()? * w)?)?;
    }
    Ok(total)
}

/// `edl_step`: each weak label first mixed with the student's own argmax,
/// y_j <- (1 - a) y_j + a onehot(argmax z) (a ramps to 0.2 over the first 25%), then [`edl`].
pub fn edl_step(
    logits: &Tensor,
    weak: &[Tensor],
    weights: &[f64],
    lambda: f64,
    aux_weight: f64,
    evidence: Evidence,
) -> Result<Tensor> {
    edl_step_anchored(logits, logits, weak, weights, lambda, aux_weight, evidence)
}

/// [`edl_step`] with the argmax taken from `anchor` (detached logits of the same shape).
pub fn edl_step_anchored(
    logits: &Tensor,
    anchor: &Tensor,
    weak: &[Tensor],
    weights: &[f64],
    lambda: f64,
    aux_weight: f64,
    evidence: Evidence,
) -> Result<Tensor> {
    let k = logits.dim(D::Minus1)?;
    let argmax = anchor.detach().argmax(D::Minus1)?;
    let onehot = one_hot(&argmax, k, logits)?;
    let mixed: Vec<Tensor> = weak
        .iter()
        .map(|y| (y * (1.0 - aux_weight))? + (&onehot * aux_weight)?)
        .collect::<Result<_>>()?;
    edl(logits, &mixed, weights, lambda, evidence)
}

/// One-hot rows [.., K] of `indices`, in the dtype and device of `like`.
pub fn one_hot(indices: &Tensor, k: usize, like: &Tensor) -> Result<Tensor> {
    let shape = indices.dims().to_vec();
    let idx = indices
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let mut values = vec![0f32; idx.len() * k];
    for (i, &c) in idx.iter().enumerate() {
        values[i * k + c as usize] = 1.0;
    }
    let mut dims = shape;
    dims.push(k);
    Tensor::from_vec(values, dims, like.device())?.to_dtype(like.dtype())
}

/// Dirichlet-multinomial negative log-likelihood of the J weak hard labels of each input, given as
/// counts n [B, K] (sum_k n_k = J): mean_b -[lgamma(S) - lgamma(S + J) + sum_k (lgamma(alpha_k + n_k)
/// - lgamma(alpha_k))].
pub fn dirichlet_multinomial(
    logits: &Tensor,
    counts: &Tensor,
    evidence: Evidence,
) -> Result<Tensor> {
    let alpha = dirichlet_alpha(logits, evidence)?;
    let s = alpha.sum(D::Minus1)?;
    let j = counts.sum(D::Minus1)?;
    let log_lik = ((lgamma(&s)? - lgamma(&(&s + &j)?)?)?
        + (lgamma(&(&alpha + counts)?)? - lgamma(&alpha)?)?.sum(D::Minus1)?)?;
    log_lik.neg()?.mean_all()
}

/// Token-level soft KL: mean over real tokens of KL(q_t || softmax(z_t)) = sum_v q log q - q log p
/// (0 log 0 = 0). logits, q: [B, T, V]; mask: [B, T] of 0/1.
pub fn token_soft_kl(logits: &Tensor, q: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let logp = log_softmax(logits, D::Minus1)?;
    let safe_q = q.clamp(1e-30, f64::MAX)?;
    let q_log_q = (q * safe_q.log()?)?;
    let per_token = (q_log_q - (q * logp)?)?.sum(D::Minus1)?;
    masked_mean(&per_token, mask)
}

/// Token-level EDL: [`edl_terms`] per token with K = the vocabulary, averaged over real tokens.
pub fn token_edl(
    logits: &Tensor,
    q: &Tensor,
    mask: &Tensor,
    lambda: f64,
    evidence: Evidence,
) -> Result<Tensor> {
    let alpha = dirichlet_alpha(logits, evidence)?;
    masked_mean(&edl_terms(&alpha, q, lambda)?, mask)
}

fn masked_mean(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(values.dtype())?;
    let count = mask.sum_all()?.clamp(1.0, f64::MAX)?;
    (values * mask)?.sum_all()?.div(&count)
}

/// log sigmoid(x) = -softplus(-x).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    softplus(&x.neg()?)?.neg()
}

/// Conservative DPO: h = [log pi(y_c|x) - log pi(y_r|x)] - [log pi_ref(y_c|x) - log pi_ref(y_r|x)]
/// (sums of token log-probabilities), L = mean[ -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) ].
pub fn conservative_dpo(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    reference_chosen: &Tensor,
    reference_rejected: &Tensor,
    beta: f64,
    eps: f64,
) -> Result<Tensor> {
    let h = ((policy_chosen - policy_rejected)? - (reference_chosen - reference_rejected)?)?;
    let scaled = (h * beta)?;
    let loss = ((log_sigmoid(&scaled)? * -(1.0 - eps))? - (log_sigmoid(&scaled.neg()?)? * eps)?)?;
    loss.mean_all()
}
