//! A whole post-norm Transformer encoder layer (BERT's) as one CPU op with its own backward.
//!
//! Forward, for x [rows, H] (rows = B T):
//!
//!   [q k v] = x Wqkv^T + bqkv                      (one product; Wqkv = [Wq; Wk; Wv])
//!   c = attention(q, k, v, mask)                   (heads are column stripes of [q k v])
//!   s1 = c Wo^T + bo + x,       a = LN1(s1)
//!   u = a Wup^T + bup,          g = gelu(u)        (erf form; gelu'(u) kept for the backward)
//!   s2 = g Wdown^T + bdown + a, y = LN2(s2)
//!
//! Backward, from dy:
//!
//!   ds2 = LN2'(dy);  dWdown = ds2^T g;  dbdown = sum_rows ds2;  du = (ds2 Wdown) * gelu'(u)
//!   dWup = du^T a;   dbup = sum_rows du;  da = ds2 + du Wup
//!   ds1 = LN1'(da);  dWo = ds1^T c;  dbo = sum_rows ds1;  dc = ds1 Wo
//!   d[q k v] = attention'(dc);  dWqkv = d[q k v]^T x;  dbqkv = sum_rows d[q k v]
//!   dx = ds1 + d[q k v] Wqkv
//!
//! Built layer by layer from the other fused ops, each intermediate ([q k v], c, s1's output,
//! u, ...) is a graph tensor whose gradient candle zero-fills and then adds into: about 45 MB of
//! such edges per MiniLM layer and step. Here the intermediates live inside the op, and the
//! layer's sixteen parameters travel as one flat input (their concatenation, whose backward
//! hands each parameter its slice of the flat gradient), so that a layer has two inputs.

use super::activation::GeluRows;
use super::attention::{self, Dims, Strides};
use super::linear::ColumnSums;
use super::linear::{self, residual_linear, Weight};
use super::norm::{Norm, NormRows};
use super::real::{by_dtype, cpu, typed, Kept, Real};
use super::softmax::SoftmaxRows;
use super::{norm, real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// The row kernels an encoder layer runs (norms, softmax, GELU, bias sums), in one bound.
trait LayerReal: NormRows + SoftmaxRows + GeluRows + ColumnSums {}
impl<T: NormRows + SoftmaxRows + GeluRows + ColumnSums> LayerReal for T {}

/// The parameters of one post-norm layer: (weight, bias) of each projection, with the weight
/// [out, in] as in `nn.Linear`, and (weight, bias) of each LayerNorm.
#[derive(Clone, Copy)]
pub struct PostNormParams<'a> {
    pub query: (&'a Tensor, &'a Tensor),
    pub key: (&'a Tensor, &'a Tensor),
    pub value: (&'a Tensor, &'a Tensor),
    pub attn_out: (&'a Tensor, &'a Tensor),
    pub attn_norm: (&'a Tensor, &'a Tensor),
    pub up: (&'a Tensor, &'a Tensor),
    pub down: (&'a Tensor, &'a Tensor),
    pub out_norm: (&'a Tensor, &'a Tensor),
}

impl<'a> PostNormParams<'a> {
    /// The sixteen tensors in the order of the flat input (weights, then biases and norms).
    fn tensors(&self) -> [&'a Tensor; 16] {
        [
            self.query.0,
            self.key.0,
            self.value.0,
            self.attn_out.0,
            self.up.0,
            self.down.0,
            self.query.1,
            self.key.1,
            self.value.1,
            self.attn_out.1,
            self.attn_norm.0,
            self.attn_norm.1,
            self.up.1,
            self.down.1,
            self.out_norm.0,
            self.out_norm.1,
        ]
    }
}

/// Where each parameter lies in the flat input, for hidden size h and intermediate size i.
#[derive(Clone, Debug)]
struct Slots {
    wqkv: Range<usize>,
    wo: Range<usize>,
    wup: Range<usize>,
    wdown: Range<usize>,
    bqkv: Range<usize>,
    bo: Range<usize>,
    ln1w: Range<usize>,
    ln1b: Range<usize>,
    bup: Range<usize>,
    bdown: Range<usize>,
    ln2w: Range<usize>,
    ln2b: Range<usize>,
    len: usize,
}

impl Slots {
    /// The shapes of [`PostNormParams::tensors`], in order.
    fn shapes(h: usize, i: usize) -> [Vec<usize>; 16] {
        [
            vec![h, h],
            vec![h, h],
            vec![h, h],
            vec![h, h],
            vec![i, h],
            vec![h, i],
            vec![h],
            vec![h],
            vec![h],
            vec![h],
            vec![h],
            vec![h],
            vec![i],
            vec![h],
            vec![h],
            vec![h],
        ]
    }

    fn new(h: usize, i: usize) -> Self {
        let mut at = 0;
        let mut take = |n: usize| {
            at += n;
            at - n..at
        };
        let wqkv = take(3 * h * h);
        let wo = take(h * h);
        let wup = take(i * h);
        let wdown = take(h * i);
        let bqkv = take(3 * h);
        let bo = take(h);
        let ln1w = take(h);
        let ln1b = take(h);
        let bup = take(i);
        let bdown = take(h);
        let ln2w = take(h);
        let ln2b = take(h);
        let len = ln2b.end;
        Slots {
            wqkv,
            wo,
            wup,
            wdown,
            bqkv,
            bo,
            ln1w,
            ln1b,
            bup,
            bdown,
            ln2w,
            ln2b,
            len,
        }
    }
}

/// What the forward keeps for the backward.
struct Saved<T> {
    qkv: Vec<T>,
    probs: Vec<T>,
    ctx: Vec<T>,
    s1: Vec<T>,
    a: Vec<T>,
    /// gelu'(u) at the up projection's output u.
    gd: Vec<T>,
    g: Vec<T>,
    s2: Vec<T>,
}

struct PostNormLayer {
    dims: Dims,
    inter: usize,
    scale: f64,
    norm: Norm,
    slots: Slots,
    /// The additive mask [B, T, T], contiguous, in the input's dtype.
    mask: Tensor,
    saved: Kept,
}

impl PostNormLayer {
    fn hidden(&self) -> usize {
        self.dims.q_row()
    }

    fn rows(&self) -> usize {
        self.dims.b * self.dims.tq
    }

    fn strides(&self) -> Strides {
        Strides {
            q: 3 * self.hidden(),
            kv: 3 * self.hidden(),
        }
    }

    fn forward<T: LayerReal>(&self, x: &[T], p: &[T], mask: &[T]) -> (Vec<T>, Saved<T>) {
        let (h, i, rows, sl) = (self.hidden(), self.inter, self.rows(), &self.slots);
        let qkv = linear::forward(
            x,
            &p[sl.wqkv.clone()],
            Some(&p[sl.bqkv.clone()]),
            rows,
            h,
            3 * h,
        );
        let dm = self.dims;
        let mut ctx = Vec::with_capacity(rows * h);
        let probs_len = dm.b * dm.heads * dm.tq * dm.tk;
        let mut probs: Vec<T> = Vec::with_capacity(probs_len);
        // SAFETY: q, k and v are the column stripes 0, H, 2H of the [rows, 3H] buffer qkv (rows
        // 3H apart); ctx and probs have room for the values forward_into writes, all of them.
        unsafe {
            let base = qkv.as_ptr();
            attention::forward_into(
                (base, base.add(h), base.add(2 * h)),
                self.strides(),
                mask,
                dm,
                self.scale,
                ctx.as_mut_ptr(),
                probs.as_mut_ptr(),
            );
            ctx.set_len(rows * h);
            probs.set_len(probs_len);
        }
        let s1 = residual_linear(
            &ctx,
            (Weight::plain(&p[sl.wo.clone()]), Some(&p[sl.bo.clone()])),
            x,
            rows,
            h,
            h,
        );
        let a = norm::norm_rows(
            &s1,
            &p[sl.ln1w.clone()],
            Some(&p[sl.ln1b.clone()]),
            self.norm,
        );
        // u = a Wup^T + bup, then g = gelu(u) with u overwritten by gelu'(u) (kept as `gd`).
        let mut gd = linear::forward(&a, &p[sl.wup.clone()], Some(&p[sl.bup.clone()]), rows, h, i);
        let mut g = vec![T::from(0.0); gd.len()];
        let block = real::rows_per_task(1);
        g.par_chunks_mut(block)
            .zip(gd.par_chunks_mut(block))
            .for_each(|(g, u)| T::gelu_keeping_grad(u, g));
        let s2 = residual_linear(
            &g,
            (
                Weight::plain(&p[sl.wdown.clone()]),
                Some(&p[sl.bdown.clone()]),
            ),
            &a,
            rows,
            i,
            h,
        );
        let y = norm::norm_rows(
            &s2,
            &p[sl.ln2w.clone()],
            Some(&p[sl.ln2b.clone()]),
            self.norm,
        );
        let saved = Saved {
            qkv,
            probs,
            ctx,
            s1,
            a,
            gd,
            g,
            s2,
        };
        (y, saved)
    }

    /// (dx if `need_x`, the flat parameter gradient if `need_p`).
    fn backward<T: LayerReal>(
        &self,
        (x, p, dy): (&[T], &[T], &[T]),
        sv: &Saved<T>,
        need_x: bool,
        need_p: bool,
    ) -> (Option<Vec<T>>, Option<Vec<T>>) {
        let (h, i, rows, sl) = (self.hidden(), self.inter, self.rows(), &self.slots);
        let n = rows * h;
        let mut dp = vec![T::from(0.0); if need_p { sl.len } else { 0 }];
        // A norm's packed gradient [dx, dw, db]: dw, db to their slots, dx returned.
        let norm_grad = |s: &[T], w: &Range<usize>, b: &Range<usize>, g: &[T], dp: &mut [T]| {
            let mut packed = norm::norm_grad_rows(s, &p[w.clone()], g, self.norm);
            if need_p {
                dp[w.clone()].copy_from_slice(&packed[n..n + h]);
                dp[b.clone()].copy_from_slice(&packed[n + h..n + 2 * h]);
            }
            packed.truncate(n);
            packed
        };
        let ds2 = norm_grad(&sv.s2, &sl.ln2w, &sl.ln2b, dy, &mut dp);
        if need_p {
            dp[sl.bdown.clone()].copy_from_slice(&linear::bias_grad(&ds2, h));
            linear::weight_grad_into(&mut dp[sl.wdown.clone()], &ds2, &sv.g, rows, i, h);
        }
        let mut du = linear::input_grad(&ds2, &p[sl.wdown.clone()], rows, i, h);
        real::par_rows_in_place(&sv.gd, &mut du, 1, |d, g| {
            for (g, &d) in g.iter_mut().zip(d) {
                *g = *g * d;
            }
        });
        if need_p {
            dp[sl.bup.clone()].copy_from_slice(&linear::bias_grad(&du, i));
            linear::weight_grad_into(&mut dp[sl.wup.clone()], &du, &sv.a, rows, h, i);
        }
        let mut da = ds2;
        linear::gemm_into(
            (rows, h, i),
            &mut da,
            true,
            (&du, i, 1),
            (&p[sl.wup.clone()], h, 1),
            1.0,
        );
        drop(du);
        let ds1 = norm_grad(&sv.s1, &sl.ln1w, &sl.ln1b, &da, &mut dp);
        drop(da);
        if need_p {
            dp[sl.bo.clone()].copy_from_slice(&linear::bias_grad(&ds1, h));
            linear::weight_grad_into(&mut dp[sl.wo.clone()], &ds1, &sv.ctx, rows, h, h);
        }
        let dctx = linear::input_grad(&ds1, &p[sl.wo.clone()], rows, h, h);
        let mut dqkv: Vec<T> = Vec::with_capacity(rows * 3 * h);
        // SAFETY: as in the forward for q, k, v; dctx is [rows, H]; dq, dk, dv are the column
        // stripes 0, H, 2H of dqkv, disjoint, and backward_into writes every element of them.
        unsafe {
            let base = sv.qkv.as_ptr();
            let dbase = dqkv.as_mut_ptr();
            attention::backward_into(
                (base, base.add(h), base.add(2 * h)),
                self.strides(),
                &sv.probs,
                dctx.as_ptr(),
                self.dims,
                self.scale,
                (dbase, dbase.add(h), dbase.add(2 * h)),
            );
            dqkv.set_len(rows * 3 * h);
        }
        drop(dctx);
        if need_p {
            dp[sl.bqkv.clone()].copy_from_slice(&linear::bias_grad(&dqkv, 3 * h));
            linear::weight_grad_into(&mut dp[sl.wqkv.clone()], &dqkv, x, rows, h, 3 * h);
        }
        let dx = need_x.then(|| {
            let mut dx = ds1;
            linear::gemm_into(
                (rows, h, 3 * h),
                &mut dx,
                true,
                (&dqkv, 3 * h, 1),
                (&p[sl.wqkv.clone()], h, 1),
                1.0,
            );
            dx
        });
        (dx, need_p.then_some(dp))
    }
}

impl CustomOp2 for PostNormLayer {
    fn name(&self) -> &'static str {
        "post-norm-layer"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (mask_s, mask_l) = self.mask.storage_and_layout();
        let mask_s = cpu(&mask_s, name)?;
        let out = by_dtype!(xs.dtype(), name, |T| {
            let (y, saved) = self.forward::<T>(
                typed(xs, xl, name)?,
                typed(ps, pl, name)?,
                typed(mask_s, mask_l, name)?,
            );
            self.saved.keep(saved);
            T::wrap(y)
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = "post-norm-layer-grad";
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = p.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xs, ps, gs) = (cpu(&xs, name)?, cpu(&ps, name)?, cpu(&gs, name)?);
        by_dtype!(x.dtype(), name, |T| {
            let sv = self.saved.get::<Saved<T>>("post-norm layer")?;
            let (dx, dp) = self.backward::<T>(
                (
                    typed(xs, xl, name)?,
                    typed(ps, pl, name)?,
                    typed(gs, gl, name)?,
                ),
                &sv,
                x.track_op(),
                p.track_op(),
            );
            real::tensors_of((dx, dp), (x, p))
        })
    }
}

/// One post-norm encoder layer (see the module doc) for x [B, T, H], with `heads` attention
/// heads, an additive mask [B, 1, T, T] (0 or a large negative number) and the LayerNorms' eps.
/// One op on the CPU in f32 and f64 with every parameter of x's dtype; `Ok(None)` elsewhere (run
/// the layer op by op). Parameters of the wrong shape are an error.
pub fn post_norm_layer(
    x: &Tensor,
    params: &PostNormParams,
    mask: &Tensor,
    heads: usize,
    eps: f64,
) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let tensors = params.tensors();
    let fits = x.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && tensors.iter().all(|t| t.dtype() == dtype);
    if !fits {
        return Ok(None);
    }
    let (b, t, h) = x.dims3()?;
    let i = params.up.0.dim(0)?;
    if heads == 0 || h % heads != 0 {
        candle_core::bail!("post-norm layer: {heads} heads do not divide the hidden size {h}");
    }
    for (k, (tensor, shape)) in tensors.iter().zip(Slots::shapes(h, i)).enumerate() {
        if tensor.dims() != shape.as_slice() {
            candle_core::bail!(
                "post-norm layer: parameter {k} has shape {:?}, expected {shape:?}",
                tensor.dims()
            );
        }
    }
    if mask.dims4()? != (b, 1, t, t) {
        candle_core::bail!(
            "post-norm layer: mask {:?} does not fit input {:?}",
            mask.dims(),
            x.dims()
        );
    }
    if b * t == 0 {
        return Ok(None);
    }
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.flatten_all())
        .collect::<Result<_>>()?;
    let flat = Tensor::cat(&flat, 0)?;
    let d = h / heads;
    let op = PostNormLayer {
        dims: Dims {
            b,
            tq: t,
            tk: t,
            heads,
            kv_heads: heads,
            d,
        },
        inter: i,
        scale: 1.0 / (d as f64).sqrt(),
        norm: Norm::layer(eps),
        slots: Slots::new(h, i),
        mask: mask.to_dtype(dtype)?.reshape((b, t, t))?.contiguous()?,
        saved: Kept::default(),
    };
    Ok(Some(x.contiguous()?.apply_op2(&flat, op)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, random};
    use candle_core::{Device, Var, D};

    const EPS: f64 = 1e-12;

    fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let centred = x.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        centred
            .broadcast_div(&(var + EPS).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
            .broadcast_add(b)
            .unwrap()
    }

    fn dense(x: &Tensor, (w, b): (&Tensor, &Tensor)) -> Tensor {
        x.broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(b)
            .unwrap()
    }

    /// The layer with plain candle ops, heads split and merged, softmax written out.
    fn decomposed(x: &Tensor, p: &PostNormParams, mask: &Tensor, heads: usize) -> Tensor {
        let (b, t, h) = x.dims3().unwrap();
        let d = h / heads;
        let split = |y: Tensor| {
            y.reshape((b, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = split(dense(x, p.query));
        let k = split(dense(x, p.key));
        let v = split(dense(x, p.value));
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt())
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        let e = s
            .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let c = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h))
            .unwrap();
        let a = layer_norm(
            &(dense(&c, p.attn_out) + x).unwrap(),
            p.attn_norm.0,
            p.attn_norm.1,
        );
        // GELU written out: candle's own gelu_erf backward rounds 1/sqrt(2 pi) to 6 digits.
        let u = dense(&a, p.up);
        let phi = (((&u / 2f64.sqrt()).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5).unwrap();
        let g = (&u * phi).unwrap();
        layer_norm(
            &(dense(&g, p.down) + &a).unwrap(),
            p.out_norm.0,
            p.out_norm.1,
        )
    }

    /// Sixteen parameters of a layer of width h, intermediate size i (norm weights around 1).
    fn params(h: usize, i: usize, seed: u64) -> Vec<Tensor> {
        Slots::shapes(h, i)
            .iter()
            .enumerate()
            .map(|(k, shape)| {
                let r = random(shape, seed + k as u64, 0.5);
                if k == 10 || k == 14 {
                    (r + 1.0).unwrap()
                } else {
                    r
                }
            })
            .collect()
    }

    fn view(t: &[Tensor]) -> PostNormParams<'_> {
        PostNormParams {
            query: (&t[0], &t[6]),
            key: (&t[1], &t[7]),
            value: (&t[2], &t[8]),
            attn_out: (&t[3], &t[9]),
            up: (&t[4], &t[12]),
            down: (&t[5], &t[13]),
            attn_norm: (&t[10], &t[11]),
            out_norm: (&t[14], &t[15]),
        }
    }

    /// Right-padded key mask [B, 1, T, T]: batch row r has `t - r` real tokens.
    fn mask(b: usize, t: usize) -> Tensor {
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|r| (0..t).map(|j| u32::from(j + r < t)).collect())
            .collect();
        crate::models::nn::additive_mask(&rows, t, false, None, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    }

    #[test]
    fn values_and_gradients_match_the_decomposed_layer() {
        for (b, t, h, heads, i) in [(2, 5, 8, 2, 12), (3, 7, 12, 3, 20), (1, 1, 4, 1, 6)] {
            let x = Var::from_tensor(&random(&[b, t, h], 1, 1.0)).unwrap();
            let vars: Vec<Var> = params(h, i, 10)
                .iter()
                .map(|p| Var::from_tensor(p).unwrap())
                .collect();
            let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let p = view(&tensors);
            let m = mask(b, t);
            let fused = post_norm_layer(&x, &p, &m, heads, EPS).unwrap().unwrap();
            let plain = decomposed(&x, &p, &m, heads);
            let diff = max_diff(&fused, &plain);
            assert!(diff < 1e-10, "values differ by {diff} at {b}x{t}x{h}");
            // A loss that weighs every output differently.
            let r = random(&[b, t, h], 99, 1.0);
            let gf = (&fused * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gp = (&plain * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut all = vec![x.as_tensor().clone()];
            all.extend(tensors.iter().cloned());
            for (k, v) in all.iter().enumerate() {
                let (a, e) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                let scale = 1.0 + max_diff(e, &e.zeros_like().unwrap());
                let diff = max_diff(a, e);
                assert!(
                    diff < 1e-9 * scale,
                    "gradient of input {k} differs by {diff} at {b}x{t}x{h}"
                );
            }
        }
    }

    #[test]
    fn frozen_parameters_get_no_gradient_and_the_input_still_does() {
        let (b, t, h, heads, i) = (2, 4, 8, 2, 16);
        let x = Var::from_tensor(&random(&[b, t, h], 3, 1.0)).unwrap();
        let tensors = params(h, i, 30);
        let p = view(&tensors);
        let m = mask(b, t);
        let fused = post_norm_layer(&x, &p, &m, heads, EPS).unwrap().unwrap();
        let r = random(&[b, t, h], 7, 1.0);
        let gf = (&fused * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (decomposed(&x, &p, &m, heads) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(gf.get(&x).unwrap(), gp.get(&x).unwrap()) < 1e-9);
        assert!(tensors.iter().all(|t| gf.get(t).is_none()));
    }

    #[test]
    fn f32_agrees_with_f64() {
        let (b, t, h, heads, i) = (2, 6, 16, 4, 32);
        let x = random(&[b, t, h], 5, 1.0);
        let tensors = params(h, i, 50);
        let m = mask(b, t);
        let y64 = post_norm_layer(&x, &view(&tensors), &m, heads, 1e-5)
            .unwrap()
            .unwrap();
        let t32: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect();
        let y32 = post_norm_layer(
            &x.to_dtype(DType::F32).unwrap(),
            &view(&t32),
            &m,
            heads,
            1e-5,
        )
        .unwrap()
        .unwrap();
        let diff = max_diff(&y32.to_dtype(DType::F64).unwrap(), &y64);
        assert!(diff < 1e-4, "f32 and f64 differ by {diff}");
    }

    #[test]
    fn wrong_shapes_are_an_error_and_other_dtypes_are_not_fused() {
        let (b, t, h, i) = (1, 3, 8, 16);
        let x = random(&[b, t, h], 5, 1.0);
        let mut tensors = params(h, i, 60);
        let m = mask(b, t);
        assert!(post_norm_layer(&x, &view(&tensors), &m, 3, EPS).is_err());
        assert!(post_norm_layer(&x, &view(&tensors), &mask(b, t + 1), 2, EPS).is_err());
        let x16 = x.to_dtype(DType::BF16).unwrap();
        assert!(post_norm_layer(&x16, &view(&tensors), &m, 2, EPS)
            .unwrap()
            .is_none());
        tensors[5] = random(&[i, h], 1, 1.0);
        let err = post_norm_layer(&x, &view(&tensors), &m, 2, EPS).unwrap_err();
        assert!(err.to_string().contains("parameter 5"), "{err}");
    }
}
