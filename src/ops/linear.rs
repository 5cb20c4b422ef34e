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
//! decomposed form. With few rows (decoding) and f32, the product reads W in place
//! ([`super::skinny`]). Built on the same products: a frozen layer with a LoRA adapter
//! ([`super::lora`]), a whole frozen MLP block and GELU followed by a trained layer
//! ([`super::mlp`]), each one op with its own backward.

use super::real::*;
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
    let (m, n, k) = dims;
    gemm_into_with(
        dims,
        dst,
        accumulate,
        lhs,
        rhs,
        beta,
        parallelism(m * n * k),
    );
}

/// [`gemm_into`] with gemm's threads given.
fn gemm_into_with<T: Real>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    beta: f64,
    threads: gemm::Parallelism,
) {
    let (m, n, _) = dims;
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "gemm: destination too small");
    check_operands(dims, lhs, rhs);
    // SAFETY: check_operands bounds every element the strides address; dst is a distinct
    // mutable slice of at least m * n elements.
    unsafe { gemm_raw(dims, dst.as_mut_ptr(), accumulate, lhs, rhs, beta, threads) }
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
        gemm_raw(
            dims,
            out.as_mut_ptr(),
            false,
            lhs,
            rhs,
            beta,
            parallelism(m * n * k),
        );
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
    threads: gemm::Parallelism,
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
        threads,
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

/// Rows per task of [`accumulate_transposed`]: a fixed count, so that the result does not depend
/// on the number of threads.
const TRANSPOSED_ROWS: usize = 128;

/// y [rows, n] += x [rows, k] Wt (Wt = W^T [k, n], row-major): blocks of [`TRANSPOSED_ROWS`] rows
/// in parallel, gemm on one thread each. gemm's kernels read a row-major right operand as it
/// lies; W [n, k] as the right operand (x W^T) they first copy into column panels, which made
/// the frozen projections of a training step with few output columns (q, k, v, o, down: n <=
/// 896) run at 175-265 GFLOP/s against 290-380 this way (2 threads, Intel Xeon with AVX-512).
fn accumulate_transposed<T: Real>(y: &mut [T], x: &[T], wt: &[T], rows: usize, k: usize, n: usize) {
    use rayon::prelude::*;
    if n == 0 || k == 0 {
        return;
    }
    let block = |(y, x): (&mut [T], &[T])| {
        let m = y.len() / n;
        gemm_into_with(
            (m, n, k),
            y,
            true,
            (x, k, 1),
            (wt, n, 1),
            1.0,
            gemm::Parallelism::None,
        );
    };
    let (y, x) = (&mut y[..rows * n], &x[..rows * k]);
    if rows * n * k > 1 << 15 {
        y.par_chunks_mut(TRANSPOSED_ROWS * n)
            .zip(x.par_chunks(TRANSPOSED_ROWS * k))
            .for_each(block);
    } else {
        y.chunks_mut(TRANSPOSED_ROWS * n)
            .zip(x.chunks(TRANSPOSED_ROWS * k))
            .for_each(block);
    }
}

/// The frozen weight of a product: W [n, k] as stored, or also W^T [k, n] row-major
/// ([`accumulate_transposed`]; same values up to the order of the sums).
#[derive(Clone, Copy)]
pub(crate) struct Weight<'a, T> {
    pub w: &'a [T],
    pub t: Option<&'a [T]>,
}

impl<'a, T: Real> Weight<'a, T> {
    pub fn plain(w: &'a [T]) -> Self {
        Weight { w, t: None }
    }
}

/// y [rows, n] += x [rows, k] W^T, from W^T when given.
fn accumulate_weight<T: Real>(y: &mut [T], x: &[T], w: Weight<T>, rows: usize, k: usize, n: usize) {
    match w.t {
        Some(wt) if !super::skinny::applies(rows, k) => accumulate_transposed(y, x, wt, rows, k, n),
        _ => accumulate_product(y, x, w.w, rows, k, n),
    }
}

/// [`forward`] from a [`Weight`]: y [rows, n] = x [rows, k] W^T + b.
pub(crate) fn forward_weight<T: Real>(
    x: &[T],
    w: Weight<T>,
    b: Option<&[T]>,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<T> {
    if w.t.is_none() {
        return forward(x, w.w, b, rows, k, n);
    }
    let mut y = match b {
        Some(b) => bias_rows(b, rows),
        None => vec![T::from(0.0); rows * n],
    };
    accumulate_weight(&mut y, x, w, rows, k, n);
    y
}

/// `rows` copies of the bias, one after the other: the rows a product accumulates onto.
fn bias_rows<T: Real>(b: &[T], rows: usize) -> Vec<T> {
    let mut y = Vec::with_capacity(rows * b.len());
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    y
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
    let mut y = bias_rows(b, rows);
    accumulate_product(&mut y, x, w, rows, k, n);
    y
}

/// r + x W^T (+ b): rows of r (with b added), then the product accumulated onto them.
pub(crate) fn residual_linear<T: Real>(
    x: &[T],
    (w, b): (Weight<T>, Option<&[T]>),
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
    accumulate_weight(&mut y, x, w, rows, k, n);
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

/// Sums over rows per column, in each number type (f32: summed in f32 by [`super::simd`]).
pub(crate) trait ColumnSums: Real {
    /// The sums over the rows (of `cols` values each) of a block, per column, as f64.
    fn column_sums(rows: &[Self], cols: usize) -> Vec<f64>;
}

impl ColumnSums for f32 {
    fn column_sums(rows: &[Self], cols: usize) -> Vec<f64> {
        let mut sums = vec![0f32; cols];
        super::simd::column_sums(rows, &mut sums);
        sums.into_iter().map(|v| v as f64).collect()
    }
}

impl ColumnSums for f64 {
    fn column_sums(rows: &[Self], cols: usize) -> Vec<f64> {
        let mut sums = vec![0f64; cols];
        for row in rows.chunks(cols) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
        sums
    }
}

/// Rows per block of the bias gradient's partial sums.
const BIAS_BLOCK_ROWS: usize = 64;

/// db [n] = sum over rows of dy: blocks of [`BIAS_BLOCK_ROWS`] rows summed in parallel, then the
/// blocks' sums in order in f64: the result does not depend on the number of threads.
pub(crate) fn bias_grad<T: ColumnSums>(g: &[T], n: usize) -> Vec<T> {
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
            let b = optional_values::<T, _>(&bias, name)?;
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
            let b = optional_typed::<T>(bias, name)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, plain_linear as plain, random_unit as random};
    use candle_core::Var;

    /// The products from W^T (blocks of rows, gemm on one thread each) against the sums written
    /// plainly in f64, with and without bias and residual, for row counts around the block size
    /// and a few rows (which take the in-place product instead).
    #[test]
    fn products_from_the_transposed_weight_match_the_definition() {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        for (rows, k, n) in [
            (1, 9, 5),
            (3, 64, 33),
            (127, 17, 40),
            (128, 33, 7),
            (300, 48, 70),
        ] {
            let x: Vec<f64> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f64> = (0..n * k).map(|_| next()).collect();
            let b: Vec<f64> = (0..n).map(|_| next()).collect();
            let r: Vec<f64> = (0..rows * n).map(|_| next()).collect();
            let wt: Vec<f64> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let expect = |bias: bool, residual: bool| -> Vec<f64> {
                let mut y = vec![0f64; rows * n];
                for i in 0..rows {
                    for c in 0..n {
                        let dot: f64 = (0..k).map(|j| x[i * k + j] * w[c * k + j]).sum();
                        y[i * n + c] = dot
                            + if bias { b[c] } else { 0.0 }
                            + if residual { r[i * n + c] } else { 0.0 };
                    }
                }
                y
            };
            let weight = Weight {
                w: &w[..],
                t: Some(&wt[..]),
            };
            let close = |a: &[f64], e: &[f64], what: &str| {
                assert_eq!(a.len(), e.len());
                let d = a
                    .iter()
                    .zip(e)
                    .map(|(a, e)| (a - e).abs())
                    .fold(0f64, f64::max);
                assert!(d < 1e-12, "{rows}x{k}x{n} {what}: differs by {d}");
            };
            close(
                &forward_weight(&x, weight, None, rows, k, n),
                &expect(false, false),
                "no bias",
            );
            close(
                &forward_weight(&x, weight, Some(&b), rows, k, n),
                &expect(true, false),
                "bias",
            );
            close(
                &residual_linear(&x, (weight, Some(&b)), &r, rows, k, n),
                &expect(true, true),
                "residual",
            );
            // f32: the same products within f32's rounding.
            let f = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let (x32, w32, wt32) = (f(&x), f(&w), f(&wt));
            let y32 = forward_weight(
                &x32,
                Weight {
                    w: &w32,
                    t: Some(&wt32),
                },
                None,
                rows,
                k,
                n,
            );
            let d = y32
                .iter()
                .zip(expect(false, false))
                .map(|(a, e)| (*a as f64 - e).abs())
                .fold(0f64, f64::max);
            assert!(d < 1e-5, "{rows}x{k}x{n} f32: differs by {d}");
        }
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
}
