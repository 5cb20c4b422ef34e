//! How a model of an experiment learns: a linear probe on its cached frozen features, or
//! fine-tuning (LoRA adapters or all weights) of the backbone with a classification head.
//! Both train on a batch loss over example indices (any loss of METHOD.md section 3).

use crate::config::{default_lora, ExperimentConfig, ModelSpec, TrainingMode};
use crate::data::{Dataset, Example};
use crate::models::features::{extract, feature_key, load_cached, store_cached, FeatureOptions};
use crate::models::heads::{pool, ClassificationHead, Pooling};
use crate::models::params::{LoraConfig, Params, Trainable};
use crate::models::Model;
use crate::models::{model_hash, resolve_model};
use crate::report::classify::Timing;
use crate::train::convex::{CvReport, Objective, SolverConfig};
use crate::train::probe::{self, LinearProbe, ProbeLoss, Step, TensorObjective};
use crate::train::trainer::{train, TrainConfig, TrainTask};
use anyhow::Context;
use anyhow::Result;
use candle_core::{Device, Tensor, D};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;

/// Produces class logits for examples.
pub trait Predictor {
    fn logits(&self, examples: &[Example]) -> Result<Tensor>;

    fn probs(&self, examples: &[Example]) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax(&self.logits(examples)?, D::Minus1)?)
    }
}

/// What a learner learns from.
pub struct Supervision<'a> {
    /// The batch loss (any loss of METHOD.md section 3).
    pub loss: &'a ProbeLoss<'a>,
    /// Whether the loss changes with training progress or with the learner's own predictions.
    pub staged: bool,
    /// The distribution over classes that the loss pulls each training example towards (ground
    /// truth one-hot, or the weak labels): what cross-validation scores held-out predictions
    /// against when a learner chooses its regularisation.
    pub targets: &'a [Vec<f64>],
    /// The same loss as `loss`, written in f64 with its gradient (`SoftXent` for a
    /// cross-entropy against fixed rows, [`crate::train::objectives::MethodObjective`] for the
    /// others): probes evaluate it instead of `loss` through candle (same value and gradient,
    /// much cheaper per solver step). `None`: probes use `loss` and candle's autograd.
    pub native: Option<&'a dyn Objective>,
}

/// A trained predictor and, for probes, how its regularisation was chosen.
pub struct Fitted<'a> {
    pub predictor: Box<dyn Predictor + 'a>,
    pub cv: Option<CvReport>,
}

/// Trains a predictor on `train` with a batch loss.
pub trait Learner: Sync {
    /// What determines this learner's results (for the stage cache).
    fn key(&self) -> String;
    fn fit(
        &self,
        train: &[Example],
        supervision: &Supervision,
        config: &TrainConfig,
    ) -> Result<Fitted<'_>>;
}

/// Frozen features of a set of examples, by id.
pub struct FeatureTable {
    pub features: Tensor,
    pub row_of: HashMap<String, usize>,
    pub model_hash: String,
    /// Model hash, pooling and maximum length.
    pub key: String,
}

impl FeatureTable {
    pub fn rows(&self, examples: &[Example]) -> Result<Tensor> {
        let index: Vec<u32> = examples.iter().map(|e| self.row_of[&e.id] as u32).collect();
        Ok(self.features.index_select(
            &Tensor::from_vec(index, examples.len(), self.features.device())?,
            0,
        )?)
    }
}

pub struct ProbeLearner {
    pub table: FeatureTable,
    pub classes: usize,
    pub solver: SolverConfig,
    /// The last few training sets made ready for the solver, by their examples' ids (a seed's
    /// ceiling and every student fit on the same strong_train rows).
    pub prepared: PreparedCache,
}

/// Training sets made ready for the solver ([`probe::prepare`]), the most recent
/// [`PreparedCache::KEEP`] of them.
#[derive(Default)]
pub struct PreparedCache(std::sync::Mutex<Vec<(Vec<String>, std::sync::Arc<probe::Prepared>)>>);

impl PreparedCache {
    /// Enough for the seeds that run side by side, each reusing one set.
    const KEEP: usize = 4;

    fn get_or_prepare(
        &self,
        train: &[Example],
        features: impl FnOnce() -> Result<Tensor>,
    ) -> Result<std::sync::Arc<probe::Prepared>> {
        let ids: Vec<String> = train.iter().map(|e| e.id.clone()).collect();
        let lock = || {
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        if let Some((_, prepared)) = lock().iter().find(|(k, _)| *k == ids) {
            return Ok(prepared.clone());
        }
        let prepared = std::sync::Arc::new(probe::prepare(&features()?)?);
        let mut entries = lock();
        if entries.len() == Self::KEEP {
            entries.remove(0);
        }
        entries.push((ids, prepared.clone()));
        Ok(prepared)
    }
}

struct ProbePredictor<'a> {
    probe: LinearProbe,
    table: &'a FeatureTable,
}

impl Predictor for ProbePredictor<'_> {
    fn logits(&self, examples: &[Example]) -> Result<Tensor> {
        self.probe.logits(&self.table.rows(examples)?)
    }
}

impl Learner for ProbeLearner {
    fn key(&self) -> String {
        let solver = serde_json::to_string(&self.solver).unwrap_or_default();
        format!("probe|{}|{solver}", self.table.key)
    }

    fn fit(
        &self,
        train: &[Example],
        supervision: &Supervision,
        config: &TrainConfig,
    ) -> Result<Fitted<'_>> {
        let tensor_objective = TensorObjective {
            loss: supervision.loss,
            classes: self.classes,
            staged: supervision.staged,
        };
        let objective = supervision.native.unwrap_or(&tensor_objective);
        let prepared = self
            .prepared
            .get_or_prepare(train, || self.table.rows(train))?;
        let (probe, cv) = probe::fit(
            &prepared,
            self.classes,
            objective,
            supervision.targets,
            &self.solver,
            config.seed,
        )?;
        Ok(Fitted {
            predictor: Box::new(ProbePredictor {
                probe,
                table: &self.table,
            }),
            cv: Some(cv),
        })
    }
}

/// Fine-tuning of a backbone (LoRA or full) with a classification head on pooled hidden states.
pub struct FinetuneLearner {
    /// Where the model trains (its logits come back to the CPU for the losses).
    pub device: Device,
    pub path: PathBuf,
    pub model_hash: String,
    /// `None`: full fine-tuning.
    pub lora: Option<LoraConfig>,
    pub pooling: Option<Pooling>,
    pub max_tokens: usize,
    pub classes: usize,
    /// Overrides the experiment's training settings for this model.
    pub train: Option<TrainConfig>,
}

struct Finetuned {
    model: Model,
    head: ClassificationHead,
    pooling: Pooling,
    max_tokens: usize,
}

impl Finetuned {
    fn encode(&self, examples: &[Example]) -> Result<Vec<Vec<u32>>> {
        let tokenizer = self.model.tokenizer()?;
        examples
            .iter()
            .map(|e| {
                let mut ids = tokenizer.encode(&e.input)?;
                if ids.len() > self.max_tokens {
                    ids.drain(..ids.len() - self.max_tokens);
                }
                Ok(ids)
            })
            .collect()
    }

    fn logits_of(&self, encoded: &[&Vec<u32>]) -> Result<Tensor> {
        let t = encoded.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![0u32; encoded.len() * t];
        let mut mask = vec![vec![0u32; t]; encoded.len()];
        for (r, tokens) in encoded.iter().enumerate() {
            for (j, &token) in tokens.iter().enumerate() {
                ids[r * t + j] = token;
                mask[r][j] = 1;
            }
        }
        let device = self.head.weight.device();
        let ids = Tensor::from_vec(ids, (encoded.len(), t), device)?;
        let network = &self.model.network;
        // Pooled at the last token, the last layer's work after attention runs for that token
        // alone (Network::last_hidden; the gradient flows through the same positions).
        let pooled = if self.pooling == Pooling::LastToken {
            network.last_hidden(&ids, &mask, &mut network.new_cache())?
        } else {
            let hidden = network.hidden(&ids, &mask, &mut network.new_cache())?;
            pool(&hidden, &mask, self.pooling)?
        };
        // The losses and their targets live on the CPU (the transfer is differentiable).
        Ok(self.head.forward(&pooled)?.to_device(&Device::Cpu)?)
    }
}

impl Predictor for Finetuned {
    fn logits(&self, examples: &[Example]) -> Result<Tensor> {
        let encoded = self.encode(examples)?;
        let mut parts = Vec::new();
        for chunk in encoded.chunks(32) {
            let refs: Vec<&Vec<u32>> = chunk.iter().collect();
            parts.push(self.logits_of(&refs)?.detach());
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

struct FinetuneTask<'a> {
    finetuned: &'a Finetuned,
    encoded: Vec<Vec<u32>>,
    loss: &'a ProbeLoss<'a>,
}

impl TrainTask for FinetuneTask<'_> {
    fn num_examples(&self) -> usize {
        self.encoded.len()
    }

    fn length(&self, i: usize) -> usize {
        self.encoded[i].len()
    }

    fn loss(&self, batch: &[usize], progress: f64) -> Result<Tensor> {
        let refs: Vec<&Vec<u32>> = batch.iter().map(|&i| &self.encoded[i]).collect();
        let step = Step {
            batch,
            progress,
            anchor: None,
        };
        (self.loss)(&self.finetuned.logits_of(&refs)?, &step)
    }
}

impl Learner for FinetuneLearner {
    fn key(&self) -> String {
        let settings =
            serde_json::to_string(&(&self.lora, &self.pooling, self.max_tokens, &self.train))
                .unwrap_or_default();
        format!(
            "finetune|{}|{settings}{}",
            self.model_hash,
            crate::runtime::stage_key_suffix(&self.device)
        )
    }

    fn fit(
        &self,
        train_set: &[Example],
        supervision: &Supervision,
        config: &TrainConfig,
    ) -> Result<Fitted<'_>> {
        let loss = supervision.loss;
        let config = match &self.train {
            Some(own) => TrainConfig {
                seed: config.seed,
                progress: config.progress,
                ..own.clone()
            },
            None => config.clone(),
        };
        let trainable = match &self.lora {
            Some(lora) => Trainable::Lora(lora.clone()),
            None => Trainable::All,
        };
        let model = Model::load(&self.path, trainable, config.seed, &self.device)?;
        let pooling = self.pooling.unwrap_or(if model.network.is_decoder() {
            Pooling::LastToken
        } else {
            Pooling::Mean
        });
        let mut head_params = Params::new(
            HashMap::new(),
            Trainable::Frozen,
            config.seed,
            &self.device,
            "head",
        );
        let head =
            ClassificationHead::new(&mut head_params, model.network.hidden_size(), self.classes)?;
        let mut vars = model.vars.clone();
        vars.extend(head_params.into_vars());
        let finetuned = Finetuned {
            model,
            head,
            pooling,
            max_tokens: self.max_tokens,
        };
        let encoded = finetuned.encode(train_set)?;
        let task = FinetuneTask {
            finetuned: &finetuned,
            encoded,
            loss,
        };
        train(&task, &vars, &config, None)?;
        Ok(Fitted {
            predictor: Box::new(finetuned),
            cv: None,
        })
    }
}

// ---------------------------------------------------------------- building a run's learners

/// "int8 (vnni512 kernel)", "f32".
pub(super) fn describe_precision(precision: crate::ops::Precision) -> String {
    match precision {
        crate::ops::Precision::F32 => "f32".into(),
        crate::ops::Precision::Int8 => format!("int8 ({} kernel)", precision.kernel()),
        crate::ops::Precision::Bf16 => "bf16 (GPU)".into(),
        crate::ops::Precision::Bf16x2 => format!("bf16x2 ({})", precision.kernel()),
    }
}

/// Extracts (or reads from the cache) the features of every example for one model.
pub(super) fn features_for(
    spec: &ModelSpec,
    examples: &BTreeMap<String, String>,
    (progress, precision): (bool, crate::ops::Precision),
    (device, cache_dir): (&Device, &std::path::Path),
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
    let key = feature_key(&hash, &ids, &texts, &options);
    let (features, hit) = match load_cached(&key, texts.len(), cache_dir, &Device::Cpu) {
        Some(features) => (features, true),
        None => {
            let model = Model::load_for_inference(&path, precision, device)
                .with_context(|| format!("loading {}", spec.label()))?;
            // Extracted on the model's device; kept (and probed) on the CPU in f32.
            let features = extract(&model, &texts, &options, device)?
                .to_device(&Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?;
            store_cached(&key, &features, cache_dir)?;
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
pub(super) struct Learners<'a> {
    config: &'a ExperimentConfig,
    examples: &'a BTreeMap<String, String>,
    progress: bool,
    classes: usize,
    /// Models run on the configured device (bf16 on a GPU); probes and losses on the CPU.
    device: Device,
    pub(super) precision: crate::ops::Precision,
    /// Where extracted features are cached.
    features_dir: std::path::PathBuf,
    timings: &'a std::cell::RefCell<Vec<Timing>>,
}

impl<'a> Learners<'a> {
    pub(super) fn new(
        config: &'a ExperimentConfig,
        examples: &'a BTreeMap<String, String>,
        (home, progress, classes): (&crate::home::Home, bool, usize),
        timings: &'a std::cell::RefCell<Vec<Timing>>,
    ) -> Result<Self> {
        let device = config.device.device()?;
        let precision = config
            .precision
            .resolve_on(crate::ops::Purpose::Features, &device)?;
        Ok(Learners {
            config,
            examples,
            features_dir: home.features(),
            progress,
            classes,
            device,
            precision,
            timings,
        })
    }

    /// The learner of `spec` and its model's hash.
    pub(super) fn make(&self, spec: &ModelSpec) -> Result<(Box<dyn Learner>, String)> {
        if spec.mode == TrainingMode::Probe {
            let table = features_for(
                spec,
                self.examples,
                (self.progress, self.precision),
                (&self.device, &self.features_dir),
                self.timings,
            )?;
            let hash = table.model_hash.clone();
            let learner = ProbeLearner {
                table,
                classes: self.classes,
                solver: self.config.solver.clone(),
                prepared: Default::default(),
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
pub(super) fn examples_of(datasets: &[Dataset]) -> BTreeMap<String, String> {
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
