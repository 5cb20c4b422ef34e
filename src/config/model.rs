//! `[[weak]]` and `[strong]`: a model, its training and its inference precision.

use super::*;

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
    /// bf16 weights, activations as two bf16 (hi + lo): CPUs with AVX512-BF16 or Intel AMX-BF16.
    Bf16x2,
}

impl PrecisionSetting {
    /// The precision for `purpose` on the CPU: as set, or the fastest that passes that use's
    /// check (bf16 is a GPU's precision: f32 here).
    pub fn resolve(self, purpose: crate::ops::Purpose) -> crate::ops::Precision {
        match self {
            PrecisionSetting::Auto => crate::ops::Precision::fastest_for(purpose),
            PrecisionSetting::F32 | PrecisionSetting::Bf16 => crate::ops::Precision::F32,
            PrecisionSetting::Int8 => crate::ops::Precision::Int8,
            PrecisionSetting::Bf16x2 => crate::ops::Precision::Bf16x2,
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
            (false, PrecisionSetting::Bf16x2) => {
                bail!("precision bf16x2 runs on CPUs only (with AVX512-BF16 or Intel AMX); on a GPU use bf16 (auto) or f32")
            }
            (true, PrecisionSetting::Bf16) => {
                bail!(
                    "precision bf16 is a GPU's precision; on the CPU use auto, f32, int8{}",
                    if crate::ops::bf16x2::available() {
                        " or bf16x2 (bf16 weights, activations as two bf16)"
                    } else {
                        ""
                    }
                )
            }
            (true, PrecisionSetting::Bf16x2) if !crate::ops::bf16x2::available() => {
                bail!(
                    "precision bf16x2 needs a CPU with AVX512-BF16 (AMD Zen 4 or later, Intel \
                     Cooper Lake) or Intel AMX-BF16 (Xeon 4th generation or later); this one has \
                     neither (or WS2S_MAX_ISA excludes them): use auto, f32 or int8"
                )
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

    pub(super) fn check(&self, key: &str) -> Result<()> {
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
