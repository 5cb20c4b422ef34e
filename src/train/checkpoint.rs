//! Checkpoints: weights, optimiser state and progress in one safetensors file, written atomically
//! (to a temporary file that is then renamed), so a crash never leaves a half-written checkpoint.

use super::optimizer::AdamW;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Where training stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Epochs completed.
    pub epoch: usize,
    pub best_valid: Option<f64>,
    pub best_epoch: Option<usize>,
    pub epochs_without_improvement: usize,
}

pub fn save(path: &Path, optimizer: &AdamW, progress: &Progress) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, name) in optimizer.names.iter().enumerate() {
        let var = &optimizer.vars()[i];
        let shape = var.as_tensor().shape().clone();
        tensors.insert(
            format!("param.{name}"),
            var.as_tensor().to_device(&Device::Cpu)?,
        );
        tensors.insert(
            format!("adam_m.{name}"),
            Tensor::from_vec(optimizer.m[i].clone(), &shape, &Device::Cpu)?,
        );
        tensors.insert(
            format!("adam_v.{name}"),
            Tensor::from_vec(optimizer.v[i].clone(), &shape, &Device::Cpu)?,
        );
    }
    let state = vec![
        progress.epoch as f64,
        optimizer.step as f64,
        progress.best_valid.unwrap_or(f64::NAN),
        progress.best_epoch.map_or(-1.0, |e| e as f64),
        progress.epochs_without_improvement as f64,
    ];
    tensors.insert("state".into(), Tensor::new(state.as_slice(), &Device::Cpu)?);
    crate::io::save_tensors(path, &tensors)
}

/// Restores weights and optimiser state; returns the progress recorded with them.
pub fn load(path: &Path, optimizer: &mut AdamW) -> Result<Progress> {
    let tensors = crate::io::load_tensors(path, &Device::Cpu)
        .with_context(|| format!("{}: not a readable checkpoint", path.display()))?;
    let get = |key: &str| {
        tensors
            .get(key)
            .ok_or_else(|| anyhow!("{}: `{key}` is missing", path.display()))
    };
    for (i, name) in optimizer.names.clone().iter().enumerate() {
        let var = optimizer.vars()[i].clone();
        let param = get(&format!("param.{name}"))?;
        if param.shape() != var.as_tensor().shape() {
            bail!(
                "{}: `{name}` has shape {:?}, the model has {:?}",
                path.display(),
                param.dims(),
                var.as_tensor().dims()
            );
        }
        var.set(
            &param
                .to_device(var.as_tensor().device())?
                .to_dtype(var.as_tensor().dtype())?,
        )?;
        optimizer.m[i] = get(&format!("adam_m.{name}"))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        optimizer.v[i] = get(&format!("adam_v.{name}"))?
            .flatten_all()?
            .to_vec1::<f32>()?;
    }
    let state = get("state")?.to_vec1::<f64>()?;
    if state.len() != 5 {
        bail!("{}: malformed `state`", path.display());
    }
    optimizer.step = state[1] as usize;
    Ok(Progress {
        epoch: state[0] as usize,
        best_valid: (!state[2].is_nan()).then_some(state[2]),
        best_epoch: (state[3] >= 0.0).then_some(state[3] as usize),
        epochs_without_improvement: state[4] as usize,
    })
}
