//! What `ws2s run` checks before any work, and all that `ws2s config check` does: the checks
//! that need neither training nor inference. The config's own values are checked when it is
//! parsed (config.rs); here come the files it points to: every model resolves and its files
//! parse (config or GGUF header, safetensors headers against the file sizes, tokenizer), the
//! data files exist and every line parses, the split sizes fit, and the output folder can be
//! created. It takes seconds, so a run never fails after hours on something knowable at start.

use crate::config::{default_lora, ExperimentConfig, TrainingMode};
use crate::data::Dataset;
use crate::models;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// What the checks found, for `config check`'s summary.
pub struct Checked {
    pub datasets: Vec<Dataset>,
    /// (config key, resolved model path)
    pub models: Vec<(String, PathBuf)>,
}

/// Runs every check; `out` is the run folder (None: not checked). Errors name the config file
/// and the key, or the data file and the line.
pub fn check(config: &ExperimentConfig, path: &Path, out: Option<&Path>) -> Result<Checked> {
    if config.sweep.is_none() && config.weak.is_empty() {
        bail!(
            "{}: no [[weak]] model; give at least one (two or more for the multi-weak methods)",
            path.display()
        );
    }
    if config.sweep.is_none() && config.strong.is_none() {
        bail!("{}: no [strong] model", path.display());
    }
    config
        .device
        .device()
        .with_context(|| format!("{}: device", path.display()))?;
    // The data and every model's files are read side by side (a GGUF model's check builds its
    // tokenizer: ~0.2 s each); errors are reported in the same order as one after the other:
    // the data first (with models not yet installed, the rest has still been checked), then
    // the models in config order.
    let keys = config.model_keys();
    let (datasets, checked) = rayon::join(
        || super::load_datasets(config, path),
        || {
            keys.par_iter()
                .map(|(_, spec)| {
                    models::resolve_model(&spec.model)
                        .and_then(|p| models::check_model_files(&p).map(|arch| (p, arch)))
                })
                .collect::<Vec<_>>()
        },
    );
    let datasets =
        datasets.with_context(|| format!("{}: loading the data of [task]", path.display()))?;
    let mut resolved = Vec::new();
    for ((key, spec), checked) in keys.into_iter().zip(checked) {
        let (model, arch) = checked
            .with_context(|| format!("{}: {key}.model = \"{}\"", path.display(), spec.model))?;
        if let Some((limit, key_name)) = arch.max_positions() {
            if spec.max_tokens > limit {
                bail!(
                    "{}: {key}.max_tokens = {} is more than {} can read ({limit} positions, `{key_name}` in its config); set max_tokens <= {limit}",
                    path.display(),
                    spec.max_tokens,
                    spec.model
                );
            }
        }
        if spec.mode == TrainingMode::Lora {
            let lora = spec.lora.clone().unwrap_or_else(default_lora);
            let modules = arch.adapter_modules();
            if let Some(t) = lora.targets.iter().find(|t| !modules.contains(&t.as_str())) {
                bail!(
                    "{}: {key}.lora.targets: `{t}` is not a module of {} ({}); its modules: {}",
                    path.display(),
                    spec.model,
                    arch.name(),
                    modules.join(", ")
                );
            }
        }
        resolved.push((key, model));
    }
    if let Some(out) = out {
        check_writable(out)?;
    }
    Ok(Checked {
        datasets,
        models: resolved,
    })
}

/// The nearest existing folder of `out` must be a writable folder (nothing is created here).
fn check_writable(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a folder", out.display());
    }
    let mut existing = out.to_path_buf();
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent.to_path_buf(),
            _ => {
                existing = PathBuf::from(".");
                break;
            }
        }
    }
    let writable = existing.is_dir() && {
        let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: access() only reads the NUL-terminated path.
        unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
    };
    if !writable {
        bail!(
            "--out {}: cannot create the run folder there ({} is not a writable folder)",
            out.display(),
            existing.display()
        );
    }
    Ok(())
}
