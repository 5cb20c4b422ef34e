//! lgamma, digamma and trigamma: their formulas on one number (accumulated in f64) and the fused
//! elementwise op that applies them to a CPU tensor with the exact derivative as backward.
//! `losses::special` builds the tensor functions on these (and their decomposed forms for other
//! devices). For x > 0: shift to z = x + 6 with the recurrences, then the Stirling / asymptotic
//! series, whose first omitted terms are below 1e-9 at z >= 6.

use super::real::{by_dtype, fusable, typed, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// The recurrence's shift: the series is evaluated at z = x + SHIFT.
pub(crate) const SHIFT: usize = 6;
/// From here on the scalar forms use the series directly (z = x >= 6 is where it is accurate).
const LARGE: f64 = 64.0;

/// Where the series is evaluated for x: z = x + SHIFT below LARGE, x itself above.
fn shifted(x: f64) -> f64 {
    if x < LARGE {
        x + SHIFT as f64
    } else {
        x
    }
}

/// log Gamma(x) of one number, x > 0.
pub fn lgamma_scalar(x: f64) -> f64 {
    let z = shifted(x);
    lgamma_at(x, z, z.ln())
}

/// log Gamma(x) from z = [`shifted`]`(x)` and ln z.
fn lgamma_at(x: f64, z: f64, ln_z: f64) -> f64 {
    // The shift only matters for small x; past it the series alone is as accurate (and
    // x (x+1) ... (x+5) would overflow for x near 1e51).
    let product: f64 = if x < LARGE {
        (0..SHIFT).map(|k| x + k as f64).product()
    } else {
        1.0
    };
    let inv2 = 1.0 / (z * z);
    let series =
        ((((-1.0 / 1680.0) * inv2 + 1.0 / 1260.0) * inv2 - 1.0 / 360.0) * inv2 + 1.0 / 12.0) / z;
    (z - 0.5) * ln_z - z + 0.5 * (2.0 * std::f64::consts::PI).ln() + series - product.ln()
}

/// psi(x) of one number, x > 0.
pub fn digamma_scalar(x: f64) -> f64 {
    let z = shifted(x);
    digamma_at(x, z, z.ln())
}

/// psi(x) from z = [`shifted`]`(x)` and ln z.
fn digamma_at(x: f64, z: f64, ln_z: f64) -> f64 {
    let correction: f64 = if x < LARGE {
        (0..SHIFT).map(|k| 1.0 / (x + k as f64)).sum()
    } else {
        0.0
    };
    let inv2 = 1.0 / (z * z);
    let series = (((((-1.0 / 132.0) * inv2 + 1.0 / 240.0) * inv2 - 1.0 / 252.0) * inv2
        + 1.0 / 120.0)
        * inv2
        - 1.0 / 12.0)
        * inv2;
    ln_z - 0.5 / z + series - correction
}

/// (lgamma(x), psi(x)): the values of [`lgamma_scalar`] and [`digamma_scalar`], bit for bit,
/// with one logarithm of the shifted argument for both.
pub fn lgamma_digamma(x: f64) -> (f64, f64) {
    let z = shifted(x);
    let ln_z = z.ln();
    (lgamma_at(x, z, ln_z), digamma_at(x, z, ln_z))
}

/// psi'(x) (trigamma) of one number, x > 0: sum_k 1/(x+k)^2 for the shift, then
/// 1/z + 1/(2z^2) + 1/(6z^3) - 1/(30z^5) + 1/(42z^7) - 1/(30z^9) + 5/(66z^11).
pub fn trigamma_scalar(x: f64) -> f64 {
    let (z, correction) = if x < LARGE {
        (
            x + SHIFT as f64,
            (0..SHIFT).map(|k| 1.0 / (x + k as f64).powi(2)).sum(),
        )
    } else {
        (x, 0.0)
    };
    let inv = 1.0 / z;
    let inv2 = inv * inv;
    let series = ((((5.0 / 66.0 * inv2 - 1.0 / 30.0) * inv2 + 1.0 / 42.0) * inv2 - 1.0 / 30.0)
        * inv2
        + 1.0 / 6.0)
        * inv2
        * inv;
    correction + inv + 0.5 * inv2 + series
}

/// The special functions as fused elementwise ops.
#[derive(Clone, Copy, Debug)]
pub enum Special {
    Lgamma,
    Digamma,
    Trigamma,
}

impl Special {
    fn eval(self, x: f64) -> f64 {
        match self {
            Special::Lgamma => lgamma_scalar(x),
            Special::Digamma => digamma_scalar(x),
            Special::Trigamma => trigamma_scalar(x),
        }
    }

    fn map<T: Real>(self, x: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        let mut out = vec![T::from(0.0); x.len()];
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, x)| {
                for (o, v) in o.iter_mut().zip(x) {
                    *o = T::from(self.eval(v.to()));
                }
            });
        out
    }
}

impl CustomOp1 for Special {
    fn name(&self) -> &'static str {
        match self {
            Special::Lgamma => "fused-lgamma",
            Special::Digamma => "fused-digamma",
            Special::Trigamma => "fused-trigamma",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = by_dtype!(storage.dtype(), name, |T| T::wrap(
            self.map::<T>(typed(storage, layout, name)?)
        ));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let derivative = match self {
            Special::Lgamma => Special::Digamma,
            Special::Digamma => Special::Trigamma,
            Special::Trigamma => candle_core::bail!("fused-trigamma has no backward"),
        };
        Ok(Some(
            grad_res.mul(&arg.contiguous()?.apply_op1_no_bwd(&derivative)?)?,
        ))
    }
}

/// `f` applied elementwise as one fused op with its exact derivative, on the CPU in f32 / f64;
/// `None` elsewhere (use the decomposed form).
pub fn special(x: &Tensor, f: Special) -> Result<Option<Tensor>> {
    if !fusable(x) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(f)?))
}
