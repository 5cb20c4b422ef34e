//! LayerNorm (also of a residual sum) and RMSNorm as CPU ops with their own backward: row
//! statistics in one pass, the backward in one pass per row and the weight gradients per block of
//! rows added in f64 in a fixed order.

use super::real::*;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

// ---------------------------------------------------------------- norms

/// The settings of a norm over rows: LayerNorm is centred, RMSNorm is not; Gemma's RMSNorm
/// scales by (1 + w).
#[derive(Clone, Copy)]
pub(crate) struct Norm {
    pub(crate) eps: f64,
    pub(crate) centre: bool,
    pub(crate) unit_offset: bool,
}

impl Norm {
    /// LayerNorm (centred, no offset on the scale).
    pub(crate) fn layer(eps: f64) -> Self {
        Norm {
            eps,
            centre: true,
            unit_offset: false,
        }
    }

    /// RMSNorm without the unit offset on the scale.
    pub(crate) fn rms(eps: f64) -> Self {
        Norm {
            eps,
            centre: false,
            unit_offset: false,
        }
    }

    pub(crate) fn offset(&self) -> f64 {
        if self.unit_offset {
            1.0
        } else {
            0.0
        }
    }

    pub(crate) fn simd(&self) -> super::simd::NormParams {
        super::simd::NormParams {
            eps: self.eps as f32,
            centre: self.centre,
            offset: self.offset() as f32,
        }
    }
}

/// Per row: mean (0 for RMSNorm) and 1 / sqrt(var + eps) (mean of squares for RMSNorm).
fn row_stats(row: &[f64], eps: f64, centre: bool) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = if centre {
        row.iter().sum::<f64>() / n
    } else {
        0.0
    };
    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The norms' row kernels in each number type (f32: the vectorized ones of [`super::simd`]).
pub(crate) trait NormRows: Real {
    /// Norm of every row of `w.len()` values: out = (x - mean) rstd (w + offset) + b.
    fn norm_rows_into(x: &[Self], w: &[Self], b: Option<&[Self]>, out: &mut [Self], n: Norm);
    /// The norm's backward for a block of rows: dx written, the block's dw, db added to `sums`.
    fn norm_grad_block(
        x: &[Self],
        g: &[Self],
        w: &[Self],
        dx: &mut [Self],
        sums: (&mut [f64], &mut [f64]),
        n: Norm,
    );
}

impl NormRows for f32 {
    fn norm_rows_into(x: &[Self], w: &[Self], b: Option<&[Self]>, out: &mut [Self], n: Norm) {
        super::simd::norm_rows(x, w, b, out, n.simd())
    }
    fn norm_grad_block(
        x: &[Self],
        g: &[Self],
        w: &[Self],
        dx: &mut [Self],
        (dw, db): (&mut [f64], &mut [f64]),
        n: Norm,
    ) {
        let mut block_dw = vec![0f32; w.len()];
        let mut block_db = vec![0f32; w.len()];
        super::simd::norm_grad_rows(x, g, w, dx, (&mut block_dw, &mut block_db), n.simd());
        for (s, v) in dw.iter_mut().zip(&block_dw) {
            *s += *v as f64;
        }
        for (s, v) in db.iter_mut().zip(&block_db) {
            *s += *v as f64;
        }
    }
}

impl NormRows for f64 {
    fn norm_rows_into(x: &[Self], w: &[Self], b: Option<&[Self]>, out: &mut [Self], n: Norm) {
        let cols = w.len();
        let offset = n.offset();
        for (row, out) in x.chunks(cols).zip(out.chunks_mut(cols)) {
            let (mean, rstd) = row_stats(row, n.eps, n.centre);
            for (k, (o, v)) in out.iter_mut().zip(row).enumerate() {
                let shift = b.map_or(0.0, |b| b[k]);
                *o = (v - mean) * rstd * (w[k] + offset) + shift;
            }
        }
    }
    fn norm_grad_block(
        x: &[Self],
        g: &[Self],
        w: &[Self],
        dx: &mut [Self],
        (dw, db): (&mut [f64], &mut [f64]),
        n: Norm,
    ) {
        let cols = w.len();
        let offset = n.offset();
        let mut xhat = vec![0f64; cols];
        let mut gh = vec![0f64; cols];
        for ((row, grow), dx) in x.chunks(cols).zip(g.chunks(cols)).zip(dx.chunks_mut(cols)) {
            let (mean, rstd) = row_stats(row, n.eps, n.centre);
            let mut mean_gh = 0.0;
            let mut mean_ghx = 0.0;
            for k in 0..cols {
                xhat[k] = (row[k] - mean) * rstd;
                gh[k] = grow[k] * (w[k] + offset);
                mean_gh += gh[k];
                mean_ghx += gh[k] * xhat[k];
                dw[k] += grow[k] * xhat[k];
                db[k] += grow[k];
            }
            mean_gh /= cols as f64;
            mean_ghx /= cols as f64;
            if !n.centre {
                mean_gh = 0.0;
            }
            for (k, d) in dx.iter_mut().enumerate() {
                *d = rstd * (gh[k] - mean_gh - xhat[k] * mean_ghx);
            }
        }
    }
}

/// y = (x - mean) * rstd * scale + shift, with scale = w (+ 1 when `unit_offset`); blocks of
/// rows in parallel.
pub(crate) fn norm_rows<T: NormRows>(x: &[T], w: &[T], b: Option<&[T]>, n: Norm) -> Vec<T> {
    par_rows(x, w.len(), |x, out| T::norm_rows_into(x, w, b, out, n))
}

/// Gradients of a norm: packed as [dx (rows * cols), dw (cols), db (cols)].
/// With x^ = (x - mean) rstd and gh = g * scale: dx = rstd (gh - mean(gh) - x^ mean(gh x^))
/// (RMSNorm: dx = rstd (gh - x^ mean(gh x^))), dw = sum_rows g x^, db = sum_rows g.
/// Blocks of rows run in parallel; their partial dw, db are summed in block order, so the
/// result does not depend on the number of threads.
pub(crate) fn norm_grad_rows<T: NormRows>(x: &[T], w: &[T], g: &[T], n: Norm) -> Vec<T> {
    use rayon::prelude::*;
    let cols = w.len();
    let mut dx = vec![T::from(0.0); x.len() + 2 * cols];
    let block = rows_per_task(cols) * cols;
    let partials: Vec<(Vec<f64>, Vec<f64>)> = dx[..x.len()]
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(g.par_chunks(block)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![0f64; cols];
            let mut db = vec![0f64; cols];
            T::norm_grad_block(x, g, w, dx, (&mut dw, &mut db), n);
            (dw, db)
        })
        .collect();
    let (dw, db) = dx[x.len()..].split_at_mut(cols);
    for k in 0..cols {
        dw[k] = T::from(partials.iter().map(|p| p.0[k]).sum());
        db[k] = T::from(partials.iter().map(|p| p.1[k]).sum());
    }
    dx
}

impl Norm {
    fn name(&self) -> &'static str {
        if self.centre {
            "fused-layer-norm"
        } else {
            "fused-rms-norm"
        }
    }

    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = by_dtype!(x.0.dtype(), name, |T| {
            let bias = optional_typed::<T>(b, name)?;
            T::wrap(norm_rows::<T>(
                typed(x.0, x.1, name)?,
                typed(w.0, w.1, name)?,
                bias,
                *self,
            ))
        });
        Ok((out, x.1.shape().clone()))
    }

    /// (dx, dw, db) from the packed gradient op.
    fn grads(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &g.contiguous()?,
            &NormGrad(*self),
        )?;
        let n = x.elem_count();
        let cols = w.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, cols)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + cols, cols)?.reshape(w.shape())?;
        Ok((dx, dw, db))
    }
}

struct NormGrad(Norm);

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        "fused-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.0;
        let name = self.name();
        let (out, len) = by_dtype!(s1.dtype(), name, |T| {
            let packed = norm_grad_rows::<T>(
                typed(s1, l1, name)?,
                typed(s2, l2, name)?,
                typed(s3, l3, name)?,
                n,
            );
            let len = packed.len();
            (T::wrap(packed), len)
        });
        Ok((out, Shape::from(len)))
    }
}

struct LayerNormOp(Norm);

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.0.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct RmsNormOp(Norm);

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.0.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if !fusable(x) {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
        return normed.broadcast_mul(w)?.broadcast_add(b);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNormOp(Norm::layer(eps)),
    )
}

/// LN(x + r) with w, b packed as one [2, cols] input: the residual sum is formed inside the op
/// and kept for the backward, so it is not a graph tensor (no gradient edge of its own); x and
/// r receive the same gradient.
struct ResidualLayerNorm {
    norm: Norm,
    /// x + r from the forward.
    sum: Kept,
    /// Whether the forward keeps the sum (something needs a gradient); otherwise each block of
    /// rows forms its sum in a buffer of its own, normalized from there (one output, no pass).
    keep_sum: bool,
}

impl CustomOp3 for ResidualLayerNorm {
    fn name(&self) -> &'static str {
        "fused-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let shape = l1.shape().clone();
        let (sum, out) = by_dtype!(s1.dtype(), name, |T| {
            let wb = typed::<T>(s3, l3, name)?;
            let cols = wb.len() / 2;
            let (w, b) = wb.split_at(cols);
            let x = typed::<T>(s1, l1, name)?;
            let r = typed::<T>(s2, l2, name)?;
            if !self.keep_sum {
                let out = par_rows2(x, r, cols, |x, r, out| {
                    let sum: Vec<T> = x.iter().zip(r).map(|(&a, &c)| a + c).collect();
                    T::norm_rows_into(&sum, w, Some(b), out, self.norm);
                });
                return Ok((T::wrap(out), shape));
            }
            let sum = par_rows2(x, r, cols, |x, r, out| {
                for ((o, &a), &c) in out.iter_mut().zip(x).zip(r) {
                    *o = a + c;
                }
            });
            let out = T::wrap(norm_rows::<T>(&sum, w, Some(b), self.norm));
            (
                Tensor::from_vec(sum, shape.clone(), &candle_core::Device::Cpu)?,
                out,
            )
        });
        self.sum.keep(sum);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sum = self.sum.get::<Tensor>("residual layer norm")?;
        let cols = wb.elem_count() / 2;
        let w = wb.narrow(0, 0, 1)?.reshape(cols)?;
        let (dx, dw, db) = self.norm.grads(&sum, &w, grad)?;
        let dwb = wb
            .track_op()
            .then(|| Tensor::stack(&[&dw, &db], 0))
            .transpose()?;
        Ok((
            x.track_op().then(|| dx.clone()),
            r.track_op().then_some(dx),
            dwb,
        ))
    }
}

/// LayerNorm of the residual sum, LN(x + r) (post-norm blocks): one op on the CPU, whose sum is
/// not a graph tensor; elsewhere the add and [`layer_norm`].
pub fn layer_norm_residual(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let fits = fusable(x)
        && x.shape() == r.shape()
        && r.dtype() == dtype
        && w.dtype() == dtype
        && b.dtype() == dtype
        && w.dims1().ok() == x.dims().last().copied()
        && w.shape() == b.shape();
    if !fits {
        return layer_norm(&(x + r)?, w, b, eps);
    }
    x.contiguous()?.apply_op3(
        &r.contiguous()?,
        &Tensor::stack(&[w, b], 0)?,
        ResidualLayerNorm {
            norm: Norm::layer(eps),
            sum: Kept::default(),
            keep_sum: [x, r, w, b].iter().any(|t| t.track_op()),
        },
    )
}

/// RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * s, with s = w, or 1 + w when
/// `unit_offset` (Gemma).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, unit_offset: bool) -> Result<Tensor> {
    if !fusable(x) {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
        let scale = if unit_offset { (w + 1.0)? } else { w.clone() };
        return normed.broadcast_mul(&scale);
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        RmsNormOp(Norm {
            eps,
            centre: false,
            unit_offset,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, probe_loss, random};
    use candle_core::Var;

    fn decomposed_norm(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        eps: f64,
        centre: bool,
        offset: bool,
    ) -> Tensor {
        let centered = if centre {
            x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
                .unwrap()
        } else {
            x.clone()
        };
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centered
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        let scale = if offset {
            (w + 1.0).unwrap()
        } else {
            w.clone()
        };
        let y = normed.broadcast_mul(&scale).unwrap();
        match b {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        }
    }

    #[test]
    fn fused_norms_match_the_decomposed_ones_in_values_and_gradients() {
        for (i, (shape, centre, offset)) in [
            (vec![4usize, 6], true, false),
            (vec![2, 3, 8], true, false),
            (vec![5, 7], false, false),
            (vec![2, 2, 9], false, true),
            (vec![1, 1], true, false),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 20 + i as u64 * 3;
            let cols = *shape.last().unwrap();
            let x = Var::from_tensor(&(random(&shape, seed, 3.0) + 0.5).unwrap()).unwrap();
            let w = Var::from_tensor(&random(&[cols], seed + 1, 1.0)).unwrap();
            let b = Var::from_tensor(&random(&[cols], seed + 2, 1.0)).unwrap();
            let eps = 1e-5;
            let (ours, plain) = if centre {
                (
                    layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps).unwrap(),
                    decomposed_norm(
                        x.as_tensor(),
                        w.as_tensor(),
                        Some(b.as_tensor()),
                        eps,
                        true,
                        false,
                    ),
                )
            } else {
                (
                    rms_norm(x.as_tensor(), w.as_tensor(), eps, offset).unwrap(),
                    decomposed_norm(x.as_tensor(), w.as_tensor(), None, eps, false, offset),
                )
            };
            assert!(max_diff(&ours, &plain) < 1e-10, "{shape:?} centre {centre}");
            let g1 = probe_loss(&ours, 7).backward().unwrap();
            let g2 = probe_loss(&plain, 7).backward().unwrap();
            let mut vars = vec![("x", &x), ("w", &w)];
            if centre {
                vars.push(("b", &b));
            }
            for (name, v) in vars {
                let d = max_diff(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    d < 1e-9,
                    "{shape:?} centre {centre} offset {offset}: d{name} {d}"
                );
            }
        }
    }

    #[test]
    fn residual_layer_norm_matches_add_then_norm() {
        for (case, shape) in [vec![4usize, 6], vec![2, 3, 40], vec![1, 1]]
            .into_iter()
            .enumerate()
        {
            let seed = 300 + case as u64 * 5;
            let cols = *shape.last().unwrap();
            let x = Var::from_tensor(&random(&shape, seed, 2.0)).unwrap();
            let r = Var::from_tensor(&random(&shape, seed + 1, 2.0)).unwrap();
            let w = Var::from_tensor(&random(&[cols], seed + 2, 1.0)).unwrap();
            let b = Var::from_tensor(&random(&[cols], seed + 3, 1.0)).unwrap();
            let (xt, rt, wt, bt) = (x.as_tensor(), r.as_tensor(), w.as_tensor(), b.as_tensor());
            let ours = layer_norm_residual(xt, rt, wt, bt, 1e-5).unwrap();
            let plain = decomposed_norm(&(xt + rt).unwrap(), wt, Some(bt), 1e-5, true, false);
            assert!(max_diff(&ours, &plain) < 1e-10, "{shape:?}: values");
            let g1 = probe_loss(&ours, 9).backward().unwrap();
            let g2 = probe_loss(&plain, 9).backward().unwrap();
            for (name, v) in [("x", xt), ("r", rt), ("w", wt), ("b", bt)] {
                let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(d < 1e-9, "{shape:?}: d{name} {d}");
            }
            // A constant residual and frozen weights get no gradient; x gets the same one.
            let rc = r.as_tensor().detach();
            let (wc, bc) = (wt.detach(), bt.detach());
            let ours = layer_norm_residual(xt, &rc, &wc, &bc, 1e-5).unwrap();
            let g3 = probe_loss(&ours, 9).backward().unwrap();
            assert!(g3.get(&rc).is_none() && g3.get(&wc).is_none() && g3.get(&bc).is_none());
            let d = max_diff(g3.get(xt).unwrap(), g1.get(xt).unwrap());
            assert!(d < 1e-12, "{shape:?}: dx with a constant residual {d}");
            // Nothing needing a gradient (inference): the sum is not kept, same values, in
            // f64 and f32 (several blocks of rows when there are many).
            let detached = [xt, rt, wt, bt].map(|t| t.detach());
            let [xd, rd, wd, bd] = &detached;
            let inference = layer_norm_residual(xd, rd, wd, bd, 1e-5).unwrap();
            assert_eq!(max_diff(&inference, &ours), 0.0, "{shape:?}: inference");
        }
        let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (x, r) = (random(&[300, 200], 7, 2.0), random(&[300, 200], 8, 2.0));
        let (w, b) = (random(&[200], 9, 1.0), random(&[200], 10, 1.0));
        let [x, r, w, b] = [&x, &r, &w, &b].map(to32);
        let plain = layer_norm(&(&x + &r).unwrap(), &w, &b, 1e-5).unwrap();
        let fused = layer_norm_residual(&x, &r, &w, &b, 1e-5).unwrap();
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        assert_eq!(max_diff(&to64(&fused), &to64(&plain)), 0.0, "f32, 300 rows");
    }

    #[test]
    fn f32_norm_values_and_gradients_agree_with_f64() {
        let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        for (cols, kind) in [(16usize, 0), (37, 0), (37, 1), (64, 2), (37, 3)] {
            let x = random(&[5, cols], 5 + cols as u64, 2.0);
            let r = random(&[5, cols], 8 + cols as u64, 2.0);
            let w = random(&[cols], 6, 1.0);
            let b = random(&[cols], 7, 1.0);
            let run = |x: &Tensor, r: &Tensor, w: &Tensor, b: &Tensor| {
                let (xv, wv, bv) = (
                    Var::from_tensor(x).unwrap(),
                    Var::from_tensor(w).unwrap(),
                    Var::from_tensor(b).unwrap(),
                );
                let (xt, wt, bt) = (xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
                let y = match kind {
                    0 => layer_norm(xt, wt, bt, 1e-6),
                    1 => rms_norm(xt, wt, 1e-6, false),
                    2 => rms_norm(xt, wt, 1e-6, true),
                    _ => layer_norm_residual(xt, r, wt, bt, 1e-6),
                }
                .unwrap();
                let g = probe_loss(&to64(&y), 3).backward().unwrap();
                let grads = [xt, wt, bt].map(|t| g.get(t).map(to64));
                (to64(&y), grads)
            };
            let (y64, g64) = run(&x, &r, &w, &b);
            let (y32, g32) = run(&to32(&x), &to32(&r), &to32(&w), &to32(&b));
            assert!(
                max_diff(&y64, &y32) < 2e-5,
                "cols {cols} kind {kind}: values"
            );
            for (a, b) in g64.iter().zip(&g32) {
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let d = max_diff(a, b);
                        assert!(d < 1e-4, "cols {cols} kind {kind}: gradient {d}");
                    }
                    (None, None) => {}
                    _ => panic!("cols {cols} kind {kind}: a gradient in one dtype only"),
                }
            }
        }
    }

    #[test]
    fn f32_norms_agree_with_f64() {
        let x = random(&[3, 16], 5, 2.0);
        let w = random(&[16], 6, 1.0);
        let b = random(&[16], 7, 1.0);
        let f64_out = layer_norm(&x, &w, &b, 1e-6).unwrap();
        let f32_out = layer_norm(
            &x.to_dtype(DType::F32).unwrap(),
            &w.to_dtype(DType::F32).unwrap(),
            &b.to_dtype(DType::F32).unwrap(),
            1e-6,
        )
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
        assert!(max_diff(&f64_out, &f32_out) < 1e-5);
    }
}
