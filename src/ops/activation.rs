//! Activations as CPU ops with their own backward: GELU (erf form) and the gated activations
//! of gated MLPs (act(a) * b with SiLU or tanh-GELU).

use super::real::*;
use super::rowgrad::RowGrad;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

pub use super::simd::Gate;

// ---------------------------------------------------------------- row kernels

/// GELU's (erf form) row kernels in each number type (f32: the vectorized ones of
/// [`super::simd`]; f64 with candle's f64 erf).
pub(crate) trait GeluRows: Real {
    /// out = x Phi(x).
    fn gelu_into(x: &[Self], out: &mut [Self]);
    /// g = g (Phi(x) + x phi(x)), in place.
    fn gelu_grad_in_place(x: &[Self], g: &mut [Self]);
    /// out = x Phi(x), and x overwritten with the derivative Phi(x) + x phi(x).
    fn gelu_keeping_grad(x: &mut [Self], out: &mut [Self]);
}

/// The gated activations' row kernels in each number type.
pub(crate) trait GatedRows: Real {
    /// out = act(a) * b.
    fn gated_into(gate: Gate, a: &[Self], b: &[Self], out: &mut [Self]);
    /// da = g b act'(a), db = g act(a).
    fn gated_grad_into(
        gate: Gate,
        a: &[Self],
        b: &[Self],
        g: &[Self],
        da: &mut [Self],
        db: &mut [Self],
    );
}

impl GeluRows for f32 {
    fn gelu_into(x: &[Self], out: &mut [Self]) {
        super::simd::gelu(x, out)
    }
    fn gelu_grad_in_place(x: &[Self], g: &mut [Self]) {
        super::simd::gelu_grad_in_place(x, g)
    }
    fn gelu_keeping_grad(x: &mut [Self], out: &mut [Self]) {
        super::simd::gelu_keeping_grad(x, out)
    }
}

impl GeluRows for f64 {
    fn gelu_into(x: &[Self], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * normal_cdf(v);
        }
    }
    fn gelu_grad_in_place(x: &[Self], g: &mut [Self]) {
        for (gv, &v) in g.iter_mut().zip(x) {
            *gv *= gelu_derivative(v);
        }
    }
    fn gelu_keeping_grad(x: &mut [Self], out: &mut [Self]) {
        for (o, v) in out.iter_mut().zip(x.iter_mut()) {
            *o = *v * normal_cdf(*v);
            *v = gelu_derivative(*v);
        }
    }
}

impl GatedRows for f32 {
    fn gated_into(gate: Gate, a: &[Self], b: &[Self], out: &mut [Self]) {
        super::simd::gated(gate, a, b, out)
    }
    fn gated_grad_into(
        gate: Gate,
        a: &[Self],
        b: &[Self],
        g: &[Self],
        da: &mut [Self],
        db: &mut [Self],
    ) {
        super::simd::gated_grad(gate, a, b, g, da, db)
    }
}

impl GatedRows for f64 {
    fn gated_into(gate: Gate, a: &[Self], b: &[Self], out: &mut [Self]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = gate.eval_f64(x).0 * y;
        }
    }
    fn gated_grad_into(
        gate: Gate,
        a: &[Self],
        b: &[Self],
        g: &[Self],
        da: &mut [Self],
        db: &mut [Self],
    ) {
        for i in 0..a.len() {
            let (act, d) = gate.eval_f64(a[i]);
            da[i] = g[i] * b[i] * d;
            db[i] = g[i] * act;
        }
    }
}

/// d/dx x Phi(x) = Phi(x) + x phi(x), in f64.
fn gelu_derivative(x: f64) -> f64 {
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    normal_cdf(x) + x * inv_sqrt_2pi * (-0.5 * x * x).exp()
}

/// The standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2, with candle's f64 erf.
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
}

// ---------------------------------------------------------------- GELU (erf)

fn gelu_rows<T: GeluRows>(x: &[T]) -> Vec<T> {
    par_rows(x, 1, |x, out| T::gelu_into(x, out))
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = by_dtype!(storage.dtype(), name, |T| T::wrap(gelu_rows::<T>(typed(
            storage, layout, name
        )?)));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad_res.contiguous()?, &GELU_GRAD)?,
        ))
    }
}

/// d/dx [x Phi(x)] = Phi(x) + x phi(x), times g (on a copy of g).
fn gelu_grad_rows<T: GeluRows>(x: &[T], g: &[T], _cols: usize) -> Vec<T> {
    let mut out = g.to_vec();
    par_rows_in_place(x, &mut out, 1, T::gelu_grad_in_place);
    out
}

const GELU_GRAD: RowGrad = RowGrad {
    name: "fused-gelu-erf-grad",
    f32: gelu_grad_rows::<f32>,
    f64: gelu_grad_rows::<f64>,
};

/// GELU with the exact erf form, x Phi(x) (fused on the CPU, with backward).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

// ---------------------------------------------------------------- gated MLP activation

/// out = act(a) * b, the product inside a gated MLP, with its own backward.
struct Gated(Gate);

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "fused-gated"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let gate = self.0;
        let out = by_dtype!(s1.dtype(), name, |T| T::wrap(par_rows2::<T>(
            typed(s1, l1, name)?,
            typed(s2, l2, name)?,
            1,
            |a, b, out| T::gated_into(gate, a, b, out)
        )));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let gate = self.0;
        let g = grad.contiguous()?;
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (as_, bs, gs) = (cpu(&as_, name)?, cpu(&bs, name)?, cpu(&gs, name)?);
        let (da, db) = by_dtype!(a.dtype(), name, |T| {
            let (av, bv, gv) = (
                typed::<T>(as_, al, name)?,
                typed::<T>(bs, bl, name)?,
                typed::<T>(gs, gl, name)?,
            );
            let (da, db) = gated_grads(gate, av, bv, gv);
            (
                Tensor::from_vec(da, a.shape(), a.device())?,
                Tensor::from_vec(db, b.shape(), b.device())?,
            )
        });
        Ok((Some(da), Some(db)))
    }
}

/// (da, db) = (g b act'(a), g act(a)), in parallel blocks.
pub(crate) fn gated_grads<T: GatedRows>(gate: Gate, a: &[T], b: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
    use rayon::prelude::*;
    let mut da = vec![T::from(0.0); a.len()];
    let mut db = vec![T::from(0.0); a.len()];
    let block = rows_per_task(1);
    da.par_chunks_mut(block)
        .zip(db.par_chunks_mut(block))
        .enumerate()
        .for_each(|(i, (da, db))| {
            let r = i * block..i * block + da.len();
            T::gated_grad_into(gate, &a[r.clone()], &b[r.clone()], &g[r], da, db);
        });
    (da, db)
}

/// act(a) * b for same-shaped a, b (the gated MLP of Llama/Qwen2 with [`Gate::Silu`], Gemma
/// with [`Gate::GeluTanh`]): one fused op on the CPU in f32 and f64, with backward; elsewhere
/// candle's activation and a product.
pub fn gated(a: &Tensor, b: &Tensor, gate: Gate) -> Result<Tensor> {
    if !fusable(a) || a.dtype() != b.dtype() || a.shape() != b.shape() {
        let act = match gate {
            Gate::Silu => candle_nn::ops::silu(a)?,
            Gate::GeluTanh => a.gelu()?,
        };
        return act * b;
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Gated(gate))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, probe_loss, random};
    use candle_core::{Device, Var};

    #[test]
    fn fused_gated_activation_matches_candle_in_values_and_gradients() {
        for (i, shape) in [vec![3usize, 5], vec![2, 3, 17], vec![1, 1]]
            .iter()
            .enumerate()
        {
            for gate in [Gate::Silu, Gate::GeluTanh] {
                let a = Var::from_tensor(&random(shape, 40 + i as u64, 6.0)).unwrap();
                let b = Var::from_tensor(&random(shape, 50 + i as u64, 2.0)).unwrap();
                let ours = gated(a.as_tensor(), b.as_tensor(), gate).unwrap();
                let act = match gate {
                    Gate::Silu => candle_nn::ops::silu(a.as_tensor()).unwrap(),
                    Gate::GeluTanh => a.as_tensor().gelu().unwrap(),
                };
                let plain = (act * b.as_tensor()).unwrap();
                assert!(max_diff(&ours, &plain) < 1e-12, "{gate:?} {shape:?}");
                let g1 = probe_loss(&ours, 7).backward().unwrap();
                let g2 = probe_loss(&plain, 7).backward().unwrap();
                for v in [&a, &b] {
                    let d = max_diff(
                        g1.get(v.as_tensor()).unwrap(),
                        g2.get(v.as_tensor()).unwrap(),
                    );
                    // candle's tanh-GELU backward rounds its constants to six digits
                    // (0.797885, 0.0356774); ours is exact (checked against finite
                    // differences in ops::simd's tests).
                    let tol = if gate == Gate::Silu { 1e-10 } else { 1e-6 };
                    assert!(d < tol, "{gate:?} {shape:?}: gradient {d}");
                }
            }
        }
    }

    #[test]
    fn fused_gelu_matches_candle_in_values_and_gradients() {
        let x = Var::from_tensor(&random(&[3, 11], 41, 4.0)).unwrap();
        let ours = gelu_erf(x.as_tensor()).unwrap();
        let plain = x.as_tensor().gelu_erf().unwrap();
        assert!(max_diff(&ours, &plain) < 1e-12);
        let g1 = probe_loss(&ours, 5).backward().unwrap();
        let g2 = probe_loss(&plain, 5).backward().unwrap();
        // candle's backward rounds 1/sqrt(2 pi) to 0.398942
        let d = max_diff(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
        // against finite differences
        let h = 1e-6;
        let xs = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let p = random(&[3, 11], 5, 1.0)
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let grad = g1
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in [0usize, 7, 20, 32] {
            let f = |v: f64| {
                let t = Tensor::new(&[v], &Device::Cpu).unwrap();
                gelu_erf(&t).unwrap().to_vec1::<f64>().unwrap()[0]
            };
            let numeric = (f(xs[i] + h) - f(xs[i] - h)) / (2.0 * h) * p[i];
            assert!(
                (numeric - grad[i]).abs() < 1e-6,
                "{i}: {numeric} vs {}",
                grad[i]
            );
        }
    }
}
