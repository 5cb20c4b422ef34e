//! MLP blocks as CPU ops with their own backward, built on the products of [`super::linear`]: a
//! whole frozen block (gated or GELU, [`frozen_mlp`]) and GELU followed by a trained layer
//! ([`gelu_linear`]).

use super::activation::{GatedRows, GeluRows};
use super::linear::{bias_grad, forward, gemm_into, input_grad, weight_grad};
use super::real::*;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// down(gelu_erf(h)) with its own backward (BERT's feed-forward output with trainable weights):
///   g = gelu(h);  y = g W^T + b
///   dh = (dy W) gelu'(h) (in place);  dW = dy^T g;  db = sum_rows dy
/// g is kept by the op for dW rather than being a graph tensor, so its gradient is never a
/// zero-filled edge of its own, and dh overwrites the buffer of dy W.
struct GeluLinear {
    /// gelu(h) from the forward.
    saved: Kept,
}

impl CustomOp3 for GeluLinear {
    fn name(&self) -> &'static str {
        "gelu-linear"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, k) = hl.shape().dims2()?;
        let n = wl.shape().dims2()?.0;
        let (g, out) = by_dtype!(hs.dtype(), name, |T| {
            let g = super::real::par_rows(typed::<T>(hs, hl, name)?, 1, T::gelu_into);
            let y = forward::<T>(
                &g,
                typed(ws, wl, name)?,
                Some(typed(bs, bl, name)?),
                rows,
                k,
                n,
            );
            (
                Tensor::from_vec(g, (rows, k), &candle_core::Device::Cpu)?,
                T::wrap(y),
            )
        });
        self.saved.keep(g);
        Ok((out, Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = "gelu-linear-grad";
        let g = self.saved.get::<Tensor>("gelu-linear")?;
        let dy = grad.contiguous()?;
        let (rows, k) = h.dims2()?;
        let n = w.dim(0)?;
        let device = h.device();
        let hs = h.storage_and_layout();
        let ws = w.storage_and_layout();
        let gs = g.storage_and_layout();
        let dys = dy.storage_and_layout();
        by_dtype!(h.dtype(), name, |T| {
            let dyv = operand_values::<T, _>(&dys, name)?;
            let dh = if h.track_op() {
                let mut d = input_grad(dyv, operand_values::<T, _>(&ws, name)?, rows, k, n);
                super::real::par_rows_in_place(
                    operand_values::<T, _>(&hs, name)?,
                    &mut d,
                    1,
                    T::gelu_grad_in_place,
                );
                Some(Tensor::from_vec(d, (rows, k), device)?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let gv = operand_values::<T, _>(&gs, name)?;
                Some(Tensor::from_vec(
                    weight_grad(dyv, gv, rows, k, n),
                    (n, k),
                    device,
                )?)
            } else {
                None
            };
            let db = if b.track_op() {
                Some(Tensor::from_vec(bias_grad(dyv, n), n, device)?)
            } else {
                None
            };
            Ok((dh, dw, db))
        })
    }
}

/// down(gelu_erf(h)) = gelu(h) W^T + b for h of any rank (W [n, k] as in nn.Linear) as one op
/// with its own backward, on the CPU in f32 and f64 with W, b of h's dtype; `None` elsewhere (use
/// the GELU and the layer one by one).
pub fn gelu_linear(h: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    let dtype = h.dtype();
    let dims = h.dims().to_vec();
    let Some(&k) = dims.last() else {
        return Ok(None);
    };
    let n = weight.dim(0)?;
    let fits = h.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && weight.dtype() == dtype
        && bias.dtype() == dtype
        && weight.dims2()? == (n, k)
        && bias.dims() == [n];
    if !fits {
        return Ok(None);
    }
    let rows = h.elem_count() / k.max(1);
    let y = h.reshape((rows, k))?.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        GeluLinear {
            saved: Kept::default(),
        },
    )?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = n;
    Ok(Some(y.reshape(out_dims)?))
}

/// The activation between the two halves of a frozen MLP.
#[derive(Clone, Copy, Debug)]
pub enum MlpKind {
    /// down(act(gate x) * up x), no biases (Llama, Qwen2: silu; Gemma: tanh GELU).
    Gated(super::activation::Gate),
    /// down(gelu_erf(up x + b_up)) + b_down (BERT).
    GeluErf,
}

/// A whole MLP block with frozen weights as one op: one graph node and one gradient (dx)
/// instead of five, and the [rows, intermediate] activations never become graph tensors. The
/// forward keeps a = gate x (+ b) and, gated, b = up x for the backward:
///   gated:  gh = dy Wd; da = gh b act'(a); db = gh act(a); dx = da Wg + db Wu
///   GELU:   gh = dy W2; da = gh gelu'(a);                   dx = da W1
struct FrozenMlp {
    kind: MlpKind,
    /// [inter, k] (gate or up), [inter, k] (up, gated only), [n, inter]; biases (GELU only).
    first: Tensor,
    up: Option<Tensor>,
    down: Tensor,
    first_bias: Option<Tensor>,
    down_bias: Option<Tensor>,
    /// (a, b) from the forward.
    saved: Kept,
}

impl CustomOp1 for FrozenMlp {
    fn name(&self) -> &'static str {
        "frozen-mlp"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, k) = layout.shape().dims2()?;
        let inter = self.first.dim(0)?;
        let n = self.down.dim(0)?;
        let device = self.first.device().clone();
        let (fs, fl) = self.first.storage_and_layout();
        let (ds, dl) = self.down.storage_and_layout();
        let up = self.up.as_ref().map(|t| t.storage_and_layout());
        let fb = self.first_bias.as_ref().map(|t| t.storage_and_layout());
        let db = self.down_bias.as_ref().map(|t| t.storage_and_layout());
        let out = by_dtype!(storage.dtype(), name, |T| {
            let x = typed::<T>(storage, layout, name)?;
            let first = typed::<T>(cpu(&fs, name)?, fl, name)?;
            let down = typed::<T>(cpu(&ds, name)?, dl, name)?;
            let first_bias = optional_values::<T, _>(&fb, name)?;
            let down_bias = optional_values::<T, _>(&db, name)?;
            let a = forward::<T>(x, first, first_bias, rows, k, inter);
            let (h, b) = match (self.kind, &up) {
                (MlpKind::Gated(gate), Some((us, ul))) => {
                    let up = typed::<T>(cpu(us, name)?, ul, name)?;
                    let b = forward::<T>(x, up, None, rows, k, inter);
                    let h = super::real::par_rows2(&a, &b, 1, |a, b, out| {
                        T::gated_into(gate, a, b, out)
                    });
                    (h, Some(b))
                }
                (MlpKind::GeluErf, None) => (super::real::par_rows(&a, 1, T::gelu_into), None),
                _ => candle_core::bail!("frozen-mlp: the up projection does not fit the kind"),
            };
            let y = forward::<T>(&h, down, down_bias, rows, inter, n);
            let a = Tensor::from_vec(a, (rows, inter), &device)?;
            let b = b
                .map(|b| Tensor::from_vec(b, (rows, inter), &device))
                .transpose()?;
            self.saved.keep((a, b));
            T::wrap(y)
        });
        Ok((out, Shape::from((rows, n))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let name = "frozen-mlp-grad";
        let kept = self.saved.get::<(Tensor, Option<Tensor>)>("frozen-mlp")?;
        let (a, b) = (&kept.0, &kept.1);
        let g = grad.contiguous()?;
        let (rows, k) = x.dims2()?;
        let (inter, n) = (self.first.dim(0)?, self.down.dim(0)?);
        let fs = self.first.storage_and_layout();
        let ds = self.down.storage_and_layout();
        let us = self.up.as_ref().map(|t| t.storage_and_layout());
        let as_ = a.storage_and_layout();
        let bs = b.as_ref().map(|t| t.storage_and_layout());
        let gs = g.storage_and_layout();
        let dx = by_dtype!(x.dtype(), name, |T| {
            let gv = operand_values::<T, _>(&gs, name)?;
            let av = operand_values::<T, _>(&as_, name)?;
            let gh = input_grad(gv, operand_values::<T, _>(&ds, name)?, rows, inter, n);
            let first = operand_values::<T, _>(&fs, name)?;
            let dx = match (self.kind, &bs, &us) {
                (MlpKind::Gated(gate), Some(bs), Some(us)) => {
                    let bv = operand_values::<T, _>(bs, name)?;
                    let (da, db) = super::activation::gated_grads(gate, av, bv, &gh);
                    let mut dx = input_grad(&da, first, rows, k, inter);
                    let up = operand_values::<T, _>(us, name)?;
                    gemm_into(
                        (rows, k, inter),
                        &mut dx,
                        true,
                        (&db, inter, 1),
                        (up, k, 1),
                        1.0,
                    );
                    dx
                }
                (MlpKind::GeluErf, None, None) => {
                    let mut da = gh;
                    super::real::par_rows_in_place(av, &mut da, 1, T::gelu_grad_in_place);
                    input_grad(&da, first, rows, k, inter)
                }
                _ => candle_core::bail!("frozen-mlp: saved activations do not fit the kind"),
            };
            Tensor::from_vec(dx, (rows, k), x.device())?
        });
        Ok(Some(dx))
    }
}

/// An MLP block with frozen weights (see [`MlpKind`]) for x of any rank: weights are [out, in]
/// as in nn.Linear (`first` is the gate projection of a gated MLP, the up projection of a GELU
/// one; `up` is given for gated MLPs only; biases for GELU ones only). One fused op on the CPU
/// in f32 and f64; `None` where it does not apply (other devices or dtypes, a trained weight):
/// use the layers one by one.
pub fn frozen_mlp(
    x: &Tensor,
    kind: MlpKind,
    (first, first_bias): (&Tensor, Option<&Tensor>),
    up: Option<&Tensor>,
    (down, down_bias): (&Tensor, Option<&Tensor>),
) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let params = [Some(first), first_bias, up, Some(down), down_bias];
    let fusable = x.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && params
            .iter()
            .flatten()
            .all(|p| !p.track_op() && p.device().is_cpu());
    if !fusable {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let k = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg("mlp: scalar input".into()))?;
    let (inter, n) = (first.dim(0)?, down.dim(0)?);
    let gated = matches!(kind, MlpKind::Gated(_));
    if first.dims2()? != (inter, k)
        || down.dims2()? != (n, inter)
        || up.map(|u| u.dims().to_vec()) != gated.then(|| vec![inter, k])
    {
        candle_core::bail!(
            "mlp: input {:?} and weights {:?} / {:?} / {:?} do not fit",
            x.dims(),
            first.dims(),
            up.map(|u| u.dims().to_vec()),
            down.dims()
        );
    }
    let prepare = |t: &Tensor| t.to_dtype(dtype)?.contiguous();
    let op = FrozenMlp {
        kind,
        first: prepare(first)?,
        up: up.map(prepare).transpose()?,
        down: prepare(down)?,
        first_bias: first_bias.map(prepare).transpose()?,
        down_bias: down_bias.map(prepare).transpose()?,
        saved: Kept::default(),
    };
    let rows = x.elem_count() / k.max(1);
    let y = x.reshape((rows, k))?.contiguous()?.apply_op1(op)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = n;
    Ok(Some(y.reshape(out_dims)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::linear::linear;
    use crate::ops::testing::{max_diff, plain_linear as plain, random_unit as random};
    use candle_core::Var;

    /// gelu_linear against the GELU and the linear layer one by one: values and the gradients
    /// of h, W, b, trained and frozen weights, several shapes.
    #[test]
    fn gelu_linear_matches_gelu_then_linear() {
        use super::super::activation::gelu_erf;
        for (case, (shape, n)) in [
            (vec![3usize, 5], 4usize),
            (vec![2, 7, 6], 3),
            (vec![1, 1, 9], 1),
        ]
        .into_iter()
        .enumerate()
        {
            let k = *shape.last().unwrap();
            let seed = 400 + case as u64 * 7;
            let h = Var::from_tensor(&(random(&shape, seed) * 3.0).unwrap()).unwrap();
            let w = Var::from_tensor(&random(&[n, k], seed + 1)).unwrap();
            let b = Var::from_tensor(&random(&[n], seed + 2)).unwrap();
            let (ht, wt, bt) = (h.as_tensor(), w.as_tensor(), b.as_tensor());
            let rows: usize = shape.iter().product::<usize>() / k;
            let probe = random(&[rows * n], seed + 3);
            let loss = |y: &Tensor| {
                (y.flatten_all().unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let ours = gelu_linear(ht, wt, bt).unwrap().unwrap();
            let reference = plain(&gelu_erf(ht).unwrap(), wt, Some(bt));
            assert_eq!(ours.dims(), reference.dims());
            assert!(max_diff(&ours, &reference) < 1e-12, "case {case}: values");
            let g1 = loss(&ours).backward().unwrap();
            let g2 = loss(&reference).backward().unwrap();
            for (name, t) in [("h", ht), ("W", wt), ("b", bt)] {
                let d = max_diff(g1.get(t).unwrap(), g2.get(t).unwrap());
                assert!(d < 1e-11, "case {case}: d{name} differs by {d}");
            }
            // Frozen weight and bias: only h gets a gradient, the same one.
            let (wf, bf) = (wt.detach(), bt.detach());
            let g3 = loss(&gelu_linear(ht, &wf, &bf).unwrap().unwrap())
                .backward()
                .unwrap();
            assert!(g3.get(&wf).is_none() && g3.get(&bf).is_none());
            assert!(max_diff(g3.get(ht).unwrap(), g1.get(ht).unwrap()) < 1e-12);
        }
        // Mixed dtypes do not fuse.
        let h = random(&[2, 3], 1).to_dtype(DType::F32).unwrap();
        assert!(gelu_linear(&h, &random(&[2, 3], 2), &random(&[2], 3))
            .unwrap()
            .is_none());
    }

    /// The fused frozen MLP against its layers one by one: values and the input gradient, both
    /// kinds, with and without leading dimensions.
    #[test]
    fn frozen_mlp_matches_the_layers_one_by_one() {
        use super::super::activation::{gated, gelu_erf, Gate};
        for (case, shape) in [vec![3usize, 5], vec![2, 7, 6], vec![1, 1, 4]]
            .into_iter()
            .enumerate()
        {
            let k = *shape.last().unwrap();
            let (inter, n) = (9, 4);
            let seed = 200 + case as u64 * 11;
            let x = Var::from_tensor(&random(&shape, seed)).unwrap();
            let first = random(&[inter, k], seed + 1);
            let up = random(&[inter, k], seed + 2);
            let down = random(&[n, inter], seed + 3);
            let (b1, b2) = (random(&[inter], seed + 4), random(&[n], seed + 5));
            let rows: usize = shape.iter().product::<usize>() / k;
            let probe = random(&[rows * n], seed + 6);
            let loss = |y: &Tensor| {
                (y.flatten_all().unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            for kind in [
                MlpKind::Gated(Gate::Silu),
                MlpKind::Gated(Gate::GeluTanh),
                MlpKind::GeluErf,
            ] {
                let xt = x.as_tensor();
                let (ours, reference) = match kind {
                    MlpKind::Gated(gate) => (
                        frozen_mlp(xt, kind, (&first, None), Some(&up), (&down, None))
                            .unwrap()
                            .unwrap(),
                        plain(
                            &gated(&plain(xt, &first, None), &plain(xt, &up, None), gate).unwrap(),
                            &down,
                            None,
                        ),
                    ),
                    MlpKind::GeluErf => (
                        frozen_mlp(xt, kind, (&first, Some(&b1)), None, (&down, Some(&b2)))
                            .unwrap()
                            .unwrap(),
                        plain(
                            &gelu_erf(&plain(xt, &first, Some(&b1))).unwrap(),
                            &down,
                            Some(&b2),
                        ),
                    ),
                };
                let label = format!("case {case} {kind:?}");
                assert!(max_diff(&ours, &reference) < 1e-12, "{label}: values");
                let g1 = loss(&ours).backward().unwrap();
                let g2 = loss(&reference).backward().unwrap();
                let d = max_diff(g1.get(xt).unwrap(), g2.get(xt).unwrap());
                assert!(d < 1e-11, "{label}: input gradient differs by {d}");
            }
        }
        // A trained weight: not fused.
        let w = Var::from_tensor(&random(&[3, 2], 1)).unwrap();
        let x = random(&[4, 2], 2);
        let down = random(&[2, 3], 3);
        let kind = MlpKind::GeluErf;
        assert!(
            frozen_mlp(&x, kind, (w.as_tensor(), None), None, (&down, None))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn f32_agrees_with_f64() {
        let x = random(&[9, 16], 1);
        let w = random(&[5, 16], 2);
        let b = random(&[5], 3);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let y64 = linear(&x, &w, Some(&b)).unwrap();
        let y32 = linear(&f32(&x), &f32(&w), Some(&f32(&b))).unwrap();
        assert!(max_diff(&y64, &y32.to_dtype(DType::F64).unwrap()) < 1e-5);
    }
}
