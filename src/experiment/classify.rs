//! `ws2s run` for classification with linear probes on cached frozen features (METHOD.md 1-3):
//! weak models trained on weak_train (ground truth) -> their soft labels on strong_train and test
//! -> the strong ceiling (ground truth of strong_train) -> the strong model trained per method on
//! the weak labels alone -> test metrics -> PGR against the mean and the best weak model ->
//! summary over seeds (mean, std, 95% bootstrap interval).

use super::learner::{describe_precision, examples_of, Fitted, Learner, Learners, Supervision};
use super::stages::{stage_key, StageCache, Subject};
use crate::config::{ClassifyWeights, ExperimentConfig, Method, ModelSpec, TrainingMode, Weights};
use crate::data::{Dataset, Example};
use crate::eval::classify::{classify_metrics, ClassifyMetrics, Prediction};
use crate::eval::summary::pgr;
use crate::home::Home;
use crate::losses;
pub use crate::report::classify::{
    markdown, Claim, Convergence, MethodResult, PairedReport, PairedRow, RunResults,
    SeedPredictions, SeedResult, Timing,
};
use crate::report::classify::{paired_statistics, summarise, write_outputs, LabelRow};
use crate::supervision::{dawid_skene, majority_vote, weighted_average};
use crate::train::convex::{Objective, SoftXent};
use crate::train::objectives::MethodObjective;
use crate::train::probe::Step;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

type Rows = Vec<Vec<f64>>;

/// Part of every stage key: bumped when what a stage stores changes, so that entries written by
/// an older build are recomputed rather than read with missing fields.
const STAGE_FORMAT: &str = "classify-stages-3";

/// A weak model's stage: its test metrics and probabilities, and its soft labels on
/// strong_train with their calibration against ground truth (for the report only).
#[derive(Serialize, serde::Deserialize)]
struct WeakStage {
    test: ClassifyMetrics,
    test_probs: Rows,
    strong_train: ClassifyMetrics,
    strong_train_labels: Rows,
    chosen_c: Option<f64>,
    /// The cross-validated log-loss on weak_train at the chosen C (no test data involved).
    cv_log_loss: Option<f64>,
    solves: Convergence,
}

/// The ceiling's stage.
#[derive(Serialize, serde::Deserialize)]
struct CeilingStage {
    test: ClassifyMetrics,
    test_probs: Rows,
    chosen_c: Option<f64>,
    solves: Convergence,
}

/// A student's stage: its result, its test probabilities and, for EDL, its Dirichlet confidence
/// alpha / S on strong_train.
#[derive(Serialize, serde::Deserialize)]
struct StudentStage {
    result: MethodResult,
    test_probs: Rows,
    confidence: Option<Rows>,
    solves: Convergence,
}

fn one_hot_rows(examples: &[Example], k: usize) -> Rows {
    examples
        .iter()
        .map(|e| {
            let class = e.label.class().unwrap_or(0);
            (0..k).map(|c| if c == class { 1.0 } else { 0.0 }).collect()
        })
        .collect()
}

fn to_tensor(rows: &Rows, device: &Device) -> Result<Tensor> {
    let k = rows.first().map_or(0, Vec::len);
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), k), device)?)
}

/// The rows `batch` of `tensor`, in the dtype of `like` (the logits).
fn batch_like(tensor: &Tensor, batch: &[usize], like: &Tensor) -> Result<Tensor> {
    let index: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
    Ok(tensor
        .index_select(&Tensor::from_vec(index, batch.len(), tensor.device())?, 0)?
        .to_dtype(like.dtype())?)
}

fn metrics_of(probs: &Tensor, examples: &[Example]) -> Result<(ClassifyMetrics, Rows)> {
    let rows: Rows = probs.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
    let predictions: Vec<Prediction> = rows
        .iter()
        .zip(examples)
        .map(|(p, e)| Prediction {
            label: e.label.class().unwrap_or(0),
            probs: p.clone(),
        })
        .collect();
    Ok((classify_metrics(&predictions)?, rows))
}

/// Trains a learner on ground truth (one-hot targets, cross-entropy; a probe's C chosen by
/// cross-validation on these labels).
fn fit_on_ground_truth<'l>(
    learner: &'l dyn Learner,
    train: &[Example],
    targets: &Rows,
    config: &crate::train::trainer::TrainConfig,
) -> Result<Fitted<'l>> {
    let tensor = to_tensor(targets, &Device::Cpu)?;
    let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
        Ok(losses::xent(
            logits,
            &batch_like(&tensor, step.batch, logits)?,
        )?)
    };
    let supervision = Supervision {
        loss: &loss,
        staged: false,
        targets,
        native: Some(&SoftXent { targets }),
    };
    learner.fit(train, &supervision, config)
}

/// The probe settings of one seed, and their JSON (part of every stage key).
fn probe_settings(
    config: &ExperimentConfig,
    seed: u64,
) -> Result<(crate::train::trainer::TrainConfig, String)> {
    let probe_config = crate::train::trainer::TrainConfig {
        seed,
        ..config.probe.clone()
    };
    let json = serde_json::to_string(&probe_config)?;
    Ok((probe_config, json))
}

/// A weak model's stage: trained on weak_train's ground truth, labelling strong_train and
/// test. Returns the stage and its key.
fn weak_stage(
    stages: &StageCache,
    learner: &dyn Learner,
    dataset: &Dataset,
    (classes, probe_json): (usize, &str),
    probe_config: &crate::train::trainer::TrainConfig,
    subject: &Subject,
) -> Result<(WeakStage, String)> {
    let key = stage_key(&[
        "weak",
        STAGE_FORMAT,
        &learner.key(),
        &dataset.data_hash(),
        probe_json,
    ]);
    let (stage, _) = stages.get_or_compute("weak", &key, subject, || {
        let targets = one_hot_rows(&dataset.weak_train, classes);
        let fitted = fit_on_ground_truth(learner, &dataset.weak_train, &targets, probe_config)?;
        let (test, test_probs) =
            metrics_of(&fitted.predictor.probs(&dataset.test)?, &dataset.test)?;
        let (strong_train, strong_train_labels) = metrics_of(
            &fitted.predictor.probs(&dataset.strong_train)?,
            &dataset.strong_train,
        )?;
        Ok(WeakStage {
            test,
            test_probs,
            strong_train,
            strong_train_labels,
            cv_log_loss: fitted.cv.as_ref().map(|cv| cv.chosen_score()),
            solves: Convergence::of(fitted.cv.as_ref()),
            chosen_c: fitted.cv.map(|cv| cv.chosen_c),
        })
    })?;
    Ok((stage, key))
}

fn weak_subject(seed: u64, j: usize, name: &str) -> Subject {
    Subject {
        seed,
        model: name.to_string(),
        method: None,
        what: format!("seed {seed}, weak[{}] {name}", j + 1),
    }
}

/// Each `[[weak]]` model's strength measured without test data: the cross-validated log-loss
/// of its probe on weak_train's ground truth at the chosen C, mean over seeds (lower is
/// stronger). The stages are the run's own weak stages (cached, reused by a later run).
pub fn ground_truth_cv(
    config: &ExperimentConfig,
    datasets: &[Dataset],
    (home, progress): (&Home, bool),
) -> Result<Vec<f64>> {
    let classes = datasets[0]
        .num_classes
        .context("ordering models by strength needs a classification task")?;
    let examples = examples_of(datasets);
    let timings = std::cell::RefCell::new(Vec::new());
    let learners = Learners::new(config, &examples, (home, progress, classes), &timings)?;
    let stages = StageCache::new(&home.stages());
    let names = config.weak_labels();
    let mut strength = Vec::new();
    for (j, spec) in config.weak.iter().enumerate() {
        let (learner, _) = learners
            .make(spec)
            .with_context(|| format!("stage `features` ({})", names[j]))?;
        let mut values = Vec::new();
        for dataset in datasets {
            let (probe_config, probe_json) = probe_settings(config, dataset.seed)?;
            let (stage, _) = weak_stage(
                &stages,
                learner.as_ref(),
                dataset,
                (classes, &probe_json),
                &probe_config,
                &weak_subject(dataset.seed, j, &names[j]),
            )?;
            values.push(stage.cv_log_loss.with_context(|| {
                format!(
                    "{}: no cross-validated loss (only linear probes have one)",
                    names[j]
                )
            })?);
        }
        strength.push(values.iter().sum::<f64>() / values.len() as f64);
    }
    Ok(strength)
}

/// What the stages of one seed share.
struct Seed<'a> {
    config: &'a ExperimentConfig,
    dataset: &'a Dataset,
    stages: &'a StageCache,
    classes: usize,
    probe_config: crate::train::trainer::TrainConfig,
    probe_json: String,
    data_hash: String,
}

impl<'a> Seed<'a> {
    fn new(
        config: &'a ExperimentConfig,
        dataset: &'a Dataset,
        stages: &'a StageCache,
        classes: usize,
    ) -> Result<Self> {
        let (probe_config, probe_json) = probe_settings(config, dataset.seed)?;
        Ok(Seed {
            config,
            dataset,
            stages,
            classes,
            probe_config,
            probe_json,
            data_hash: dataset.data_hash(),
        })
    }
}

/// The weak models' stages of one seed, in the config's order.
#[derive(Default)]
struct WeakSet {
    test: Vec<ClassifyMetrics>,
    /// Their labels scored against strong_train's ground truth (calibration report only).
    on_strong_train: Vec<ClassifyMetrics>,
    /// Their soft labels on strong_train: what the students learn from.
    labels: Vec<Rows>,
    test_probs: Vec<Rows>,
    chosen_c: Vec<Option<f64>>,
    cv_log_loss: Vec<Option<f64>>,
    keys: Vec<String>,
    solves: Convergence,
}

/// Stage `weak` of every weak model: trained on weak_train, labelling strong_train and test.
fn weak_set(seed: &Seed, learners: &[Box<dyn Learner>], names: &[String]) -> Result<WeakSet> {
    let mut set = WeakSet::default();
    for (j, learner) in learners.iter().enumerate() {
        let (stage, key) = weak_stage(
            seed.stages,
            learner.as_ref(),
            seed.dataset,
            (seed.classes, &seed.probe_json),
            &seed.probe_config,
            &weak_subject(seed.dataset.seed, j, &names[j]),
        )?;
        set.test.push(stage.test);
        set.on_strong_train.push(stage.strong_train);
        set.labels.push(stage.strong_train_labels);
        set.test_probs.push(stage.test_probs);
        set.chosen_c.push(stage.chosen_c);
        set.solves.add(stage.solves);
        set.cv_log_loss.push(stage.cv_log_loss);
        set.keys.push(key);
    }
    Ok(set)
}

/// Stage `ceiling`: the strong model trained on strong_train's ground truth.
fn ceiling_stage(seed: &Seed, strong: &dyn Learner, label: &str) -> Result<CeilingStage> {
    let dataset = seed.dataset;
    let key = stage_key(&[
        "ceiling",
        STAGE_FORMAT,
        &strong.key(),
        &seed.data_hash,
        &seed.probe_json,
    ]);
    let subject = Subject {
        seed: dataset.seed,
        model: label.to_string(),
        method: None,
        what: format!(
            "seed {}, strong {label}, trained on ground truth",
            dataset.seed
        ),
    };
    let (ceiling, _) = seed.stages.get_or_compute("ceiling", &key, &subject, || {
        let targets = one_hot_rows(&dataset.strong_train, seed.classes);
        let fitted =
            fit_on_ground_truth(strong, &dataset.strong_train, &targets, &seed.probe_config)?;
        let (test, test_probs) =
            metrics_of(&fitted.predictor.probs(&dataset.test)?, &dataset.test)?;
        Ok(CeilingStage {
            test,
            test_probs,
            solves: Convergence::of(fitted.cv.as_ref()),
            chosen_c: fitted.cv.map(|cv| cv.chosen_c),
        })
    })?;
    Ok(ceiling)
}

/// What the methods learn from, built from one seed's weak labels on strong_train (no ground
/// truth): the weights, the joint labels and the hard-label counts.
struct Targets {
    ds: dawid_skene::DawidSkene,
    weights: Vec<f64>,
    /// Each weak model's soft labels as a tensor.
    weak: Vec<Tensor>,
    average: Rows,
    /// sum_j w_j y_j (need not sum to 1): the naive loss as one cross-entropy target.
    naive: Rows,
    vote: Rows,
    /// The hard-label counts, normalised (what cross-validation scores against).
    count_shares: Rows,
    /// The hard-label counts [n][K].
    count_rows: Rows,
    joint_average: Tensor,
    joint_vote: Tensor,
    joint_ds: Tensor,
    counts: Tensor,
}

fn targets(seed: &Seed, weak: &[Rows]) -> Result<Targets> {
    let (classes, n) = (seed.classes, seed.dataset.strong_train.len());
    let device = Device::Cpu;
    let hard: Vec<Vec<usize>> = weak
        .iter()
        .map(|rows| {
            rows.iter()
                .map(|r| crate::eval::classify::argmax(r))
                .collect()
        })
        .collect();
    // Reliability learned from agreement (no ground truth).
    let ds = dawid_skene::fit(&hard, classes, 200);
    let weights: Vec<f64> = match &seed.config.methods.weights {
        Weights::Given(w) => w.clone(),
        Weights::Named(ClassifyWeights::DawidSkene) => {
            let total: f64 = ds.accuracy.iter().sum();
            ds.accuracy.iter().map(|a| a / total).collect()
        }
        Weights::Named(ClassifyWeights::Uniform) => vec![1.0 / weak.len() as f64; weak.len()],
    };
    let average = weighted_average(weak, &weights);
    // sum_j w_j CE(y_j, p) = CE(sum_j w_j y_j, p).
    let naive: Rows = (0..n)
        .map(|i| {
            (0..classes)
                .map(|c| weak.iter().zip(&weights).map(|(l, w)| w * l[i][c]).sum())
                .collect()
        })
        .collect();
    let vote = majority_vote(weak, &weights);
    let count_rows: Rows = (0..n)
        .map(|i| {
            let mut c = vec![0.0; classes];
            for model in &hard {
                c[model[i]] += 1.0;
            }
            c
        })
        .collect();
    let count_shares = count_rows
        .iter()
        .map(|c| {
            let total: f64 = c.iter().sum();
            c.iter().map(|v| v / total.max(1.0)).collect()
        })
        .collect();
    Ok(Targets {
        weak: weak
            .iter()
            .map(|r| to_tensor(r, &device))
            .collect::<Result<_>>()?,
        joint_average: to_tensor(&average, &device)?,
        joint_vote: to_tensor(&vote, &device)?,
        joint_ds: to_tensor(&ds.posteriors, &device)?,
        counts: to_tensor(&count_rows, &device)?,
        count_rows,
        ds,
        weights,
        average,
        naive,
        vote,
        count_shares,
    })
}

/// The strong model's students of one seed, in the order of `methods.list`.
#[derive(Default)]
struct Students {
    results: Vec<MethodResult>,
    test_probs: Vec<Rows>,
    /// The EDL student's Dirichlet confidence alpha / S on strong_train.
    confidence: Option<Rows>,
    solves: Convergence,
}

/// What a student's stage needs besides its supervision.
struct StudentContext<'a> {
    seed: &'a Seed<'a>,
    strong: &'a dyn Learner,
    strong_label: String,
    /// The stage key's parts that name its teachers, the strong model and the methods' settings.
    key_parts: [String; 3],
    evidence: crate::losses::Evidence,
    /// Mean and best weak test accuracy, and the ceiling's: the PGR references.
    references: (f64, f64, f64),
}

/// Stage `student`: the strong model trained on `supervision`.
fn student_stage(
    ctx: &StudentContext,
    name: &str,
    supervision: &Supervision,
    keep_confidence: bool,
) -> Result<StudentStage> {
    let (seed, dataset) = (ctx.seed, ctx.seed.dataset);
    let [weak_keys, strong_key, methods_json] = &ctx.key_parts;
    let key = stage_key(&[
        "student",
        STAGE_FORMAT,
        name,
        weak_keys,
        strong_key,
        &seed.data_hash,
        &seed.probe_json,
        methods_json,
    ]);
    let subject = Subject {
        seed: dataset.seed,
        model: ctx.strong_label.clone(),
        method: Some(name.to_string()),
        what: format!(
            "seed {}, strong {}, method {name}",
            dataset.seed, ctx.strong_label
        ),
    };
    let (stage, _) = seed.stages.get_or_compute("student", &key, &subject, || {
        let student = ctx
            .strong
            .fit(&dataset.strong_train, supervision, &seed.probe_config)?;
        let (test, test_probs) =
            metrics_of(&student.predictor.probs(&dataset.test)?, &dataset.test)?;
        let confidence = if keep_confidence {
            let alpha = losses::dirichlet_alpha(
                &student.predictor.logits(&dataset.strong_train)?,
                ctx.evidence,
            )?;
            let s = alpha.sum_keepdim(1)?;
            Some(
                alpha
                    .broadcast_div(&s)?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec2::<f64>()?,
            )
        } else {
            None
        };
        let (mean_weak, best_weak, ceiling) = ctx.references;
        let result = MethodResult {
            method: name.to_string(),
            pgr_vs_mean_weak: pgr(test.accuracy, mean_weak, ceiling),
            pgr_vs_best_weak: pgr(test.accuracy, best_weak, ceiling),
            test,
            chosen_c: student.cv.as_ref().map(|cv| cv.chosen_c),
        };
        Ok(StudentStage {
            result,
            test_probs,
            confidence,
            solves: Convergence::of(student.cv.as_ref()),
        })
    })?;
    Ok(stage)
}

/// Every method's student (METHOD.md section 3): the loss of each method on the weak labels.
fn students(
    ctx: &StudentContext,
    t: &Targets,
    weak: &WeakSet,
    weak_names: &[String],
) -> Result<Students> {
    let m = &ctx.seed.config.methods;
    let evidence = ctx.evidence;
    let mut out = Students::default();
    let mut train = |name: String, supervision: &Supervision, keep: bool| -> Result<()> {
        let stage = student_stage(ctx, &name, supervision, keep)?;
        if stage.confidence.is_some() {
            out.confidence = stage.confidence;
        }
        out.results.push(stage.result);
        out.test_probs.push(stage.test_probs);
        out.solves.add(stage.solves);
        Ok(())
    };
    let weak_batch = |step: &Step, logits: &Tensor| -> Result<Vec<Tensor>> {
        t.weak
            .iter()
            .map(|y| batch_like(y, step.batch, logits))
            .collect()
    };
    for &method in &m.list {
        match method {
            Method::Xent | Method::Logconf | Method::Product => {
                for (j, y) in t.weak.iter().enumerate() {
                    let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                        let target = batch_like(y, step.batch, logits)?;
                        let anchor = step.anchor.unwrap_or(logits);
                        Ok(match method {
                            Method::Xent => losses::xent(logits, &target)?,
                            Method::Logconf => {
                                let a =
                                    losses::ramp(step.progress, m.logconf_a_max, m.logconf_warmup);
                                losses::logconf_anchored(logits, anchor, &target, a)?
                            }
                            _ => losses::product_anchored(logits, anchor, &target)?,
                        })
                    };
                    let labels = &weak.labels[j][..];
                    let native: &dyn Objective = match method {
                        Method::Xent => &SoftXent { targets: labels },
                        Method::Logconf => &MethodObjective::Logconf {
                            weak: labels,
                            a_max: m.logconf_a_max,
                            warmup: m.logconf_warmup,
                        },
                        _ => &MethodObjective::Product { weak: labels },
                    };
                    let supervision = Supervision {
                        loss: &loss,
                        staged: method != Method::Xent,
                        targets: labels,
                        native: Some(native),
                    };
                    let name = format!("{}[{}]", method.as_str(), weak_names[j]);
                    train(name, &supervision, false)?;
                }
            }
            Method::Naive => {
                let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                    Ok(losses::naive_multi(
                        logits,
                        &weak_batch(step, logits)?,
                        &t.weights,
                    )?)
                };
                let supervision = Supervision {
                    loss: &loss,
                    staged: false,
                    targets: &t.average,
                    native: Some(&SoftXent { targets: &t.naive }),
                };
                train(method.as_str().into(), &supervision, false)?;
            }
            Method::JointAverage | Method::JointVote | Method::JointDawidSkene => {
                let (joint, rows) = match method {
                    Method::JointAverage => (&t.joint_average, &t.average),
                    Method::JointVote => (&t.joint_vote, &t.vote),
                    _ => (&t.joint_ds, &t.ds.posteriors),
                };
                let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                    Ok(losses::xent(
                        logits,
                        &batch_like(joint, step.batch, logits)?,
                    )?)
                };
                let supervision = Supervision {
                    loss: &loss,
                    staged: false,
                    targets: rows,
                    native: Some(&SoftXent { targets: rows }),
                };
                train(method.as_str().into(), &supervision, false)?;
            }
            Method::Edl | Method::EdlStep => {
                let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                    let targets = weak_batch(step, logits)?;
                    let lambda = losses::ramp(step.progress, m.edl_c, 1.0);
                    Ok(if method == Method::Edl {
                        losses::edl(logits, &targets, &t.weights, lambda, evidence)?
                    } else {
                        let a = losses::ramp(step.progress, m.edl_step_a_max, m.edl_step_warmup);
                        losses::edl_step_anchored(
                            logits,
                            step.anchor.unwrap_or(logits),
                            &targets,
                            &t.weights,
                            lambda,
                            a,
                            evidence,
                        )?
                    })
                };
                let native = MethodObjective::Edl {
                    weak: &weak.labels,
                    weights: &t.weights,
                    c: m.edl_c,
                    evidence,
                    step: (method == Method::EdlStep)
                        .then_some((m.edl_step_a_max, m.edl_step_warmup)),
                };
                let supervision = Supervision {
                    loss: &loss,
                    staged: true,
                    targets: &t.average,
                    native: Some(&native),
                };
                train(method.as_str().into(), &supervision, method == Method::Edl)?;
            }
            Method::DirichletMultinomial => {
                let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                    Ok(losses::dirichlet_multinomial(
                        logits,
                        &batch_like(&t.counts, step.batch, logits)?,
                        evidence,
                    )?)
                };
                let supervision = Supervision {
                    loss: &loss,
                    staged: false,
                    targets: &t.count_shares,
                    native: Some(&MethodObjective::DirichletMultinomial {
                        counts: &t.count_rows,
                        evidence,
                    }),
                };
                train(method.as_str().into(), &supervision, false)?;
            }
        }
    }
    Ok(out)
}

/// One seed's rows of `weak_labels.jsonl`: each strong_train example with every weak model's
/// label, the joint label, the Dawid-Skene posterior and the EDL student's confidence.
fn label_rows(
    dataset: &Dataset,
    weak_names: &[String],
    weak: &WeakSet,
    t: &Targets,
    confidence: Option<&Rows>,
) -> Vec<LabelRow> {
    dataset
        .strong_train
        .iter()
        .enumerate()
        .map(|(i, example)| {
            let labels: BTreeMap<String, Vec<f64>> = weak_names
                .iter()
                .zip(&weak.labels)
                .map(|(name, rows)| (name.clone(), rows[i].clone()))
                .collect();
            LabelRow {
                seed: dataset.seed,
                id: example.id.clone(),
                text: example.input.clone(),
                label: example.label.class(),
                weak: labels,
                joint: t.average[i].clone(),
                dawid_skene: t.ds.posteriors[i].clone(),
                bayesian_confidence: confidence.map(|c| c[i].clone()),
            }
        })
        .collect()
}

/// The learners of a run: every weak model's and the strong model's, with their models' hashes.
struct RunLearners {
    weak: Vec<Box<dyn Learner>>,
    weak_hashes: Vec<String>,
    strong: Box<dyn Learner>,
    strong_hash: String,
}

fn run_learners(
    learners: &Learners,
    config: &ExperimentConfig,
    strong: &ModelSpec,
) -> Result<RunLearners> {
    let (weak, weak_hashes) = config
        .weak
        .iter()
        .enumerate()
        .map(|(j, spec)| {
            learners
                .make(spec)
                .with_context(|| format!("stage `features` (weak[{}] {})", j + 1, spec.label()))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let (strong_learner, strong_hash) = learners
        .make(strong)
        .with_context(|| format!("stage `features` (strong {})", strong.label()))?;
    Ok(RunLearners {
        weak,
        weak_hashes,
        strong: strong_learner,
        strong_hash,
    })
}

/// One seed of a run: the weak models, the ceiling, the targets and every student.
fn run_seed(
    seed: &Seed,
    learners: &RunLearners,
    strong_label: &str,
) -> Result<(SeedResult, SeedPredictions, Vec<LabelRow>)> {
    let (config, dataset) = (seed.config, seed.dataset);
    let weak_names = config.weak_labels();
    let weak = weak_set(seed, &learners.weak, &weak_names)?;
    let ceiling = ceiling_stage(seed, learners.strong.as_ref(), strong_label)?;
    let t = targets(seed, &weak.labels)?;
    let accuracy: Vec<f64> = weak.test.iter().map(|m| m.accuracy).collect();
    let ctx = StudentContext {
        seed,
        strong: learners.strong.as_ref(),
        strong_label: strong_label.to_string(),
        key_parts: [
            weak.keys.join(","),
            learners.strong.key(),
            serde_json::to_string(&(&config.methods, &t.weights))?,
        ],
        evidence: config
            .methods
            .evidence
            .with_clamp(config.methods.evidence_clamp),
        references: (
            accuracy.iter().sum::<f64>() / accuracy.len() as f64,
            accuracy.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            ceiling.test.accuracy,
        ),
    };
    let students = students(&ctx, &t, &weak, &weak_names)?;
    let rows = label_rows(
        dataset,
        &weak_names,
        &weak,
        &t,
        students.confidence.as_ref(),
    );
    let predictions = SeedPredictions {
        seed: dataset.seed,
        test_ids: dataset.test.iter().map(|e| e.id.clone()).collect(),
        labels: dataset
            .test
            .iter()
            .map(|e| e.label.class().unwrap_or(0))
            .collect(),
        weak: weak.test_probs,
        ceiling: ceiling.test_probs,
        methods: students.test_probs,
    };
    let mut solves = weak.solves;
    solves.add(ceiling.solves);
    solves.add(students.solves);
    let result = SeedResult {
        seed: dataset.seed,
        data_hash: dataset.data_hash(),
        sizes: [
            dataset.weak_train.len(),
            dataset.strong_train.len(),
            dataset.test.len(),
            dataset.valid.len(),
        ],
        weak: weak.test,
        weak_on_strong_train: weak.on_strong_train,
        weak_chosen_c: weak.chosen_c,
        weak_cv_log_loss: weak.cv_log_loss,
        learned_reliability: t.ds.accuracy.clone(),
        weights: t.weights,
        ceiling: ceiling.test,
        ceiling_chosen_c: ceiling.chosen_c,
        probe_solves: solves,
        methods: students.results,
    };
    Ok((result, predictions, rows))
}

/// Runs the experiment on its datasets (one per seed, [`super::load_datasets`]) and writes
/// its outputs into `out`.
pub fn run(
    config: &ExperimentConfig,
    datasets: &[Dataset],
    out: &Path,
    (home, progress): (&Home, bool),
) -> Result<RunResults> {
    let strong_spec = config.strong_over_weak()?;
    let classes = datasets[0]
        .num_classes
        .context("`ws2s run` supports classification tasks so far")?;
    let examples = examples_of(datasets);
    let s = &datasets[0];
    eprintln!(
        "task {}: weak_train {} / strong_train {} / test {}; seeds {:?}; {} distinct examples",
        s.task,
        s.weak_train.len(),
        s.strong_train.len(),
        s.test.len(),
        config.seeds,
        examples.len()
    );
    let timings = std::cell::RefCell::new(Vec::new());
    let learners = Learners::new(config, &examples, (home, progress, classes), &timings)?;
    let run_learners = run_learners(&learners, config, strong_spec)?;
    let stages = StageCache::new(&home.stages());
    let (mut seed_results, mut predictions, mut label_rows) = (Vec::new(), Vec::new(), Vec::new());
    let probes_started = std::time::Instant::now();
    // Seeds are independent. With linear probes only they run side by side (their folds too),
    // which keeps both cores busy through each probe's serial refit; fine-tuning runs one seed
    // at a time (two trainings of a model at once would double the memory and share the
    // cores anyway). Results come back in seed order; the training log of this part is put
    // back in seed order below.
    let logged_before = stages.log().len();
    let probes_only = config
        .weak
        .iter()
        .chain([strong_spec])
        .all(|spec| spec.mode == TrainingMode::Probe);
    let one_seed = |dataset: &Dataset| -> Result<_> {
        let seed = Seed::new(config, dataset, &stages, classes)?;
        run_seed(&seed, &run_learners, &strong_spec.label())
    };
    let per_seed = if probes_only {
        datasets
            .par_iter()
            .map(one_seed)
            .collect::<Result<Vec<_>>>()?
    } else {
        datasets.iter().map(one_seed).collect::<Result<Vec<_>>>()?
    };
    for (result, seed_predictions, rows) in per_seed {
        seed_results.push(result);
        predictions.push(seed_predictions);
        label_rows.extend(rows);
    }
    let probe_seconds = probes_started.elapsed().as_secs_f64();
    eprintln!("probes: {} seeds in {probe_seconds:.0} s", datasets.len());
    let precision = learners.precision;
    let mut timings = timings.into_inner();
    timings.push(Timing {
        stage: format!("probes: {} seeds, every method", datasets.len()),
        seconds: probe_seconds,
        cached: false,
    });
    let summary = summarise(config, &seed_results);
    let paired = paired_statistics(config, &seed_results, &predictions);
    let models = super::model_list(
        config,
        run_learners.weak_hashes,
        (strong_spec.label(), run_learners.strong_hash),
    );
    let results = RunResults {
        config: config.clone(),
        provenance: datasets[0].provenance.clone(),
        models,
        seeds: seed_results,
        summary,
        paired,
        cpu: crate::runtime::cpu_description(),
        precision: describe_precision(precision),
        timings,
        label_names: datasets[0].label_names.clone(),
    };
    let mut log = stages.log();
    // Stable: each seed's lines keep the order its stages ran in.
    log[logged_before..].sort_by_key(|line| line.seed);
    write_outputs(out, &results, &label_rows, &predictions, &log)?;
    Ok(results)
}
