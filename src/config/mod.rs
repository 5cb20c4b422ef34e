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

pub mod generation;
mod methods;
mod model;
mod sweep;
pub use generation::{DpoConfig, GenerationConfig};
pub use methods::*;
pub use model::*;
pub use sweep::*;

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
    /// The strong model of a weak-to-strong run; an error when there is no strong model or no
    /// weak one.
    pub fn strong_over_weak(&self) -> Result<&ModelSpec> {
        let strong = self
            .strong
            .as_ref()
            .context("the config has no [strong] model")?;
        if self.weak.is_empty() {
            bail!("the config has no [[weak]] model");
        }
        Ok(strong)
    }

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
                bail!("precision: bf16 is a GPU's precision (device = \"cuda\"); on the CPU use \"auto\", \"f32\", \"int8\" or \"bf16x2\" (CPUs with AVX512-BF16 or Intel AMX)")
            }
            (crate::runtime::DeviceSetting::Cuda(_), PrecisionSetting::Bf16x2) => {
                bail!("precision: bf16x2 runs on CPUs only (with AVX512-BF16 or Intel AMX); with device = \"{}\" use \"auto\" (bf16) or \"f32\"", self.device)
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
            if !matches!(
                d.after,
                generation::Method::Edl | generation::Method::EdlStep
            ) {
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
        // Decoding never defaults to int8 (bf16x2 on CPUs with AVX512-BF16 or AMX-BF16, else f32); features
        // follow the CPU.
        let decoding = if crate::ops::bf16x2::available() {
            Precision::Bf16x2
        } else {
            Precision::F32
        };
        assert_eq!(config.precision.resolve(Purpose::Decoding), decoding);
        let int8_features = crate::ops::int8::Kernel::dot_products_available();
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
