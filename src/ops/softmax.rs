//! Softmax over the last dimension as one CPU op with its own backward (one pass forward,
//! one backward, [`super::rowgrad`]).

use super::real::*;
use super::rowgrad::RowGrad;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

// ---------------------------------------------------------------- softmax

/// Softmax's row kernels in each number type (f32: the vectorized ones of [`super::simd`]).
pub(crate) trait SoftmaxRows: Real {
    /// Softmax of every row of `cols` values, in place.
    fn softmax_rows_in_place(data: &mut [Self], cols: usize);
    /// Per row: out = y * (g - sum(g * y)) * scale.
    fn softmax_grad_rows_into(y: &[Self], g: &[Self], out: &mut [Self], cols: usize, scale: f64);
}

impl SoftmaxRows for f32 {
    fn softmax_rows_in_place(data: &mut [Self], cols: usize) {
        super::simd::softmax_rows(data, cols)
    }
    fn softmax_grad_rows_into(y: &[Self], g: &[Self], out: &mut [Self], cols: usize, scale: f64) {
        super::simd::softmax_grad_rows(y, g, out, cols, scale as f32)
    }
}

impl SoftmaxRows for f64 {
    fn softmax_rows_in_place(data: &mut [Self], cols: usize) {
        for row in data.chunks_mut(cols) {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
    }
    fn softmax_grad_rows_into(y: &[Self], g: &[Self], out: &mut [Self], cols: usize, scale: f64) {
        for ((yr, gr), or) in y.chunks(cols).zip(g.chunks(cols)).zip(out.chunks_mut(cols)) {
            let dot: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, a), b) in or.iter_mut().zip(yr).zip(gr) {
                *o = a * (b - dot) * scale;
            }
        }
    }
}

fn softmax_rows<T: SoftmaxRows>(x: &[T], cols: usize) -> Vec<T> {
    par_rows(x, cols, |x, out| {
        out.copy_from_slice(x);
        T::softmax_rows_in_place(out, cols);
    })
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(layout);
        let name = self.name();
        let out = by_dtype!(storage.dtype(), name, |T| T::wrap(softmax_rows::<T>(
            typed(storage, layout, name)?,
            cols
        )));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SOFTMAX_GRAD,
        )?))
    }
}

/// dx = y * (g - sum(g * y)) per row.
fn softmax_grad_rows<T: SoftmaxRows>(y: &[T], g: &[T], cols: usize) -> Vec<T> {
    par_rows2(y, g, cols, |y, g, out| {
        T::softmax_grad_rows_into(y, g, out, cols, 1.0)
    })
}

const SOFTMAX_GRAD: RowGrad = RowGrad {
    name: "fused-softmax-grad",
    f32: softmax_grad_rows::<f32>,
    f64: softmax_grad_rows::<f64>,
};

/// Softmax over the last dimension (fused on the CPU, with backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, probe_loss, random};
    use candle_core::{Device, Var};

    #[test]
    fn fused_softmax_matches_the_decomposed_one_in_values_and_gradients() {
        for (i, shape) in [vec![3usize, 5], vec![2, 3, 4, 7], vec![1, 1], vec![4, 33]]
            .iter()
            .enumerate()
        {
            let x = Var::from_tensor(&random(shape, 10 + i as u64, 30.0)).unwrap();
            let ours = softmax_last_dim(x.as_tensor()).unwrap();
            let plain = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
            assert!(max_diff(&ours, &plain) < 1e-12, "{shape:?}");
            let g1 = probe_loss(&ours, 99).backward().unwrap();
            let g2 = probe_loss(&plain, 99).backward().unwrap();
            let d = max_diff(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert!(d < 1e-12, "{shape:?}: gradient {d}");
        }
        // f32, and huge logits stay finite
        let x = Tensor::new(&[[1e4f32, 0.0, -1e4], [3.0, 3.0, 3.0]], &Device::Cpu).unwrap();
        let y = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y[0], vec![1.0, 0.0, 0.0]);
        assert!((y[1][0] - 1.0 / 3.0).abs() < 1e-7);
    }
}
