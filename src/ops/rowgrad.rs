//! The backward of the row-wise fused ops whose gradient needs no graph of its own (softmax,
//! GELU): one CPU op that computes it row by row from two same-shaped tensors, with the kernel
//! its op hands it for each number type.

use super::real::*;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape};

/// A gradient computed from two same-shaped tensors (a, b) with rows of `cols` values: the
/// op's kernel in f32 and in f64 (no backward of its own).
pub(crate) struct RowGrad {
    pub(crate) name: &'static str,
    pub(crate) f32: fn(&[f32], &[f32], usize) -> Vec<f32>,
    pub(crate) f64: fn(&[f64], &[f64], usize) -> Vec<f64>,
}

impl CustomOp2 for RowGrad {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(l1);
        let name = self.name;
        let out = match s1.dtype() {
            DType::F32 => f32::wrap((self.f32)(typed(s1, l1, name)?, typed(s2, l2, name)?, cols)),
            DType::F64 => f64::wrap((self.f64)(typed(s1, l1, name)?, typed(s2, l2, name)?, cols)),
            _ => candle_core::bail!("{name} supports f32 and f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}
