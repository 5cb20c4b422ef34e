//! The weak side of a generation run (stages 1-3): the weak models' n-best lists, the joint
//! rescoring of the pooled lists, the weights learned from agreement, and the top hypotheses
//! bridged to the strong tokenizer.

use super::models::*;
use crate::config::{GenerationConfig, GenerationWeights, Weights};
use crate::data::Dataset;
use crate::experiment::stages::{stage_key, StageCache, Subject};
pub use crate::report::generate::Eval;
use crate::seq2seq::bridge::{bridge, BridgedTarget};
use crate::seq2seq::joint::{self, AgreementInput};
use crate::seq2seq::model::Seq2Seq;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// A generated hypothesis as stored in a stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hyp {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub text: String,
}

#[derive(Serialize, Deserialize)]
pub(super) struct WeakStage {
    pub(super) test: Eval,
    /// Per strong_train example, the n-best list, best first.
    pub(super) nbest: Vec<Vec<Hyp>>,
}

/// Joint rescoring: per strong_train example, the pooled candidates and each weak model's
/// length-normalised log-likelihood of each.
#[derive(Serialize, Deserialize)]
pub(super) struct JointStage {
    pub(super) candidates: Vec<Vec<String>>,
    pub(super) scores: Vec<Vec<Vec<f64>>>,
}

/// What the stages of one seed share.
pub(super) struct Seed<'a> {
    pub(super) g: &'a GenerationConfig,
    pub(super) dataset: &'a Dataset,
    pub(super) stages: &'a StageCache,
    pub(super) progress: bool,
    pub(super) weak_models: &'a [ModelRef],
    pub(super) strong: &'a ModelRef,
    pub(super) weak_names: &'a [String],
    pub(super) seed: u64,
    pub(super) data_hash: String,
    pub(super) weak_train_inputs: Vec<&'a str>,
    pub(super) weak_train_targets: Vec<&'a str>,
    pub(super) strong_inputs: Vec<&'a str>,
    /// The key of each weak model's fine-tuning on weak_train.
    pub(super) weak_train_keys: Vec<String>,
    /// Decoding's precision in stage keys ("" for f32).
    pub(super) decode_tag: String,
}

impl<'a> Seed<'a> {
    pub(super) fn weak_subject(&self, j: usize) -> Subject {
        Subject {
            seed: self.seed,
            model: self.weak_names[j].clone(),
            method: None,
            what: format!("weak {}", self.weak_names[j]),
        }
    }

    /// Weak model j, fine-tuned on weak_train (its saved adapters when present).
    pub(super) fn load_weak(&self, j: usize) -> Result<Seq2Seq> {
        trained(
            &self.weak_models[j],
            &self.weak_train_keys[j],
            (self.seed, &self.g.prompt, self.progress),
            (self.stages, "gen-weak-train", &self.weak_subject(j)),
            &|s2s| {
                ce_task(
                    s2s,
                    &self.weak_train_inputs,
                    &self.weak_train_targets,
                    vec![1.0; self.weak_train_inputs.len()],
                )
            },
        )
    }

    /// Every weak model's length-normalised log-likelihood of each candidate continuation of
    /// each strong_train input: result[i][c][j] for input i, candidate c, model j.
    pub(super) fn rescore(
        &self,
        candidates: &[Vec<String>],
        what: &str,
    ) -> Result<Vec<Vec<Vec<f64>>>> {
        let n = self.weak_models.len();
        let mut scores: Vec<Vec<Vec<f64>>> = candidates
            .iter()
            .map(|c| vec![vec![0.0; n]; c.len()])
            .collect();
        for j in 0..n {
            let start = std::time::Instant::now();
            let by_model = score_candidates(&self.load_weak(j)?, &self.strong_inputs, candidates)?;
            for (row, model_row) in scores.iter_mut().zip(by_model) {
                for (cell, v) in row.iter_mut().zip(model_row) {
                    cell[j] = v;
                }
            }
            eprintln!(
                "{what} by {}: {} candidates ({:.0} s)",
                self.weak_names[j],
                candidates.iter().map(Vec::len).sum::<usize>(),
                start.elapsed().as_secs_f64()
            );
        }
        Ok(scores)
    }
}

/// Stage `gen-weak` of every weak model: trained on weak_train, its n-best lists on
/// strong_train, scored on test. Returns the stages and their keys.
pub(super) fn weak_stages(s: &Seed, decode_json: &str) -> Result<(Vec<WeakStage>, Vec<String>)> {
    let g = s.g;
    let (mut stages, mut keys) = (Vec::new(), Vec::new());
    for (j, train_key) in s.weak_train_keys.iter().enumerate() {
        let key = stage_key(&["gen-weak", train_key, decode_json]);
        let name = &s.weak_names[j];
        let subject = Subject {
            seed: s.seed,
            model: name.clone(),
            method: None,
            what: format!("seed {}, weak[{}] {name}", s.seed, j + 1),
        };
        let (stage, _) = s.stages.get_or_compute("gen-weak", &key, &subject, || {
            let s2s = s.load_weak(j)?;
            let start = std::time::Instant::now();
            let results = s2s.generate_all(
                &s.strong_inputs,
                g.weak_beams,
                g.weak_beams,
                g.max_new_tokens,
                g.decode_batch,
                false,
                &format!("{name} n-best"),
                s.progress,
            )?;
            let nbest = results
                .into_iter()
                .map(|hyps| {
                    hyps.into_iter()
                        .map(|h| {
                            Ok(Hyp {
                                text: s2s.text_of(&h.tokens)?,
                                tokens: h.tokens,
                                logprobs: h.logprobs,
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?;
            let nbest_seconds = start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            let test = evaluate(
                &s2s,
                &s.dataset.test,
                g,
                &format!("{name} test"),
                s.progress,
            )?;
            eprintln!(
                "weak {name}: {}-best lists {nbest_seconds:.0} s, test {:.0} s",
                g.weak_beams,
                start.elapsed().as_secs_f64()
            );
            Ok(WeakStage { test, nbest })
        })?;
        log_trained(train_key, (s.stages, "gen-weak-train", &s.weak_subject(j)));
        eprintln!(
            "weak {name}: SLU-F1 {:.4} on test ({} unparsable)",
            stage.test.metrics.slu_f1, stage.test.unparsable
        );
        stages.push(stage);
        keys.push(key);
    }
    Ok((stages, keys))
}

/// Stage `gen-joint`: the pooled n-best lists rescored by every weak model.
pub(super) fn joint_stage(s: &Seed, weak: &[WeakStage], joint_key: &str) -> Result<JointStage> {
    let subject = Subject {
        seed: s.seed,
        model: "weak ensemble".into(),
        method: None,
        what: format!("seed {}", s.seed),
    };
    let (stage, _) = s
        .stages
        .get_or_compute("gen-joint", joint_key, &subject, || {
            let candidates: Vec<Vec<String>> = (0..s.strong_inputs.len())
                .map(|i| {
                    let lists: Vec<Vec<String>> = weak
                        .iter()
                        .map(|w| w.nbest[i].iter().map(|h| h.text.clone()).collect())
                        .collect();
                    let refs: Vec<&[String]> = lists.iter().map(Vec::as_slice).collect();
                    joint::pool_candidates(&refs)
                })
                .collect();
            let scores = s.rescore(&candidates, "joint rescoring")?;
            Ok(JointStage { candidates, scores })
        })?;
    Ok(stage)
}

/// The weak models' weights: learned from their agreement on the joint candidates (no ground
/// truth), uniform, or given.
pub(super) fn generation_weights(s: &Seed, joint: &JointStage, weak: &[WeakStage]) -> Vec<f64> {
    let n = s.weak_models.len();
    let agreement_inputs: Vec<AgreementInput> = (0..s.strong_inputs.len())
        .map(|i| AgreementInput {
            candidates: joint.candidates[i].clone(),
            scores: joint.scores[i].clone(),
            own_top: weak
                .iter()
                .map(|w| {
                    w.nbest[i]
                        .first()
                        .and_then(|h| joint.candidates[i].iter().position(|c| *c == h.text))
                        .unwrap_or(0)
                })
                .collect(),
        })
        .filter(|a| !a.candidates.is_empty())
        .collect();
    let learned = joint::agreement_weights(&agreement_inputs, n, 20);
    let weights: Vec<f64> = match &s.g.weights {
        // The length was checked with the config.
        Weights::Given(w) => w.clone(),
        Weights::Named(GenerationWeights::Agreement) => learned,
        Weights::Named(GenerationWeights::Uniform) => vec![1.0 / n as f64; n],
    };
    eprintln!(
        "weights: {}",
        s.weak_names
            .iter()
            .zip(&weights)
            .map(|(n, w)| format!("{n} {w:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    weights
}

/// Each weak model's top hypothesis of each strong_train input, bridged to the strong
/// tokenizer (token-level soft labels).
pub(super) fn bridged_targets(s: &Seed, weak: &[WeakStage]) -> Result<Vec<Vec<BridgedTarget>>> {
    let strong = &s.strong.tokenizer;
    let strong_eos = strong.eos_ids.first().copied();
    s.weak_models
        .iter()
        .zip(weak)
        .map(|(model, stage)| {
            stage
                .nbest
                .iter()
                .map(|list| match list.first() {
                    Some(h) => bridge(
                        &model.tokenizer,
                        &h.tokens,
                        &h.logprobs,
                        &model.tokenizer.eos_ids,
                        strong,
                        strong_eos,
                    ),
                    None => Ok(BridgedTarget {
                        text: String::new(),
                        tokens: strong_eos.into_iter().collect(),
                        unit_of: vec![0],
                        unit_scores: vec![0.0],
                    }),
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect()
}
