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
    #[serde(default)]
    pub methods: MethodsConfig,
    /// Generation tasks (SLURP, generate:PATH): the methods of METHOD.md section 4 and the
    /// preference stage of section 5.
    #[serde(default)]
    pub generation: GenerationConfig,
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
    pub weights: WeightsSpec,
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
    pub evidence: String,
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
            weights: WeightsSpec::Named("agreement".into()),
            prompt: crate::generation::seq2seq::DEFAULT_PROMPT.into(),
            weak_beams: 5,
            test_beams: 3,
            max_new_tokens: 64,
            decode_batch: 8,
            stop_at_json: true,
            share: Default::default(),
            spread: Default::default(),
            edl_c: 1e-4,
            evidence: "exp".into(),
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
}

impl PrecisionSetting {
    /// The precision for `purpose`: as set, or the fastest that passes that use's check.
    pub fn resolve(self, purpose: crate::ops::Purpose) -> crate::ops::Precision {
        match self {
            PrecisionSetting::Auto => crate::ops::Precision::fastest_for(purpose),
            PrecisionSetting::F32 => crate::ops::Precision::F32,
            PrecisionSetting::Int8 => crate::ops::Precision::Int8,
        }
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

fn check_evidence(evidence: &str, clamp: f64, section: &str) -> Result<()> {
    if evidence != "exp" && evidence != "softplus" {
        bail!("{section}.evidence: `{evidence}` is not one of \"exp\", \"softplus\"");
    }
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
    pub weights: WeightsSpec,
    pub logconf_a_max: f64,
    pub logconf_warmup: f64,
    /// c of the KL annealing lambda_t = c min(1, t).
    pub edl_c: f64,
    pub edl_step_a_max: f64,
    pub edl_step_warmup: f64,
    /// "exp" (clamped) or "softplus".
    pub evidence: String,
    pub evidence_clamp: f64,
}

impl Default for MethodsConfig {
    fn default() -> Self {
        MethodsConfig {
            list: Method::ALL.to_vec(),
            weights: WeightsSpec::Named("uniform".into()),
            logconf_a_max: 0.5,
            logconf_warmup: 0.2,
            edl_c: 1e-2,
            edl_step_a_max: 0.2,
            edl_step_warmup: 0.25,
            evidence: "exp".into(),
            evidence_clamp: 10.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WeightsSpec {
    Named(String),
    Given(Vec<f64>),
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
        let spec = match TaskSpec::parse(&self.name, options)? {
            TaskSpec::ClassifyJsonl { path, .. } => TaskSpec::ClassifyJsonl {
                path: resolve(&path),
                test_path: self.test_path.as_deref().map(resolve),
            },
            TaskSpec::GenerateJsonl { path, .. } => TaskSpec::GenerateJsonl {
                path: resolve(&path),
                test_path: self.test_path.as_deref().map(resolve),
            },
            other => {
                if self.test_path.is_some() {
                    bail!(
                        "task.test_path is only for classify:/generate: JSONL tasks, not {}",
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
        let config: ExperimentConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        if config.seeds.is_empty() {
            bail!(
                "{}: `seeds` is empty; give at least one seed",
                path.display()
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        config
            .task
            .spec(base)
            .with_context(|| format!("{}: in [task]", path.display()))?;
        config
            .solver
            .validate()
            .with_context(|| format!("{}: in [solver]", path.display()))?;
        config
            .check_values()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Range and choice checks of every setting that TOML's types do not catch; the error names
    /// the key, the value and what is allowed.
    fn check_values(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for seed in &self.seeds {
            if !seen.insert(seed) {
                bail!("seeds: seed {seed} is given twice; seeds must be distinct (a repeated seed fakes the spread over seeds)");
            }
        }
        if self.task.sizes.test == Some(0) {
            bail!("task.sizes.test: must be at least 1");
        }
        check_train(&self.probe, "probe")?;
        for (j, spec) in self.weak.iter().enumerate() {
            spec.check(&format!("weak[{}]", j + 1))?;
        }
        if let Some(strong) = &self.strong {
            strong.check("strong")?;
        }
        let m = &self.methods;
        match &m.weights {
            WeightsSpec::Named(name) if name == "uniform" || name == "dawid_skene" => {}
            WeightsSpec::Named(name) => bail!(
                "methods.weights: `{name}` is not one of \"uniform\", \"dawid_skene\" or a list of {} numbers",
                self.weak.len()
            ),
            WeightsSpec::Given(w) => check_weights(w, self.weak.len(), "methods.weights")?,
        }
        check_evidence(&m.evidence, m.evidence_clamp, "methods")?;
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
        if let WeightsSpec::Named(name) = &g.weights {
            if name != "agreement" && name != "uniform" {
                bail!("generation.weights: `{name}` is not one of \"agreement\", \"uniform\" or a list of numbers");
            }
        } else if let WeightsSpec::Given(w) = &g.weights {
            check_weights(w, self.weak.len(), "generation.weights")?;
        }
        check_evidence(&g.evidence, g.evidence_clamp, "generation")?;
        Ok(())
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
