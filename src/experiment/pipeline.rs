//! `ws2s run` for classification with linear probes on cached frozen features (METHOD.md 1-3):
//! weak models trained on weak_train (ground truth) -> their soft labels on strong_train and test
//! -> the strong ceiling (ground truth of strong_train) -> the strong model trained per method on
//! the weak labels alone -> test metrics -> PGR against the mean and the best weak model ->
//! summary over seeds (mean, std, 95% bootstrap interval).

use super::config::{
    default_lora, ClassifyWeights, ExperimentConfig, Method, ModelSpec, TrainingMode, Weights,
};
use super::learner::{FeatureTable, FinetuneLearner, Fitted, Learner, ProbeLearner, Supervision};
use super::stages::{stage_key, StageCache, Subject};
use crate::data::{Dataset, Example};
use crate::eval::classify::{classify_metrics, ClassifyMetrics, Prediction};
use crate::eval::paired::{average, Estimate, Outcomes, Resampler};
use crate::eval::summary::{pgr, Summary, SummaryBuilder, SummaryTable};
use crate::losses;
use crate::models::features::{extract, feature_key, load_cached, store_cached, FeatureOptions};
use crate::models::heads::Pooling;
use crate::models::params::Trainable;
use crate::models::{model_hash, resolve_model, ws2s_home, Model};
use crate::report::parquet::ColumnData;
use crate::supervision::{dawid_skene, majority_vote, weighted_average};
use crate::train::probe::Step;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
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

/// How many probe solves a stage ran, and how many stopped before the gradient tolerance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Convergence {
    pub solves: usize,
    pub unconverged: usize,
}

impl Convergence {
    fn of(cv: Option<&crate::train::convex::CvReport>) -> Self {
        cv.map_or_else(Self::default, |cv| Convergence {
            solves: cv.solves,
            unconverged: cv.unconverged,
        })
    }

    fn add(&mut self, other: Convergence) {
        self.solves += other.solves;
        self.unconverged += other.unconverged;
    }
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

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MethodResult {
    pub method: String,
    pub test: ClassifyMetrics,
    pub pgr_vs_mean_weak: Option<f64>,
    pub pgr_vs_best_weak: Option<f64>,
    /// The probe's C, chosen by cross-validation on the weak labels it learns from.
    pub chosen_c: Option<f64>,
}

/// Test-set probabilities of every model of one seed (written to `test_predictions.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct SeedPredictions {
    pub seed: u64,
    pub test_ids: Vec<String>,
    pub labels: Vec<usize>,
    pub weak: Vec<Rows>,
    pub ceiling: Rows,
    /// In the order of the seed's `methods`.
    pub methods: Vec<Rows>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    pub data_hash: String,
    pub sizes: [usize; 4],
    pub weak: Vec<ClassifyMetrics>,
    /// The weak models' labels on strong_train scored against its ground truth (calibration:
    /// ECE, Brier; ground truth used for this report only).
    pub weak_on_strong_train: Vec<ClassifyMetrics>,
    /// C of each weak model's probe, chosen by cross-validation on weak_train.
    pub weak_chosen_c: Vec<Option<f64>>,
    /// Each weak model's cross-validated log-loss on weak_train at that C.
    pub weak_cv_log_loss: Vec<Option<f64>>,
    /// Dawid-Skene accuracies estimated on strong_train without ground truth, per weak model.
    pub learned_reliability: Vec<f64>,
    /// The weights used by the multi-weak methods.
    pub weights: Vec<f64>,
    pub ceiling: ClassifyMetrics,
    pub ceiling_chosen_c: Option<f64>,
    /// Probe solves of this seed (all folds, grid values and refits) and how many stopped
    /// before the gradient tolerance.
    pub probe_solves: Convergence,
    pub methods: Vec<MethodResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResults {
    pub config: ExperimentConfig,
    pub provenance: String,
    pub models: Vec<(String, String)>,
    pub seeds: Vec<SeedResult>,
    pub summary: SummaryTable,
    pub paired: PairedReport,
    /// The CPU the run used (model name, vector extensions, threads).
    pub cpu: String,
    /// The number type of the frozen forward passes, and its kernel.
    pub precision: String,
    /// Wall time of each stage (feature extraction per model, the probes of all seeds).
    pub timings: Vec<Timing>,
    /// Users' files with string labels: class k is label_names[k] (sorted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_names: Option<Vec<String>>,
}

impl RunResults {
    /// The strong ceiling's margin over the best weak model, mean over seeds: how much room
    /// the run leaves for weak-to-strong.
    pub fn ceiling_margin(&self) -> f64 {
        let margins: Vec<f64> = self
            .seeds
            .iter()
            .map(|s| {
                s.ceiling.accuracy
                    - s.weak
                        .iter()
                        .map(|w| w.accuracy)
                        .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect();
        margins.iter().sum::<f64>() / margins.len().max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub stage: String,
    pub seconds: f64,
    /// Read from the cache instead of computed.
    pub cached: bool,
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
        xent_targets: Some(targets),
    };
    learner.fit(train, &supervision, config)
}

/// "int8 (vnni512 kernel)", "f32".
fn describe_precision(precision: crate::ops::Precision) -> String {
    match precision {
        crate::ops::Precision::F32 => "f32".into(),
        crate::ops::Precision::Int8 => format!("int8 ({} kernel)", precision.kernel()),
        crate::ops::Precision::Bf16 => "bf16 (GPU)".into(),
    }
}

/// Extracts (or reads from the cache) the features of every example for one model.
fn features_for(
    spec: &ModelSpec,
    examples: &BTreeMap<String, String>,
    (progress, precision): (bool, crate::ops::Precision),
    device: &Device,
    timings: &std::cell::RefCell<Vec<Timing>>,
) -> Result<FeatureTable> {
    let path = resolve_model(&spec.model)?;
    let hash = model_hash(&path)?;
    // The pooling default depends on the architecture, known from the model's config without
    // loading its weights; the cache is checked before the (slow) load.
    let pooling = match spec.pooling {
        Some(p) => p,
        None if crate::models::model_type(&path)? == "bert" => Pooling::Mean,
        None => Pooling::LastToken,
    };
    let options = FeatureOptions {
        pooling,
        max_tokens: spec.max_tokens,
        progress,
        precision,
        ..Default::default()
    };
    let ids: Vec<&str> = examples.keys().map(String::as_str).collect();
    let texts: Vec<&str> = examples.values().map(String::as_str).collect();
    let start = std::time::Instant::now();
    let cache_dir = ws2s_home().join("features");
    let key = feature_key(&hash, &ids, &texts, &options);
    let (features, hit) = match load_cached(&key, texts.len(), &cache_dir, &Device::Cpu) {
        Some(features) => (features, true),
        None => {
            let mut model = Model::load_as(&path, Trainable::Frozen, 0, device, precision.dtype())
                .with_context(|| format!("loading {}", spec.label()))?;
            model.network.set_precision(precision)?;
            // Extracted on the model's device; kept (and probed) on the CPU in f32.
            let features = extract(&model, &texts, &options, device)?
                .to_device(&Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?;
            store_cached(&key, &features, &cache_dir)?;
            (features, false)
        }
    };
    eprintln!(
        "features: {} ({} examples, {})",
        spec.label(),
        ids.len(),
        if hit {
            "cached".to_string()
        } else {
            format!("{:.0} s", start.elapsed().as_secs_f64())
        }
    );
    timings.borrow_mut().push(Timing {
        stage: format!("features: {}", spec.label()),
        seconds: start.elapsed().as_secs_f64(),
        cached: hit,
    });
    let row_of = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.to_string(), i))
        .collect();
    let key = format!("{hash}|{}|{}", pooling.as_str(), spec.max_tokens);
    Ok(FeatureTable {
        features,
        row_of,
        model_hash: hash,
        key,
    })
}

/// Builds each model's learner: a probe on its (cached) features, or a fine-tuning.
struct Learners<'a> {
    config: &'a ExperimentConfig,
    examples: &'a BTreeMap<String, String>,
    progress: bool,
    classes: usize,
    /// Models run on the configured device (bf16 on a GPU); probes and losses on the CPU.
    device: Device,
    precision: crate::ops::Precision,
    timings: &'a std::cell::RefCell<Vec<Timing>>,
}

impl<'a> Learners<'a> {
    fn new(
        config: &'a ExperimentConfig,
        examples: &'a BTreeMap<String, String>,
        (progress, classes): (bool, usize),
        timings: &'a std::cell::RefCell<Vec<Timing>>,
    ) -> Result<Self> {
        let device = config.device.device()?;
        let precision = config
            .precision
            .resolve_on(crate::ops::Purpose::Features, &device)?;
        Ok(Learners {
            config,
            examples,
            progress,
            classes,
            device,
            precision,
            timings,
        })
    }

    /// The learner of `spec` and its model's hash.
    fn make(&self, spec: &ModelSpec) -> Result<(Box<dyn Learner>, String)> {
        if spec.mode == TrainingMode::Probe {
            let table = features_for(
                spec,
                self.examples,
                (self.progress, self.precision),
                &self.device,
                self.timings,
            )?;
            let hash = table.model_hash.clone();
            let learner = ProbeLearner {
                table,
                classes: self.classes,
                solver: self.config.solver.clone(),
            };
            return Ok((Box::new(learner), hash));
        }
        let path = resolve_model(&spec.model)?;
        let hash = model_hash(&path)?;
        let lora = (spec.mode == TrainingMode::Lora)
            .then(|| spec.lora.clone().unwrap_or_else(default_lora));
        let learner = FinetuneLearner {
            device: self.device.clone(),
            path,
            model_hash: hash.clone(),
            lora,
            pooling: spec.pooling,
            max_tokens: spec.max_tokens,
            classes: self.classes,
            train: spec.train.clone(),
        };
        Ok((Box::new(learner), hash))
    }
}

/// Every example of every seed's splits, by id (features are extracted once per example).
fn examples_of(datasets: &[Dataset]) -> BTreeMap<String, String> {
    let mut examples = BTreeMap::new();
    for dataset in datasets {
        for split in [&dataset.weak_train, &dataset.strong_train, &dataset.test] {
            for e in split {
                examples.insert(e.id.clone(), e.input.clone());
            }
        }
    }
    examples
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
    progress: bool,
) -> Result<Vec<f64>> {
    let classes = datasets[0]
        .num_classes
        .context("ordering models by strength needs a classification task")?;
    let examples = examples_of(datasets);
    let timings = std::cell::RefCell::new(Vec::new());
    let learners = Learners::new(config, &examples, (progress, classes), &timings)?;
    let stages = StageCache::new(&ws2s_home().join("stages"));
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

/// Runs the experiment on its datasets (one per seed, [`super::load_datasets`]) and writes
/// its outputs into `out`.
pub fn run(
    config: &ExperimentConfig,
    datasets: &[Dataset],
    out: &Path,
    progress: bool,
) -> Result<RunResults> {
    let device = Device::Cpu;
    let strong_spec = config
        .strong
        .as_ref()
        .context("the config has no [strong] model")?;
    if config.weak.is_empty() {
        bail!("the config has no [[weak]] model");
    }
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
    let learners = Learners::new(config, &examples, (progress, classes), &timings)?;
    let precision = learners.precision;
    let learner_for = |spec: &ModelSpec| learners.make(spec);
    let (weak_learners, weak_hashes): (Vec<Box<dyn Learner>>, Vec<String>) = config
        .weak
        .iter()
        .enumerate()
        .map(|(j, spec)| {
            learner_for(spec)
                .with_context(|| format!("stage `features` (weak[{}] {})", j + 1, spec.label()))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let (strong_learner, strong_hash) = learner_for(strong_spec)
        .with_context(|| format!("stage `features` (strong {})", strong_spec.label()))?;
    let evidence = config
        .methods
        .evidence
        .with_clamp(config.methods.evidence_clamp);
    let stages = StageCache::new(&ws2s_home().join("stages"));
    let weak_names = config.weak_labels();
    let mut seed_results = Vec::new();
    let mut predictions = Vec::new();
    let mut label_rows: Vec<serde_json::Value> = Vec::new();
    let probes_started = std::time::Instant::now();
    for dataset in datasets {
        let (probe_config, probe_json) = probe_settings(config, dataset.seed)?;
        // Weak models: trained on weak_train, labelling strong_train and test.
        let data_hash = dataset.data_hash();
        let mut weak_metrics = Vec::new();
        let mut weak_calibration = Vec::new();
        let mut weak_labels: Vec<Rows> = Vec::new();
        let mut weak_test: Vec<Rows> = Vec::new();
        let mut weak_c = Vec::new();
        let mut convergence = Convergence::default();
        let mut weak_cv = Vec::new();
        let mut weak_keys = Vec::new();
        for (j, learner) in weak_learners.iter().enumerate() {
            let (stage, key) = weak_stage(
                &stages,
                learner.as_ref(),
                dataset,
                (classes, &probe_json),
                &probe_config,
                &weak_subject(dataset.seed, j, &weak_names[j]),
            )?;
            weak_metrics.push(stage.test);
            weak_calibration.push(stage.strong_train);
            weak_labels.push(stage.strong_train_labels);
            weak_test.push(stage.test_probs);
            weak_c.push(stage.chosen_c);
            convergence.add(stage.solves);
            weak_cv.push(stage.cv_log_loss);
            weak_keys.push(key);
        }
        let strong_key = strong_learner.key();
        let ceiling_key = stage_key(&[
            "ceiling",
            STAGE_FORMAT,
            &strong_key,
            &data_hash,
            &probe_json,
        ]);
        let ceiling_what = Subject {
            seed: dataset.seed,
            model: strong_spec.label(),
            method: None,
            what: format!(
                "seed {}, strong {}, trained on ground truth",
                dataset.seed,
                strong_spec.label()
            ),
        };
        let (ceiling, _) = stages.get_or_compute("ceiling", &ceiling_key, &ceiling_what, || {
            let targets = one_hot_rows(&dataset.strong_train, classes);
            let fitted = fit_on_ground_truth(
                strong_learner.as_ref(),
                &dataset.strong_train,
                &targets,
                &probe_config,
            )?;
            let (test, test_probs) =
                metrics_of(&fitted.predictor.probs(&dataset.test)?, &dataset.test)?;
            Ok(CeilingStage {
                test,
                test_probs,
                solves: Convergence::of(fitted.cv.as_ref()),
                chosen_c: fitted.cv.map(|cv| cv.chosen_c),
            })
        })?;
        convergence.add(ceiling.solves);
        // Reliability learned from agreement (no ground truth).
        let hard: Vec<Vec<usize>> = weak_labels
            .iter()
            .map(|rows| {
                rows.iter()
                    .map(|r| crate::eval::classify::argmax(r))
                    .collect()
            })
            .collect();
        let ds = dawid_skene::fit(&hard, classes, 200);
        let weights: Vec<f64> = match &config.methods.weights {
            Weights::Given(w) => w.clone(),
            Weights::Named(ClassifyWeights::DawidSkene) => {
                let total: f64 = ds.accuracy.iter().sum();
                ds.accuracy.iter().map(|a| a / total).collect()
            }
            Weights::Named(ClassifyWeights::Uniform) => {
                vec![1.0 / weak_learners.len() as f64; weak_learners.len()]
            }
        };
        let mean_weak =
            weak_metrics.iter().map(|m| m.accuracy).sum::<f64>() / weak_metrics.len() as f64;
        let best_weak = weak_metrics
            .iter()
            .map(|m| m.accuracy)
            .fold(f64::NEG_INFINITY, f64::max);
        let weak_tensors: Vec<Tensor> = weak_labels
            .iter()
            .map(|r| to_tensor(r, &device))
            .collect::<Result<_>>()?;
        let average_rows = weighted_average(&weak_labels, &weights);
        // sum_j w_j CE(y_j, p) = CE(sum_j w_j y_j, p): the naive loss as one (unnormalised) target.
        let naive_rows: Rows = (0..dataset.strong_train.len())
            .map(|i| {
                (0..classes)
                    .map(|c| {
                        weak_labels
                            .iter()
                            .zip(&weights)
                            .map(|(l, w)| w * l[i][c])
                            .sum()
                    })
                    .collect()
            })
            .collect();
        let vote_rows = majority_vote(&weak_labels, &weights);
        let joint_average = to_tensor(&average_rows, &device)?;
        let joint_vote = to_tensor(&vote_rows, &device)?;
        let joint_ds = to_tensor(&ds.posteriors, &device)?;
        let count_rows: Rows = (0..dataset.strong_train.len())
            .map(|i| {
                let mut c = vec![0.0; classes];
                for model in &hard {
                    c[model[i]] += 1.0;
                }
                c
            })
            .collect();
        let counts = to_tensor(&count_rows, &device)?;
        let count_targets: Rows = count_rows
            .iter()
            .map(|c| {
                let total: f64 = c.iter().sum();
                c.iter().map(|v| v / total.max(1.0)).collect()
            })
            .collect();
        let m = &config.methods;
        let mut results = Vec::new();
        let mut method_test = Vec::new();
        let mut bayesian_confidence: Option<Rows> = None;
        let methods_json = serde_json::to_string(&(&config.methods, &weights))?;
        let weak_keys = weak_keys.join(",");
        let mut train_student = |name: String,
                                 supervision: &Supervision,
                                 keep_confidence: bool|
         -> Result<()> {
            let key = stage_key(&[
                "student",
                STAGE_FORMAT,
                &name,
                &weak_keys,
                &strong_key,
                &data_hash,
                &probe_json,
                &methods_json,
            ]);
            let (stage, _) = stages.get_or_compute(
                "student",
                &key,
                &Subject {
                    seed: dataset.seed,
                    model: strong_spec.label(),
                    method: Some(name.clone()),
                    what: format!(
                        "seed {}, strong {}, method {name}",
                        dataset.seed,
                        strong_spec.label()
                    ),
                },
                || {
                    let student =
                        strong_learner.fit(&dataset.strong_train, supervision, &probe_config)?;
                    let (test, test_probs) =
                        metrics_of(&student.predictor.probs(&dataset.test)?, &dataset.test)?;
                    let confidence = if keep_confidence {
                        let alpha = losses::dirichlet_alpha(
                            &student.predictor.logits(&dataset.strong_train)?,
                            evidence,
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
                    let solves = Convergence::of(student.cv.as_ref());
                    let result = MethodResult {
                        method: name.clone(),
                        pgr_vs_mean_weak: pgr(test.accuracy, mean_weak, ceiling.test.accuracy),
                        pgr_vs_best_weak: pgr(test.accuracy, best_weak, ceiling.test.accuracy),
                        test,
                        chosen_c: student.cv.map(|cv| cv.chosen_c),
                    };
                    Ok(StudentStage {
                        result,
                        test_probs,
                        confidence,
                        solves,
                    })
                },
            )?;
            if stage.confidence.is_some() {
                bayesian_confidence = stage.confidence;
            }
            results.push(stage.result);
            method_test.push(stage.test_probs);
            convergence.add(stage.solves);
            Ok(())
        };
        for &method in &m.list {
            match method {
                Method::Xent | Method::Logconf | Method::Product => {
                    for (j, y) in weak_tensors.iter().enumerate() {
                        let name = format!("{}[{}]", method.as_str(), weak_names[j]);
                        let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                            let target = batch_like(y, step.batch, logits)?;
                            let anchor = step.anchor.unwrap_or(logits);
                            Ok(match method {
                                Method::Xent => losses::xent(logits, &target)?,
                                Method::Logconf => {
                                    let a = losses::ramp(
                                        step.progress,
                                        m.logconf_a_max,
                                        m.logconf_warmup,
                                    );
                                    losses::logconf_anchored(logits, anchor, &target, a)?
                                }
                                _ => losses::product_anchored(logits, anchor, &target)?,
                            })
                        };
                        let supervision = Supervision {
                            loss: &loss,
                            staged: method != Method::Xent,
                            targets: &weak_labels[j],
                            xent_targets: (method == Method::Xent).then_some(&weak_labels[j][..]),
                        };
                        train_student(name, &supervision, false)?;
                    }
                }
                Method::Naive => {
                    let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                        let targets: Vec<Tensor> = weak_tensors
                            .iter()
                            .map(|y| batch_like(y, step.batch, logits))
                            .collect::<Result<_>>()?;
                        Ok(losses::naive_multi(logits, &targets, &weights)?)
                    };
                    let supervision = Supervision {
                        loss: &loss,
                        staged: false,
                        targets: &average_rows,
                        xent_targets: Some(&naive_rows),
                    };
                    train_student(method.as_str().into(), &supervision, false)?;
                }
                Method::JointAverage | Method::JointVote | Method::JointDawidSkene => {
                    let (joint, rows) = match method {
                        Method::JointAverage => (&joint_average, &average_rows),
                        Method::JointVote => (&joint_vote, &vote_rows),
                        _ => (&joint_ds, &ds.posteriors),
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
                        xent_targets: Some(rows),
                    };
                    train_student(method.as_str().into(), &supervision, false)?;
                }
                Method::Edl | Method::EdlStep => {
                    let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                        let targets: Vec<Tensor> = weak_tensors
                            .iter()
                            .map(|y| batch_like(y, step.batch, logits))
                            .collect::<Result<_>>()?;
                        let lambda = losses::ramp(step.progress, m.edl_c, 1.0);
                        Ok(if method == Method::Edl {
                            losses::edl(logits, &targets, &weights, lambda, evidence)?
                        } else {
                            let a =
                                losses::ramp(step.progress, m.edl_step_a_max, m.edl_step_warmup);
                            losses::edl_step_anchored(
                                logits,
                                step.anchor.unwrap_or(logits),
                                &targets,
                                &weights,
                                lambda,
                                a,
                                evidence,
                            )?
                        })
                    };
                    let supervision = Supervision {
                        loss: &loss,
                        staged: true,
                        targets: &average_rows,
                        xent_targets: None,
                    };
                    train_student(method.as_str().into(), &supervision, method == Method::Edl)?;
                }
                Method::DirichletMultinomial => {
                    let loss = |logits: &Tensor, step: &Step| -> Result<Tensor> {
                        Ok(losses::dirichlet_multinomial(
                            logits,
                            &batch_like(&counts, step.batch, logits)?,
                            evidence,
                        )?)
                    };
                    let supervision = Supervision {
                        loss: &loss,
                        staged: false,
                        targets: &count_targets,
                        xent_targets: None,
                    };
                    train_student(method.as_str().into(), &supervision, false)?;
                }
            }
        }
        for (i, example) in dataset.strong_train.iter().enumerate() {
            let weak: BTreeMap<&String, &Vec<f64>> = weak_names
                .iter()
                .zip(&weak_labels)
                .map(|(name, rows)| (name, &rows[i]))
                .collect();
            label_rows.push(serde_json::json!({
                "seed": dataset.seed,
                "id": example.id,
                "text": example.input,
                "label": example.label.class(),
                "weak": weak,
                "joint": average_rows[i],
                "dawid_skene": ds.posteriors[i],
                "bayesian_confidence": bayesian_confidence.as_ref().map(|c| c[i].clone()),
            }));
        }
        predictions.push(SeedPredictions {
            seed: dataset.seed,
            test_ids: dataset.test.iter().map(|e| e.id.clone()).collect(),
            labels: dataset
                .test
                .iter()
                .map(|e| e.label.class().unwrap_or(0))
                .collect(),
            weak: weak_test,
            ceiling: ceiling.test_probs,
            methods: method_test,
        });
        seed_results.push(SeedResult {
            seed: dataset.seed,
            data_hash: dataset.data_hash(),
            sizes: [
                dataset.weak_train.len(),
                dataset.strong_train.len(),
                dataset.test.len(),
                dataset.valid.len(),
            ],
            weak: weak_metrics,
            weak_on_strong_train: weak_calibration,
            weak_chosen_c: weak_c,
            weak_cv_log_loss: weak_cv,
            learned_reliability: ds.accuracy.clone(),
            weights,
            ceiling: ceiling.test,
            ceiling_chosen_c: ceiling.chosen_c,
            probe_solves: convergence,
            methods: results,
        });
    }
    let probe_seconds = probes_started.elapsed().as_secs_f64();
    eprintln!("probes: {} seeds in {probe_seconds:.0} s", datasets.len());
    let mut timings = timings.into_inner();
    timings.push(Timing {
        stage: format!("probes: {} seeds, every method", datasets.len()),
        seconds: probe_seconds,
        cached: false,
    });
    let summary = summarise(config, &seed_results);
    let paired = paired_statistics(config, &seed_results, &predictions);
    let models = weak_names
        .iter()
        .cloned()
        .zip(weak_hashes)
        .chain(std::iter::once((strong_spec.label(), strong_hash)))
        .collect();
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
    write_outputs(out, &results, &label_rows, &predictions, &stages.log())?;
    Ok(results)
}

/// One method's paired comparisons (differences of test accuracy, 95% two-way bootstrap
/// intervals over test examples and seeds).
#[derive(Debug, Clone, Serialize)]
pub struct PairedRow {
    pub method: String,
    /// Its weak teacher (single-weak methods) or "mean weak" (multi-weak methods).
    pub reference: String,
    pub vs_reference: Option<Estimate>,
    /// PGR against the reference: (student - reference) / (ceiling - reference).
    pub pgr: Option<Estimate>,
    pub vs_naive: Option<Estimate>,
    pub vs_best_single: Option<Estimate>,
}

/// A claim of the paper with the measured difference it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub claim: String,
    /// "a - b" of the methods compared.
    pub comparison: String,
    pub estimate: Option<Estimate>,
    /// holds / not resolved / contradicted (interval above / across / below zero).
    pub verdict: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PairedReport {
    pub resamples: usize,
    /// "crossed" (one test set shared by all seeds) or "nested".
    pub design: String,
    /// The single-weak xent student whose teacher has the lowest cross-validated log-loss on
    /// weak_train (chosen without test data).
    pub best_single: Option<String>,
    pub rows: Vec<PairedRow>,
    pub claims: Vec<Claim>,
}

const PAIRED_RESAMPLES: usize = 2000;

fn correctness(probs: &Rows, labels: &[usize]) -> Vec<f64> {
    probs
        .iter()
        .zip(labels)
        .map(|(p, &y)| f64::from(crate::eval::classify::argmax(p) == y))
        .collect()
}

/// The teacher of a single-weak method `name[weak]`.
fn teacher_of(method: &str, weak_names: &[String]) -> Option<usize> {
    let inner = method.split_once('[')?.1.strip_suffix(']')?;
    weak_names.iter().position(|w| w == inner)
}

fn paired_statistics(
    config: &ExperimentConfig,
    seeds: &[SeedResult],
    predictions: &[SeedPredictions],
) -> PairedReport {
    let Some(first) = predictions.first() else {
        return PairedReport::default();
    };
    let weak_names = config.weak_labels();
    let shared = predictions.iter().all(|p| p.test_ids == first.test_ids);
    let sampler = Resampler::new(
        predictions.iter().map(|p| p.labels.len()).collect(),
        shared,
        PAIRED_RESAMPLES,
        config.seeds.first().copied().unwrap_or(0),
    );
    let outcomes = |pick: &dyn Fn(&SeedPredictions) -> &Rows| -> Outcomes {
        predictions
            .iter()
            .map(|p| correctness(pick(p), &p.labels))
            .collect()
    };
    let weak: Vec<Outcomes> = (0..weak_names.len())
        .map(|j| outcomes(&|p| &p.weak[j]))
        .collect();
    let mean_weak = average(&weak.iter().collect::<Vec<_>>());
    let ceiling = outcomes(&|p| &p.ceiling);
    let names: Vec<String> = seeds[0].methods.iter().map(|m| m.method.clone()).collect();
    let methods: Vec<Outcomes> = (0..names.len())
        .map(|k| outcomes(&|p| &p.methods[k]))
        .collect();
    let find = |name: &str| names.iter().position(|n| n == name);
    // The best single-weak student is chosen without test data: the xent student of the weak
    // model with the lowest cross-validated log-loss on weak_train (mean over seeds).
    let cv_of = |j: usize| -> f64 {
        let values: Vec<f64> = seeds
            .iter()
            .filter_map(|s| s.weak_cv_log_loss.get(j).copied().flatten())
            .collect();
        if values.is_empty() {
            f64::INFINITY
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        }
    };
    let best_single = names
        .iter()
        .enumerate()
        .filter_map(|(k, n)| {
            n.starts_with("xent[")
                .then(|| teacher_of(n, &weak_names))
                .flatten()
                .map(|j| (k, cv_of(j)))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| k);
    let naive = find("naive");
    let rows: Vec<PairedRow> = names
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let teacher = teacher_of(name, &weak_names);
            let (reference, reference_outcomes) = match teacher {
                Some(j) => (weak_names[j].clone(), &weak[j]),
                None => ("mean weak".to_string(), &mean_weak),
            };
            PairedRow {
                method: name.clone(),
                reference,
                vs_reference: sampler.difference(&methods[k], reference_outcomes),
                pgr: sampler.pgr(&methods[k], reference_outcomes, &ceiling),
                vs_naive: naive
                    .filter(|&n| n != k)
                    .and_then(|n| sampler.difference(&methods[k], &methods[n])),
                vs_best_single: best_single
                    .filter(|&b| b != k)
                    .and_then(|b| sampler.difference(&methods[k], &methods[b])),
            }
        })
        .collect();
    // Every claim is one of the rows' comparisons (the same bootstrap, not drawn again).
    let row = |name: &str| find(name).map(|k| &rows[k]);
    let claim = |text: String, comparison: String, estimate: Option<Estimate>| Claim {
        claim: text,
        comparison,
        verdict: estimate.map_or("undefined", |e| e.verdict()).into(),
        estimate,
    };
    let best_name = best_single.map(|k| names[k].as_str());
    let mut claims = Vec::new();
    for (text, a, b, pick) in [
        (
            "Bayesian multi-weak beats naive multi-weak",
            "edl",
            Some("naive"),
            (|r: &PairedRow| r.vs_naive) as fn(&PairedRow) -> Option<Estimate>,
        ),
        (
            "Naive multi-weak beats the best single-weak student",
            "naive",
            best_name,
            |r: &PairedRow| r.vs_best_single,
        ),
        (
            "Bayesian multi-weak beats the best single-weak student",
            "edl",
            best_name,
            |r: &PairedRow| r.vs_best_single,
        ),
        // The classification counterpart of joint decoding. The weighted-average joint label is
        // not used here: the cross-entropy is linear in its target, so with weights summing to 1
        // it is the naive loss exactly.
        (
            "Joint labels (Dawid-Skene posterior) beat naive multi-weak (classification counterpart of joint decoding)",
            "joint_dawid_skene",
            Some("naive"),
            |r: &PairedRow| r.vs_naive,
        ),
    ] {
        if let (Some(r), Some(b)) = (row(a), b) {
            if find(b).is_some() {
                claims.push(claim(text.into(), format!("{a} - {b}"), pick(r)));
            }
        }
    }
    for r in rows
        .iter()
        .filter(|r| r.method.starts_with("xent[") || r.method == "edl")
    {
        claims.push(claim(
            format!(
                "{} recovers part of the gap (beats {})",
                r.method, r.reference
            ),
            format!("{} - {}", r.method, r.reference),
            r.vs_reference,
        ));
    }
    PairedReport {
        resamples: PAIRED_RESAMPLES,
        design: if shared { "crossed" } else { "nested" }.into(),
        best_single: best_single.map(|k| names[k].clone()),
        rows,
        claims,
    }
}

fn estimate_cell(e: &Option<Estimate>) -> String {
    match e {
        Some(e) => format!("{:+.3} [{:+.3}, {:+.3}]", e.value, e.lo, e.hi),
        None => "undefined".into(),
    }
}

fn summarise(config: &ExperimentConfig, seeds: &[SeedResult]) -> SummaryTable {
    let mut b = SummaryBuilder::new(config.seeds.first().copied().unwrap_or(0));
    for (j, label) in config.weak_labels().iter().enumerate() {
        let name = format!("weak[{label}]");
        b.add(
            &name,
            "accuracy",
            seeds.iter().map(|s| s.weak[j].accuracy).collect(),
        );
        b.add(
            &name,
            "strong_train_ece",
            seeds
                .iter()
                .map(|s| s.weak_on_strong_train[j].ece)
                .collect(),
        );
        b.add(
            &name,
            "strong_train_brier",
            seeds
                .iter()
                .map(|s| s.weak_on_strong_train[j].brier)
                .collect(),
        );
        b.add(
            &name,
            "strong_train_accuracy",
            seeds
                .iter()
                .map(|s| s.weak_on_strong_train[j].accuracy)
                .collect(),
        );
        b.add(
            &name,
            "learned_reliability",
            seeds.iter().map(|s| s.learned_reliability[j]).collect(),
        );
    }
    b.add(
        "ceiling",
        "accuracy",
        seeds.iter().map(|s| s.ceiling.accuracy).collect(),
    );
    if let Some(first) = seeds.first() {
        for (k, method) in first.methods.iter().enumerate() {
            let column = |f: &dyn Fn(&MethodResult) -> Option<f64>| -> Vec<f64> {
                seeds.iter().filter_map(|s| f(&s.methods[k])).collect()
            };
            let name = &method.method;
            b.add(name, "accuracy", column(&|m| Some(m.test.accuracy)));
            b.add(name, "auroc", column(&|m| m.test.auroc));
            b.add(name, "ece", column(&|m| Some(m.test.ece)));
            b.add(name, "pgr_vs_mean_weak", column(&|m| m.pgr_vs_mean_weak));
            b.add(name, "pgr_vs_best_weak", column(&|m| m.pgr_vs_best_weak));
        }
    }
    b.table
}

pub(crate) fn cell(summary: Option<&Option<Summary>>) -> String {
    match summary.and_then(Option::as_ref) {
        None => "undefined".into(),
        Some(s) => match (s.std, s.ci95) {
            (Some(std), Some((lo, hi))) => {
                format!("{:.3} ± {:.3} [{:.3}, {:.3}]", s.mean, std, lo, hi)
            }
            _ => format!("{:.3}", s.mean),
        },
    }
}

/// The table a paper would print.
pub fn markdown(results: &RunResults) -> String {
    let c = &results.config;
    let sizes = results.seeds.first().map(|s| s.sizes).unwrap_or_default();
    let mut out = format!(
        "# {}\n\nTask `{}`: weak_train {}, strong_train {}, test {}; seeds {:?}.\n{}.\n\n\
         Linear probes on frozen features. Cells: mean ± std over seeds [95% bootstrap interval of the mean].\n\
         PGR = (student - weak) / (ceiling - weak), against the mean of the weak models' test accuracies and against the best one.\n\n",
        c.name, c.task.name, sizes[0], sizes[1], sizes[2], c.seeds, results.provenance
    );
    let chosen = |pick: &dyn Fn(&SeedResult) -> Option<f64>| -> String {
        let mut values: Vec<f64> = results.seeds.iter().filter_map(pick).collect();
        if values.is_empty() {
            return String::new();
        }
        values.sort_by(f64::total_cmp);
        format!("{:.2e}", values[values.len() / 2])
    };
    out.push_str(
        "Weak models: probes trained on weak_train (C chosen by 5-fold cross-validation on its ground truth; \
         median over seeds). Their labels on strong_train are what the students learn from; their \
         calibration there is measured against strong_train's ground truth (for this report only: \
         no student sees it).\n\n\
         | model | test accuracy | C | strong_train accuracy | strong_train ECE | strong_train Brier | learned reliability (Dawid-Skene) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (j, label) in c.weak_labels().iter().enumerate() {
        let row = &results.summary[&format!("weak[{label}]")];
        out.push_str(&format!(
            "| weak: {} | {} | {} | {} | {} | {} | {} |\n",
            label,
            cell(row.get("accuracy")),
            chosen(&|s| s.weak_chosen_c.get(j).copied().flatten()),
            cell(row.get("strong_train_accuracy")),
            cell(row.get("strong_train_ece")),
            cell(row.get("strong_train_brier")),
            cell(row.get("learned_reliability"))
        ));
    }
    let strong = c.strong.as_ref().map(ModelSpec::label).unwrap_or_default();
    out.push_str(&format!(
        "| ceiling: {strong} on ground truth | {} | {} | | | | |\n\n",
        cell(results.summary["ceiling"].get("accuracy")),
        chosen(&|s| s.ceiling_chosen_c)
    ));
    let grid = c.solver.grid();
    let edge = |v: Option<f64>| {
        v.is_some_and(|v| grid.len() > 1 && (v == grid[0] || v == grid[grid.len() - 1]))
    };
    // Probe name -> the seeds where its C landed on the grid's edge.
    let mut edge_seeds: Vec<(String, Vec<u64>)> = Vec::new();
    let mut mark = |name: String, seed: u64| match edge_seeds.iter_mut().find(|(n, _)| *n == name) {
        Some((_, seeds)) => seeds.push(seed),
        None => edge_seeds.push((name, vec![seed])),
    };
    for s in &results.seeds {
        let weak = c.weak_labels();
        for (j, v) in s.weak_chosen_c.iter().enumerate() {
            if edge(*v) {
                mark(format!("weak {}", weak[j]), s.seed);
            }
        }
        if edge(s.ceiling_chosen_c) {
            mark("ceiling".into(), s.seed);
        }
        for m in &s.methods {
            if edge(m.chosen_c) {
                mark(m.method.clone(), s.seed);
            }
        }
    }
    let at_edge: Vec<String> = edge_seeds
        .iter()
        .map(|(name, seeds)| format!("{name} (seeds {seeds:?})"))
        .collect();
    if !at_edge.is_empty() {
        out.push_str(&format!(
            "Note: C was chosen at the edge of the grid [{:.1e}, {:.1e}] for {}; widen `[solver]` c_min / c_max to see whether the optimum lies beyond it.\n\n",
            grid[0],
            grid[grid.len() - 1],
            at_edge.join(", ")
        ));
    }
    let mut solves = Convergence::default();
    for s in &results.seeds {
        solves.add(s.probe_solves);
    }
    if solves.solves > 0 {
        out.push_str(&format!(
            "Solver: {} probe solves (every fold, grid value and refit), {} of them stopped before \
             the gradient tolerance {:.0e} (at max_iter {} or a failed line search).\n\n",
            solves.solves, solves.unconverged, c.solver.tol, c.solver.max_iter
        ));
    }
    out.push_str("Students: the strong model's probe trained on the weak labels alone, C chosen by cross-validation on those labels.\n\n");
    out.push_str("| method | test accuracy | C | AUROC | ECE | PGR vs mean weak | PGR vs best weak |\n|---|---|---|---|---|---|---|\n");
    if let Some(first) = results.seeds.first() {
        for (k, method) in first.methods.iter().enumerate() {
            let row = &results.summary[&method.method];
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                method.method,
                cell(row.get("accuracy")),
                chosen(&|s| s.methods.get(k).and_then(|m| m.chosen_c)),
                cell(row.get("auroc")),
                cell(row.get("ece")),
                cell(row.get("pgr_vs_mean_weak")),
                cell(row.get("pgr_vs_best_weak"))
            ));
        }
    }
    if !results.timings.is_empty() {
        out.push_str(&format!(
            "\nRan on: {}; frozen forward passes in {}.\n\n| stage | wall time |\n|---|---|\n",
            results.cpu, results.precision
        ));
        for t in &results.timings {
            out.push_str(&format!(
                "| {} | {} |\n",
                t.stage,
                if t.cached {
                    "cached".to_string()
                } else {
                    format!("{:.0} s", t.seconds)
                }
            ));
        }
    }
    let p = &results.paired;
    if !p.rows.is_empty() {
        out.push_str(&format!(
            "\n## Paired differences\n\nDifferences of test accuracy, computed per test example and seed \
             (the same examples for every model), with 95% percentile intervals of a two-way bootstrap \
             ({} resamples; seeds and test examples drawn with replacement, design: {}). \
             Reference: the student's weak teacher, or the mean of the weak models for multi-weak methods. \
             Best single-weak student: {}, the student of the weak model with the lowest cross-validated \
             log-loss on weak_train (chosen without test data).\n\n\
             | method | reference | vs reference | PGR vs reference | vs naive | vs best single-weak |\n\
             |---|---|---|---|---|---|\n",
            p.resamples,
            p.design,
            p.best_single.as_deref().unwrap_or("none")
        ));
        for r in &p.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.method,
                r.reference,
                estimate_cell(&r.vs_reference),
                estimate_cell(&r.pgr),
                estimate_cell(&r.vs_naive),
                estimate_cell(&r.vs_best_single)
            ));
        }
    }
    if !p.claims.is_empty() {
        out.push_str(
            "\n## Claims\n\nEach claim of the paper as a paired difference of test accuracy \
             (95% interval as above): holds when the interval is above zero, contradicted when it \
             is below, not resolved when it contains zero.\n\n\
             | claim | comparison | difference [95% interval] | verdict |\n|---|---|---|---|\n",
        );
        for claim in &p.claims {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                claim.claim,
                claim.comparison,
                estimate_cell(&claim.estimate),
                claim.verdict
            ));
        }
    }
    out
}

/// Accuracy per method (with the weak models and the ceiling as reference lines) and PGR per
/// method, error bars the 95% bootstrap intervals over seeds.
fn plots(results: &RunResults) -> Vec<(&'static str, String)> {
    let methods: Vec<String> = results
        .seeds
        .first()
        .map(|s| s.methods.iter().map(|m| m.method.clone()).collect())
        .unwrap_or_default();
    metric_plots(
        &results.summary,
        &results.config.weak_labels(),
        &methods,
        ("accuracy", "Test accuracy per method", "test accuracy"),
    )
}

/// Two plots of a run: `metric` per method with the strong ceiling, the best and the mean weak
/// model as reference lines (file name = the metric), and PGR against the best weak model per
/// method (`pgr`); error bars are the 95% bootstrap intervals over seeds.
pub(crate) fn metric_plots(
    summary: &SummaryTable,
    weak_labels: &[String],
    methods: &[String],
    (metric, title, y_label): (&'static str, &str, &str),
) -> Vec<(&'static str, String)> {
    use crate::report::plot::{bar_chart, Bar, Reference};
    let mean_of = |name: &str, m: &str| {
        summary
            .get(name)
            .and_then(|r| r.get(m))
            .and_then(Option::as_ref)
            .map(|s| (s.mean, s.ci95))
    };
    let bars = |m: &str| -> Vec<Bar> {
        methods
            .iter()
            .filter_map(|name| {
                mean_of(name, m).map(|(value, interval)| Bar {
                    label: name.clone(),
                    value,
                    interval,
                })
            })
            .collect()
    };
    let weak: Vec<f64> = weak_labels
        .iter()
        .filter_map(|l| mean_of(&format!("weak[{l}]"), metric).map(|v| v.0))
        .collect();
    let mut references = Vec::new();
    if let Some((ceiling, _)) = mean_of("ceiling", metric) {
        references.push(Reference {
            label: "strong ceiling".into(),
            value: ceiling,
            color: "#d62728",
        });
    }
    if !weak.is_empty() {
        references.push(Reference {
            label: "best weak".into(),
            value: weak.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            color: "#2ca02c",
        });
        references.push(Reference {
            label: "mean weak".into(),
            value: weak.iter().sum::<f64>() / weak.len() as f64,
            color: "#ff7f0e",
        });
    }
    vec![
        (
            metric,
            bar_chart(title, y_label, &bars(metric), &references),
        ),
        (
            "pgr",
            bar_chart(
                "Performance gap recovered (vs best weak)",
                "PGR vs best weak",
                &bars("pgr_vs_best_weak"),
                &[
                    Reference {
                        label: "weak".into(),
                        value: 0.0,
                        color: "#2ca02c",
                    },
                    Reference {
                        label: "ceiling".into(),
                        value: 1.0,
                        color: "#d62728",
                    },
                ],
            ),
        ),
    ]
}

/// The weak labels as flat columns: seed, id, text, label, then one probability column per
/// weak model and class (`weak:{name}:p{k}`), the joint label, the Dawid-Skene posterior and the
/// Bayesian (EDL) confidence.
fn label_columns(results: &RunResults, rows: &[serde_json::Value]) -> Vec<(String, ColumnData)> {
    let classes = rows
        .first()
        .and_then(|r| r["joint"].as_array())
        .map_or(0, Vec::len);
    let int = |r: &serde_json::Value, key: &str| r[key].as_i64();
    let prob = |v: &serde_json::Value, k: usize| v.get(k).and_then(serde_json::Value::as_f64);
    let mut columns = vec![
        (
            "seed".to_string(),
            ColumnData::Int64(rows.iter().map(|r| int(r, "seed").unwrap_or(0)).collect()),
        ),
        (
            "id".to_string(),
            ColumnData::Utf8(
                rows.iter()
                    .map(|r| r["id"].as_str().unwrap_or("").to_string())
                    .collect(),
            ),
        ),
        (
            "text".to_string(),
            ColumnData::Utf8(
                rows.iter()
                    .map(|r| r["text"].as_str().unwrap_or("").to_string())
                    .collect(),
            ),
        ),
        (
            "label".to_string(),
            ColumnData::OptionalInt64(rows.iter().map(|r| int(r, "label")).collect()),
        ),
    ];
    for name in results.config.weak_labels() {
        for k in 0..classes {
            let values = rows
                .iter()
                .map(|r| prob(&r["weak"][&name], k).unwrap_or(f64::NAN))
                .collect();
            columns.push((format!("weak:{name}:p{k}"), ColumnData::Double(values)));
        }
    }
    for field in ["joint", "dawid_skene"] {
        for k in 0..classes {
            let values = rows
                .iter()
                .map(|r| prob(&r[field], k).unwrap_or(f64::NAN))
                .collect();
            columns.push((format!("{field}:p{k}"), ColumnData::Double(values)));
        }
    }
    for k in 0..classes {
        let values = rows
            .iter()
            .map(|r| prob(&r["bayesian_confidence"], k))
            .collect();
        columns.push((
            format!("bayesian_confidence:p{k}"),
            ColumnData::OptionalDouble(values),
        ));
    }
    columns
}

fn write_outputs(
    out: &Path,
    results: &RunResults,
    label_rows: &[serde_json::Value],
    predictions: &[SeedPredictions],
    log: &[crate::train::log::LogLine],
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::io::write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    let training = crate::report::loss::write(out, log)?;
    crate::io::write_atomic(
        &out.join("results.md"),
        (markdown(results) + &training).as_bytes(),
    )?;
    let mut jsonl = String::new();
    for row in label_rows {
        jsonl.push_str(&serde_json::to_string(row)?);
        jsonl.push('\n');
    }
    crate::io::write_atomic(&out.join("weak_labels.jsonl"), jsonl.as_bytes())?;
    let mut lines = String::new();
    for seed in predictions {
        lines.push_str(&serde_json::to_string(seed)?);
        lines.push('\n');
    }
    crate::io::write_atomic(&out.join("test_predictions.jsonl"), lines.as_bytes())?;
    crate::report::parquet::write(
        &out.join("weak_labels.parquet"),
        &label_columns(results, label_rows),
    )?;
    for (name, svg) in plots(results) {
        crate::io::write_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
        crate::io::write_atomic(
            &out.join(format!("{name}.png")),
            &crate::report::plot::svg_to_png(&svg)?,
        )?;
    }
    Ok(())
}
