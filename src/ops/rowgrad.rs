//! The backward of the row-wise fused ops whose gradient needs no graph of its own (softmax,
//! GELU): one CPU op that computes it row by row from two same-shaped tensors.

use super::activation::GeluRows;
use super::real::*;
use super::softmax::SoftmaxRows;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape};

/// dx = y * (g - sum(g * y)) per row.
fn softmax_grad_rows<T: SoftmaxRows>(y: &[T], g: &[T], cols: usize) -> Vec<T> {
    par_rows2(y, g, cols, |y, g, out| {
        T::softmax_grad_rows_into(y, g, out, cols, 1.0)
    })
}

/// d/dx [x Phi(x)] = Phi(x) + x phi(x), times g (on a copy of g).
fn gelu_grad_rows<T: GeluRows>(x: &[T], g: &[T], _cols: usize) -> Vec<T> {
    let mut out = g.to_vec();
    par_rows_in_place(x, &mut out, 1, T::gelu_grad_in_place);
    out
}

/// Which gradient a [`RowGrad`] computes.
#[derive(Clone, Copy)]
pub(crate) enum RowGradKind {
    Softmax,
    Gelu,
}

/// A gradient computed from two same-shaped tensors row by row (no backward of its own).
pub(crate) struct RowGrad(pub(crate) RowGradKind);

impl RowGrad {
    fn rows<T: SoftmaxRows + GeluRows>(&self, a: &[T], b: &[T], cols: usize) -> Vec<T> {
        match self.0 {
            RowGradKind::Softmax => softmax_grad_rows(a, b, cols),
            RowGradKind::Gelu => gelu_grad_rows(a, b, cols),
        }
    }
}

impl CustomOp2 for RowGrad {
    fn name(&self) -> &'static str {
        match self.0 {
            RowGradKind::Softmax => "fused-softmax-grad",
            RowGradKind::Gelu => "fused-gelu-erf-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(l1);
        let name = self.name();
        let out = by_dtype!(s1.dtype(), name, |T| T::wrap(self.rows::<T>(
            typed(s1, l1, name)?,
            typed(s2, l2, name)?,
            cols
        )));
        Ok((out, l1.shape().clone()))
    }
}
