//! The training loop.

use super::checkpoint::{self, Progress};
use super::optimizer::{AdamW, AdamWConfig};
use super::schedule::{Schedule, ScheduleKind};
use crate::models::features::progress_bar;
use crate::models::nn::with_training;
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one update.
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: ScheduleKind,
    /// Fraction of the updates used for linear warm-up.
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    pub max_grad_norm: Option<f64>,
    /// Stop after this many epochs without a better validation score.
    pub patience: Option<usize>,
    pub seed: u64,
    /// Show a progress bar.
    #[serde(skip)]
    pub progress: bool,
    /// Return after this many epochs in this call, as if the run had been interrupted there (it
    /// resumes from its checkpoint with the same settings); `None`: run to the end.
    #[serde(skip)]
    pub stop_after_epochs: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 3,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            schedule: ScheduleKind::Linear,
            warmup_ratio: 0.0,
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            patience: None,
            seed: 0,
            progress: false,
            stop_after_epochs: None,
        }
    }
}

/// What the loop trains: a loss over batches of example indices, and optionally a validation
/// score (lower is better).
pub trait TrainTask {
    fn num_examples(&self) -> usize;
    /// Length of example `i` (tokens), for length-bucketed batching.
    fn length(&self, _i: usize) -> usize {
        1
    }
    /// Mean loss over `batch`; `progress` is the fraction of training done, in [0, 1].
    fn loss(&self, batch: &[usize], progress: f64) -> Result<Tensor>;
    fn validate(&self) -> Result<Option<f64>> {
        Ok(None)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub valid: Option<f64>,
    pub lr: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    pub epochs_run: usize,
    pub updates: usize,
    pub best_valid: Option<f64>,
    pub best_epoch: Option<usize>,
    pub stopped_early: bool,
    pub history: Vec<EpochLog>,
}

/// Batches of one epoch: the examples shuffled with (seed, epoch), cut into groups of 50 batches,
/// each group sorted by length (little padding) and cut into batches, and the batches shuffled.
pub fn length_bucketed_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = Rng::derived(seed, &format!("batches/{epoch}"));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let batch_size = batch_size.max(1);
    let mut batches = Vec::new();
    for group in order.chunks(batch_size * 50) {
        let mut group = group.to_vec();
        group.sort_by_key(|&i| lengths[i]);
        batches.extend(group.chunks(batch_size).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Checkpoint files of a run folder.
pub fn last_checkpoint(dir: &Path) -> PathBuf {
    dir.join("last.safetensors")
}

pub fn best_checkpoint(dir: &Path) -> PathBuf {
    dir.join("best.safetensors")
}

/// The error of a training that diverged (a non-finite loss or gradient norm) at `epoch` and
/// `batch` (0-based) with learning rate `lr`: where, the settings most likely responsible, and
/// the last good checkpoint.
fn divergence(
    what: String,
    (epoch, batch, lr): (usize, usize, f64),
    config: &TrainConfig,
    checkpoints: Option<&Path>,
) -> anyhow::Error {
    let kept = checkpoints.map(last_checkpoint).filter(|p| p.exists());
    anyhow::anyhow!(
        "{what} at epoch {}, batch {} (learning rate {lr:.3e} at this step, lr = {}, max_grad_norm = {}); \
         the likely causes: a learning rate too high for this model, no gradient clipping, or a loss's settings (weights, evidence clamp); training stopped{}",
        epoch + 1,
        batch + 1,
        config.lr,
        config.max_grad_norm.map_or("none".to_string(), |n| n.to_string()),
        kept.map_or(String::new(), |p| format!(
            "; the last good checkpoint is {}",
            p.display()
        ))
    )
}

/// Trains `vars` on `task`. With a checkpoint folder, writes `last.safetensors` after every
/// epoch and `best.safetensors` when validation improves, and resumes from `last.safetensors`
/// when it exists (a finished run resumes to its end at once).
pub fn train(
    task: &dyn TrainTask,
    vars: &BTreeMap<String, Var>,
    config: &TrainConfig,
    checkpoints: Option<&Path>,
) -> Result<TrainReport> {
    if vars.is_empty() {
        bail!("nothing to train: the model has no trainable parameters");
    }
    if task.num_examples() == 0 {
        bail!("nothing to train on: no examples");
    }
    let lengths: Vec<usize> = (0..task.num_examples()).map(|i| task.length(i)).collect();
    let batches_per_epoch = lengths.len().div_ceil(config.batch_size.max(1));
    let updates_per_epoch = batches_per_epoch.div_ceil(config.grad_accum.max(1));
    let total_updates = updates_per_epoch * config.epochs;
    let schedule = Schedule {
        kind: config.schedule,
        base_lr: config.lr,
        warmup_steps: (config.warmup_ratio * total_updates as f64).round() as usize,
        total_steps: total_updates,
    };
    let mut optimizer = AdamW::new(vars, config.adamw.clone());
    let mut progress = Progress {
        epoch: 0,
        best_valid: None,
        best_epoch: None,
        epochs_without_improvement: 0,
    };
    if let Some(dir) = checkpoints {
        if last_checkpoint(dir).exists() {
            // A torn checkpoint fails its checksum before any weight is set: start over.
            match checkpoint::load(&last_checkpoint(dir), &mut optimizer) {
                Ok(p) => progress = p,
                Err(err) => {
                    eprintln!("warning: checkpoint not used, training from the start: {err:#}")
                }
            }
        }
    }
    let mut history = Vec::new();
    let mut stopped_early = false;
    let total_micro = (batches_per_epoch * config.epochs).max(1) as f64;
    let started = std::time::Instant::now();
    while progress.epoch < config.epochs {
        if config.stop_after_epochs.is_some_and(|n| history.len() >= n) {
            break;
        }
        if let Some(patience) = config.patience {
            if progress.epochs_without_improvement >= patience {
                stopped_early = true;
                break;
            }
        }
        let epoch = progress.epoch;
        let batches = length_bucketed_batches(&lengths, config.batch_size, config.seed, epoch);
        let bar = progress_bar(
            config.progress,
            lengths.len() as u64,
            &format!("epoch {}", epoch + 1),
        );
        let (mut loss_sum, mut loss_count) = (0.0, 0usize);
        // The loss of the micro-batches since the last update (the training log's loss).
        let (mut update_sum, mut update_count) = (0.0, 0usize);
        let mut sum = optimizer.new_grad_sum();
        let mut lr = schedule.lr(optimizer.step);
        for (b, batch) in batches.iter().enumerate() {
            let micro = epoch * batches_per_epoch + b;
            let fraction = micro as f64 / total_micro;
            let dropout_seed =
                crate::rng::Rng::derived(config.seed, &format!("step/{micro}")).next_u64();
            let loss = with_training(dropout_seed, || task.loss(batch, fraction))?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            // Where training diverged, and the settings most likely responsible.
            let diverged =
                |what: String, lr: f64| divergence(what, (epoch, b, lr), config, checkpoints);
            if !value.is_finite() {
                return Err(diverged(format!("the loss is {value}"), lr));
            }
            optimizer.accumulate(&mut sum, &loss.backward()?)?;
            loss_sum += value;
            loss_count += 1;
            update_sum += value;
            update_count += 1;
            if sum.micro_batches == config.grad_accum.max(1) || b + 1 == batches.len() {
                lr = schedule.lr(optimizer.step);
                let grad_norm = optimizer
                    .update(&sum, lr, config.max_grad_norm)
                    .map_err(|e| diverged(e.to_string(), lr))?;
                sum.reset();
                crate::train::log::record(crate::train::log::Step {
                    epoch: epoch + 1,
                    step: optimizer.step,
                    loss: update_sum / update_count as f64,
                    lr: Some(lr),
                    grad_norm,
                    seconds: started.elapsed().as_secs_f64(),
                });
                (update_sum, update_count) = (0.0, 0);
            }
            bar.inc(batch.len() as u64);
            bar.set_message(format!(
                "epoch {} loss {:.4}",
                epoch + 1,
                loss_sum / loss_count as f64
            ));
        }
        bar.finish_and_clear();
        let valid = task.validate()?;
        progress.epoch = epoch + 1;
        let improved = match (valid, progress.best_valid) {
            (Some(v), Some(best)) => v < best,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if improved {
            progress.best_valid = valid;
            progress.best_epoch = Some(epoch + 1);
            progress.epochs_without_improvement = 0;
        } else if valid.is_some() {
            progress.epochs_without_improvement += 1;
        }
        if let Some(dir) = checkpoints {
            if improved {
                checkpoint::save(&best_checkpoint(dir), &optimizer, &progress)?;
            }
            checkpoint::save(&last_checkpoint(dir), &optimizer, &progress)?;
        }
        history.push(EpochLog {
            epoch: epoch + 1,
            train_loss: loss_sum / loss_count.max(1) as f64,
            valid,
            lr,
        });
    }
    Ok(TrainReport {
        epochs_run: history.len(),
        updates: optimizer.step,
        best_valid: progress.best_valid,
        best_epoch: progress.best_epoch,
        stopped_early,
        history,
    })
}
