//! Heads on top of a backbone: pooling of hidden states and a linear classification head.

use super::params::Params;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// How a sequence of hidden states becomes one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The last real (non-padding) token: the usual choice for decoders.
    LastToken,
    /// The mean over real tokens: sentence-transformers encoders such as MiniLM.
    Mean,
    /// The first token ([CLS]).
    Cls,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::LastToken => "last_token",
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
        }
    }
}

/// Pools hidden states [B, T, H] with 0/1 mask rows into [B, H]; differentiable.
pub fn pool(hidden: &Tensor, mask: &[Vec<u32>], pooling: Pooling) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let device = hidden.device();
    if mask.len() != b || mask.iter().any(|row| row.len() != t) {
        bail!(
            "mask of {} rows does not match hidden states [{b}, {t}, {h}]",
            mask.len()
        );
    }
    match pooling {
        Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?),
        Pooling::LastToken => {
            let mut last = Vec::with_capacity(b);
            for row in mask {
                match row.iter().rposition(|&m| m == 1) {
                    Some(i) => last.push(i as u32),
                    None => bail!("a sequence without any real token cannot be pooled"),
                }
            }
            let index = Tensor::from_vec(last, (b, 1, 1), device)?
                .broadcast_as((b, 1, h))?
                .contiguous()?;
            Ok(hidden.gather(&index, 1)?.squeeze(1)?)
        }
        Pooling::Mean => {
            let flat: Vec<f32> = mask
                .iter()
                .flat_map(|row| row.iter().map(|&m| m as f32))
                .collect();
            let weights = Tensor::from_vec(flat, (b, t, 1), device)?.to_dtype(hidden.dtype())?;
            let counts = weights.sum(1)?.clamp(1.0, f64::MAX)?;
            Ok(hidden
                .broadcast_mul(&weights)?
                .sum(1)?
                .broadcast_div(&counts)?)
        }
    }
}

/// A linear classification head: logits = W x + b, W [K, H], initialised uniform in
/// [-1/sqrt(H), 1/sqrt(H)] from the seed (as nn.Linear), b zero.
#[derive(Debug, Clone)]
pub struct ClassificationHead {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl ClassificationHead {
    pub fn new(params: &mut Params, hidden: usize, classes: usize) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        Ok(ClassificationHead {
            weight: params.new_var("head.weight", &[classes, hidden], bound)?,
            bias: params.new_var("head.bias", &[classes], 0.0)?,
        })
    }

    /// Logits [B, K] from pooled features [B, H].
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(pooled
            .to_dtype(DType::F32)?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pooling_picks_the_right_positions() {
        // hidden[b, t, :] = [10 b + t, -(10 b + t)]
        let values: Vec<f32> = (0..2)
            .flat_map(|b| {
                (0..3).flat_map(move |t| {
                    let v = (10 * b + t) as f32;
                    [v, -v]
                })
            })
            .collect();
        let hidden = Tensor::from_vec(values, (2, 3, 2), &Device::Cpu).unwrap();
        let mask = vec![vec![1, 1, 0], vec![0, 1, 1]];
        let last = pool(&hidden, &mask, Pooling::LastToken)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(last, vec![vec![1.0, -1.0], vec![12.0, -12.0]]);
        let mean = pool(&hidden, &mask, Pooling::Mean)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mean, vec![vec![0.5, -0.5], vec![11.5, -11.5]]);
        let cls = pool(&hidden, &mask, Pooling::Cls)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(cls, vec![vec![0.0, 0.0], vec![10.0, -10.0]]);
        assert!(pool(&hidden, &[vec![0, 0, 0], vec![1, 1, 1]], Pooling::LastToken).is_err());
    }
}
