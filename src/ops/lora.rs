//! A frozen linear layer with a LoRA adapter, y = x W^T + b + s (x A^T) B^T, as one CPU op with
//! its own backward (the gradients of A and B only; W and b stay frozen), built on the products of
//! [`super::linear`].

use super::linear::{forward, gemm_into, gemm_new, input_grad, linear};
use super::real::*;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// y = x W^T + b + scale (x A^T) B^T: a frozen linear layer with a LoRA adapter (A [r, in],
/// B [out, r] trained), as one op. The adapter's low-rank product u = x A^T is recomputed in the
/// backward (rows x r x in: small) rather than kept. With gB = dy B:
///   dx = dy W + scale gB A,  dA = scale gB^T x,  dB = scale dy^T u.
struct LoraLinear {
    /// [n, k] and [n], frozen, contiguous, the input's dtype.
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, k) = xl.shape().dims2()?;
        let n = self.weight.dim(0)?;
        let r = al.shape().dims2()?.0;
        let (ws, wl) = self.weight.storage_and_layout();
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let out = by_dtype!(xs.dtype(), name, |T| {
            let x = typed::<T>(xs, xl, name)?;
            let bias = optional_values::<T, _>(&bias, name)?;
            let w = typed::<T>(cpu(&ws, name)?, wl, name)?;
            let mut y = forward::<T>(x, w, bias, rows, k, n);
            let a = typed::<T>(as_, al, name)?;
            let u = gemm_new((rows, r, k), (x, k, 1), (a, 1, k), 1.0);
            let b = typed::<T>(bs, bl, name)?;
            gemm_into(
                (rows, n, r),
                &mut y,
                true,
                (&u, r, 1),
                (b, 1, r),
                self.scale,
            );
            T::wrap(y)
        });
        Ok((out, Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = "lora-linear-grad";
        let g = grad.contiguous()?;
        let (rows, k) = x.dims2()?;
        let (n, r) = b.dims2()?;
        let (ws, wl) = self.weight.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (a_s, al) = a.storage_and_layout();
        let (b_s, bl) = b.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let device = x.device();
        let s = self.scale;
        let (dx, da, db) = by_dtype!(x.dtype(), name, |T| {
            let xv = typed::<T>(cpu(&xs, name)?, xl, name)?;
            let av = typed::<T>(cpu(&a_s, name)?, al, name)?;
            let bv = typed::<T>(cpu(&b_s, name)?, bl, name)?;
            let gv = typed::<T>(cpu(&gs, name)?, gl, name)?;
            // gB = dy B [rows, r]; u = x A^T [rows, r].
            let gb = gemm_new((rows, r, n), (gv, n, 1), (bv, r, 1), 1.0);
            let u = gemm_new((rows, r, k), (xv, k, 1), (av, 1, k), 1.0);
            let dx = if x.track_op() {
                let w = typed::<T>(cpu(&ws, name)?, wl, name)?;
                let mut dx = input_grad(gv, w, rows, k, n);
                gemm_into((rows, k, r), &mut dx, true, (&gb, r, 1), (av, k, 1), s);
                Some(Tensor::from_vec(dx, (rows, k), device)?)
            } else {
                None
            };
            let da = gemm_new((r, k, rows), (&gb, 1, r), (xv, k, 1), s);
            let db = gemm_new((n, r, rows), (gv, 1, n), (&u, r, 1), s);
            (
                dx,
                Tensor::from_vec(da, (r, k), device)?,
                Tensor::from_vec(db, (n, r), device)?,
            )
        });
        Ok((dx, Some(da), Some(db)))
    }
}

/// y = x W^T + b + scale (x A^T) B^T for x of any rank: a linear layer with a LoRA adapter
/// (A [r, in], B [out, r]). One fused op on the CPU in f32 and f64 when W and b are frozen;
/// otherwise [`linear`] plus the adapter's two matmuls.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    (a, b, scale): (&Tensor, &Tensor, f64),
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg("linear: scalar input".into()))?;
    let (n, r) = b.dims2()?;
    if a.dims2()? != (r, last) || weight.dims2()? != (n, last) {
        candle_core::bail!(
            "lora linear: input {:?}, weight {:?}, A {:?} and B {:?} do not fit",
            x.dims(),
            weight.dims(),
            a.dims(),
            b.dims()
        );
    }
    let dtype = x.dtype();
    let fusable = x.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && a.dtype() == dtype
        && b.dtype() == dtype
        && !weight.track_op()
        && bias.is_none_or(|b| !b.track_op());
    if !fusable {
        let base = linear(x, weight, bias)?;
        let rows = x.elem_count() / last.max(1);
        let flat = x.reshape((rows, last))?;
        let delta = flat.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let delta = (delta * scale)?.reshape(base.shape())?;
        return base + delta;
    }
    let rows = x.elem_count() / last.max(1);
    let y = x.reshape((rows, last))?.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            weight: weight.to_dtype(dtype)?.contiguous()?,
            bias: bias.map(|b| b.to_dtype(dtype)?.contiguous()).transpose()?,
            scale,
        },
    )?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = n;
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, plain_linear as plain, random_unit as random};
    use candle_core::Var;

    /// The LoRA layer against linear + (x A^T) B^T * scale: values and the gradients of x, A, B;
    /// the frozen W gets none.
    #[test]
    fn lora_linear_matches_the_decomposed_adapter() {
        for (case, (shape, out, rank)) in [
            (vec![3usize, 5], 4usize, 2usize),
            (vec![2, 7, 6], 3, 1),
            (vec![40, 33], 17, 8),
        ]
        .into_iter()
        .enumerate()
        {
            let inp = *shape.last().unwrap();
            let seed = 100 + case as u64 * 7;
            for with_bias in [false, true] {
                let x = Var::from_tensor(&random(&shape, seed)).unwrap();
                let w = Var::from_tensor(&random(&[out, inp], seed + 1)).unwrap();
                let w = w.as_tensor().detach();
                let bias = random(&[out], seed + 2);
                let a = Var::from_tensor(&random(&[rank, inp], seed + 3)).unwrap();
                let b = Var::from_tensor(&random(&[out, rank], seed + 4)).unwrap();
                let scale = 2.5;
                let bias = with_bias.then_some(&bias);
                let ours = lora_linear(
                    x.as_tensor(),
                    &w,
                    bias,
                    (a.as_tensor(), b.as_tensor(), scale),
                )
                .unwrap();
                let delta = x
                    .as_tensor()
                    .broadcast_matmul(&a.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&b.as_tensor().t().unwrap())
                    .unwrap();
                let reference =
                    (plain(x.as_tensor(), &w, bias) + (delta * scale).unwrap()).unwrap();
                let label = format!("case {case} bias {with_bias}");
                assert!(max_diff(&ours, &reference) < 1e-12, "{label}: values");
                let rows: usize = shape.iter().product::<usize>() / inp;
                let probe = random(&[rows * out], seed + 5);
                let loss = |y: &Tensor| {
                    (y.flatten_all().unwrap() * &probe)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                };
                let g_ours = loss(&ours).backward().unwrap();
                let g_ref = loss(&reference).backward().unwrap();
                for t in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
                    let diff = max_diff(g_ours.get(t).unwrap(), g_ref.get(t).unwrap());
                    assert!(diff < 1e-12, "{label}: gradient differs by {diff}");
                }
                assert!(g_ours.get(&w).is_none());
            }
        }
    }
}
