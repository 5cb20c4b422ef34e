//! A whole pre-norm decoder layer (Llama, Qwen2) with a frozen base, optionally with LoRA
//! adapters on the query and value projections, as one CPU op with its own backward.
//!
//! Forward, for x [rows, H] (rows = B T), s the adapters' scale:
//!
//!   n1 = RMS1(x)
//!   q = n1 Wq^T + bq + s (n1 Aq^T) Bq^T,   k = n1 Wk^T + bk,   v = n1 Wv^T + bv + s (n1 Av^T) Bv^T
//!   c = attention(rope(q), rope(k), v, mask)      (grouped-query heads, column stripes)
//!   s1 = x + c Wo^T + bo,   n2 = RMS2(s1)
//!   y = s1 + (silu(n2 Wg^T) * (n2 Wu^T)) Wd^T
//!
//! Backward: only x and the adapters receive gradients (the base is frozen):
//!
//!   dh = dy Wd;  (da, db) = gated'(dh);  ds1 = dy + RMS2'(da Wg + db Wu);  dc = ds1 Wo
//!   (dq, dk, dv) = rope^-1 of attention'(dc);  dn1 = dq Wq + dk Wk + dv Wv + s (dq Bq) Aq + s (dv Bv) Av
//!   dAq = s (dq Bq)^T n1,  dBq = s dq^T (n1 Aq^T)  (and the same for v);  dx = ds1 + RMS1'(dn1)
//!
//! Layer by layer, every one of n1, q, k, v, their rotations, c, the projections and both
//! residual sums is a graph tensor whose gradient candle zero-fills and adds into; here they
//! live inside the op, and a layer has one gradient edge for x and one for the adapters (their
//! concatenation).

use super::activation::Gate;
use super::activation::GatedRows;
use super::attention::{self, Dims, Strides};
use super::linear::ColumnSums;
use super::linear::{self, residual_linear};
use super::norm::{Norm, NormRows};
use super::real::{by_dtype, cpu, operand_values, typed, Kept, Real};
use super::softmax::SoftmaxRows;
use super::{activation, norm, real, rope};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::ops::Range;

/// The row kernels a decoder layer runs (norms, softmax, the gated activation, bias sums), in one
/// bound.
trait LayerReal: NormRows + SoftmaxRows + GatedRows + ColumnSums {}
impl<T: NormRows + SoftmaxRows + GatedRows + ColumnSums> LayerReal for T {}

/// A LoRA adapter: A [r, in], B [out, r], scale alpha / r.
#[derive(Clone, Copy)]
pub struct Adapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

/// The parameters of one pre-norm layer: norm weights, (weight [out, in], bias) of the
/// attention projections, the gated MLP's weights (no biases), adapters on q and v.
#[derive(Clone, Copy)]
pub struct PreNormParams<'a> {
    pub input_norm: &'a Tensor,
    pub q: (&'a Tensor, Option<&'a Tensor>),
    pub k: (&'a Tensor, Option<&'a Tensor>),
    pub v: (&'a Tensor, Option<&'a Tensor>),
    pub o: (&'a Tensor, Option<&'a Tensor>),
    pub q_lora: Option<Adapter<'a>>,
    pub v_lora: Option<Adapter<'a>>,
    pub post_norm: &'a Tensor,
    pub gate: &'a Tensor,
    pub up: &'a Tensor,
    pub down: &'a Tensor,
    /// W^T [in, out], contiguous, of q, k, v, o, gate, up and down (in that order) where given,
    /// for the forward's products in gemm's faster orientation: worth their memory when the
    /// layer is trained through (every step reads them), not for one inference pass.
    pub transposed: [Option<&'a Tensor>; 7],
}

// Slots of the frozen tensors.
const N1: usize = 0;
const WQ: usize = 1;
const BQ: usize = 2;
const WK: usize = 3;
const BK: usize = 4;
const WV: usize = 5;
const BV: usize = 6;
const WO: usize = 7;
const BO: usize = 8;
const N2: usize = 9;
const WG: usize = 10;
const WU: usize = 11;
const WD: usize = 12;
/// The transposed weights W^T [in, out] of q, k, v, o, gate, up and down, in that order, when the
/// caller gives them (training: [`linear::Weight`]).
const TRANSPOSED: usize = 13;
const SLOTS: usize = 20;

/// The transposed slot of a projection's weight slot.
fn transposed_slot(w: usize) -> usize {
    TRANSPOSED
        + match w {
            WQ => 0,
            WK => 1,
            WV => 2,
            WO => 3,
            WG => 4,
            WU => 5,
            _ => 6,
        }
}

/// Where an adapter lies in the flat adapter input: rank, scale, A's and B's ranges.
#[derive(Clone, Debug)]
struct AdapterSlot {
    rank: usize,
    scale: f64,
    a: Range<usize>,
    b: Range<usize>,
}

/// What the forward keeps for the backward.
struct Saved<T> {
    n1: Vec<T>,
    /// n1 A^T of the q and v adapters.
    u: [Vec<T>; 2],
    /// q and k after the rotation; v.
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    probs: Vec<T>,
    s1: Vec<T>,
    /// gate and up projections of n2.
    a: Vec<T>,
    b: Vec<T>,
}

struct PreNormLayer {
    dims: Dims,
    hidden: usize,
    inter: usize,
    scale: f64,
    norm: Norm,
    frozen: Vec<Option<Tensor>>,
    /// The q and v adapters, if any.
    adapters: [Option<AdapterSlot>; 2],
    /// [B, 1, T, D] each, contiguous, x's dtype.
    cos: Tensor,
    sin: Tensor,
    /// [B, T, T], contiguous, x's dtype.
    mask: Tensor,
    saved: Kept,
}

impl PreNormLayer {
    fn rows(&self) -> usize {
        self.dims.b * self.dims.tq
    }

    fn widths(&self) -> (usize, usize) {
        (self.dims.q_row(), self.dims.kv_heads * self.dims.d)
    }

    fn strides(&self) -> Strides {
        let (q, kv) = self.widths();
        Strides { q, kv }
    }

    /// Rotates rows [rows, heads D] by the position of their row (inverse for the backward).
    fn rope<T: Real>(&self, x: &[T], heads: usize, tables: (&[T], &[T]), inverse: bool) -> Vec<T> {
        rope::rope_rows(
            x,
            tables.0,
            tables.1,
            self.dims.d,
            move |r| r / heads,
            inverse,
        )
    }

    fn forward<T: LayerReal>(
        &self,
        (x, lp): (&[T], &[T]),
        w: &[Option<&[T]>],
        (mask, cos, sin): (&[T], &[T], &[T]),
    ) -> (Vec<T>, Saved<T>) {
        let (h, i, rows) = (self.hidden, self.inter, self.rows());
        let (qw, kw) = self.widths();
        let fw = |k: usize| w[k].expect("required frozen weight");
        let weight = |k: usize| linear::Weight {
            w: fw(k),
            t: w[transposed_slot(k)],
        };
        let n1 = norm::norm_rows(x, fw(N1), None, self.norm);
        let project = |slot: Option<&AdapterSlot>, wk: usize, bk: usize, n: usize| {
            let mut y = linear::forward_weight(&n1, weight(wk), w[bk], rows, h, n);
            let u = match slot {
                Some(s) => {
                    let u = linear::gemm_new(
                        (rows, s.rank, h),
                        (&n1, h, 1),
                        (&lp[s.a.clone()], 1, h),
                        1.0,
                    );
                    linear::gemm_into(
                        (rows, n, s.rank),
                        &mut y,
                        true,
                        (&u, s.rank, 1),
                        (&lp[s.b.clone()], 1, s.rank),
                        s.scale,
                    );
                    u
                }
                None => Vec::new(),
            };
            (y, u)
        };
        let (q, uq) = project(self.adapters[0].as_ref(), WQ, BQ, qw);
        let (k, _) = project(None, WK, BK, kw);
        let (v, uv) = project(self.adapters[1].as_ref(), WV, BV, kw);
        let q = self.rope(&q, self.dims.heads, (cos, sin), false);
        let k = self.rope(&k, self.dims.kv_heads, (cos, sin), false);
        let dm = self.dims;
        let probs_len = dm.b * dm.heads * dm.tq * dm.tk;
        let mut ctx: Vec<T> = Vec::with_capacity(rows * qw);
        let mut probs: Vec<T> = Vec::with_capacity(probs_len);
        // SAFETY: q is [rows, qw], k and v are [rows, kw] (the strides); ctx and probs have room
        // for the values forward_into writes, all of them.
        unsafe {
            attention::forward_into(
                (q.as_ptr(), k.as_ptr(), v.as_ptr()),
                self.strides(),
                mask,
                dm,
                self.scale,
                ctx.as_mut_ptr(),
                probs.as_mut_ptr(),
            );
            ctx.set_len(rows * qw);
            probs.set_len(probs_len);
        }
        let s1 = residual_linear(&ctx, (weight(WO), w[BO]), x, rows, qw, h);
        drop(ctx);
        let n2 = norm::norm_rows(&s1, fw(N2), None, self.norm);
        let a = linear::forward_weight(&n2, weight(WG), None, rows, h, i);
        let b = linear::forward_weight(&n2, weight(WU), None, rows, h, i);
        drop(n2);
        let gated = real::par_rows2(&a, &b, 1, |a, b, out| T::gated_into(Gate::Silu, a, b, out));
        let y = residual_linear(&gated, (weight(WD), None), &s1, rows, i, h);
        let saved = Saved {
            n1,
            u: [uq, uv],
            q,
            k,
            v,
            probs,
            s1,
            a,
            b,
        };
        (y, saved)
    }

    /// (dx if `need_x`, the flat adapter gradient if `need_lp`).
    #[allow(clippy::too_many_arguments)]
    fn backward<T: LayerReal>(
        &self,
        (x, lp, dy): (&[T], &[T], &[T]),
        w: &[Option<&[T]>],
        (cos, sin): (&[T], &[T]),
        sv: &Saved<T>,
        need_x: bool,
        need_lp: bool,
    ) -> (Option<Vec<T>>, Option<Vec<T>>) {
        let (h, i, rows) = (self.hidden, self.inter, self.rows());
        let (qw, kw) = self.widths();
        let n = rows * h;
        let fw = |k: usize| w[k].expect("required frozen weight");
        // The MLP half: dh = dy Wd, gated gradients, dn2 = da Wg + db Wu.
        let dh = linear::input_grad(dy, fw(WD), rows, i, h);
        let (da, db) = activation::gated_grads(Gate::Silu, &sv.a, &sv.b, &dh);
        drop(dh);
        let mut dn2 = linear::input_grad(&da, fw(WG), rows, h, i);
        linear::gemm_into(
            (rows, h, i),
            &mut dn2,
            true,
            (&db, i, 1),
            (fw(WU), h, 1),
            1.0,
        );
        drop((da, db));
        let mut ds1 = norm::norm_grad_rows(&sv.s1, fw(N2), &dn2, self.norm);
        ds1.truncate(n);
        for (d, &g) in ds1.iter_mut().zip(dy) {
            *d = *d + g;
        }
        // The attention half.
        let dctx = linear::input_grad(&ds1, fw(WO), rows, qw, h);
        let (mut dq, mut dk, mut dv): (Vec<T>, Vec<T>, Vec<T>) = (
            Vec::with_capacity(rows * qw),
            Vec::with_capacity(rows * kw),
            Vec::with_capacity(rows * kw),
        );
        // SAFETY: q, k, v and their gradients are [rows, qw] and [rows, kw] buffers (the
        // strides), dctx is [rows, qw]; backward_into writes every element of dq, dk and dv.
        unsafe {
            attention::backward_into(
                (sv.q.as_ptr(), sv.k.as_ptr(), sv.v.as_ptr()),
                self.strides(),
                &sv.probs,
                dctx.as_ptr(),
                self.dims,
                self.scale,
                (dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()),
            );
            dq.set_len(rows * qw);
            dk.set_len(rows * kw);
            dv.set_len(rows * kw);
        }
        drop(dctx);
        let dq = self.rope(&dq, self.dims.heads, (cos, sin), true);
        let dk = self.rope(&dk, self.dims.kv_heads, (cos, sin), true);
        let mut dn1 = linear::input_grad(&dq, fw(WQ), rows, h, qw);
        linear::gemm_into(
            (rows, h, kw),
            &mut dn1,
            true,
            (&dk, kw, 1),
            (fw(WK), h, 1),
            1.0,
        );
        linear::gemm_into(
            (rows, h, kw),
            &mut dn1,
            true,
            (&dv, kw, 1),
            (fw(WV), h, 1),
            1.0,
        );
        let mut dlp = vec![T::from(0.0); if need_lp { lp.len() } else { 0 }];
        for (slot, (dproj, width, u)) in self
            .adapters
            .iter()
            .zip([(&dq, qw, &sv.u[0]), (&dv, kw, &sv.u[1])])
        {
            let Some(s) = slot else { continue };
            let r = s.rank;
            // gb = dproj B [rows, r].
            let gb = linear::gemm_new(
                (rows, r, width),
                (dproj, width, 1),
                (&lp[s.b.clone()], r, 1),
                1.0,
            );
            if need_lp {
                linear::gemm_into(
                    (r, h, rows),
                    &mut dlp[s.a.clone()],
                    false,
                    (&gb, 1, r),
                    (&sv.n1, h, 1),
                    s.scale,
                );
                linear::gemm_into(
                    (width, r, rows),
                    &mut dlp[s.b.clone()],
                    false,
                    (dproj, 1, width),
                    (u, r, 1),
                    s.scale,
                );
            }
            linear::gemm_into(
                (rows, h, r),
                &mut dn1,
                true,
                (&gb, r, 1),
                (&lp[s.a.clone()], h, 1),
                s.scale,
            );
        }
        let dx = need_x.then(|| {
            let mut dx = norm::norm_grad_rows(x, fw(N1), &dn1, self.norm);
            dx.truncate(n);
            for (d, &g) in dx.iter_mut().zip(&ds1) {
                *d = *d + g;
            }
            dx
        });
        (dx, need_lp.then_some(dlp))
    }
}

/// The values of the frozen tensors (absent slots stay `None`) behind their storage guards.
#[allow(clippy::type_complexity)]
fn frozen_slices<'a, T: Real, G: std::ops::Deref<Target = candle_core::Storage>>(
    guards: &'a [Option<(G, &'a Layout)>],
    name: &str,
) -> Result<Vec<Option<&'a [T]>>> {
    guards
        .iter()
        .map(|g| {
            g.as_ref()
                .map(|g| operand_values::<T, _>(g, name))
                .transpose()
        })
        .collect()
}

impl CustomOp2 for PreNormLayer {
    fn name(&self) -> &'static str {
        "pre-norm-layer"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let guards: Vec<_> = self
            .frozen
            .iter()
            .map(|t| t.as_ref().map(|t| t.storage_and_layout()))
            .collect();
        let (ms, ml) = self.mask.storage_and_layout();
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (ms, cs, ss) = (cpu(&ms, name)?, cpu(&cs, name)?, cpu(&ss, name)?);
        let out = by_dtype!(xs.dtype(), name, |T| {
            let w = frozen_slices::<T, _>(&guards, name)?;
            let (y, saved) = self.forward::<T>(
                (typed(xs, xl, name)?, typed(ps, pl, name)?),
                &w,
                (
                    typed(ms, ml, name)?,
                    typed(cs, cl, name)?,
                    typed(ss, sl, name)?,
                ),
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
        let name = "pre-norm-layer-grad";
        let grad = grad.contiguous()?;
        let guards: Vec<_> = self
            .frozen
            .iter()
            .map(|t| t.as_ref().map(|t| t.storage_and_layout()))
            .collect();
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = p.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (xs, ps, gs) = (cpu(&xs, name)?, cpu(&ps, name)?, cpu(&gs, name)?);
        let (cs, ss) = (cpu(&cs, name)?, cpu(&ss, name)?);
        by_dtype!(x.dtype(), name, |T| {
            let sv = self.saved.get::<Saved<T>>("pre-norm layer")?;
            let w = frozen_slices::<T, _>(&guards, name)?;
            let (dx, dp) = self.backward::<T>(
                (
                    typed(xs, xl, name)?,
                    typed(ps, pl, name)?,
                    typed(gs, gl, name)?,
                ),
                &w,
                (typed(cs, cl, name)?, typed(ss, sl, name)?),
                &sv,
                x.track_op(),
                p.track_op(),
            );
            real::tensors_of((dx, dp), (x, p))
        })
    }
}

/// The output of [`pre_norm_layer`]: y [B, T, H], and the layer's rotated keys and values
/// [B, T, KVH D] (detached) for a key/value cache.
pub struct PreNormOutput {
    pub y: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

/// The adapters' flat input (every A and B flattened, one after the other; one zero when there
/// are none) and their slots in it, checking their shapes against the hidden size `h` and each
/// adapted projection's output size.
fn adapter_slots(
    adapters: &[Option<Adapter<'_>>; 2],
    (h, outs): (usize, [usize; 2]),
    x: &Tensor,
) -> Result<([Option<AdapterSlot>; 2], Tensor)> {
    let mut slots: [Option<AdapterSlot>; 2] = [None, None];
    let mut flat = Vec::new();
    let mut at = 0;
    for ((slot, adapter), out) in slots.iter_mut().zip(adapters).zip(outs) {
        let Some(adapter) = adapter else { continue };
        let rank = adapter.a.dim(0)?;
        if adapter.a.dims() != [rank, h] || adapter.b.dims() != [out, rank] {
            candle_core::bail!(
                "pre-norm layer: adapter shapes {:?}, {:?} do not fit [r, {h}], [{out}, r]",
                adapter.a.dims(),
                adapter.b.dims()
            );
        }
        let a = at..at + rank * h;
        let bb = a.end..a.end + out * rank;
        at = bb.end;
        *slot = Some(AdapterSlot {
            rank,
            scale: adapter.scale,
            a,
            b: bb,
        });
        flat.push(adapter.a.flatten_all()?);
        flat.push(adapter.b.flatten_all()?);
    }
    let flat = if flat.is_empty() {
        Tensor::zeros(1, x.dtype(), x.device())?
    } else {
        Tensor::cat(&flat, 0)?
    };
    Ok((slots, flat))
}

/// One pre-norm decoder layer (see the module doc) for x [B, T, H] attending to itself only (no
/// cached positions): `heads` query and `kv_heads` key/value heads, RoPE tables cos, sin
/// [B, 1, T, D], an additive mask [B, 1, T, T], the RMSNorms' eps and the score scale. One op
/// on the CPU in f32 and f64 when every base weight is frozen and of x's dtype; `Ok(None)`
/// otherwise (run the layer op by op). Parameters of the wrong shape are an error.
#[allow(clippy::too_many_arguments)]
pub fn pre_norm_layer(
    x: &Tensor,
    p: &PreNormParams,
    (cos, sin): (&Tensor, &Tensor),
    mask: &Tensor,
    (heads, kv_heads): (usize, usize),
    eps: f64,
    scale: f64,
) -> Result<Option<PreNormOutput>> {
    let dtype = x.dtype();
    let frozen: [Option<&Tensor>; SLOTS] = [
        Some(p.input_norm),
        Some(p.q.0),
        p.q.1,
        Some(p.k.0),
        p.k.1,
        Some(p.v.0),
        p.v.1,
        Some(p.o.0),
        p.o.1,
        Some(p.post_norm),
        Some(p.gate),
        Some(p.up),
        Some(p.down),
        p.transposed[0],
        p.transposed[1],
        p.transposed[2],
        p.transposed[3],
        p.transposed[4],
        p.transposed[5],
        p.transposed[6],
    ];
    let adapters = [p.q_lora, p.v_lora];
    let adapter_tensors = adapters.iter().flatten().flat_map(|a| [a.a, a.b]);
    let fits = x.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && frozen
            .iter()
            .flatten()
            .all(|t| t.dtype() == dtype && !t.track_op())
        && adapter_tensors.clone().all(|t| t.dtype() == dtype);
    if !fits {
        return Ok(None);
    }
    let (b, t, h) = x.dims3()?;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!("pre-norm layer: {heads} query heads and {kv_heads} key/value heads");
    }
    let (qw, _) = p.q.0.dims2()?;
    let d = qw / heads;
    let kw = kv_heads * d;
    let i = p.gate.dim(0)?;
    let expected: [&[usize]; SLOTS] = [
        &[h],
        &[qw, h],
        &[qw],
        &[kw, h],
        &[kw],
        &[kw, h],
        &[kw],
        &[h, qw],
        &[h],
        &[h],
        &[i, h],
        &[i, h],
        &[h, i],
        &[h, qw],
        &[h, kw],
        &[h, kw],
        &[qw, h],
        &[h, i],
        &[h, i],
        &[i, h],
    ];
    for (k, (tensor, shape)) in frozen.iter().zip(expected).enumerate() {
        if let Some(tensor) = tensor {
            if tensor.dims() != shape {
                candle_core::bail!(
                    "pre-norm layer: parameter {k} has shape {:?}, expected {shape:?}",
                    tensor.dims()
                );
            }
        }
    }
    if qw != heads * d || cos.dims4()? != (b, 1, t, d) || sin.dims() != cos.dims() {
        candle_core::bail!(
            "pre-norm layer: rotary tables {:?} do not fit {heads} heads of {d} for input {:?}",
            cos.dims(),
            x.dims()
        );
    }
    if mask.dims4()? != (b, 1, t, t) {
        candle_core::bail!(
            "pre-norm layer: mask {:?} does not fit input {:?}",
            mask.dims(),
            x.dims()
        );
    }
    if b * t == 0 {
        return Ok(None);
    }
    let (slots, flat) = adapter_slots(&adapters, (h, [qw, kw]), x)?;
    let saved = Kept::default();
    let op = PreNormLayer {
        dims: Dims {
            b,
            tq: t,
            tk: t,
            heads,
            kv_heads,
            d,
        },
        hidden: h,
        inter: i,
        scale,
        norm: Norm::rms(eps),
        frozen: frozen
            .iter()
            .map(|t| t.map(|t| t.contiguous()).transpose())
            .collect::<Result<_>>()?,
        adapters: slots,
        cos: cos.to_dtype(dtype)?.contiguous()?,
        sin: sin.to_dtype(dtype)?.contiguous()?,
        mask: mask.to_dtype(dtype)?.reshape((b, t, t))?.contiguous()?,
        saved: saved.clone(),
    };
    let y = x.contiguous()?.apply_op2(&flat, op)?;
    // The rotated keys and the values, for the caller's cache.
    let (k, v) = by_dtype!(dtype, "pre-norm layer", |T| {
        let sv = saved.get::<Saved<T>>("pre-norm layer")?;
        (
            Tensor::from_slice(&sv.k, (b, t, kw), x.device())?,
            Tensor::from_slice(&sv.v, (b, t, kw), x.device())?,
        )
    });
    Ok(Some(PreNormOutput { y, k, v }))
}

#[cfg(test)]
mod tests;
