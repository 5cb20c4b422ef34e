//! `ws2s run` for generation tasks (SLURP slot filling; METHOD.md sections 4 and 5):
//! weak decoders fine-tuned on weak_train -> their n-best hypotheses (with per-token
//! log-probabilities) on strong_train and their test scores -> joint rescoring of the pooled
//! n-best lists by every weak model -> weights (by hand, uniform, or learned from agreement) ->
//! the strong ceiling and the strong model trained per method -> the preference stage
//! (conservative DPO) after the Bayesian student -> SLU-F1 and the other SLURP metrics on test,
//! PGR against the mean and the best weak model -> summary over seeds.
//!
//! Stages are cached like the classification pipeline's; trained adapters (or weights) are
//! kept beside the stage files so that later stages can reload a trained model.

use super::config::{
    default_lora, ExperimentConfig, GenMethod, GenerationConfig, GenerationWeights, ModelSpec,
    TrainingMode, Weights,
};
use super::stages::{stage_key, StageCache, Subject};
use crate::data::slurp::json_to_slots;
use crate::data::{Dataset, Example, Label};
use crate::eval::slurp::{slurp_metrics, SlotRecord};
use crate::eval::summary::pgr;
use crate::generation::bridge::{bridge, BridgedTarget};
use crate::generation::joint::{self, AgreementInput};
use crate::generation::seq2seq::Seq2Seq;
use crate::generation::tasks::{
    sequence_logprobs, CeTask, DpoTask, Pair, SoftItem, SoftLoss, SoftTask,
};
use crate::losses::Evidence;
use crate::models::params::Trainable;
use crate::models::tokenizer::Tokenizer;
use crate::models::{load_tokenizer, model_hash, resolve_model, ws2s_home};
pub use crate::report::generate::{
    markdown, DpoReport, GenEval, GenMethodResult, GenRunResults, GenSeedResult,
};
use crate::report::generate::{summarise, write_outputs};
use crate::train::trainer::{train, TrainConfig, TrainTask};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A generated hypothesis as stored in a stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hyp {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub text: String,
}

#[derive(Serialize, Deserialize)]
struct WeakStage {
    test: GenEval,
    /// Per strong_train example, the n-best list, best first.
    nbest: Vec<Vec<Hyp>>,
}

/// Joint rescoring: per strong_train example, the pooled candidates and each weak model's
/// length-normalised log-likelihood of each.
#[derive(Serialize, Deserialize)]
struct JointStage {
    candidates: Vec<Vec<String>>,
    scores: Vec<Vec<Vec<f64>>>,
}

fn trainable_of(spec: &ModelSpec) -> Result<Trainable> {
    Ok(match spec.mode {
        TrainingMode::Lora => Trainable::Lora(spec.lora.clone().unwrap_or_else(default_lora)),
        TrainingMode::Full => Trainable::All,
        TrainingMode::Probe => bail!(
            "model `{}`: generation needs mode = \"lora\" or \"full\" (a linear probe cannot generate)",
            spec.label()
        ),
    })
}

/// Training settings of a generation model: its own `train` section, else small LoRA defaults.
fn train_config(spec: &ModelSpec, seed: u64, progress: bool) -> TrainConfig {
    let own = spec.train.clone().unwrap_or(TrainConfig {
        epochs: 2,
        batch_size: 8,
        lr: 1e-3,
        ..TrainConfig::default()
    });
    TrainConfig {
        seed,
        progress,
        ..own
    }
}

/// A model of the run: where it is, its hash, its tokenizer.
struct ModelRef {
    spec: ModelSpec,
    path: PathBuf,
    hash: String,
    tokenizer: Tokenizer,
    device: candle_core::Device,
}

impl ModelRef {
    fn new(spec: &ModelSpec, device: &candle_core::Device) -> Result<ModelRef> {
        let path = resolve_model(&spec.model)?;
        let hash = model_hash(&path)?;
        let tokenizer = load_tokenizer(&path)?;
        trainable_of(spec)?;
        Ok(ModelRef {
            spec: spec.clone(),
            path,
            hash,
            tokenizer,
            device: device.clone(),
        })
    }

    fn key(&self) -> String {
        let settings = serde_json::to_string(&(&self.spec.mode, &self.spec.lora, &self.spec.train))
            .unwrap_or_default();
        format!(
            "{}|{settings}{}",
            self.hash,
            crate::runtime::stage_key_suffix(&self.device)
        )
    }

    fn load(&self, seed: u64, template: &str) -> Result<Seq2Seq> {
        Seq2Seq::load(
            &self.path,
            trainable_of(&self.spec)?,
            seed,
            template,
            &self.device,
        )
        .with_context(|| format!("loading {}", self.spec.label()))
    }
}

fn adapters_path(key: &str) -> PathBuf {
    ws2s_home()
        .join("stages")
        .join("trained")
        .join(format!("{key}.safetensors"))
}

/// The model trained under `key`: its saved trainable weights when present, else trained by
/// `make_task` now (and saved).
/// Its training steps go to the run's log under `stage` (and to a file beside the weights).
fn trained(
    model: &ModelRef,
    key: &str,
    (seed, template, progress): (u64, &str, bool),
    (stages, stage, subject): (&StageCache, &str, &Subject),
    make_task: &dyn Fn(&Seq2Seq) -> Result<Box<dyn TrainTask + '_>>,
) -> Result<Seq2Seq> {
    let s2s = model.load(seed, template)?;
    let path = adapters_path(key);
    let log_path = path.with_extension("log.jsonl");
    if path.exists() && s2s.load_trainable(&path).is_ok() {
        log_trained(key, (stages, stage, subject));
        return Ok(s2s);
    }
    let start = std::time::Instant::now();
    let config = train_config(&model.spec, seed, progress);
    let what = &subject.what;
    let steps = {
        let task = make_task(&s2s)?;
        let (report, steps) =
            crate::train::log::capture(|| train(task.as_ref(), &s2s.model.vars, &config, None));
        report.with_context(|| format!("training {what}"))?;
        steps
    };
    crate::io::write_atomic(&log_path, crate::train::log::to_jsonl(&steps).as_bytes())?;
    s2s.save_trainable(&path)?;
    stages.add_log(key, stage, subject, steps);
    eprintln!("trained {what} ({:.0} s)", start.elapsed().as_secs_f64());
    Ok(s2s)
}

/// Adds the saved training log of the model trained under `key` to the run's log (once), for
/// runs that reuse a stage without loading the model.
fn log_trained(key: &str, (stages, stage, subject): (&StageCache, &str, &Subject)) {
    let steps = crate::train::log::read_jsonl(&adapters_path(key).with_extension("log.jsonl"));
    stages.add_log(key, stage, subject, steps);
}

fn gold_records(test: &[Example]) -> Vec<SlotRecord> {
    test.iter()
        .map(|e| match &e.label {
            Label::Slots { entities, .. } => SlotRecord {
                id: e.id.clone(),
                entities: entities.clone(),
                scenario: None,
                action: None,
                intent: None,
            },
            other => SlotRecord {
                id: e.id.clone(),
                entities: other.target().and_then(json_to_slots).unwrap_or_default(),
                scenario: None,
                action: None,
                intent: None,
            },
        })
        .collect()
}

/// Length-normalised log-likelihood of every candidate continuation of every input under one
/// model: `result[i][c]` scores `candidates[i][c]` given `inputs[i]`.
fn score_candidates(
    s2s: &Seq2Seq,
    inputs: &[&str],
    candidates: &[Vec<String>],
) -> Result<Vec<Vec<f64>>> {
    let mut prompts = Vec::new();
    let mut conts = Vec::new();
    for (input, cands) in inputs.iter().zip(candidates) {
        let prompt = s2s.prompt_ids(input)?;
        for text in cands {
            prompts.push(prompt.clone());
            conts.push(s2s.target_ids(text)?);
        }
    }
    let mut flat = s2s.scores(&prompts, &conts, 16)?.into_iter();
    Ok(candidates
        .iter()
        .map(|cands| flat.by_ref().take(cands.len()).collect())
        .collect())
}

/// Scores generated texts against the test gold.
pub fn score_predictions(test: &[Example], predictions: Vec<String>) -> GenEval {
    let mut unparsable = 0;
    let records: Vec<SlotRecord> = test
        .iter()
        .zip(&predictions)
        .map(|(e, text)| {
            let entities = json_to_slots(text).unwrap_or_else(|| {
                unparsable += 1;
                Vec::new()
            });
            SlotRecord {
                id: e.id.clone(),
                entities,
                scenario: None,
                action: None,
                intent: None,
            }
        })
        .collect();
    let (metrics, _) = slurp_metrics(&gold_records(test), &records);
    GenEval {
        metrics,
        unparsable,
        predictions,
    }
}

fn evaluate(
    model: &Seq2Seq,
    test: &[Example],
    g: &GenerationConfig,
    label: &str,
    progress: bool,
) -> Result<GenEval> {
    let inputs: Vec<&str> = test.iter().map(|e| e.input.as_str()).collect();
    let results = model.generate_all(
        &inputs,
        g.test_beams,
        1,
        g.max_new_tokens,
        g.decode_batch,
        g.stop_at_json,
        label,
        progress,
    )?;
    let predictions = results
        .iter()
        .map(|h| match h.first() {
            Some(h) => model.text_of(&h.tokens),
            None => Ok(String::new()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(score_predictions(test, predictions))
}

fn target_of(e: &Example) -> Result<&str> {
    e.label
        .target()
        .with_context(|| format!("example {}: a generation task needs a target text", e.id))
}

fn evidence_of(g: &GenerationConfig) -> Evidence {
    g.evidence.with_clamp(g.evidence_clamp)
}

fn ce_task<'a>(
    model: &'a Seq2Seq,
    inputs: &[&str],
    targets: &[&str],
    weights: Vec<f32>,
) -> Result<Box<dyn TrainTask + 'a>> {
    let prompts = inputs
        .iter()
        .map(|i| model.prompt_ids(i))
        .collect::<Result<_>>()?;
    let targets = targets
        .iter()
        .map(|t| model.target_ids(t))
        .collect::<Result<_>>()?;
    Ok(Box::new(CeTask {
        model,
        prompts,
        targets,
        weights,
    }))
}

/// Runs a generation experiment and writes its outputs into `out`.
pub fn run(
    config: &ExperimentConfig,
    datasets: &[Dataset],
    out: &Path,
    progress: bool,
) -> Result<GenRunResults> {
    let started = std::time::Instant::now();
    let g = &config.generation;
    let strong_spec = config
        .strong
        .as_ref()
        .context("the config has no [strong] model")?;
    if config.weak.is_empty() {
        bail!("the config has no [[weak]] model");
    }
    let device = config.device.device()?;
    let weak_models: Vec<ModelRef> = config
        .weak
        .iter()
        .map(|spec| ModelRef::new(spec, &device))
        .collect::<Result<_>>()?;
    let strong = ModelRef::new(strong_spec, &device)?;
    let weak_names = config.weak_labels();
    let stages = StageCache::new(&ws2s_home().join("stages"));
    let decode_json = serde_json::to_string(&(
        &g.prompt,
        g.weak_beams,
        g.test_beams,
        g.max_new_tokens,
        g.stop_at_json,
    ))?;
    let mut seed_results = Vec::new();
    let mut label_rows: Vec<serde_json::Value> = Vec::new();
    let mut pair_rows: Vec<serde_json::Value> = Vec::new();
    for dataset in datasets {
        let seed = dataset.seed;
        let data_hash = dataset.data_hash();
        let weak_train_inputs: Vec<&str> = dataset
            .weak_train
            .iter()
            .map(|e| e.input.as_str())
            .collect();
        let weak_train_targets: Vec<&str> = dataset
            .weak_train
            .iter()
            .map(target_of)
            .collect::<Result<_>>()?;
        let strong_inputs: Vec<&str> = dataset
            .strong_train
            .iter()
            .map(|e| e.input.as_str())
            .collect();
        // 1. Weak models: trained on weak_train, n-best on strong_train, scored on test.
        let weak_train_keys: Vec<String> = weak_models
            .iter()
            .map(|m| stage_key(&["gen-weak-train", &m.key(), &data_hash, &g.prompt]))
            .collect();
        let weak_subject = |j: usize| Subject {
            seed,
            model: weak_names[j].clone(),
            method: None,
            what: format!("weak {}", weak_names[j]),
        };
        // Weak model j, fine-tuned on weak_train (its saved adapters when present).
        let load_weak = |j: usize| {
            trained(
                &weak_models[j],
                &weak_train_keys[j],
                (seed, &g.prompt, progress),
                (&stages, "gen-weak-train", &weak_subject(j)),
                &|s2s| {
                    ce_task(
                        s2s,
                        &weak_train_inputs,
                        &weak_train_targets,
                        vec![1.0; weak_train_inputs.len()],
                    )
                },
            )
        };
        // Every weak model's length-normalised log-likelihood of each candidate continuation of
        // each strong_train input: result[i][c][j] for input i, candidate c, model j.
        let rescore = |candidates: &[Vec<String>], what: &str| -> Result<Vec<Vec<Vec<f64>>>> {
            let mut scores: Vec<Vec<Vec<f64>>> = candidates
                .iter()
                .map(|c| vec![vec![0.0; weak_models.len()]; c.len()])
                .collect();
            for j in 0..weak_models.len() {
                let start = std::time::Instant::now();
                let by_model = score_candidates(&load_weak(j)?, &strong_inputs, candidates)?;
                for (row, model_row) in scores.iter_mut().zip(by_model) {
                    for (cell, v) in row.iter_mut().zip(model_row) {
                        cell[j] = v;
                    }
                }
                eprintln!(
                    "{what} by {}: {} candidates ({:.0} s)",
                    weak_names[j],
                    candidates.iter().map(Vec::len).sum::<usize>(),
                    start.elapsed().as_secs_f64()
                );
            }
            Ok(scores)
        };
        let mut weak_keys = Vec::new();
        let mut weak_stages: Vec<WeakStage> = Vec::new();
        for (j, train_key) in weak_train_keys.iter().enumerate() {
            let key = stage_key(&["gen-weak", train_key, &decode_json]);
            let name = &weak_names[j];
            let (stage, _) = stages.get_or_compute(
                "gen-weak",
                &key,
                &Subject {
                    seed,
                    model: name.clone(),
                    method: None,
                    what: format!("seed {seed}, weak[{}] {name}", j + 1),
                },
                || {
                    let s2s = load_weak(j)?;
                    let start = std::time::Instant::now();
                    let results = s2s.generate_all(
                        &strong_inputs,
                        g.weak_beams,
                        g.weak_beams,
                        g.max_new_tokens,
                        g.decode_batch,
                        false,
                        &format!("{name} n-best"),
                        progress,
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
                    let test = evaluate(&s2s, &dataset.test, g, &format!("{name} test"), progress)?;
                    eprintln!(
                        "weak {name}: {}-best lists {nbest_seconds:.0} s, test {:.0} s",
                        g.weak_beams,
                        start.elapsed().as_secs_f64()
                    );
                    Ok(WeakStage { test, nbest })
                },
            )?;
            log_trained(train_key, (&stages, "gen-weak-train", &weak_subject(j)));
            eprintln!(
                "weak {name}: SLU-F1 {:.4} on test ({} unparsable)",
                stage.test.metrics.slu_f1, stage.test.unparsable
            );
            weak_stages.push(stage);
            weak_keys.push(key);
        }
        let weak_stage_keys: Vec<&str> = weak_keys.iter().map(String::as_str).collect();
        // 2. Joint rescoring of the pooled n-best lists by every weak model.
        let joint_key = stage_key(&["gen-joint", &weak_stage_keys.join(",")]);
        let joint_subject = Subject {
            seed,
            model: "weak ensemble".into(),
            method: None,
            what: format!("seed {seed}"),
        };
        let (joint_stage, _) =
            stages.get_or_compute("gen-joint", &joint_key, &joint_subject, || {
                let candidates: Vec<Vec<String>> = (0..strong_inputs.len())
                    .map(|i| {
                        let lists: Vec<Vec<String>> = weak_stages
                            .iter()
                            .map(|s| s.nbest[i].iter().map(|h| h.text.clone()).collect())
                            .collect();
                        let refs: Vec<&[String]> = lists.iter().map(Vec::as_slice).collect();
                        joint::pool_candidates(&refs)
                    })
                    .collect();
                let scores = rescore(&candidates, "joint rescoring")?;
                Ok(JointStage { candidates, scores })
            })?;
        // 3. Weights.
        let agreement_inputs: Vec<AgreementInput> = (0..strong_inputs.len())
            .map(|i| AgreementInput {
                candidates: joint_stage.candidates[i].clone(),
                scores: joint_stage.scores[i].clone(),
                own_top: weak_stages
                    .iter()
                    .map(|s| {
                        s.nbest[i]
                            .first()
                            .and_then(|h| {
                                joint_stage.candidates[i].iter().position(|c| *c == h.text)
                            })
                            .unwrap_or(0)
                    })
                    .collect(),
            })
            .filter(|a| !a.candidates.is_empty())
            .collect();
        let learned = joint::agreement_weights(&agreement_inputs, weak_models.len(), 20);
        let weights: Vec<f64> = match &g.weights {
            // The length was checked with the config.
            Weights::Given(w) => w.clone(),
            Weights::Named(GenerationWeights::Agreement) => learned.clone(),
            Weights::Named(GenerationWeights::Uniform) => {
                vec![1.0 / weak_models.len() as f64; weak_models.len()]
            }
        };
        eprintln!(
            "weights: {}",
            weak_names
                .iter()
                .zip(&weights)
                .map(|(n, w)| format!("{n} {w:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let joint_targets: Vec<String> = (0..strong_inputs.len())
            .map(|i| {
                joint::pick(&joint_stage.scores[i], &weights)
                    .map(|c| joint_stage.candidates[i][c].clone())
                    .unwrap_or_else(|| "{}".to_string())
            })
            .collect();
        // Bridged weak hypotheses (top of each list) for the strong tokenizer.
        let strong_eos = strong.tokenizer.eos_ids.first().copied();
        let bridged: Vec<Vec<BridgedTarget>> = weak_models
            .iter()
            .zip(&weak_stages)
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
                            &strong.tokenizer,
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
            .collect::<Result<_>>()?;
        // 4. The strong ceiling and the students.
        let strong_json = serde_json::to_string(&(g, &weights))?;
        let weak_all = weak_stage_keys.join(",");
        let student_key = |name: &str| {
            stage_key(&[
                "gen-student",
                name,
                &strong.key(),
                &data_hash,
                &weak_all,
                &joint_key,
                &strong_json,
            ])
        };
        let student_subject = |name: &str| Subject {
            seed,
            model: strong.spec.label(),
            method: Some(name.to_string()),
            what: format!("student {name}"),
        };
        let train_student = |name: &str,
                             make_task: &dyn Fn(&Seq2Seq) -> Result<Box<dyn TrainTask + '_>>|
         -> Result<GenEval> {
            let key = student_key(name);
            let (stage, _) = stages.get_or_compute(
                "gen-student",
                &key,
                &Subject {
                    seed,
                    model: strong.spec.label(),
                    method: Some(name.to_string()),
                    what: format!("seed {seed}, strong {}, method {name}", strong.spec.label()),
                },
                || {
                    let s2s = trained(
                        &strong,
                        &key,
                        (seed, &g.prompt, progress),
                        (&stages, "gen-student", &student_subject(name)),
                        make_task,
                    )?;
                    let start = std::time::Instant::now();
                    let eval = evaluate(&s2s, &dataset.test, g, &format!("{name} test"), progress)?;
                    eprintln!("{name}: test {:.0} s", start.elapsed().as_secs_f64());
                    Ok(eval)
                },
            )?;
            log_trained(&key, (&stages, "gen-student", &student_subject(name)));
            eprintln!(
                "{name}: SLU-F1 {:.4} on test ({} unparsable)",
                stage.metrics.slu_f1, stage.unparsable
            );
            Ok(stage)
        };
        let gold_targets: Vec<&str> = dataset
            .strong_train
            .iter()
            .map(target_of)
            .collect::<Result<_>>()?;
        let ceiling = train_student("ceiling", &|s2s| {
            ce_task(
                s2s,
                &strong_inputs,
                &gold_targets,
                vec![1.0; strong_inputs.len()],
            )
        })?;
        let weak_f1: Vec<f64> = weak_stages.iter().map(|s| s.test.metrics.slu_f1).collect();
        let mean_weak = weak_f1.iter().sum::<f64>() / weak_f1.len() as f64;
        let best_weak = weak_f1.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let result_of = |method: String, test: GenEval| GenMethodResult {
            method,
            pgr_vs_mean_weak: pgr(test.metrics.slu_f1, mean_weak, ceiling.metrics.slu_f1),
            pgr_vs_best_weak: pgr(test.metrics.slu_f1, best_weak, ceiling.metrics.slu_f1),
            test,
        };
        let soft_items =
            |s2s: &Seq2Seq, models: &[usize], weights: &[f64]| -> Result<Vec<SoftItem>> {
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
        let all_models: Vec<usize> = (0..weak_models.len()).collect();
        let evidence = evidence_of(g);
        let soft_loss = |method: GenMethod| match method {
            GenMethod::Edl => SoftLoss::Edl {
                c: g.edl_c,
                evidence,
            },
            GenMethod::EdlStep => SoftLoss::EdlStep {
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
                GenMethod::Hard => {
                    for (j, stage) in weak_stages.iter().enumerate() {
                        let name = format!("hard[{}]", weak_names[j]);
                        let targets: Vec<&str> = stage
                            .nbest
                            .iter()
                            .map(|l| l.first().map_or("{}", |h| h.text.as_str()))
                            .collect();
                        let test = train_student(&name, &|s2s| {
                            ce_task(s2s, &strong_inputs, &targets, vec![1.0; targets.len()])
                        })?;
                        results.push(result_of(name, test));
                    }
                }
                GenMethod::Soft => {
                    for (j, weak_name) in weak_names.iter().enumerate() {
                        let name = format!("soft[{weak_name}]");
                        let test = train_student(&name, &|s2s| {
                            Ok(Box::new(SoftTask {
                                model: s2s,
                                items: soft_items(s2s, &[j], &[1.0])?,
                                loss: SoftLoss::Kl,
                                share: g.share,
                                spread: g.spread,
                            }))
                        })?;
                        results.push(result_of(name, test));
                    }
                }
                GenMethod::Joint => {
                    let targets: Vec<&str> = joint_targets.iter().map(String::as_str).collect();
                    let test = train_student("joint", &|s2s| {
                        ce_task(s2s, &strong_inputs, &targets, vec![1.0; targets.len()])
                    })?;
                    results.push(result_of("joint".into(), test));
                }
                GenMethod::Naive | GenMethod::Edl | GenMethod::EdlStep => {
                    let name = method.as_str();
                    let test = train_student(name, &|s2s| {
                        Ok(Box::new(SoftTask {
                            model: s2s,
                            items: soft_items(s2s, &all_models, &weights)?,
                            loss: soft_loss(method),
                            share: g.share,
                            spread: g.spread,
                        }))
                    })?;
                    results.push(result_of(name.into(), test));
                }
            }
        }
        // 5. The preference stage.
        let dpo = match &g.dpo {
            None => None,
            Some(d) => {
                let after = d.after.as_str();
                let Some(before) = results.iter().find(|r| r.method == after).cloned() else {
                    bail!("generation.dpo.after = {after:?} is not among generation.methods");
                };
                let student_key_after = student_key(after);
                let dpo_key = stage_key(&[
                    "gen-dpo",
                    &student_key_after,
                    &serde_json::to_string(d)?,
                    &weak_all,
                ]);
                let (stage, _) = stages.get_or_compute(
                    "gen-dpo",
                    &dpo_key,
                    &Subject {
                        seed,
                        model: strong.spec.label(),
                        method: Some(format!("dpo after {after}")),
                        what: format!("seed {seed}, strong {}, after {after}", strong.spec.label()),
                    },
                    || {
                        let policy = strong.load(seed, &g.prompt)?;
                        policy
                            .load_trainable(&adapters_path(&student_key_after))
                            .context("the student before the preference stage")?;
                        // Pairs: the student's n-best, ranked by the weak ensemble.
                        let nbest = policy.generate_all(
                            &strong_inputs,
                            d.beams,
                            d.beams,
                            g.max_new_tokens,
                            g.decode_batch.div_ceil(2).max(1),
                            g.stop_at_json,
                            "student n-best",
                            progress,
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
                        let ensemble: Vec<Vec<f64>> = rescore(&texts, "preference scoring")?
                            .iter()
                            .map(|by_model| joint::combined(by_model, &weights))
                            .collect();
                        let mut pairs = Vec::new();
                        let mut rows = Vec::new();
                        let mut skipped = 0usize;
                        for (i, cands) in candidates.iter().enumerate() {
                            match joint::preference_pair(&ensemble[i]) {
                                None => skipped += 1,
                                Some((c, r)) => {
                                    rows.push(serde_json::json!({
                                        "seed": seed,
                                        "id": dataset.strong_train[i].id,
                                        "prompt": strong_inputs[i],
                                        "chosen": cands[c].1,
                                        "rejected": cands[r].1,
                                        "chosen_score": ensemble[i][c],
                                        "rejected_score": ensemble[i][r],
                                    }));
                                    pairs.push((
                                        policy.prompt_ids(strong_inputs[i])?,
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
                            let rc = sequence_logprobs(&policy, &p, &c)?.to_vec1::<f32>()?;
                            let rr = sequence_logprobs(&policy, &p, &r)?.to_vec1::<f32>()?;
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
                        let task = DpoTask {
                            model: &policy,
                            pairs: with_refs,
                            beta: d.beta,
                            eps: d.eps,
                            batch: d.train.batch_size.max(1),
                            log: RefCell::new(Vec::new()),
                        };
                        let mut epochs = Vec::new();
                        if !task.pairs.is_empty() {
                            epochs.push(task.measure(0)?);
                            let config = TrainConfig {
                                seed,
                                progress,
                                ..d.train.clone()
                            };
                            train(&task, &policy.model.vars, &config, None)
                                .context("training the preference stage")?;
                            epochs.extend(task.log.borrow().iter().cloned());
                        }
                        let test = evaluate(&policy, &dataset.test, g, "dpo test", progress)?;
                        Ok((rows, skipped, epochs, test))
                    },
                )?;
                let (rows, skipped, epochs, test) = stage;
                let pairs = rows.len();
                pair_rows.extend(rows);
                let after_dpo = result_of(format!("{after}+dpo"), test);
                eprintln!(
                    "{after}+dpo: SLU-F1 {:.4} on test (before {:.4})",
                    after_dpo.test.metrics.slu_f1, before.test.metrics.slu_f1
                );
                Some(DpoReport {
                    after: after.to_string(),
                    pairs,
                    skipped_ties: skipped,
                    epochs,
                    before,
                    after_dpo,
                })
            }
        };
        if let Some(d) = &dpo {
            results.push(d.after_dpo.clone());
        }
        for (i, example) in dataset.strong_train.iter().enumerate() {
            let weak: BTreeMap<&String, &str> = weak_names
                .iter()
                .zip(&weak_stages)
                .map(|(name, s)| (name, s.nbest[i].first().map_or("", |h| h.text.as_str())))
                .collect();
            label_rows.push(serde_json::json!({
                "seed": seed,
                "id": example.id,
                "text": example.input,
                "label": example.label.target(),
                "weak": weak,
                "joint": joint_targets[i],
            }));
        }
        seed_results.push(GenSeedResult {
            seed,
            data_hash,
            sizes: [
                dataset.weak_train.len(),
                dataset.strong_train.len(),
                dataset.test.len(),
                dataset.valid.len(),
            ],
            weak: weak_stages.into_iter().map(|s| s.test).collect(),
            weights,
            ceiling,
            methods: results,
            dpo,
        });
    }
    let summary = summarise(config, &seed_results);
    let models = weak_names
        .iter()
        .cloned()
        .zip(weak_models.iter().map(|m| m.hash.clone()))
        .chain(std::iter::once((strong_spec.label(), strong.hash.clone())))
        .collect();
    let results = GenRunResults {
        config: config.clone(),
        provenance: datasets[0].provenance.clone(),
        models,
        seeds: seed_results,
        summary,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    write_outputs(out, &results, &label_rows, &pair_rows, &stages.log())?;
    Ok(results)
}
