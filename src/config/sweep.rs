//! `[sweep]`: the models of a ladder, their order, and the methods of its cells.

use super::*;

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

pub(super) fn default_sweep_single() -> Vec<Method> {
    vec![Method::Xent, Method::Logconf]
}

pub(super) fn default_sweep_multi() -> Vec<Method> {
    vec![Method::Naive, Method::JointDawidSkene, Method::Edl]
}

impl Method {
    /// Learns from one weak model (one run per weak model).
    pub fn is_single_weak(self) -> bool {
        matches!(self, Method::Xent | Method::Logconf | Method::Product)
    }
}

impl SweepConfig {
    pub(super) fn check(&self, config: &ExperimentConfig) -> Result<()> {
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
