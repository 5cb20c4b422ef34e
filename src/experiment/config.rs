//! Experiment configuration in TOML. Unknown keys are rejected with the key's name and the file,
//! so that a typo never silently falls back to a default.
//!
//! ```toml
//! name = "sciq-small"
//! seeds = [0, 1, 2]
//!
//! [task]
//! name = "sciq"          # or cosmosqa, ethics-justice, slurp, classify:PATH, generate:PATH
//! pairs = false          # SciQ / CosmosQA: a positive and a negative per question
//! support = false        # SciQ: prepend the support paragraph
//! # test_path = "..."    # generic JSONL tasks: a separate test file
//!
//! [task.sizes]
//! weak_train = 2000
//! strong_train = 2000
//! test = 1000
//! valid = 0
//!
//! [solver]               # linear probes: k-fold CV over a log grid of C (train/convex.rs)
//! folds = 5
//! c_min = 1e-5
//! c_max = 1.0
//! c_steps = 11
//! ```

use crate::data::{ChoiceOptions, SplitSizes, TaskSpec};
use crate::models::heads::Pooling;
use crate::models::params::LoraConfig;
use crate::train::convex::SolverConfig;
use crate::train::trainer::TrainConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    #[serde(default)]
    pub pairs: bool,
    #[serde(default)]
    pub support: bool,
    /// SciQ / CosmosQA: end each item by asking whether the answer is correct.
    #[serde(default)]
    pub ask: bool,
    #[serde(default)]
    pub test_path: Option<PathBuf>,
    #[serde(default)]
    pub sizes: SplitSizes,
    /// Draw the examples once with this seed; each run seed then only re-splits weak_train and
    /// strong_train between each other (test fixed), so all seeds share the same features.
    #[serde(default)]
    pub pool_seed: Option<u64>,
    /// classify:PATH / generate:PATH: the columns (or JSON fields) that hold each field
    /// (default text, label, prompt, target).
    #[serde(default)]
    pub text_column: Option<String>,
    #[serde(default)]
    pub label_column: Option<String>,
    #[serde(default)]
    pub prompt_column: Option<String>,
    #[serde(default)]
    pub target_column: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Folder of the bundled datasets; default `$WS2S_DATA` or the source tree's `data/`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    pub task: TaskConfig,
    /// The weak models (J >= 1; the method needs J >= 2 for the multi-weak methods).
    #[serde(default)]
    pub weak: Vec<ModelSpec>,
    #[serde(default)]
    pub strong: Option<ModelSpec>,
    /// Training settings of fine-tuned models (LoRA or full) without their own `train` table.
    #[serde(default = "default_probe")]
    pub probe: TrainConfig,
    /// How linear probes are solved and their L2 strength chosen (cross-validation).
    #[serde(default)]
    pub solver: SolverConfig,
    /// Number type of the frozen forward passes (features, scoring, decoding): "auto" (the
    /// fastest that passes the accuracy check of each use: int8 features with AVX-512 VNNI,
    /// else f32; f32 decoding; docs/results/inference.md),
    /// "f32" or "int8". Training computes in f32 whatever this says.
    #[serde(default)]
    pub precision: PrecisionSetting,
    /// Where models run: "cpu" (default), "cuda" or "cuda:N" (a build with the `cuda` feature).
    /// On a GPU, frozen weights are bf16 and trained ones f32; linear probes are solved on the
    /// CPU either way.
    #[serde(default)]
    pub device: crate::runtime::DeviceSetting,
    #[serde(default)]
    pub methods: MethodsConfig,
    /// Generation tasks (SLURP, generate:PATH): the methods of METHOD.md section 4 and the
    /// preference stage of section 5.
    #[serde(default)]
    pub generation: GenerationConfig,
    /// A ladder (`ws2s sweep`): its models replace [[weak]] and [strong].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepConfig>,
}

/// `[task]` settings given on the command line (`--task`, `--text-column`, ...).
#[derive(Debug, Clone, Default)]
pub struct TaskOverride {
    pub name: Option<String>,
    pub text_column: Option<String>,
    pub label_column: Option<String>,
    pub prompt_column: Option<String>,
    pub target_column: Option<String>,
}

/// How a ladder orders its models from weakest to strongest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LadderOrder {
    /// As listed in `[[sweep.models]]`.
    #[default]
    Listed,
    /// By each model's strength measured on training data only: the cross-validated log-loss
    /// of its probe on ground-truth labels (weak_train), mean over seeds.
    Ceiling,
}

/// `[sweep]`: every model as a weak supervisor of every stronger one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    pub models: Vec<ModelSpec>,
    #[serde(default)]
    pub order: LadderOrder,
    /// Single-weak methods: one cell per (weak, strong) pair.
    #[serde(default = "default_sweep_single")]
    pub single: Vec<Method>,
    /// Multi-weak methods: one cell per strong model with at least two models below it.
    #[serde(default = "default_sweep_multi")]
    pub multi: Vec<Method>,
}

fn default_sweep_single() -> Vec<Method> {
    vec![Method::Xent, Method::Logconf]
}

fn default_sweep_multi() -> Vec<Method> {
    vec![Method::Naive, Method::JointDawidSkene, Method::Edl]
}

impl Method {
    /// Learns from one weak model (one run per weak model).
    pub fn is_single_weak(self) -> bool {
        matches!(self, Method::Xent | Method::Logconf | Method::Product)
    }
}

impl SweepConfig {
    fn check(&self, config: &ExperimentConfig) -> Result<()> {
        if self.models.len() < 2 {
            bail!(
                "sweep.models: a ladder needs at least two models, got {}",
                self.models.len()
            );
        }
        if !config.weak.is_empty() || config.strong.is_some() {
            bail!("[[weak]] / [strong]: not used with [sweep], whose models are all in [[sweep.models]] (each supervises every stronger one)");
        }
        if config.methods.list != MethodsConfig::default().list {
            bail!("methods.list: not used with [sweep]; choose its methods with sweep.single and sweep.multi");
        }
        if let Weights::Given(_) = config.methods.weights {
            bail!("methods.weights: a list of weights cannot fit every rung of a ladder (each has a different number of weak models); use \"uniform\" or \"dawid_skene\"");
        }
        for (j, spec) in self.models.iter().enumerate() {
            spec.check(&format!("sweep.models[{}]", j + 1))?;
            if self.models[..j].iter().any(|m| m.label() == spec.label()) {
                bail!(
                    "sweep.models[{}]: the name `{}` is used twice; give each model its own `name`",
                    j + 1,
                    spec.label()
                );
            }
        }
        if self.order == LadderOrder::Ceiling {
            if let Some((j, _)) = self
                .models
                .iter()
                .enumerate()
                .find(|(_, m)| m.mode != TrainingMode::Probe)
            {
                bail!("sweep.order: \"ceiling\" measures each model by its probe's cross-validated loss, but sweep.models[{}] is fine-tuned; use order = \"listed\" (weakest first)", j + 1);
            }
        }
        if self.single.is_empty() && self.multi.is_empty() {
            bail!("sweep.single and sweep.multi: both empty; give at least one method");
        }
        for m in &self.single {
            if !m.is_single_weak() {
                bail!(
                    "sweep.single: `{}` learns from several weak models; put it in sweep.multi",
                    m.as_str()
                );
            }
        }
        for m in &self.multi {
            if m.is_single_weak() {
                bail!(
                    "sweep.multi: `{}` learns from one weak model; put it in sweep.single",
                    m.as_str()
                );
            }
        }
        Ok(())
    }
}

/// The generation methods (METHOD.md section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenMethod {
    /// Single weak, hard labels: cross-entropy on the weak model's top hypothesis (one run per weak model).
    Hard,
    /// Single weak, token-level soft labels (soft KL; one run per weak model).
    Soft,
    /// Naive multi-weak: every weak hypothesis as its own soft-label target, weighted.
    Naive,
    /// Joint decoding: pooled n-best lists rescored by every weak model, the weighted best as target.
    Joint,
    /// Bayesian multi-weak: token-level EDL over every weak hypothesis, weighted.
    Edl,
    /// Token EDL with the student's own predictions mixed in.
    EdlStep,
}

impl GenMethod {
    pub const ALL: [GenMethod; 6] = [
        GenMethod::Hard,
        GenMethod::Soft,
        GenMethod::Naive,
        GenMethod::Joint,
        GenMethod::Edl,
        GenMethod::EdlStep,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GenMethod::Hard => "hard",
            GenMethod::Soft => "soft",
            GenMethod::Naive => "naive",
            GenMethod::Joint => "joint",
            GenMethod::Edl => "edl",
            GenMethod::EdlStep => "edl_step",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    pub methods: Vec<GenMethod>,
    /// "agreement" (learned from the weak models' agreement), "uniform", or a list.
    pub weights: Weights<GenerationWeights>,
    /// The prompt; `{input}` is replaced by the utterance.
    pub prompt: String,
    /// Beam width and n-best size of the weak labels.
    pub weak_beams: usize,
    /// Beam width on test.
    pub test_beams: usize,
    pub max_new_tokens: usize,
    /// Prompts per beam-search batch.
    pub decode_batch: usize,
    /// Test and preference-stage decoding end a hypothesis when the JSON object it opened
    /// closes (as if end-of-sequence followed). The weak n-best lists always run to
    /// end-of-sequence, whose log-probability the word bridge carries to the student.
    pub stop_at_json: bool,
    pub share: crate::generation::bridge::Share,
    pub spread: crate::generation::bridge::Spread,
    /// c of the token-EDL KL annealing (the original: 1e-4).
    pub edl_c: f64,
    /// "exp" (clamped, METHOD.md's default) or "softplus". Softplus evidence over a whole
    /// vocabulary collapsed the students in the CPU run: with alpha = e + 1 the label's share
    /// alpha / S only grows by pushing its logit towards the vocabulary size.
    pub evidence: EvidenceKind,
    pub evidence_clamp: f64,
    pub edl_step_a_max: f64,
    pub edl_step_warmup: f64,
    /// The preference stage after the Bayesian student (METHOD.md section 5).
    pub dpo: Option<DpoConfig>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            methods: GenMethod::ALL.to_vec(),
            weights: Weights::Named(GenerationWeights::Agreement),
            prompt: crate::generation::seq2seq::DEFAULT_PROMPT.into(),
            weak_beams: 5,
            test_beams: 3,
            max_new_tokens: 64,
            decode_batch: 8,
            stop_at_json: true,
            share: Default::default(),
            spread: Default::default(),
            edl_c: 1e-4,
            evidence: EvidenceKind::Exp,
            evidence_clamp: 10.0,
            edl_step_a_max: 0.2,
            edl_step_warmup: 0.25,
            dpo: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// The student whose outputs are ranked: "edl" or "edl_step".
    pub after: GenMethod,
    /// Size of the student's n-best list per prompt (beam search).
    pub beams: usize,
    pub beta: f64,
    /// Label smoothing of the conservative DPO loss.
    pub eps: f64,
    pub train: TrainConfig,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            after: GenMethod::Edl,
            beams: 10,
            beta: 5.0,
            eps: 0.1,
            train: TrainConfig {
                epochs: 3,
                batch_size: 4,
                lr: 5e-7,
                ..TrainConfig::default()
            },
        }
    }
}

/// A model of the experiment, trained as a linear probe on its frozen features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A short name for tables (default: the model argument).
    #[serde(default)]
    pub name: Option<String>,
    /// An HF folder, a .gguf file, or a fetched model's name.
    pub model: String,
    /// Default: the last token for decoders, the mean for encoders.
    #[serde(default)]
    pub pooling: Option<Pooling>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// How the model learns: a linear probe on frozen features (default), LoRA, or full fine-tuning.
    #[serde(default)]
    pub mode: TrainingMode,
    /// LoRA settings (mode "lora"); default r 8, alpha 32, dropout 0.1 on q_proj, k_proj, o_proj
    /// (the original's settings; BERT names its modules query/key/value, GPT-2 c_attn/c_proj).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Training settings of this model when fine-tuned (default: the experiment's [probe] section).
    #[serde(default)]
    pub train: Option<TrainConfig>,
}

/// The `precision` key: a precision, or "auto" (chosen for the CPU when the run starts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    #[default]
    Auto,
    F32,
    Int8,
    /// bf16 weights and activations: a GPU's precision.
    Bf16,
}

impl PrecisionSetting {
    /// The precision for `purpose` on the CPU: as set, or the fastest that passes that use's
    /// check (bf16 is a GPU's precision: f32 here).
    pub fn resolve(self, purpose: crate::ops::Purpose) -> crate::ops::Precision {
        match self {
            PrecisionSetting::Auto => crate::ops::Precision::fastest_for(purpose),
            PrecisionSetting::F32 | PrecisionSetting::Bf16 => crate::ops::Precision::F32,
            PrecisionSetting::Int8 => crate::ops::Precision::Int8,
        }
    }

    /// The precision for `purpose` on `device`: on a GPU bf16 unless f32 is asked for (int8
    /// kernels are CPU kernels); on the CPU as [`PrecisionSetting::resolve`], bf16 refused (the
    /// CPU would run it through slow generic code).
    pub fn resolve_on(
        self,
        purpose: crate::ops::Purpose,
        device: &candle_core::Device,
    ) -> Result<crate::ops::Precision> {
        use crate::ops::Precision;
        Ok(match (device.is_cpu(), self) {
            (false, PrecisionSetting::Auto | PrecisionSetting::Bf16) => Precision::Bf16,
            (false, PrecisionSetting::F32) => Precision::F32,
            (false, PrecisionSetting::Int8) => {
                bail!("precision int8 runs on the CPU only; on a GPU use bf16 (auto) or f32")
            }
            (true, PrecisionSetting::Bf16) => {
                bail!("precision bf16 is a GPU's precision; on the CPU use auto, f32 or int8")
            }
            (true, setting) => setting.resolve(purpose),
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingMode {
    #[default]
    Probe,
    Lora,
    Full,
}

pub fn default_lora() -> LoraConfig {
    LoraConfig {
        rank: 8,
        alpha: 32.0,
        dropout: 0.1,
        targets: vec!["q_proj".into(), "k_proj".into(), "o_proj".into()],
    }
}

impl ModelSpec {
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.model.clone())
    }

    fn check(&self, key: &str) -> Result<()> {
        if self.max_tokens == 0 {
            bail!("{key}.max_tokens: must be at least 1");
        }
        if let Some(lora) = &self.lora {
            if lora.rank == 0 {
                bail!("{key}.lora.rank: must be at least 1");
            }
            if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
                bail!(
                    "{key}.lora.alpha: must be a finite number > 0, got {}",
                    lora.alpha
                );
            }
            if !(0.0..1.0).contains(&lora.dropout) {
                bail!(
                    "{key}.lora.dropout: must be in [0, 1), got {}",
                    lora.dropout
                );
            }
            if lora.targets.is_empty() {
                bail!("{key}.lora.targets: empty; name at least one module (e.g. \"q_proj\")");
            }
        }
        if self.lora.is_some() && self.mode != TrainingMode::Lora {
            bail!("{key}.lora: only used with mode = \"lora\" (this model's mode is {:?}); remove it or set the mode", self.mode);
        }
        if let Some(train) = &self.train {
            if self.mode == TrainingMode::Probe {
                bail!("{key}.train: only used with mode = \"lora\" or \"full\" (probes are solved to convergence; see [solver])");
            }
            check_train(train, &format!("{key}.train"))?;
        }
        Ok(())
    }
}

fn check_fraction(value: f64, key: &str) -> Result<()> {
    if !(0.0..=1.0).contains(&value) {
        bail!("{key}: must be in [0, 1], got {value}");
    }
    Ok(())
}

fn check_train(t: &TrainConfig, key: &str) -> Result<()> {
    if t.epochs == 0 {
        bail!("{key}.epochs: must be at least 1");
    }
    if t.batch_size == 0 {
        bail!("{key}.batch_size: must be at least 1");
    }
    if t.grad_accum == 0 {
        bail!("{key}.grad_accum: must be at least 1");
    }
    if !(t.lr.is_finite() && t.lr > 0.0) {
        bail!("{key}.lr: must be a finite number > 0, got {}", t.lr);
    }
    check_fraction(t.warmup_ratio, &format!("{key}.warmup_ratio"))?;
    let a = &t.adamw;
    for (name, beta) in [("beta1", a.beta1), ("beta2", a.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            bail!("{key}.adamw.{name}: must be in [0, 1), got {beta}");
        }
    }
    if !(a.eps.is_finite() && a.eps > 0.0) {
        bail!(
            "{key}.adamw.eps: must be a finite number > 0, got {}",
            a.eps
        );
    }
    if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
        bail!(
            "{key}.adamw.weight_decay: must be a finite number >= 0, got {}",
            a.weight_decay
        );
    }
    if t.patience == Some(0) {
        bail!("{key}.patience: must be at least 1 (or left out: no early stopping)");
    }
    if let Some(norm) = t.max_grad_norm {
        if !(norm.is_finite() && norm > 0.0) {
            bail!("{key}.max_grad_norm: must be a finite number > 0, got {norm}");
        }
    }
    Ok(())
}

fn check_weights(w: &[f64], weak: usize, key: &str) -> Result<()> {
    if w.len() != weak {
        bail!(
            "{key}: {} weights for {weak} weak models; give one per weak model",
            w.len()
        );
    }
    if let Some(v) = w.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
        bail!("{key}: every weight must be a finite number >= 0, got {v}");
    }
    if w.iter().sum::<f64>() <= 0.0 {
        bail!("{key}: the weights sum to 0; at least one must be positive");
    }
    Ok(())
}

fn check_evidence(clamp: f64, section: &str) -> Result<()> {
    if !(clamp.is_finite() && clamp > 0.0) {
        bail!("{section}.evidence_clamp: must be a finite number > 0, got {clamp}");
    }
    Ok(())
}

fn default_max_tokens() -> usize {
    256
}

fn default_probe() -> TrainConfig {
    TrainConfig {
        epochs: 30,
        batch_size: 64,
        lr: 1e-2,
        warmup_ratio: 0.0,
        ..TrainConfig::default()
    }
}

/// The methods compared, and their settings (METHOD.md section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodsConfig {
    pub list: Vec<Method>,
    /// Weights of the weak models: "uniform", "dawid_skene" (learned from agreement), or a list.
    pub weights: Weights<ClassifyWeights>,
    pub logconf_a_max: f64,
    pub logconf_warmup: f64,
    /// c of the KL annealing lambda_t = c min(1, t).
    pub edl_c: f64,
    pub edl_step_a_max: f64,
    pub edl_step_warmup: f64,
    /// "exp" (clamped) or "softplus".
    pub evidence: EvidenceKind,
    pub evidence_clamp: f64,
}

impl Default for MethodsConfig {
    fn default() -> Self {
        MethodsConfig {
            list: Method::ALL.to_vec(),
            weights: Weights::Named(ClassifyWeights::Uniform),
            logconf_a_max: 0.5,
            logconf_warmup: 0.2,
            edl_c: 1e-2,
            edl_step_a_max: 0.2,
            edl_step_warmup: 0.25,
            evidence: EvidenceKind::Exp,
            evidence_clamp: 10.0,
        }
    }
}

/// The evidence function of the EDL losses (METHOD.md section 3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceKind {
    /// exp(min(logit, clamp)).
    Exp,
    /// softplus(logit).
    Softplus,
}

impl EvidenceKind {
    /// The evidence function with its clamp (used by `exp` only).
    pub fn with_clamp(self, clamp: f64) -> crate::losses::Evidence {
        match self {
            EvidenceKind::Exp => crate::losses::Evidence::Exp { clamp },
            EvidenceKind::Softplus => crate::losses::Evidence::Softplus,
        }
    }
}

/// A named rule for the weights of the weak models, for one kind of task.
pub trait WeightRule: Sized + Copy {
    /// Every name, as written in a config.
    const NAMES: &'static [&'static str];
    fn from_index(index: usize) -> Self;
    fn index(self) -> usize;
    fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }
}

/// Classification: the weights of METHOD.md section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifyWeights {
    Uniform,
    /// Learned from the weak models' agreement (Dawid-Skene accuracies).
    DawidSkene,
}

impl WeightRule for ClassifyWeights {
    const NAMES: &'static [&'static str] = &["uniform", "dawid_skene"];
    fn from_index(index: usize) -> Self {
        [ClassifyWeights::Uniform, ClassifyWeights::DawidSkene][index]
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Generation: the weights of METHOD.md section 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationWeights {
    /// Learned from the weak models' agreement on each other's hypotheses.
    Agreement,
    Uniform,
}

impl WeightRule for GenerationWeights {
    const NAMES: &'static [&'static str] = &["agreement", "uniform"];
    fn from_index(index: usize) -> Self {
        [GenerationWeights::Agreement, GenerationWeights::Uniform][index]
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// The `weights` key: a named rule, or one number per weak model.
#[derive(Debug, Clone, PartialEq)]
pub enum Weights<R> {
    Named(R),
    Given(Vec<f64>),
}

impl<R: WeightRule> Serialize for Weights<R> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Weights::Named(rule) => s.serialize_str(rule.name()),
            Weights::Given(w) => w.serialize(s),
        }
    }
}

impl<'de, R: WeightRule> Deserialize<'de> for Weights<R> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<R>(std::marker::PhantomData<R>);
        impl<'de, R: WeightRule> serde::de::Visitor<'de> for Visit<R> {
            type Value = Weights<R>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "{} or a list of one number per weak model",
                    quoted(R::NAMES)
                )
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                match R::NAMES.iter().position(|n| *n == v) {
                    Some(i) => Ok(Weights::Named(R::from_index(i))),
                    None => Err(E::custom(format!(
                        "`{v}` is not one of {} or a list of one number per weak model",
                        quoted(R::NAMES)
                    ))),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut w = Vec::new();
                while let Some(v) = seq.next_element::<f64>()? {
                    w.push(v);
                }
                Ok(Weights::Given(w))
            }
        }
        d.deserialize_any(Visit(std::marker::PhantomData))
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Single weak, soft-label cross-entropy (one run per weak model).
    Xent,
    /// Single weak, auxiliary confidence loss (one run per weak model).
    Logconf,
    /// Single weak, product loss (one run per weak model).
    Product,
    /// Naive multi-weak: sum_j w_j CE(y_j, p).
    Naive,
    /// Joint label: weighted average of the soft labels.
    JointAverage,
    /// Joint label: weighted majority vote.
    JointVote,
    /// Joint label: Dawid-Skene posterior.
    JointDawidSkene,
    /// Bayesian multi-weak (EDL).
    Edl,
    /// EDL with the student's own predictions mixed in.
    EdlStep,
    /// Dirichlet-multinomial on the weak hard-label counts.
    DirichletMultinomial,
}

impl Method {
    pub const ALL: [Method; 10] = [
        Method::Xent,
        Method::Logconf,
        Method::Product,
        Method::Naive,
        Method::JointAverage,
        Method::JointVote,
        Method::JointDawidSkene,
        Method::Edl,
        Method::EdlStep,
        Method::DirichletMultinomial,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Xent => "xent",
            Method::Logconf => "logconf",
            Method::Product => "product",
            Method::Naive => "naive",
            Method::JointAverage => "joint_average",
            Method::JointVote => "joint_vote",
            Method::JointDawidSkene => "joint_dawid_skene",
            Method::Edl => "edl",
            Method::EdlStep => "edl_step",
            Method::DirichletMultinomial => "dirichlet_multinomial",
        }
    }
}

/// The dotted key of the `key = value` line holding byte `offset` of a TOML text: its table
/// header (`[a.b]` or `[[a]]`) and its own key (None for a header line or a parse failure).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?.trim();
    let own = line.split_once('=')?.0.trim();
    if own.is_empty() || own.starts_with('[') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) => format!("{t}.{own}"),
        None => own.to_string(),
    })
}

fn gen_method_names() -> String {
    quoted(&GenMethod::ALL.map(GenMethod::as_str))
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

impl TaskConfig {
    /// The task this section names. Relative JSONL paths are taken relative to `base`, the folder
    /// of the config file.
    pub fn spec(&self, base: &Path) -> Result<TaskSpec> {
        let options = ChoiceOptions {
            pairs: self.pairs,
            support: self.support,
            ask: self.ask,
        };
        let resolve = |p: &Path| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            }
        };
        let mut columns = crate::data::jsonl::Columns::default();
        let own = [
            (
                "task.text_column",
                &self.text_column,
                &mut columns.text,
                false,
            ),
            (
                "task.label_column",
                &self.label_column,
                &mut columns.label,
                false,
            ),
            (
                "task.prompt_column",
                &self.prompt_column,
                &mut columns.prompt,
                true,
            ),
            (
                "task.target_column",
                &self.target_column,
                &mut columns.target,
                true,
            ),
        ];
        let parsed = TaskSpec::parse(&self.name, options)?;
        let generation = parsed.is_generation();
        for (key, given, slot, for_generation) in own {
            if let Some(name) = given {
                let fits = match &parsed {
                    TaskSpec::ClassifyJsonl { .. } | TaskSpec::GenerateJsonl { .. } => {
                        for_generation == generation
                    }
                    _ => false,
                };
                if !fits {
                    bail!(
                        "{key}: only used by {} tasks read from your own files, not `{}`",
                        if for_generation {
                            "generate:PATH"
                        } else {
                            "classify:PATH"
                        },
                        self.name
                    );
                }
                if name.is_empty() {
                    bail!("{key}: empty; name a column of the file");
                }
                *slot = name.clone();
            }
        }
        let spec = match parsed {
            TaskSpec::ClassifyJsonl { path, .. } => TaskSpec::ClassifyJsonl {
                path: resolve(&path),
                test_path: self.test_path.as_deref().map(resolve),
                columns,
            },
            TaskSpec::GenerateJsonl { path, .. } => TaskSpec::GenerateJsonl {
                path: resolve(&path),
                test_path: self.test_path.as_deref().map(resolve),
                columns,
            },
            other => {
                if self.test_path.is_some() {
                    bail!(
                        "task.test_path is only for classify:/generate: tasks, not {}",
                        self.name
                    );
                }
                other
            }
        };
        Ok(spec)
    }
}

impl ExperimentConfig {
    /// Names of the weak models for tables, made unique (`name#2`, ...) where two coincide.
    pub fn weak_labels(&self) -> Vec<String> {
        let labels: Vec<String> = self.weak.iter().map(ModelSpec::label).collect();
        labels
            .iter()
            .enumerate()
            .map(|(j, label)| {
                if labels.iter().filter(|l| *l == label).count() > 1 {
                    format!("{label}#{}", j + 1)
                } else {
                    label.clone()
                }
            })
            .collect()
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let config: ExperimentConfig = toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .and_then(|span| key_at(text, span.start))
                .map(|key| format!("`{key}`: "))
                .unwrap_or_default();
            anyhow::anyhow!("{}: {key}{}", path.display(), e.to_string().trim_end())
        })?;
        if config.seeds.is_empty() {
            bail!(
                "{}: `seeds` is empty; give at least one seed",
                path.display()
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let spec = config
            .task
            .spec(base)
            .with_context(|| format!("{}: in [task]", path.display()))?;
        config
            .solver
            .validate()
            .with_context(|| format!("{}: in [solver]", path.display()))?;
        config
            .check_values()
            .and_then(|()| config.check_relevance(&spec))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Range and choice checks of every setting that TOML's types do not catch; the error names
    /// the key, the value and what is allowed.
    fn check_values(&self) -> Result<()> {
        match (self.device, self.precision) {
            (crate::runtime::DeviceSetting::Cpu, PrecisionSetting::Bf16) => {
                bail!("precision: bf16 is a GPU's precision (device = \"cuda\"); on the CPU use \"auto\", \"f32\" or \"int8\"")
            }
            (crate::runtime::DeviceSetting::Cuda(_), PrecisionSetting::Int8) => {
                bail!("precision: int8 runs on the CPU only; with device = \"{}\" use \"auto\" (bf16) or \"f32\"", self.device)
            }
            _ => {}
        }
        let mut seen = std::collections::HashSet::new();
        for seed in &self.seeds {
            if !seen.insert(seed) {
                bail!("seeds: seed {seed} is given twice; seeds must be distinct (a repeated seed fakes the spread over seeds)");
            }
        }
        for (key, size) in [
            ("task.sizes.test", self.task.sizes.test),
            ("task.sizes.weak_train", self.task.sizes.weak_train),
            ("task.sizes.strong_train", self.task.sizes.strong_train),
        ] {
            if size == Some(0) {
                bail!("{key}: must be at least 1 (the weak models, the strong model and the test each need examples)");
            }
        }
        check_train(&self.probe, "probe")?;
        // Before the per-weak-model checks: a ladder has no [[weak]] of its own.
        if let Some(sweep) = &self.sweep {
            sweep.check(self)?;
        }
        for (j, spec) in self.weak.iter().enumerate() {
            spec.check(&format!("weak[{}]", j + 1))?;
        }
        if let Some(strong) = &self.strong {
            strong.check("strong")?;
        }
        let m = &self.methods;
        if let Weights::Given(w) = &m.weights {
            check_weights(w, self.weak.len(), "methods.weights")?;
        }
        check_evidence(m.evidence_clamp, "methods")?;
        for (key, value) in [
            ("methods.logconf_a_max", m.logconf_a_max),
            ("methods.logconf_warmup", m.logconf_warmup),
            ("methods.edl_step_a_max", m.edl_step_a_max),
            ("methods.edl_step_warmup", m.edl_step_warmup),
        ] {
            check_fraction(value, key)?;
        }
        if !(m.edl_c.is_finite() && m.edl_c >= 0.0) {
            bail!(
                "methods.edl_c: must be a finite number >= 0, got {}",
                m.edl_c
            );
        }
        let g = &self.generation;
        for (key, value) in [
            ("generation.weak_beams", g.weak_beams),
            ("generation.test_beams", g.test_beams),
            ("generation.max_new_tokens", g.max_new_tokens),
            ("generation.decode_batch", g.decode_batch),
        ] {
            if value == 0 {
                bail!("{key}: must be at least 1");
            }
        }
        if let Weights::Given(w) = &g.weights {
            check_weights(w, self.weak.len(), "generation.weights")?;
        }
        check_evidence(g.evidence_clamp, "generation")?;
        check_fraction(g.edl_step_a_max, "generation.edl_step_a_max")?;
        check_fraction(g.edl_step_warmup, "generation.edl_step_warmup")?;
        if !(g.edl_c.is_finite() && g.edl_c >= 0.0) {
            bail!(
                "generation.edl_c: must be a finite number >= 0, got {}",
                g.edl_c
            );
        }
        if !g.prompt.contains("{input}") {
            bail!("generation.prompt: has no `{{input}}`, so the model would never see the input; put {{input}} where the input goes");
        }
        if g.methods.is_empty() {
            bail!(
                "generation.methods: empty; give at least one of {}",
                gen_method_names()
            );
        }
        if m.list.is_empty() {
            bail!("methods.list: empty; give at least one method");
        }
        if let Some(d) = &g.dpo {
            if !matches!(d.after, GenMethod::Edl | GenMethod::EdlStep) {
                bail!(
                    "generation.dpo.after: `{}` is not one of \"edl\", \"edl_step\" (the preference stage follows a Bayesian student)",
                    d.after.as_str()
                );
            }
            if !g.methods.contains(&d.after) {
                bail!(
                    "generation.dpo.after: `{}` is not among generation.methods; add it there or choose another",
                    d.after.as_str()
                );
            }
            if d.beams < 2 {
                bail!("generation.dpo.beams: must be at least 2 (a preference needs two outputs), got {}", d.beams);
            }
            if !(d.beta.is_finite() && d.beta > 0.0) {
                bail!(
                    "generation.dpo.beta: must be a finite number > 0, got {}",
                    d.beta
                );
            }
            check_fraction(d.eps, "generation.dpo.eps")?;
            check_train(&d.train, "generation.dpo.train")?;
        }
        Ok(())
    }

    /// Settings that do nothing for this kind of task are errors, never silently ignored.
    fn check_relevance(&self, spec: &TaskSpec) -> Result<()> {
        let generation = spec.is_generation();
        let name = &self.task.name;
        if generation {
            if self.methods != MethodsConfig::default() {
                bail!("[methods]: only used by classification tasks; `{name}` is a generation task, whose methods are set in [generation]");
            }
            if self.solver != SolverConfig::default() {
                bail!("[solver]: only used by the linear probes of classification tasks; `{name}` is a generation task");
            }
            if self.probe != default_probe() {
                bail!("[probe]: only used by classification tasks; a generation model's training settings are its own `train` table");
            }
            for (key, spec) in self.model_keys() {
                if spec.mode == TrainingMode::Probe {
                    bail!("{key}.mode: generation needs mode = \"lora\" or \"full\" (a linear probe cannot generate)");
                }
                if spec.pooling.is_some() {
                    bail!("{key}.pooling: only used by classification probes; `{name}` is a generation task");
                }
                if spec.max_tokens != default_max_tokens() {
                    bail!("{key}.max_tokens: only used by classification (the length of a pooled text); `{name}` is a generation task");
                }
            }
            if self.sweep.is_some() {
                bail!("[sweep]: ladders are for classification tasks so far; `{name}` is a generation task");
            }
        } else if self.generation != GenerationConfig::default() {
            bail!("[generation]: only used by generation tasks (slurp, generate:PATH); `{name}` is a classification task, whose methods are set in [methods]");
        }
        let choice = matches!(spec, TaskSpec::Sciq(_) | TaskSpec::CosmosQa(_));
        for (key, set) in [("task.pairs", self.task.pairs), ("task.ask", self.task.ask)] {
            if set && !choice {
                bail!(
                    "{key}: only used by the multiple-choice tasks sciq and cosmosqa, not `{name}`"
                );
            }
        }
        if self.task.support && !matches!(spec, TaskSpec::Sciq(_)) {
            bail!("task.support: only SciQ has support paragraphs, not `{name}`");
        }
        Ok(())
    }

    /// Every model of the experiment with its config key (`weak[1]`, ..., `strong`).
    pub fn model_keys(&self) -> Vec<(String, &ModelSpec)> {
        let ladder = self.sweep.iter().flat_map(|s| s.models.iter().enumerate());
        self.weak
            .iter()
            .enumerate()
            .map(|(j, m)| (format!("weak[{}]", j + 1), m))
            .chain(self.strong.iter().map(|m| ("strong".to_string(), m)))
            .chain(ladder.map(|(j, m)| (format!("sweep.models[{}]", j + 1), m)))
            .collect()
    }

    /// Replaces `[task]`'s name and columns by the command line's (a relative data path there
    /// is relative to the working folder), then checks the config again.
    pub fn override_task(&mut self, o: &TaskOverride, path: &Path) -> Result<()> {
        if let Some(name) = &o.name {
            self.task.name = match name.split_once(':') {
                Some((kind @ ("classify" | "generate"), file)) if Path::new(file).is_relative() => {
                    let cwd = std::env::current_dir().context("the working folder")?;
                    format!("{kind}:{}", cwd.join(file).display())
                }
                _ => name.clone(),
            };
        }
        for (given, slot) in [
            (&o.text_column, &mut self.task.text_column),
            (&o.label_column, &mut self.task.label_column),
            (&o.prompt_column, &mut self.task.prompt_column),
            (&o.target_column, &mut self.task.target_column),
        ] {
            if given.is_some() {
                slot.clone_from(given);
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let spec = self.task.spec(base).with_context(|| {
            format!("{}: [task] with the command line's --task", path.display())
        })?;
        self.check_values()
            .and_then(|()| self.check_relevance(&spec))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seeds = [0, 1]
[task]
name = "sciq"
pairs = true
[task.sizes]
weak_train = 10
"#;

    #[test]
    fn parses_a_valid_config_with_defaults() {
        let config = ExperimentConfig::parse(GOOD, Path::new("exp.toml")).unwrap();
        assert_eq!(config.seeds, vec![0, 1]);
        assert!(config.task.pairs && !config.task.support);
        assert_eq!(config.task.sizes.weak_train, Some(10));
        assert_eq!(config.task.sizes.test, None);
    }

    #[test]
    fn precision_is_auto_by_default_and_checked() {
        use crate::ops::{Precision, Purpose};
        let config = ExperimentConfig::parse(GOOD, Path::new("exp.toml")).unwrap();
        assert_eq!(config.precision, PrecisionSetting::Auto);
        // Decoding never defaults to int8; features follow the CPU.
        assert_eq!(config.precision.resolve(Purpose::Decoding), Precision::F32);
        let int8_features = crate::ops::int8::Kernel::Vnni512.available();
        assert_eq!(
            config.precision.resolve(Purpose::Features) == Precision::Int8,
            int8_features
        );
        let text = GOOD.replace("seeds = [0, 1]", "seeds = [0, 1]\nprecision = \"int8\"");
        let config = ExperimentConfig::parse(&text, Path::new("exp.toml")).unwrap();
        assert_eq!(config.precision.resolve(Purpose::Decoding), Precision::Int8);
        let text = GOOD.replace("seeds = [0, 1]", "seeds = [0, 1]\nprecision = \"bf16\"");
        let err = ExperimentConfig::parse(&text, Path::new("exp.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("exp.toml:"), "{err}");
        assert!(err.contains("precision") || err.contains("line 4"), "{err}");
        assert!(err.contains("auto") && err.contains("int8"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_name_and_file() {
        let text = GOOD.replace("pairs = true", "pairz = true");
        let err = ExperimentConfig::parse(&text, Path::new("exp.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("exp.toml:"), "{err}");
        assert!(err.contains("pairz"), "{err}");
        let text = GOOD.replace("weak_train = 10", "weak_trian = 10");
        let err = ExperimentConfig::parse(&text, Path::new("exp.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("weak_trian"), "{err}");
        let text = format!("{GOOD}\n[extra]\nx = 1\n");
        let err = ExperimentConfig::parse(&text, Path::new("exp.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
    }

    #[test]
    fn out_of_range_and_misspelt_settings_are_errors_naming_the_key() {
        let with_weak = format!(
            "{GOOD}\n[[weak]]\nmodel = \"m\"\n[[weak]]\nmodel = \"m2\"\n[strong]\nmodel = \"s\"\n"
        );
        let cases: Vec<(String, &str)> = vec![
            (
                with_weak.replace("seeds = [0, 1]", "seeds = [0, 0]"),
                "seeds",
            ),
            (
                format!("{with_weak}[methods]\nweights = \"dawid-skene\"\n"),
                "methods.weights",
            ),
            (
                format!("{with_weak}[methods]\nweights = [1.0]\n"),
                "methods.weights",
            ),
            (
                format!("{with_weak}[methods]\nweights = [0.0, 0.0]\n"),
                "methods.weights",
            ),
            (
                format!("{with_weak}[methods]\nweights = [1.0, -1.0]\n"),
                "methods.weights",
            ),
            (
                format!("{with_weak}[methods]\nevidence = \"softplu\"\n"),
                "methods.evidence",
            ),
            (
                format!("{with_weak}[methods]\nevidence_clamp = 0.0\n"),
                "methods.evidence_clamp",
            ),
            (
                format!("{with_weak}[methods]\nlogconf_a_max = 1.5\n"),
                "methods.logconf_a_max",
            ),
            (
                format!("{with_weak}[methods]\nedl_c = -1.0\n"),
                "methods.edl_c",
            ),
            (format!("{with_weak}[probe]\nlr = -0.5\n"), "probe.lr"),
            (format!("{with_weak}[probe]\nepochs = 0\n"), "probe.epochs"),
            (
                format!("{with_weak}[probe]\nbatch_size = 0\n"),
                "probe.batch_size",
            ),
            (
                format!("{with_weak}[generation]\nweak_beams = 0\n"),
                "generation.weak_beams",
            ),
            (
                format!("{with_weak}[generation]\nmax_new_tokens = 0\n"),
                "generation.max_new_tokens",
            ),
            (
                format!("{with_weak}[generation]\nweights = \"agreemnt\"\n"),
                "generation.weights",
            ),
            (format!("{with_weak}[solver]\nfolds = 1\n"), "solver.folds"),
            (
                format!("{with_weak}[solver]\nc_min = 0.0\n"),
                "solver.c_min",
            ),
            (
                with_weak.replace("weak_train = 10", "weak_train = 10\ntest = 0"),
                "task.sizes.test",
            ),
            (
                with_weak.replace("model = \"m\"", "model = \"m\"\nmax_tokens = 0"),
                "weak[1].max_tokens",
            ),
            (
                with_weak.replace(
                    "model = \"m\"",
                    "model = \"m\"\nlora = { rank = 4, alpha = 8.0, targets = [\"q_proj\"] }",
                ),
                "weak[1].lora",
            ),
            (
                with_weak.replace("model = \"m\"", "model = \"m\"\ntrain = { epochs = 2 }"),
                "weak[1].train",
            ),
        ];
        for (text, key) in cases {
            let err = format!(
                "{:#}",
                ExperimentConfig::parse(&text, Path::new("e.toml")).unwrap_err()
            );
            assert!(err.starts_with("e.toml:"), "{key}: {err}");
            assert!(err.contains(key), "expected `{key}` in: {err}");
        }
        // The same settings in range parse.
        let ok = format!("{with_weak}[methods]\nweights = [0.5, 0.5]\nevidence = \"softplus\"\n[probe]\nlr = 0.1\n");
        ExperimentConfig::parse(&ok, Path::new("e.toml")).unwrap();
    }

    #[test]
    fn bad_task_names_and_empty_seeds_are_errors() {
        let text = GOOD.replace("name = \"sciq\"", "name = \"scqi\"");
        let err = format!(
            "{:#}",
            ExperimentConfig::parse(&text, Path::new("e.toml")).unwrap_err()
        );
        assert!(err.contains("unknown task `scqi`"), "{err}");
        let text = GOOD.replace("seeds = [0, 1]", "seeds = []");
        assert!(ExperimentConfig::parse(&text, Path::new("e.toml")).is_err());
    }
}
