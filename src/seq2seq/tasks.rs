//! Training tasks for generation: cross-entropy on target tokens (weak models, ceiling, hard
//! weak labels, joint decoding), token-level soft labels (naive soft KL, token EDL, `edl_step`)
//! built on the fly from bridged weak hypotheses, and conservative DPO on preference pairs.

use super::bridge::{soft_target_row, token_logprobs, BridgedTarget, Share, Spread};
use super::model::Seq2Seq;
use crate::losses::{self, Evidence};
use crate::models::decode::{continuation_logits, continuation_logprobs_tensor};
use crate::train::trainer::TrainTask;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use std::cell::RefCell;

/// Teacher-forced cross-entropy on (prompt, target) pairs, each with a weight.
pub struct CeTask<'a> {
    pub model: &'a Seq2Seq,
    pub prompts: Vec<Vec<u32>>,
    pub targets: Vec<Vec<u32>>,
    pub weights: Vec<f32>,
}

impl TrainTask for CeTask<'_> {
    fn num_examples(&self) -> usize {
        self.prompts.len()
    }

    fn length(&self, i: usize) -> usize {
        self.prompts[i].len() + self.targets[i].len()
    }

    fn loss(&self, batch: &[usize], _progress: f64) -> Result<Tensor> {
        let p: Vec<Vec<u32>> = batch.iter().map(|&i| self.prompts[i].clone()).collect();
        let t: Vec<Vec<u32>> = batch.iter().map(|&i| self.targets[i].clone()).collect();
        let w: Vec<f32> = batch.iter().map(|&i| self.weights[i]).collect();
        self.model.nll(&p, &t, &w)
    }
}

/// Which token-level soft-label loss.
#[derive(Debug, Clone, Copy)]
pub enum SoftLoss {
    /// KL(q_t || softmax(z_t)) (single weak soft labels, naive multi-weak).
    Kl,
    /// Token EDL, lambda_t = c min(1, t).
    Edl { c: f64, evidence: Evidence },
    /// Token EDL with q mixed with the student's own argmax: (1 - a_t) q + a_t onehot(argmax z).
    EdlStep {
        c: f64,
        evidence: Evidence,
        a_max: f64,
        warmup: f64,
    },
}

/// One soft-label item: a prompt, a weak hypothesis carried over to the strong tokenizer, and
/// the weight of the weak model that produced it.
pub struct SoftItem {
    pub prompt: Vec<u32>,
    pub target: BridgedTarget,
    pub weight: f32,
}

/// Soft targets q [B, Tc, V] for a batch, from the strong model's detached probabilities.
pub fn soft_targets(
    items: &[&SoftItem],
    logits: &Tensor,
    share: Share,
    spread: Spread,
) -> Result<Tensor> {
    let (b, tc, v) = logits.dims3()?;
    let probs = candle_nn::ops::softmax_last_dim(&logits.detach().to_dtype(DType::F32)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut q = vec![0f32; b * tc * v];
    for (row, item) in items.iter().enumerate() {
        let n = item.target.tokens.len();
        let max_prob: Vec<f32> = (0..n)
            .map(|t| {
                let start = (row * tc + t) * v;
                probs[start..start + v].iter().cloned().fold(0f32, f32::max)
            })
            .collect();
        let logp = token_logprobs(&item.target, &max_prob, share);
        for (t, (&label, lp)) in item.target.tokens.iter().zip(&logp).enumerate() {
            let start = (row * tc + t) * v;
            soft_target_row(
                label as usize,
                lp.exp(),
                &probs[start..start + v],
                spread,
                &mut q[start..start + v],
            );
        }
    }
    Ok(Tensor::from_vec(q, (b, tc, v), logits.device())?)
}

pub struct SoftTask<'a> {
    pub model: &'a Seq2Seq,
    pub items: Vec<SoftItem>,
    pub loss: SoftLoss,
    pub share: Share,
    pub spread: Spread,
}

impl TrainTask for SoftTask<'_> {
    fn num_examples(&self) -> usize {
        self.items.len()
    }

    fn length(&self, i: usize) -> usize {
        self.items[i].prompt.len() + self.items[i].target.tokens.len()
    }

    fn loss(&self, batch: &[usize], progress: f64) -> Result<Tensor> {
        let items: Vec<&SoftItem> = batch.iter().map(|&i| &self.items[i]).collect();
        let prompts: Vec<Vec<u32>> = items.iter().map(|i| i.prompt.clone()).collect();
        let targets: Vec<Vec<u32>> = items.iter().map(|i| i.target.tokens.clone()).collect();
        let (logits, _, mask) = continuation_logits(
            &self.model.model.network,
            &prompts,
            &targets,
            &self.model.device,
        )?;
        let q = soft_targets(&items, &logits, self.share, self.spread)?;
        let w: Vec<f32> = items.iter().map(|i| i.weight).collect();
        let w = Tensor::from_vec(w, (items.len(), 1), &self.model.device)?;
        let weighted_mask = mask.broadcast_mul(&w)?;
        Ok(match self.loss {
            SoftLoss::Kl => losses::token_soft_kl(&logits, &q, &weighted_mask)?,
            SoftLoss::Edl { c, evidence } => losses::token_edl(
                &logits,
                &q,
                &weighted_mask,
                losses::ramp(progress, c, 1.0),
                evidence,
            )?,
            SoftLoss::EdlStep {
                c,
                evidence,
                a_max,
                warmup,
            } => {
                let a = losses::ramp(progress, a_max, warmup);
                let v = logits.dim(D::Minus1)?;
                let argmax = logits.detach().argmax(D::Minus1)?;
                let own = losses::one_hot(&argmax, v, &logits)?;
                let mixed = ((q * (1.0 - a))? + (own * a)?)?;
                losses::token_edl(
                    &logits,
                    &mixed,
                    &weighted_mask,
                    losses::ramp(progress, c, 1.0),
                    evidence,
                )?
            }
        })
    }
}

/// A preference pair with its reference log-probabilities (sums over tokens).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub reference_chosen: f32,
    pub reference_rejected: f32,
}

/// What one epoch of DPO looked like, measured over every pair after the epoch.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DpoEpochLog {
    pub epoch: usize,
    /// Mean of h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)).
    pub reward_margin: f64,
    pub chosen_logprob: f64,
    pub rejected_logprob: f64,
    /// Fraction of pairs with h > 0.
    pub accuracy: f64,
}

/// Sums of teacher-forced token log-probabilities [B] of each continuation.
pub fn sequence_logprobs(
    model: &Seq2Seq,
    prompts: &[Vec<u32>],
    continuations: &[Vec<u32>],
) -> Result<Tensor> {
    let (logprobs, _) =
        continuation_logprobs_tensor(&model.model.network, prompts, continuations, &model.device)?;
    Ok(logprobs.sum(1)?)
}

pub struct DpoTask<'a> {
    pub model: &'a Seq2Seq,
    pub pairs: Vec<Pair>,
    pub beta: f64,
    pub eps: f64,
    pub batch: usize,
    pub log: RefCell<Vec<DpoEpochLog>>,
}

impl DpoTask<'_> {
    /// Policy log-probabilities of chosen and rejected for some pairs (one forward pass).
    fn policy(&self, pairs: &[&Pair]) -> Result<(Tensor, Tensor)> {
        let mut prompts: Vec<Vec<u32>> = pairs.iter().map(|p| p.prompt.clone()).collect();
        prompts.extend(pairs.iter().map(|p| p.prompt.clone()));
        let mut continuations: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen.clone()).collect();
        continuations.extend(pairs.iter().map(|p| p.rejected.clone()));
        let all = sequence_logprobs(self.model, &prompts, &continuations)?;
        let n = pairs.len();
        Ok((all.narrow(0, 0, n)?, all.narrow(0, n, n)?))
    }

    fn references(pairs: &[&Pair], device: &Device) -> Result<(Tensor, Tensor)> {
        let c: Vec<f32> = pairs.iter().map(|p| p.reference_chosen).collect();
        let r: Vec<f32> = pairs.iter().map(|p| p.reference_rejected).collect();
        Ok((
            Tensor::from_vec(c, pairs.len(), device)?,
            Tensor::from_vec(r, pairs.len(), device)?,
        ))
    }

    /// Measures the reward margin and log-probabilities over every pair.
    pub fn measure(&self, epoch: usize) -> Result<DpoEpochLog> {
        let mut log = DpoEpochLog {
            epoch,
            ..Default::default()
        };
        let n = self.pairs.len().max(1) as f64;
        for chunk in self.pairs.chunks(self.batch.max(1)) {
            let refs: Vec<&Pair> = chunk.iter().collect();
            let (c, r) = self.policy(&refs)?;
            let (c, r) = (c.detach().to_vec1::<f32>()?, r.detach().to_vec1::<f32>()?);
            for ((pair, c), r) in chunk.iter().zip(c).zip(r) {
                let h = (c - r) as f64 - (pair.reference_chosen - pair.reference_rejected) as f64;
                log.reward_margin += h / n;
                log.chosen_logprob += c as f64 / n;
                log.rejected_logprob += r as f64 / n;
                log.accuracy += if h > 0.0 { 1.0 / n } else { 0.0 };
            }
        }
        Ok(log)
    }
}

impl TrainTask for DpoTask<'_> {
    fn num_examples(&self) -> usize {
        self.pairs.len()
    }

    fn length(&self, i: usize) -> usize {
        let p = &self.pairs[i];
        p.prompt.len() + p.chosen.len().max(p.rejected.len())
    }

    fn loss(&self, batch: &[usize], _progress: f64) -> Result<Tensor> {
        let pairs: Vec<&Pair> = batch.iter().map(|&i| &self.pairs[i]).collect();
        let (c, r) = self.policy(&pairs)?;
        let (rc, rr) = Self::references(&pairs, &self.model.device)?;
        Ok(losses::conservative_dpo(
            &c, &r, &rc, &rr, self.beta, self.eps,
        )?)
    }

    fn validate(&self) -> Result<Option<f64>> {
        let epoch = self.log.borrow().len() + 1;
        let log = self.measure(epoch)?;
        eprintln!(
            "dpo epoch {epoch}: reward margin {:.4}, chosen logp {:.3}, rejected logp {:.3}, pairs ordered {:.3}",
            log.reward_margin, log.chosen_logprob, log.rejected_logprob, log.accuracy
        );
        self.log.borrow_mut().push(log);
        Ok(None)
    }
}
