//! The preference stage of a generation run (METHOD.md section 5): the student's n-best lists
//! ranked by the weak ensemble give chosen/rejected pairs, then conservative DPO trains the
//! student against itself as the reference.

use super::models::evaluate;
use super::students::StrongStages;
use super::weak::Seed;
use crate::config::DpoConfig;
use crate::experiment::stages::{stage_key, Subject};
use crate::report::generate::{Eval, PairRow};
use crate::seq2seq::joint;
use crate::seq2seq::model::Seq2Seq;
use crate::seq2seq::tasks::{sequence_logprobs, DpoEpochLog, DpoTask, Pair};
use crate::train::trainer::{train, TrainConfig};
use anyhow::{Context, Result};
use std::cell::RefCell;

/// The preference stage's result: its pairs as rows, the ties skipped, the log per epoch and
/// the policy's test evaluation.
pub(super) type DpoStage = (Vec<PairRow>, usize, Vec<DpoEpochLog>, Eval);

/// Stage `gen-dpo` (METHOD.md section 5): pairs from the student's n-best ranked by the weak
/// ensemble, then conservative DPO from the student itself as the reference.
pub(super) fn preference_stage(
    st: &StrongStages,
    d: &DpoConfig,
    weights: &[f64],
) -> Result<DpoStage> {
    let (s, g) = (st.s, st.s.g);
    let after = d.after.as_str();
    let student_key_after = st.student_key(after);
    let dpo_key = stage_key(&[
        "gen-dpo",
        &student_key_after,
        &serde_json::to_string(d)?,
        &st.weak_all,
    ]);
    let label = s.strong.spec.label();
    let subject = Subject {
        seed: s.seed,
        model: label.clone(),
        method: Some(format!("dpo after {after}")),
        what: format!("seed {}, strong {label}, after {after}", s.seed),
    };
    let (stage, _) = s.stages.get_or_compute("gen-dpo", &dpo_key, &subject, || {
        let policy = s.strong.load(s.seed, &g.prompt)?;
        policy
            .load_trainable(&s.stages.trained_path(&student_key_after))
            .context("the student before the preference stage")?;
        let (rows, pairs, skipped) = preference_pairs(s, &policy, d, weights)?;
        let task = DpoTask {
            model: &policy,
            pairs,
            beta: d.beta,
            eps: d.eps,
            batch: d.train.batch_size.max(1),
            log: RefCell::new(Vec::new()),
        };
        let mut epochs = Vec::new();
        if !task.pairs.is_empty() {
            epochs.push(task.measure(0)?);
            let config = TrainConfig {
                seed: s.seed,
                progress: s.progress,
                ..d.train.clone()
            };
            train(&task, &policy.model.vars, &config, None)
                .context("training the preference stage")?;
            epochs.extend(task.log.borrow().iter().cloned());
        }
        let test = evaluate(&policy, &s.dataset.test, g, "dpo test", s.progress)?;
        Ok((rows, skipped, epochs, test))
    })?;
    Ok(stage)
}

/// The preference pairs of the policy's n-best lists: the ensemble's best and worst of each
/// strong_train input (ties skipped), with the policy's reference log-probabilities.
fn preference_pairs(
    s: &Seed,
    policy: &Seq2Seq,
    d: &DpoConfig,
    weights: &[f64],
) -> Result<(Vec<PairRow>, Vec<Pair>, usize)> {
    let g = s.g;
    let nbest = policy.generate_all(
        &s.strong_inputs,
        d.beams,
        d.beams,
        g.max_new_tokens,
        g.decode_batch.div_ceil(2).max(1),
        g.stop_at_json,
        "student n-best",
        s.progress,
    )?;
    let candidates: Vec<Vec<(Vec<u32>, String)>> = nbest
        .iter()
        .map(|list| {
            let mut seen: Vec<(Vec<u32>, String)> = Vec::new();
            for h in list {
                let text = policy.text_of(&h.tokens)?;
                if !seen.iter().any(|(_, t)| *t == text) {
                    seen.push((h.tokens.clone(), text));
                }
            }
            Ok(seen)
        })
        .collect::<Result<_>>()?;
    let texts: Vec<Vec<String>> = candidates
        .iter()
        .map(|c| c.iter().map(|(_, t)| t.clone()).collect())
        .collect();
    let ensemble: Vec<Vec<f64>> = s
        .rescore(&texts, "preference scoring")?
        .iter()
        .map(|by_model| joint::combined(by_model, weights))
        .collect();
    let mut pairs = Vec::new();
    let mut rows = Vec::new();
    let mut skipped = 0usize;
    for (i, cands) in candidates.iter().enumerate() {
        match joint::preference_pair(&ensemble[i]) {
            None => skipped += 1,
            Some((c, r)) => {
                rows.push(PairRow {
                    seed: s.seed,
                    id: s.dataset.strong_train[i].id.clone(),
                    prompt: s.strong_inputs[i].to_string(),
                    chosen: cands[c].1.clone(),
                    rejected: cands[r].1.clone(),
                    chosen_score: ensemble[i][c],
                    rejected_score: ensemble[i][r],
                });
                pairs.push((
                    policy.prompt_ids(s.strong_inputs[i])?,
                    cands[c].0.clone(),
                    cands[r].0.clone(),
                ));
            }
        }
    }
    // Reference log-probabilities: a forward pass of the student as it is now.
    let mut with_refs = Vec::new();
    for chunk in pairs.chunks(8) {
        let p: Vec<Vec<u32>> = chunk.iter().map(|x| x.0.clone()).collect();
        let c: Vec<Vec<u32>> = chunk.iter().map(|x| x.1.clone()).collect();
        let r: Vec<Vec<u32>> = chunk.iter().map(|x| x.2.clone()).collect();
        let rc = sequence_logprobs(policy, &p, &c)?.to_vec1::<f32>()?;
        let rr = sequence_logprobs(policy, &p, &r)?.to_vec1::<f32>()?;
        for (k, (prompt, chosen, rejected)) in chunk.iter().enumerate() {
            with_refs.push(Pair {
                prompt: prompt.clone(),
                chosen: chosen.clone(),
                rejected: rejected.clone(),
                reference_chosen: rc[k],
                reference_rejected: rr[k],
            });
        }
    }
    eprintln!(
        "preference pairs: {} ({} prompts skipped: best and worst tie)",
        with_refs.len(),
        skipped
    );
    Ok((rows, with_refs, skipped))
}
