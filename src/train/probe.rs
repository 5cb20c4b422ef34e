//! The linear-probe path: a classification head trained on cached frozen features, with any of
//! the classification losses. Features are standardised with the training set's mean and
//! standard deviation (hidden states of language models have a few very large coordinates).

use super::trainer::{train, TrainConfig, TrainReport, TrainTask};
use crate::models::heads::ClassificationHead;
use crate::models::params::{Params, Trainable};
use anyhow::Result;
use candle_core::{Tensor, D};
use std::collections::HashMap;

/// A trained probe: standardisation and head.
pub struct LinearProbe {
    mean: Tensor,
    std: Tensor,
    pub head: ClassificationHead,
}

impl LinearProbe {
    /// Logits [N, K] of features [N, H].
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let x = features
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?;
        self.head.forward(&x)
    }

    /// Class probabilities [N, K].
    pub fn probs(&self, features: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax(&self.logits(features)?, D::Minus1)?)
    }
}

/// The loss of a batch: (logits of the batch, indices of its examples, fraction of training done).
pub type ProbeLoss<'a> = dyn Fn(&Tensor, &[usize], f64) -> Result<Tensor> + 'a;

struct ProbeTask<'a> {
    features: &'a Tensor,
    probe: &'a LinearProbe,
    loss: &'a ProbeLoss<'a>,
}

impl TrainTask for ProbeTask<'_> {
    fn num_examples(&self) -> usize {
        self.features.dim(0).unwrap_or(0)
    }

    fn loss(&self, batch: &[usize], progress: f64) -> Result<Tensor> {
        let index = Tensor::from_vec(
            batch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            batch.len(),
            self.features.device(),
        )?;
        let logits = self.probe.logits(&self.features.index_select(&index, 0)?)?;
        (self.loss)(&logits, batch, progress)
    }
}

/// Trains a linear probe with `classes` outputs on `features` [N, H].
pub fn fit(
    features: &Tensor,
    classes: usize,
    loss: &ProbeLoss,
    config: &TrainConfig,
) -> Result<(LinearProbe, TrainReport)> {
    let hidden = features.dim(1)?;
    let mean = features.mean_keepdim(0)?;
    let std = (features.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
    let mut params = Params::new(
        HashMap::new(),
        Trainable::Frozen,
        config.seed,
        features.device(),
        "probe",
    );
    let head = ClassificationHead::new(&mut params, hidden, classes)?;
    let probe = LinearProbe { mean, std, head };
    let vars = params.into_vars();
    let task = ProbeTask {
        features,
        probe: &probe,
        loss,
    };
    let report = train(&task, &vars, config, None)?;
    Ok((probe, report))
}
