//! The training engine: a linear probe learns, runs are reproducible, a stopped-and-resumed run
//! ends with the same weights as an uninterrupted one (LoRA dropout included), NaN stops training
//! keeping the last good checkpoint, early stopping.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use ws2s::losses;
use ws2s::models::heads::{pool, ClassificationHead, Pooling};
use ws2s::models::params::{LoraConfig, Params, Trainable};
use ws2s::models::{network_from_config, read_safetensors, Network};
use ws2s::rng::Rng;
use ws2s::train::trainer::{last_checkpoint, train, TrainConfig, TrainTask};
use ws2s::train::{checkpoint, probe};

fn synthetic(n: usize, seed: u64) -> (Tensor, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for _ in 0..n {
        let class = rng.below(2) as u32;
        let shift = if class == 1 { 1.5 } else { -1.5 };
        x.push(shift + rng.next_f64() as f32 * 2.0 - 1.0);
        x.extend((0..7).map(|_| (rng.next_f64() as f32 - 0.5) * 100.0)); // large, useless coordinates
        y.push(class);
    }
    (Tensor::from_vec(x, (n, 8), &Device::Cpu).unwrap(), y)
}

fn one_hot(labels: &[u32]) -> Tensor {
    let v: Vec<f32> = labels
        .iter()
        .flat_map(|&c| if c == 1 { [0.0, 1.0] } else { [1.0, 0.0] })
        .collect();
    Tensor::from_vec(v, (labels.len(), 2), &Device::Cpu).unwrap()
}

#[test]
fn a_linear_probe_learns_a_separable_task() {
    let (x, y) = synthetic(200, 1);
    let targets = one_hot(&y);
    let loss = |logits: &Tensor, step: &probe::Step| -> Result<Tensor> {
        let idx = Tensor::from_vec(
            step.batch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            step.batch.len(),
            &Device::Cpu,
        )?;
        let t = targets.index_select(&idx, 0)?.to_dtype(logits.dtype())?;
        Ok(losses::xent(logits, &t)?)
    };
    let rows: Vec<Vec<f64>> = y
        .iter()
        .map(|&c| {
            if c == 1 {
                vec![0.0, 1.0]
            } else {
                vec![1.0, 0.0]
            }
        })
        .collect();
    let objective = probe::TensorObjective {
        loss: &loss,
        classes: 2,
        staged: false,
    };
    let config = ws2s::train::convex::SolverConfig::default();
    let (fitted, report) = probe::fit(
        &probe::prepare(&x).unwrap(),
        2,
        &objective,
        &rows,
        &config,
        0,
    )
    .unwrap();
    assert!(report.refit.converged, "{report:?}");
    // The held-out loss falls from the strongest regularisation to the chosen one.
    let chosen = report
        .grid
        .iter()
        .position(|&c| c == report.chosen_c)
        .unwrap();
    assert!(report.scores[chosen] < report.scores[0] * 0.5, "{report:?}");
    let (x_test, y_test) = synthetic(200, 2);
    let probs = fitted.probs(&x_test).unwrap().to_vec2::<f64>().unwrap();
    let correct = probs
        .iter()
        .zip(&y_test)
        .filter(|(p, &c)| (p[1] > 0.5) == (c == 1))
        .count();
    assert!(correct > 180, "accuracy {correct}/200");
}

/// A tiny Llama with LoRA (with dropout) and a classification head on the last token.
struct TinyClassifier {
    network: Network,
    head: ClassificationHead,
    vars: BTreeMap<String, Var>,
    inputs: Vec<Vec<u32>>,
    targets: Tensor,
    nan_from_epoch: Option<usize>,
    calls: Cell<usize>,
}

fn tiny_classifier(nan_from_epoch: Option<usize>) -> TinyClassifier {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tensors = read_safetensors(&[dir.join("model.safetensors")], &Device::Cpu).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.2,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let mut params = Params::new(tensors, Trainable::Lora(lora), 7, &Device::Cpu, "tiny");
    let network = network_from_config(&config, &dir.join("config.json"), &mut params).unwrap();
    let head = ClassificationHead::new(&mut params, 64, 2).unwrap();
    let mut rng = Rng::new(3);
    let inputs: Vec<Vec<u32>> = (0..12)
        .map(|i| (0..3 + i % 4).map(|_| 3 + rng.below(120) as u32).collect())
        .collect();
    let labels: Vec<u32> = (0..12).map(|i| (i % 2) as u32).collect();
    TinyClassifier {
        network,
        head,
        vars: params.into_vars(),
        inputs,
        targets: one_hot(&labels),
        nan_from_epoch,
        calls: Cell::new(0),
    }
}

impl TrainTask for TinyClassifier {
    fn num_examples(&self) -> usize {
        self.inputs.len()
    }

    fn length(&self, i: usize) -> usize {
        self.inputs[i].len()
    }

    fn loss(&self, batch: &[usize], _progress: f64) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        let t = batch.iter().map(|&i| self.inputs[i].len()).max().unwrap();
        let mut ids = vec![0u32; batch.len() * t];
        let mut mask = vec![vec![0u32; t]; batch.len()];
        for (r, &i) in batch.iter().enumerate() {
            for (j, &tok) in self.inputs[i].iter().enumerate() {
                ids[r * t + j] = tok;
                mask[r][j] = 1;
            }
        }
        let ids = Tensor::from_vec(ids, (batch.len(), t), &Device::Cpu)?;
        let hidden = self
            .network
            .hidden(&ids, &mask, &mut self.network.new_cache())?;
        let logits = self
            .head
            .forward(&pool(&hidden, &mask, Pooling::LastToken)?)?;
        let idx = Tensor::from_vec(
            batch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            batch.len(),
            &Device::Cpu,
        )?;
        let loss = losses::xent(&logits, &self.targets.index_select(&idx, 0)?)?;
        // 3 batches per epoch: poison the loss from the given epoch on.
        match self.nan_from_epoch {
            Some(e) if self.calls.get() > 3 * (e - 1) => Ok((loss * f64::NAN)?),
            _ => Ok(loss),
        }
    }
}

fn weights(vars: &BTreeMap<String, Var>) -> Vec<f32> {
    vars.values()
        .flat_map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn resumed_runs_end_with_the_same_weights_as_uninterrupted_ones() {
    let config = TrainConfig {
        epochs: 2,
        batch_size: 4,
        lr: 0.01,
        warmup_ratio: 0.2,
        seed: 5,
        ..Default::default()
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = tiny_classifier(None);
    train(
        &straight,
        &straight.vars,
        &config,
        Some(straight_dir.path()),
    )
    .unwrap();

    let again = tiny_classifier(None);
    train(&again, &again.vars, &config, None).unwrap();
    assert_eq!(
        max_difference(&weights(&straight.vars), &weights(&again.vars)),
        0.0,
        "same seed, same result"
    );

    let resumed_dir = tempfile::tempdir().unwrap();
    let first = tiny_classifier(None);
    let interrupted = TrainConfig {
        stop_after_epochs: Some(1),
        ..config.clone()
    };
    train(&first, &first.vars, &interrupted, Some(resumed_dir.path())).unwrap();
    // A fresh process: new model, state restored from the checkpoint.
    let second = tiny_classifier(None);
    let report = train(&second, &second.vars, &config, Some(resumed_dir.path())).unwrap();
    assert_eq!(report.epochs_run, 1);
    assert_eq!(
        max_difference(&weights(&straight.vars), &weights(&second.vars)),
        0.0,
        "resumed run differs"
    );
    assert!(
        max_difference(
            &weights(&straight.vars),
            &weights(&tiny_classifier(None).vars)
        ) > 0.0,
        "training moved nothing"
    );
    // The LoRA weights (and the head) moved; nothing else is trainable.
    assert!(second
        .vars
        .keys()
        .all(|k| k.contains("lora") || k.starts_with("head.")));
}

#[test]
fn nan_stops_training_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let task = tiny_classifier(Some(2));
    let config = TrainConfig {
        epochs: 3,
        batch_size: 4,
        lr: 0.01,
        ..Default::default()
    };
    let err = train(&task, &task.vars, &config, Some(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the loss is NaN at epoch 2"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let mut opt =
        ws2s::train::optimizer::AdamW::new(&tiny_classifier(None).vars, Default::default());
    let progress = checkpoint::load(&last_checkpoint(dir.path()), &mut opt).unwrap();
    assert_eq!(progress.epoch, 1);
}

struct Worsening {
    epochs_seen: Cell<usize>,
    var: Var,
}

impl TrainTask for Worsening {
    fn num_examples(&self) -> usize {
        4
    }
    fn loss(&self, _batch: &[usize], _p: f64) -> Result<Tensor> {
        Ok(self.var.as_tensor().sqr()?.sum_all()?)
    }
    fn validate(&self) -> Result<Option<f64>> {
        self.epochs_seen.set(self.epochs_seen.get() + 1);
        Ok(Some(self.epochs_seen.get() as f64))
    }
}

#[test]
fn early_stopping_after_patience_epochs_without_improvement() {
    let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let task = Worsening {
        epochs_seen: Cell::new(0),
        var: var.clone(),
    };
    let vars = BTreeMap::from([("w".to_string(), var)]);
    let config = TrainConfig {
        epochs: 10,
        batch_size: 4,
        patience: Some(2),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let report = train(&task, &vars, &config, Some(dir.path())).unwrap();
    assert!(report.stopped_early);
    assert_eq!(report.epochs_run, 3);
    assert_eq!(report.best_epoch, Some(1));
    assert!(dir.path().join("best.safetensors").exists());
}
