//! y = x W^T + b as one CPU op with its own backward, for a frozen or a trained W.
//!
//! candle's matmul backward computes the gradient of both operands, so a frozen weight (LoRA,
//! frozen backbones) costs a second matmul per layer for a gradient nobody uses (STACK.md trap 4);
//! its broadcast bias add then costs, in the backward, a zero-filled [rows, out] gradient for the
//! bias view plus an add, and for a trained bias a single-threaded strided sum. Here:
//!
//!   forward   y = x W^T + b      (one gemm into rows pre-filled with b)
//!   backward  dx = dy W           (only when x needs a gradient)
//!             dW = dy^T x         (only when W is trained)
//!             db = sum_rows dy    (only when W is trained; blocks of rows in parallel)
//!
//! straight from the storages, with gemm's own threads. Other devices and dtypes use the
//! decomposed form. Built on the same products: a frozen layer with a LoRA adapter
//! ([`lora_linear`]), a whole frozen MLP block ([`frozen_mlp`]) and GELU followed by a trained
//! layer ([`gelu_linear`]), each one op with its own backward.

use super::fused::{by_dtype, cpu, typed, Real};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

fn parallelism(work: usize) -> gemm::Parallelism {
    if work > 1 << 15 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    }
}

/// Checks that strided operands cover what a product of sizes (m, n, k) reads.
fn check_operands<T>(
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
) {
    if m > 0 && n > 0 && k > 0 {
        assert!(
            lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs,
            "gemm: lhs too small"
        );
        assert!(
            rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs,
            "gemm: rhs too small"
        );
    }
}

/// dst [m, n] (row-major) = (dst if `accumulate`) + beta lhs [m, k] rhs [k, n], with the
/// operands given as (slice, row stride, column stride).
pub(crate) fn gemm_into<T: Real>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    beta: f64,
) {
    let (m, n, _) = dims;
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "gemm: destination too small");
    check_operands(dims, lhs, rhs);
    // SAFETY: check_operands bounds every element the strides address; dst is a distinct
    // mutable slice of at least m * n elements.
    unsafe { gemm_raw(dims, dst.as_mut_ptr(), accumulate, lhs, rhs, beta) }
}

/// A new [m, n] matrix beta lhs rhs. Its memory is written by gemm directly, without being
/// zero-filled first (gemm does not read the destination when not accumulating).
pub(crate) fn gemm_new<T: Real>(
    dims: (usize, usize, usize),
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    beta: f64,
) -> Vec<T> {
    let (m, n, k) = dims;
    if k == 0 {
        return vec![T::from(0.0); m * n];
    }
    check_operands(dims, lhs, rhs);
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: the operands are bounded by check_operands; gemm writes all m * n elements of the
    // allocation (read_dst = false) through the raw pointer before the length is set.
    unsafe {
        gemm_raw(dims, out.as_mut_ptr(), false, lhs, rhs, beta);
        out.set_len(m * n);
    }
    out
}

/// # Safety
/// `dst` must be valid for m * n writes (and reads when `accumulate`); the operands must cover
/// their strided reads.
unsafe fn gemm_raw<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
    beta: f64,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs.as_ptr(),
        lhs_cs as isize,
        lhs_rs as isize,
        rhs.as_ptr(),
        rhs_cs as isize,
        rhs_rs as isize,
        T::from(1.0),
        T::from(beta),
        false,
        false,
        false,
        parallelism(m * n * k),
    );
}

/// The values as f32 when T is f32.
fn as_f32<T: 'static>(values: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the slice is one of f32 values.
        .then(|| unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<f32>(), values.len()) })
}

/// The values as mutable f32 when T is f32.
fn as_f32_mut<T: 'static>(values: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| {
        // SAFETY: T is f32, so the slice is one of f32 values.
        unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<f32>(), values.len()) }
    })
}

/// y [rows, n] += x [rows, k] W^T (W [n, k], row-major): for f32 with few rows (decoding) the
/// product that reads W in place ([`super::skinny`]), else gemm.
fn accumulate_product<T: Real>(y: &mut [T], x: &[T], w: &[T], rows: usize, k: usize, n: usize) {
    if super::skinny::applies(rows, k) {
        if let (Some(x), Some(w), Some(y)) = (as_f32(x), as_f32(w), as_f32_mut(y)) {
            super::skinny::accumulate(x, w, (rows, k, n), y);
            return;
        }
    }
    gemm_into((rows, n, k), y, true, (x, k, 1), (w, 1, k), 1.0);
}

/// y [rows, n] = x [rows, k] W^T (W [n, k]) + b.
pub(crate) fn forward<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<T> {
    let Some(b) = b else {
        if !super::skinny::applies(rows, k) {
            return gemm_new((rows, n, k), (x, k, 1), (w, 1, k), 1.0);
        }
        let mut y = vec![T::from(0.0); rows * n];
        accumulate_product(&mut y, x, w, rows, k, n);
        return y;
    };
    let mut y = Vec::with_capacity(rows * n);
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    accumulate_product(&mut y, x, w, rows, k, n);
    y
}

/// r + x W^T (+ b): rows of r (with b added), then the product accumulated onto them.
pub(crate) fn residual_linear<T: Real>(
    x: &[T],
    (w, b): (&[T], Option<&[T]>),
    r: &[T],
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<T> {
    let mut y = Vec::with_capacity(rows * n);
    match b {
        Some(b) => {
            for row in r.chunks_exact(n) {
                y.extend(row.iter().zip(b).map(|(&a, &c)| a + c));
            }
        }
        None => y.extend_from_slice(&r[..rows * n]),
    }
    accumulate_product(&mut y, x, w, rows, k, n);
    y
}

/// dx [rows, k] = dy [rows, n] W [n, k].
pub(crate) fn input_grad<T: Real>(g: &[T], w: &[T], rows: usize, k: usize, n: usize) -> Vec<T> {
    gemm_new((rows, k, n), (g, n, 1), (w, k, 1), 1.0)
}

/// dW [n, k] = dy^T x.
pub(crate) fn weight_grad<T: Real>(g: &[T], x: &[T], rows: usize, k: usize, n: usize) -> Vec<T> {
    gemm_new((n, k, rows), (g, 1, n), (x, k, 1), 1.0)
}

/// dW [n, k] = dy^T x written into `dst`.
pub(crate) fn weight_grad_into<T: Real>(
    dst: &mut [T],
    g: &[T],
    x: &[T],
    rows: usize,
    k: usize,
    n: usize,
) {
    gemm_into((n, k, rows), dst, false, (g, 1, n), (x, k, 1), 1.0);
}

/// Rows per block of the bias gradient's partial sums.
const BIAS_BLOCK_ROWS: usize = 64;

/// db [n] = sum over rows of dy: blocks of [`BIAS_BLOCK_ROWS`] rows summed in parallel, then the
/// blocks' sums in order in f64: the result does not depend on the number of threads.
pub(crate) fn bias_grad<T: Real>(g: &[T], n: usize) -> Vec<T> {
    use rayon::prelude::*;
    let block = BIAS_BLOCK_ROWS * n.max(1);
    let partials: Vec<Vec<f64>> = g
        .par_chunks(block)
        .map(|rows| T::column_sums(rows, n))
        .collect();
    let mut total = vec![0f64; n];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total.into_iter().map(T::from).collect()
}

/// x W^T + b with W and b constants (no gradient for them).
struct FrozenLinear {
    /// [n, k], contiguous, the input's dtype.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, k) = layout.shape().dims2()?;
        let n = self.weight.dim(0)?;
        let (ws, wl) = self.weight.storage_and_layout();
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let out = by_dtype!(storage.dtype(), name, |T| {
            let b = match &bias {
                Some((s, l)) => Some(typed::<T>(cpu(s, name)?, l, name)?),
                None => None,
            };
            T::wrap(forward::<T>(
                typed(storage, layout, name)?,
                typed(cpu(&ws, name)?, wl, name)?,
                b,
                rows,
                k,
                n,
            ))
        });
        Ok((out, Shape::from((rows, n))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        Ok(Some(input_gradient(x, &self.weight, &grad.contiguous()?)?))
    }
}

/// dx = dy W as a tensor of x's shape ([rows, k]; dy contiguous [rows, n]).
fn input_gradient(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<Tensor> {
    let name = "linear-input-grad";
    let (rows, k) = x.dims2()?;
    let n = w.dim(0)?;
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    by_dtype!(x.dtype(), name, |T| {
        let w = typed::<T>(cpu(&ws, name)?, wl, name)?;
        let g = typed::<T>(cpu(&gs, name)?, gl, name)?;
        Tensor::from_vec(input_grad(g, w, rows, k, n), (rows, k), x.device())
    })
}

/// x W^T (+ b) with W (and b) trained.
struct TrainedLinear;

impl TrainedLinear {
    fn fwd(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "trained-linear";
        let (rows, k) = xl.shape().dims2()?;
        let n = wl.shape().dims2()?.0;
        let out = by_dtype!(xs.dtype(), name, |T| {
            let b = match bias {
                Some((s, l)) => Some(typed::<T>(s, l, name)?),
                None => None,
            };
            T::wrap(forward::<T>(
                typed(xs, xl, name)?,
                typed(ws, wl, name)?,
                b,
                rows,
                k,
                n,
            ))
        });
        Ok((out, Shape::from((rows, n))))
    }

    /// (dx if x needs it, dW, db).
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let name = "trained-linear-grad";
        let g = g.contiguous()?;
        let (rows, k) = x.dims2()?;
        let n = w.dim(0)?;
        let dx = if x.track_op() {
            Some(input_gradient(x, w, &g)?)
        } else {
            None
        };
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (dw, db) = by_dtype!(x.dtype(), name, |T| {
            let xv = typed::<T>(cpu(&xs, name)?, xl, name)?;
            let gv = typed::<T>(cpu(&gs, name)?, gl, name)?;
            (
                Tensor::from_vec(weight_grad(gv, xv, rows, k, n), (n, k), x.device())?,
                Tensor::from_vec(bias_grad(gv, n), n, x.device())?,
            )
        });
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, grad)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for TrainedLinear {
    fn name(&self) -> &'static str {
        "trained-linear"
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
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, grad)?;
        Ok((dx, Some(dw), b.track_op().then_some(db)))
    }
}

/// y = x W^T + b for x of any rank (leading dimensions flattened into rows), W [out, in] as in
/// PyTorch's nn.Linear. One fused op on the CPU in f32 and f64 (W frozen or trained; a trained
/// bias with a frozen W uses the decomposed form); elsewhere matmul and broadcast add.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg("linear: scalar input".into()))?;
    let rows = x.elem_count() / last.max(1);
    let n = weight.dim(0)?;
    if weight.dims2()? != (n, last) || bias.is_some_and(|b| b.dims() != [n]) {
        candle_core::bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    let flat = x.reshape((rows, last))?;
    let fusable = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && (weight.dtype() == x.dtype() || !weight.track_op())
        && bias.is_none_or(|b| b.dtype() == x.dtype() || !b.track_op());
    let frozen_bias = bias.is_none_or(|b| !b.track_op());
    let y = if !fusable || (!weight.track_op() && !frozen_bias) {
        let y = flat.matmul(&weight.t()?)?;
        match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }
    } else if !weight.track_op() {
        let dtype = x.dtype();
        flat.contiguous()?.apply_op1(FrozenLinear {
            weight: weight.to_dtype(dtype)?.contiguous()?,
            bias: bias.map(|b| b.to_dtype(dtype)?.contiguous()).transpose()?,
        })?
    } else {
        let (x, w) = (flat.contiguous()?, weight.contiguous()?);
        match bias {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, TrainedLinear)?,
            None => x.apply_op2(&w, TrainedLinear)?,
        }
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = n;
    y.reshape(out_dims)
}

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
            let bias = match &bias {
                Some((s, l)) => Some(typed::<T>(cpu(s, name)?, l, name)?),
                None => None,
            };
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

/// down(gelu_erf(h)) with its own backward (BERT's feed-forward output with trainable weights):
///   g = gelu(h);  y = g W^T + b
///   dh = (dy W) gelu'(h) (in place);  dW = dy^T g;  db = sum_rows dy
/// g is kept by the op for dW rather than being a graph tensor, so its gradient is never a
/// zero-filled edge of its own, and dh overwrites the buffer of dy W.
struct GeluLinear {
    /// gelu(h) from the forward.
    saved: std::sync::Mutex<Option<Tensor>>,
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
            let g = super::fused::par_rows(typed::<T>(hs, hl, name)?, 1, T::gelu_into);
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
        *self.saved.lock().expect("gelu-linear activations") = Some(g);
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
        let g = self
            .saved
            .lock()
            .expect("gelu-linear activations")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("gelu-linear: backward before forward".into())
            })?;
        let dy = grad.contiguous()?;
        let (rows, k) = h.dims2()?;
        let n = w.dim(0)?;
        let device = h.device();
        let hs = h.storage_and_layout();
        let ws = w.storage_and_layout();
        let gs = g.storage_and_layout();
        let dys = dy.storage_and_layout();
        by_dtype!(h.dtype(), name, |T| {
            let dyv = frozen_values::<T, _>(&dys, name)?;
            let dh = if h.track_op() {
                let mut d = input_grad(dyv, frozen_values::<T, _>(&ws, name)?, rows, k, n);
                super::fused::par_rows_in_place(
                    frozen_values::<T, _>(&hs, name)?,
                    &mut d,
                    1,
                    T::gelu_grad_in_place,
                );
                Some(Tensor::from_vec(d, (rows, k), device)?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let gv = frozen_values::<T, _>(&gs, name)?;
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
            saved: std::sync::Mutex::new(None),
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
    Gated(super::fused::Gate),
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
    saved: std::sync::Mutex<Option<(Tensor, Option<Tensor>)>>,
}

/// The values (contiguous, of type T) behind a (storage guard, layout) pair.
pub(crate) fn frozen_values<'a, T: Real, G: std::ops::Deref<Target = candle_core::Storage>>(
    (guard, layout): &'a (G, &'a Layout),
    name: &str,
) -> Result<&'a [T]> {
    typed::<T>(cpu(guard, name)?, layout, name)
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
            let first_bias = match &fb {
                Some((s, l)) => Some(typed::<T>(cpu(s, name)?, l, name)?),
                None => None,
            };
            let down_bias = match &db {
                Some((s, l)) => Some(typed::<T>(cpu(s, name)?, l, name)?),
                None => None,
            };
            let a = forward::<T>(x, first, first_bias, rows, k, inter);
            let (h, b) = match (self.kind, &up) {
                (MlpKind::Gated(gate), Some((us, ul))) => {
                    let up = typed::<T>(cpu(us, name)?, ul, name)?;
                    let b = forward::<T>(x, up, None, rows, k, inter);
                    let h = super::fused::par_rows2(&a, &b, 1, |a, b, out| {
                        T::gated_into(gate, a, b, out)
                    });
                    (h, Some(b))
                }
                (MlpKind::GeluErf, None) => (super::fused::par_rows(&a, 1, T::gelu_into), None),
                _ => candle_core::bail!("frozen-mlp: the up projection does not fit the kind"),
            };
            let y = forward::<T>(&h, down, down_bias, rows, inter, n);
            let a = Tensor::from_vec(a, (rows, inter), &device)?;
            let b = b
                .map(|b| Tensor::from_vec(b, (rows, inter), &device))
                .transpose()?;
            *self.saved.lock().expect("frozen-mlp activations") = Some((a, b));
            T::wrap(y)
        });
        Ok((out, Shape::from((rows, n))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let name = "frozen-mlp-grad";
        let (a, b) = self
            .saved
            .lock()
            .expect("frozen-mlp activations")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("frozen-mlp: backward before forward".into()))?;
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
            let gv = frozen_values::<T, _>(&gs, name)?;
            let av = frozen_values::<T, _>(&as_, name)?;
            let gh = input_grad(gv, frozen_values::<T, _>(&ds, name)?, rows, inter, n);
            let first = frozen_values::<T, _>(&fs, name)?;
            let dx = match (self.kind, &bs, &us) {
                (MlpKind::Gated(gate), Some(bs), Some(us)) => {
                    let bv = frozen_values::<T, _>(bs, name)?;
                    let (da, db) = super::fused::gated_grads(gate, av, bv, &gh);
                    let mut dx = input_grad(&da, first, rows, k, inter);
                    let up = frozen_values::<T, _>(us, name)?;
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
                    super::fused::par_rows_in_place(av, &mut da, 1, T::gelu_grad_in_place);
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
        saved: std::sync::Mutex::new(None),
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
    use crate::ops::testing::max_diff;
    use candle_core::Var;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        crate::ops::testing::random(shape, seed, 1.0)
    }

    fn plain(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        match b {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        }
    }

    /// gelu_linear against the GELU and the linear layer one by one: values and the gradients
    /// of h, W, b, trained and frozen weights, several shapes.
    #[test]
    fn gelu_linear_matches_gelu_then_linear() {
        use super::super::fused::gelu_erf;
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

    /// Values and the gradients of x, W, b (those that are variables) against matmul +
    /// broadcast add, for frozen and trained weights, with and without bias, several shapes.
    #[test]
    fn values_and_gradients_match_the_decomposed_linear() {
        for (case, (shape, out)) in [
            (vec![3usize, 5], 4usize),
            (vec![2, 7, 6], 3),
            (vec![1, 1, 9], 2),
            (vec![40, 33], 17),
            (vec![2, 70, 5], 3),
        ]
        .into_iter()
        .enumerate()
        {
            let inp = *shape.last().unwrap();
            let seed = case as u64 * 7;
            for trained in [false, true] {
                for with_bias in [false, true] {
                    let x = Var::from_tensor(&random(&shape, seed)).unwrap();
                    let w_t = random(&[out, inp], seed + 1);
                    let b_t = random(&[out], seed + 2);
                    let (w_var, b_var) = (
                        Var::from_tensor(&w_t).unwrap(),
                        Var::from_tensor(&b_t).unwrap(),
                    );
                    let w = if trained {
                        w_var.as_tensor().clone()
                    } else {
                        w_t.clone()
                    };
                    let b = if trained {
                        b_var.as_tensor().clone()
                    } else {
                        b_t.clone()
                    };
                    let b = with_bias.then_some(&b);
                    let rows: usize = shape.iter().product::<usize>() / inp;
                    let probe = random(&[rows * out], seed + 3);
                    let loss = |y: &Tensor| {
                        (y.flatten_all().unwrap() * &probe)
                            .unwrap()
                            .sum_all()
                            .unwrap()
                    };
                    let ours = linear(x.as_tensor(), &w, b).unwrap();
                    let reference = plain(x.as_tensor(), &w, b);
                    let label = format!("case {case} trained {trained} bias {with_bias}");
                    assert!(max_diff(&ours, &reference) < 1e-12, "{label}: values");
                    let g_ours = loss(&ours).backward().unwrap();
                    let g_ref = loss(&reference).backward().unwrap();
                    let mut checked = vec![x.as_tensor()];
                    if trained {
                        checked.push(w_var.as_tensor());
                        if with_bias {
                            checked.push(b_var.as_tensor());
                        }
                    }
                    for t in checked {
                        let diff = max_diff(g_ours.get(t).unwrap(), g_ref.get(t).unwrap());
                        assert!(diff < 1e-12, "{label}: gradient differs by {diff}");
                    }
                    if !trained {
                        assert!(g_ours.get(w_var.as_tensor()).is_none());
                    }
                }
            }
        }
    }

    #[test]
    fn a_constant_input_gets_no_gradient_but_the_weight_does() {
        let w = Var::from_tensor(&random(&[3, 4], 4)).unwrap();
        let x = random(&[2, 4], 5);
        let grads = linear(&x, w.as_tensor(), None)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(w.as_tensor()).is_some());
        assert!(grads.get(&x).is_none());
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let x = random(&[2, 4], 1);
        assert!(linear(&x, &random(&[3, 5], 2), None).is_err());
        assert!(linear(&x, &random(&[3, 4], 2), Some(&random(&[4], 3))).is_err());
    }

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

    /// The fused frozen MLP against its layers one by one: values and the input gradient, both
    /// kinds, with and without leading dimensions.
    #[test]
    fn frozen_mlp_matches_the_layers_one_by_one() {
        use super::super::fused::{gated, gelu_erf, Gate};
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
