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
        Ok(config)
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
