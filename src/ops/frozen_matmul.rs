//! x W^T for a frozen W: candle's matmul backward computes the gradient of both operands, so a
//! frozen weight (LoRA, frozen backbones) costs a second matmul per layer for a gradient nobody
//! uses (STACK.md trap 4). This op's backward returns only dL/dx = dL/dy W.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// [out, in]
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul needs a contiguous input".into())
        })?;
        let (rows, cols) = layout.shape().dims2()?;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let (w_start, w_end) = w_layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul needs a contiguous weight".into())
        })?;
        let out_dim = self.weight.dim(0)?;
        // y [rows, out] = x [rows, in] W^T, straight from the storages (no copies in or out).
        let out = match (storage, &*w_storage) {
            (CpuStorage::F32(x), Storage::Cpu(CpuStorage::F32(w))) => CpuStorage::F32(
                matmul_t_slices(&x[start..end], &w[w_start..w_end], rows, cols, out_dim),
            ),
            (CpuStorage::F64(x), Storage::Cpu(CpuStorage::F64(w))) => CpuStorage::F64(
                matmul_t_slices(&x[start..end], &w[w_start..w_end], rows, cols, out_dim),
            ),
            _ => candle_core::bail!("frozen-matmul supports f32 and f64 (input and weight alike)"),
        };
        Ok((out, Shape::from((rows, out_dim))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

/// y = x W^T for row-major x [rows, k] and W [n, k], with gemm.
fn matmul_t_slices<T: Copy + Default + 'static + num_one::One>(
    x: &[T],
    w: &[T],
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<T> {
    let mut y = vec![T::default(); rows * n];
    if rows == 0 || n == 0 {
        return y;
    }
    let parallelism = if rows * n * k > 4096 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers cover rows*n (dst), rows*k (lhs) and n*k (rhs) elements, as the
    // strides below address them; dst does not alias the inputs.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
    y
}

mod num_one {
    /// 0 and 1 of the float types gemm multiplies here.
    pub trait One {
        fn zero() -> Self;
        fn one() -> Self;
    }
    impl One for f32 {
        fn zero() -> Self {
            0.0
        }
        fn one() -> Self {
            1.0
        }
    }
    impl One for f64 {
        fn zero() -> Self {
            0.0
        }
        fn one() -> Self {
            1.0
        }
    }
}

/// x W^T (any leading dimensions) with no gradient for W, which must not be trained. On devices
/// other than the CPU, and when W is trained, it falls back to a plain matmul.
pub fn frozen_matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = dims[dims.len() - 1];
    let rows = x.elem_count() / last;
    let flat = x.reshape((rows, last))?;
    let y = if weight.track_op() || !x.device().is_cpu() {
        flat.matmul(&weight.t()?)?
    } else {
        flat.contiguous()?.apply_op1(FrozenMatmul {
            weight: weight.to_dtype(x.dtype())?.contiguous()?,
        })?
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = weight.dim(0)?;
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn values_and_input_gradient_match_the_plain_matmul() {
        for (shape, out) in [
            (vec![3usize, 5], 4usize),
            (vec![2, 7, 6], 3),
            (vec![1, 1, 9], 2),
        ] {
            let weight = random(&[out, *shape.last().unwrap()], 1);
            let x = Var::from_tensor(&random(&shape, 2)).unwrap();
            let probe = random(
                &[shape.iter().product::<usize>() / shape.last().unwrap() * out],
                3,
            );
            let loss = |y: Tensor| {
                (y.flatten_all().unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let ours = frozen_matmul_t(x.as_tensor(), &weight).unwrap();
            let plain = x
                .as_tensor()
                .broadcast_matmul(&weight.t().unwrap())
                .unwrap();
            let diff = max_abs_diff(&ours, &plain);
            assert!(diff < 1e-12, "{shape:?}: {diff}");
            let g_ours = loss(ours)
                .backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .clone();
            let g_plain = loss(plain)
                .backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .clone();
            let diff = max_abs_diff(&g_ours, &g_plain);
            assert!(diff < 1e-12, "{shape:?} gradient: {diff}");
        }
    }

    #[test]
    fn a_trained_weight_still_gets_its_gradient() {
        let w = Var::from_tensor(&random(&[3, 4], 4)).unwrap();
        let x = random(&[2, 4], 5);
        let grads = frozen_matmul_t(&x, w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(w.as_tensor()).is_some());
    }
}
