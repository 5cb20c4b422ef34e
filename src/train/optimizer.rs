//! AdamW (Loshchilov & Hutter) in one pass over each parameter: decoupled weight decay
//! theta <- theta (1 - lr wd), then m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
//! theta <- theta - lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps). Parameters are updated in
//! parallel with rayon, blocks of 16k values each one vectorized loop (`ops::simd::adamw`); the
//! gradient norm sums fixed blocks in order, so it does not depend on the number of threads.
//! candle's own AdamW is much slower (STACK.md trap 3).

use anyhow::{bail, Result};
use candle_core::{
    backprop::GradStore, CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// AdamW's settings; a config may set any of them (the rest keep their defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Per-parameter state, in the order of the names.
pub struct AdamW {
    pub config: AdamWConfig,
    pub names: Vec<String>,
    vars: Vec<Var>,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Number of updates done.
    pub step: usize,
}

/// Gradients summed over micro-batches (gradient accumulation), one flat buffer per parameter.
pub struct GradSum {
    pub sums: Vec<Vec<f32>>,
    pub micro_batches: usize,
}

impl GradSum {
    /// Zeroes the sums for the next update (keeps the buffers).
    pub fn reset(&mut self) {
        self.sums.par_iter_mut().for_each(|buffer| buffer.fill(0.0));
        self.micro_batches = 0;
    }
}

impl AdamW {
    pub fn new(vars: &BTreeMap<String, Var>, config: AdamWConfig) -> Self {
        let names: Vec<String> = vars.keys().cloned().collect();
        let vars: Vec<Var> = vars.values().cloned().collect();
        let zeros = |v: &Var| vec![0f32; v.as_tensor().elem_count()];
        AdamW {
            config,
            m: vars.iter().map(zeros).collect(),
            v: vars.iter().map(zeros).collect(),
            names,
            vars,
            step: 0,
        }
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// An empty gradient sum for these parameters.
    pub fn new_grad_sum(&self) -> GradSum {
        GradSum {
            sums: self
                .vars
                .iter()
                .map(|v| vec![0f32; v.as_tensor().elem_count()])
                .collect(),
            micro_batches: 0,
        }
    }

    /// Adds one backward pass's gradients. A parameter without a gradient contributes zeros.
    pub fn accumulate(&self, sum: &mut GradSum, grads: &GradStore) -> Result<()> {
        for (buffer, var) in sum.sums.iter_mut().zip(&self.vars) {
            if let Some(grad) = grads.get(var.as_tensor()) {
                // Read an f32 CPU gradient where it lies; anything else is converted first.
                let (storage, layout) = grad.storage_and_layout();
                if let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) =
                    (&*storage, layout.contiguous_offsets())
                {
                    add_into(buffer, &values[start..end]);
                    continue;
                }
                drop(storage);
                let values = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                add_into(buffer, &values);
            }
        }
        sum.micro_batches += 1;
        Ok(())
    }

    /// One update with the mean of the accumulated gradients, clipped to a global L2 norm of
    /// `max_grad_norm` when given. Returns the gradient norm before clipping. A non-finite norm
    /// is an error and leaves the parameters untouched.
    pub fn update(&mut self, sum: &GradSum, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        if sum.micro_batches == 0 {
            bail!("no gradients accumulated");
        }
        let mean_scale = 1.0 / sum.micro_batches as f64;
        // Sums of squares of fixed blocks, added in order: the same norm whatever the threads.
        let squared: f64 = sum
            .sums
            .iter()
            .map(|g| {
                let blocks: Vec<f64> = g
                    .par_chunks(BLOCK)
                    .map(crate::ops::simd::sum_of_squares)
                    .collect();
                blocks.iter().sum::<f64>()
            })
            .sum();
        let norm = squared.sqrt() * mean_scale;
        if !norm.is_finite() {
            bail!("the gradient norm is {norm}");
        }
        let clip = match max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        let grad_scale = (mean_scale * clip) as f32;
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let step_size = (lr / bias1) as f32;
        let bias2_sqrt = bias2.sqrt() as f32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let eps = c.eps as f32;
        let step = StepConstants {
            grad_scale,
            b1,
            b2,
            step_size,
            bias2_sqrt,
            decay,
            eps,
        };
        for (i, var) in self.vars.iter().enumerate() {
            let tensor = var.as_tensor();
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &sum.sums[i]);
            if tensor.device().is_cpu() && tensor.dtype() == DType::F32 {
                // In place on the parameter's own storage: no copy out, no copy back.
                tensor.inplace_op1(&AdamWStep {
                    moments: Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
                    g,
                    c: step,
                })?;
                continue;
            }
            let mut theta = tensor
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            apply(step, &mut theta, m, v, g);
            let updated = Tensor::from_vec(theta, tensor.shape(), tensor.device())?
                .to_dtype(tensor.dtype())?;
            var.set(&updated)?;
        }
        Ok(norm)
    }
}

/// Values per parallel task of the optimizer's passes (each a vectorized loop).
const BLOCK: usize = 1 << 14;

fn add_into(buffer: &mut [f32], values: &[f32]) {
    buffer
        .par_chunks_mut(BLOCK)
        .zip(values.par_chunks(BLOCK))
        .for_each(|(b, g)| {
            for (b, g) in b.iter_mut().zip(g) {
                *b += g;
            }
        });
}

/// The scalars of one AdamW update.
type StepConstants = crate::ops::simd::AdamScalars;

/// One update of a parameter, blocks in parallel.
fn apply(c: StepConstants, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    theta
        .par_chunks_mut(BLOCK)
        .zip(m.par_chunks_mut(BLOCK))
        .zip(v.par_chunks_mut(BLOCK))
        .zip(g.par_chunks(BLOCK))
        .for_each(|(((p, m), v), g)| crate::ops::simd::adamw(p, m, v, g, c));
}

/// One AdamW update applied to a parameter's storage in place.
struct AdamWStep<'a> {
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    g: &'a [f32],
    c: StepConstants,
}

impl InplaceOp1 for AdamWStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("adamw-step: non-contiguous parameter".into())
        })?;
        let CpuStorage::F32(theta) = storage else {
            candle_core::bail!("adamw-step: f32 parameters only");
        };
        let mut moments = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("adamw-step: poisoned".into()))?;
        let (m, v) = &mut *moments;
        apply(self.c, &mut theta[start..end], m, v, self.g);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn two_steps_match_the_formula_computed_by_hand() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(&vars, config);
        let (lr, grads) = (0.1, [[0.5f64, -1.0], [0.25, 2.0]]);
        let mut theta = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (step, g) in grads.iter().enumerate() {
            // loss = sum(g * w) has gradient g
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap();
            let store = (var.as_tensor() * &gt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut sum = opt.new_grad_sum();
            opt.accumulate(&mut sum, &store).unwrap();
            opt.update(&sum, lr, None).unwrap();
            let t = (step + 1) as i32;
            for k in 0..2 {
                theta[k] *= 1.0 - lr * 0.1;
                m[k] = 0.9 * m[k] + 0.1 * g[k];
                v[k] = 0.99 * v[k] + 0.01 * g[k] * g[k];
                let m_hat = m[k] / (1.0 - 0.9f64.powi(t));
                let v_hat = v[k] / (1.0 - 0.99f64.powi(t));
                theta[k] -= lr * m_hat / (v_hat.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(theta) {
            assert!((*g as f64 - e).abs() < 1e-6, "{g} vs {e}");
        }
    }

    #[test]
    fn clipping_and_accumulation() {
        let var = Var::new(&[0.0f32, 0.0], &Device::Cpu).unwrap();
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let opt = AdamW::new(&vars, AdamWConfig::default());
        let mut sum = opt.new_grad_sum();
        for g in [[3.0f32, 4.0], [3.0, 4.0]] {
            let gt = Tensor::new(&g, &Device::Cpu).unwrap();
            let store = (var.as_tensor() * &gt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            opt.accumulate(&mut sum, &store).unwrap();
        }
        let mut opt = opt;
        // the mean gradient (3, 4) has norm 5
        let norm = opt.update(&sum, 1e-3, Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let mut bad = opt.new_grad_sum();
        bad.sums[0][0] = f32::NAN;
        bad.micro_batches = 1;
        let before = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!(opt.update(&bad, 1e-3, None).is_err());
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), before);
    }

    /// A parameter longer than several blocks of the parallel, vectorized passes (and not a
    /// multiple of the vector width): norm, clipping and update against an f64 evaluation.
    #[test]
    fn a_large_parameter_matches_the_formula_in_f64() {
        let n = 2 * BLOCK + 1001;
        let init: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let grad: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos() * 0.01).collect();
        let var = Var::new(init.as_slice(), &Device::Cpu).unwrap();
        let vars = BTreeMap::from([("w".to_string(), var.clone())]);
        let config = AdamWConfig::default();
        let mut opt = AdamW::new(&vars, config.clone());
        let mut sum = opt.new_grad_sum();
        sum.sums[0].copy_from_slice(&grad);
        sum.micro_batches = 2;
        let (lr, max_norm) = (1e-2, 0.1);
        let norm = opt.update(&sum, lr, Some(max_norm)).unwrap();
        let mean: Vec<f64> = grad.iter().map(|&g| g as f64 / 2.0).collect();
        let exact_norm = mean.iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!(
            (norm - exact_norm).abs() < 1e-9 * exact_norm,
            "{norm} vs {exact_norm}"
        );
        assert!(exact_norm > max_norm, "the test is meant to clip");
        let clip = max_norm / (exact_norm + 1e-6);
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        let (b1, b2) = (config.beta1, config.beta2);
        for i in 0..n {
            let g = mean[i] * clip;
            let (m, v) = ((1.0 - b1) * g, (1.0 - b2) * g * g);
            let (m_hat, v_hat) = (m / (1.0 - b1), v / (1.0 - b2));
            let theta = init[i] as f64 * (1.0 - lr * config.weight_decay)
                - lr * m_hat / (v_hat.sqrt() + config.eps);
            assert!(
                (got[i] as f64 - theta).abs() < 1e-6,
                "{i}: {} vs {theta}",
                got[i]
            );
            assert!((opt.m[0][i] as f64 - m).abs() < 1e-9);
        }
    }
}
