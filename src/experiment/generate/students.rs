//! The strong side of a generation run (stage 4): the ceiling and one student per method
//! (METHOD.md section 4), each a cached stage.

use super::models::*;
use super::weak::*;
use crate::config::generation;
use crate::eval::summary::pgr;
use crate::experiment::stages::{stage_key, Subject};
pub use crate::report::generate::{Eval, MethodResult};
use crate::seq2seq::bridge::BridgedTarget;
use crate::seq2seq::model::Seq2Seq;
use crate::seq2seq::tasks::{SoftItem, SoftLoss, SoftTask};
use crate::train::trainer::TrainTask;
use anyhow::Result;

/// What the strong model's stages (ceiling, students, preference) share.
pub(super) struct StrongStages<'a> {
    pub(super) s: &'a Seed<'a>,
    /// The key parts naming the weak stages, the joint stage and the settings with weights.
    pub(super) weak_all: String,
    pub(super) joint_key: String,
    pub(super) strong_json: String,
}

pub(super) type MakeTask<'t> = dyn Fn(&Seq2Seq) -> Result<Box<dyn TrainTask + '_>> + 't;

impl StrongStages<'_> {
    pub(super) fn student_key(&self, name: &str) -> String {
        let s = self.s;
        stage_key(&[
            "gen-student",
            name,
            &s.strong.key(),
            &s.data_hash,
            &self.weak_all,
            &self.joint_key,
            &self.strong_json,
        ])
    }

    pub(super) fn student_subject(&self, name: &str) -> Subject {
        Subject {
            seed: self.s.seed,
            model: self.s.strong.spec.label(),
            method: Some(name.to_string()),
            what: format!("student {name}"),
        }
    }

    /// Stage `gen-student`: the strong model fine-tuned on `make_task`'s task, scored on test.
    pub(super) fn train(&self, name: &str, make_task: &MakeTask) -> Result<Eval> {
        let s = self.s;
        let key = self.student_key(name);
        let label = s.strong.spec.label();
        let subject = Subject {
            seed: s.seed,
            model: label.clone(),
            method: Some(name.to_string()),
            what: format!("seed {}, strong {label}, method {name}", s.seed),
        };
        let (stage, _) = s.stages.get_or_compute("gen-student", &key, &subject, || {
            let s2s = trained(
                s.strong,
                &key,
                (s.seed, &s.g.prompt, s.progress),
                (s.stages, "gen-student", &self.student_subject(name)),
                make_task,
            )?;
            let start = std::time::Instant::now();
            let eval = evaluate(
                &s2s,
                &s.dataset.test,
                s.g,
                &format!("{name} test"),
                s.progress,
            )?;
            eprintln!("{name}: test {:.0} s", start.elapsed().as_secs_f64());
            Ok(eval)
        })?;
        log_trained(&key, (s.stages, "gen-student", &self.student_subject(name)));
        eprintln!(
            "{name}: SLU-F1 {:.4} on test ({} unparsable)",
            stage.metrics.slu_f1, stage.unparsable
        );
        Ok(stage)
    }
}

/// A method's result with its PGR against the mean and the best weak model.
pub(super) struct Scorer {
    pub(super) mean_weak: f64,
    pub(super) best_weak: f64,
    pub(super) ceiling: f64,
}

impl Scorer {
    pub(super) fn result(&self, method: String, test: Eval) -> MethodResult {
        MethodResult {
            method,
            pgr_vs_mean_weak: pgr(test.metrics.slu_f1, self.mean_weak, self.ceiling),
            pgr_vs_best_weak: pgr(test.metrics.slu_f1, self.best_weak, self.ceiling),
            test,
        }
    }
}

/// Every generation method's student (METHOD.md section 4).
pub(super) fn gen_students(
    st: &StrongStages,
    weak: &[WeakStage],
    (bridged, joint_targets, weights): (&[Vec<BridgedTarget>], &[String], &[f64]),
    scorer: &Scorer,
) -> Result<Vec<MethodResult>> {
    let (s, g) = (st.s, st.s.g);
    let strong_inputs = &s.strong_inputs;
    let soft_items = |s2s: &Seq2Seq, models: &[usize], weights: &[f64]| -> Result<Vec<SoftItem>> {
        let mut items = Vec::new();
        for (i, input) in strong_inputs.iter().enumerate() {
            let prompt = s2s.prompt_ids(input)?;
            for (&j, &w) in models.iter().zip(weights) {
                items.push(SoftItem {
                    prompt: prompt.clone(),
                    target: bridged[j][i].clone(),
                    weight: w as f32,
                });
            }
        }
        Ok(items)
    };
    let all_models: Vec<usize> = (0..s.weak_models.len()).collect();
    let evidence = evidence_of(g);
    let soft_loss = |method: generation::Method| match method {
        generation::Method::Edl => SoftLoss::Edl {
            c: g.edl_c,
            evidence,
        },
        generation::Method::EdlStep => SoftLoss::EdlStep {
            c: g.edl_c,
            evidence,
            a_max: g.edl_step_a_max,
            warmup: g.edl_step_warmup,
        },
        _ => SoftLoss::Kl,
    };
    let mut results = Vec::new();
    for &method in &g.methods {
        match method {
            generation::Method::Hard => {
                for (j, stage) in weak.iter().enumerate() {
                    let name = format!("hard[{}]", s.weak_names[j]);
                    let targets: Vec<&str> = stage
                        .nbest
                        .iter()
                        .map(|l| l.first().map_or("{}", |h| h.text.as_str()))
                        .collect();
                    let test = st.train(&name, &|s2s| {
                        ce_task(s2s, strong_inputs, &targets, vec![1.0; targets.len()])
                    })?;
                    results.push(scorer.result(name, test));
                }
            }
            generation::Method::Soft => {
                for (j, weak_name) in s.weak_names.iter().enumerate() {
                    let name = format!("soft[{weak_name}]");
                    let test = st.train(&name, &|s2s| {
                        Ok(Box::new(SoftTask {
                            model: s2s,
                            items: soft_items(s2s, &[j], &[1.0])?,
                            loss: SoftLoss::Kl,
                            share: g.share,
                            spread: g.spread,
                        }))
                    })?;
                    results.push(scorer.result(name, test));
                }
            }
            generation::Method::Joint => {
                let targets: Vec<&str> = joint_targets.iter().map(String::as_str).collect();
                let test = st.train("joint", &|s2s| {
                    ce_task(s2s, strong_inputs, &targets, vec![1.0; targets.len()])
                })?;
                results.push(scorer.result("joint".into(), test));
            }
            generation::Method::Naive | generation::Method::Edl | generation::Method::EdlStep => {
                let name = method.as_str();
                let test = st.train(name, &|s2s| {
                    Ok(Box::new(SoftTask {
                        model: s2s,
                        items: soft_items(s2s, &all_models, weights)?,
                        loss: soft_loss(method),
                        share: g.share,
                        spread: g.spread,
                    }))
                })?;
                results.push(scorer.result(name.into(), test));
            }
        }
    }
    Ok(results)
}
