//! Fused CPU kernels with their own backward: softmax over the last dimension, LayerNorm (also of
//! a residual sum) and RMSNorm, GELU, gated activations, RoPE, embedding lookup. The decomposed
//! versions (max, sub, exp, sum, div; mean, sub, sqr, mean, add, sqrt, div, mul, add) allocate a
//! tensor per step and record a graph node per step; these make one pass forward and one or two
//! passes backward. candle-nn's own fused norms and softmax have no backward (STACK.md), which is
//! why these exist.
//!
//! Rows are the last dimension; inputs are made contiguous. f64 data is computed in f64. f32 data
//! is computed in f32 by vectorized kernels ([`super::simd`]): row statistics with eight partial
//! sums, as PyTorch's CPU kernels do; sums over rows (norm weight gradients) per block of rows in
//! f32, the blocks added in f64 in a fixed order. On other devices (and dtypes) the functions
//! fall back to the decomposed forms.

pub use super::simd::Gate;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};

pub(crate) trait Real:
    Copy + Send + Sync + 'static + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self>
{
    fn to(self) -> f64;
    fn from(v: f64) -> Self;
    /// The values of a storage of this type.
    fn borrow(storage: &CpuStorage) -> Option<&[Self]>;
    fn wrap(values: Vec<Self>) -> CpuStorage;
    /// Softmax of every row of `cols` values, in place.
    fn softmax_rows_in_place(data: &mut [Self], cols: usize);
    /// Per row: out = y * (g - sum(g * y)) * scale.
    fn softmax_grad_rows_into(y: &[Self], g: &[Self], out: &mut [Self], cols: usize, scale: f64);
    /// out = x Phi(x) (GELU, erf form).
    fn gelu_into(x: &[Self], out: &mut [Self]);
    /// g = g (Phi(x) + x phi(x)), in place.
    fn gelu_grad_in_place(x: &[Self], g: &mut [Self]);
    /// out = x Phi(x), and x overwritten with the derivative Phi(x) + x phi(x).
    fn gelu_keeping_grad(x: &mut [Self], out: &mut [Self]);
    /// The sums over the rows (of `cols` values each) of a block, per column, as f64.
    fn column_sums(rows: &[Self], cols: usize) -> Vec<f64>;
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
    /// out = act(a) * b.
    fn gated_into(gate: Gate, a: &[Self], b: &[Self], out: &mut [Self]);
    /// da = g b act'(a), db = g act(a).
    fn gated_grad_into(
        gate: Gate,
        a: &[Self],
        b: &[Self],
        g: &[Self],
        da: &mut [Self],
        db: &mut [Self],
    );
}

impl Real for f32 {
    fn to(self) -> f64 {
        self as f64
    }
    fn from(v: f64) -> Self {
        v as f32
    }
    fn borrow(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(values)
    }
    fn softmax_rows_in_place(data: &mut [Self], cols: usize) {
        super::simd::softmax_rows(data, cols)
    }
    fn softmax_grad_rows_into(y: &[Self], g: &[Self], out: &mut [Self], cols: usize, scale: f64) {
        super::simd::softmax_grad_rows(y, g, out, cols, scale as f32)
    }
    fn gelu_into(x: &[Self], out: &mut [Self]) {
        super::simd::gelu(x, out)
    }
    fn gelu_grad_in_place(x: &[Self], g: &mut [Self]) {
        super::simd::gelu_grad_in_place(x, g)
    }
    fn gelu_keeping_grad(x: &mut [Self], out: &mut [Self]) {
        super::simd::gelu_keeping_grad(x, out)
    }
    fn column_sums(rows: &[Self], cols: usize) -> Vec<f64> {
        let mut sums = vec![0f32; cols];
        super::simd::column_sums(rows, &mut sums);
        sums.into_iter().map(|v| v as f64).collect()
    }
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
    fn gated_into(gate: Gate, a: &[Self], b: &[Self], out: &mut [Self]) {
        super::simd::gated(gate, a, b, out)
    }
    fn gated_grad_into(
        gate: Gate,
        a: &[Self],
        b: &[Self],
        g: &[Self],
        da: &mut [Self],
        db: &mut [Self],
    ) {
        super::simd::gated_grad(gate, a, b, g, da, db)
    }
}

impl Real for f64 {
    fn to(self) -> f64 {
        self
    }
    fn from(v: f64) -> Self {
        v
    }
    fn borrow(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(values: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(values)
    }
    fn softmax_rows_in_place(data: &mut [Self], cols: usize) {
        for row in data.chunks_mut(cols) {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
    }
    fn softmax_grad_rows_into(y: &[Self], g: &[Self], out: &mut [Self], cols: usize, scale: f64) {
        for ((yr, gr), or) in y.chunks(cols).zip(g.chunks(cols)).zip(out.chunks_mut(cols)) {
            let dot: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, a), b) in or.iter_mut().zip(yr).zip(gr) {
                *o = a * (b - dot) * scale;
            }
        }
    }
    fn gelu_into(x: &[Self], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * normal_cdf(v);
        }
    }
    fn column_sums(rows: &[Self], cols: usize) -> Vec<f64> {
        let mut sums = vec![0f64; cols];
        for row in rows.chunks(cols) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
        sums
    }
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
    fn gelu_grad_in_place(x: &[Self], g: &mut [Self]) {
        for (gv, &v) in g.iter_mut().zip(x) {
            *gv *= gelu_derivative(v);
        }
    }
    fn gelu_keeping_grad(x: &mut [Self], out: &mut [Self]) {
        for (o, v) in out.iter_mut().zip(x.iter_mut()) {
            *o = *v * normal_cdf(*v);
            *v = gelu_derivative(*v);
        }
    }
    fn gated_into(gate: Gate, a: &[Self], b: &[Self], out: &mut [Self]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = gate.eval_f64(x).0 * y;
        }
    }
    fn gated_grad_into(
        gate: Gate,
        a: &[Self],
        b: &[Self],
        g: &[Self],
        da: &mut [Self],
        db: &mut [Self],
    ) {
        for i in 0..a.len() {
            let (act, d) = gate.eval_f64(a[i]);
            da[i] = g[i] * b[i] * d;
            db[i] = g[i] * act;
        }
    }
}

/// d/dx x Phi(x) = Phi(x) + x phi(x), in f64.
fn gelu_derivative(x: f64) -> f64 {
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    normal_cdf(x) + x * inv_sqrt_2pi * (-0.5 * x * x).exp()
}

/// The standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2, with candle's f64 erf.
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// Rows per parallel task: about 32k values, so that small tensors stay on one thread.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (32_768 / cols.max(1)).max(1)
}

/// `out` (same length as `x`) filled in parallel, blocks of whole rows of `cols` values each:
/// `f(x_rows, out_rows)`.
pub(crate) fn par_rows<T: Real>(x: &[T], cols: usize, f: impl Fn(&[T], &mut [T]) + Sync) -> Vec<T> {
    let block = rows_per_task(cols) * cols;
    par_blocks_out(x.len(), block, |i, o| {
        f(&x[i * block..i * block + o.len()], o)
    })
}

/// A new vector of `len` values filled by `f(block index, block)` over blocks of `block`
/// values in parallel; each block is zeroed by its own task just before (a serial zeroing of
/// the whole output would leave the other threads idle).
pub(crate) fn par_blocks_out<T: Real>(
    len: usize,
    block: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(block.max(1))
        .enumerate()
        .for_each(|(i, o)| {
            for v in o.iter_mut() {
                v.write(T::from(0.0));
            }
            // SAFETY: every value of the block was just initialized.
            let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
            f(i, o)
        });
    // SAFETY: the blocks cover all len values, each initialized above.
    unsafe { out.set_len(len) };
    out
}

/// `f(x_block, y_block)` over blocks of whole rows of `cols` values, in parallel, with `y` (the
/// same length as `x`) updated in place.
pub(crate) fn par_rows_in_place<T: Real>(
    x: &[T],
    y: &mut [T],
    cols: usize,
    f: impl Fn(&[T], &mut [T]) + Sync,
) {
    use rayon::prelude::*;
    let block = rows_per_task(cols) * cols;
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(y, x)| f(x, y));
}

/// As [`par_rows`] with a second input of the same shape: `f(a_rows, b_rows, out_rows)`.
pub(crate) fn par_rows2<T: Real>(
    a: &[T],
    b: &[T],
    cols: usize,
    f: impl Fn(&[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let block = rows_per_task(cols) * cols;
    par_blocks_out(a.len(), block, |i, o| {
        let r = i * block..i * block + o.len();
        f(&a[r.clone()], &b[r], o)
    })
}

/// The contiguous values of an input of type `T`; an error when the input is of another type or
/// not contiguous.
pub(crate) fn typed<'a, T: Real>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let values = T::borrow(storage).ok_or_else(|| {
        candle_core::Error::Msg(format!("{what} supports f32 and f64, every input the same"))
    })?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} needs a contiguous input")))?;
    Ok(&values[start..end])
}

/// What a layer op's forward keeps for its backward (a per-dtype struct of buffers), shared by
/// clones of the handle.
#[derive(Clone, Default)]
pub(crate) struct Kept(
    std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>>>,
);

impl Kept {
    pub(crate) fn keep<S: std::any::Any + Send + Sync>(&self, value: S) {
        *self.0.lock().expect("kept activations") = Some(std::sync::Arc::new(value));
    }

    /// The kept value; an error before the forward or for a value of another type.
    pub(crate) fn get<S: std::any::Any + Send + Sync>(
        &self,
        what: &str,
    ) -> Result<std::sync::Arc<S>> {
        let value = self
            .0
            .lock()
            .expect("kept activations")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: backward before forward")))?;
        value.downcast::<S>().map_err(|_| {
            candle_core::Error::Msg(format!("{what}: kept activations of another dtype"))
        })
    }
}

/// The CPU storage behind a tensor's storage.
pub(crate) fn cpu<'a>(storage: &'a candle_core::Storage, what: &str) -> Result<&'a CpuStorage> {
    match storage {
        candle_core::Storage::Cpu(s) => Ok(s),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

fn last_dim(layout: &Layout) -> usize {
    layout.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// Runs `$body` with the type alias `$t` bound to f32 or f64, as `$dtype` says.
macro_rules! by_dtype {
    ($dtype:expr, $what:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{} supports f32 and f64", $what),
        }
    };
}
pub(crate) use by_dtype;

// ---------------------------------------------------------------- softmax

fn softmax_rows<T: Real>(x: &[T], cols: usize) -> Vec<T> {
    par_rows(x, cols, |x, out| {
        out.copy_from_slice(x);
        T::softmax_rows_in_place(out, cols);
    })
}

/// dx = y * (g - sum(g * y)) per row.
fn softmax_grad_rows<T: Real>(y: &[T], g: &[T], cols: usize) -> Vec<T> {
    par_rows2(y, g, cols, |y, g, out| {
        T::softmax_grad_rows_into(y, g, out, cols, 1.0)
    })
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = last_dim(layout);
        let name = self.name();
        let out = by_dtype!(storage.dtype(), name, |T| T::wrap(softmax_rows::<T>(
            typed(storage, layout, name)?,
            cols
        )));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SOFTMAX_GRAD,
        )?))
    }
}

/// Which gradient a [`RowGrad`] computes.
#[derive(Clone, Copy)]
enum RowGradKind {
    Softmax,
    Gelu,
}

/// A gradient computed from two same-shaped tensors row by row (no backward of its own).
struct RowGrad(RowGradKind);

impl RowGrad {
    fn rows<T: Real>(&self, a: &[T], b: &[T], cols: usize) -> Vec<T> {
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

const SOFTMAX_GRAD: RowGrad = RowGrad(RowGradKind::Softmax);

pub(crate) fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Softmax over the last dimension (fused on the CPU, with backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

// ---------------------------------------------------------------- GELU (erf)

fn gelu_rows<T: Real>(x: &[T]) -> Vec<T> {
    par_rows(x, 1, |x, out| T::gelu_into(x, out))
}

/// d/dx [x Phi(x)] = Phi(x) + x phi(x), times g (on a copy of g).
fn gelu_grad_rows<T: Real>(x: &[T], g: &[T], _cols: usize) -> Vec<T> {
    let mut out = g.to_vec();
    par_rows_in_place(x, &mut out, 1, T::gelu_grad_in_place);
    out
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = by_dtype!(storage.dtype(), name, |T| T::wrap(gelu_rows::<T>(typed(
            storage, layout, name
        )?)));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad_res.contiguous()?, &GELU_GRAD)?,
        ))
    }
}

const GELU_GRAD: RowGrad = RowGrad(RowGradKind::Gelu);

/// GELU with the exact erf form, x Phi(x) (fused on the CPU, with backward).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

// ---------------------------------------------------------------- gated MLP activation

/// out = act(a) * b, the product inside a gated MLP, with its own backward.
struct Gated(Gate);

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "fused-gated"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let gate = self.0;
        let out = by_dtype!(s1.dtype(), name, |T| T::wrap(par_rows2::<T>(
            typed(s1, l1, name)?,
            typed(s2, l2, name)?,
            1,
            |a, b, out| T::gated_into(gate, a, b, out)
        )));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let gate = self.0;
        let g = grad.contiguous()?;
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (as_, bs, gs) = (cpu(&as_, name)?, cpu(&bs, name)?, cpu(&gs, name)?);
        let (da, db) = by_dtype!(a.dtype(), name, |T| {
            let (av, bv, gv) = (
                typed::<T>(as_, al, name)?,
                typed::<T>(bs, bl, name)?,
                typed::<T>(gs, gl, name)?,
            );
            let (da, db) = gated_grads(gate, av, bv, gv);
            (
                Tensor::from_vec(da, a.shape(), a.device())?,
                Tensor::from_vec(db, b.shape(), b.device())?,
            )
        });
        Ok((Some(da), Some(db)))
    }
}

/// (da, db) = (g b act'(a), g act(a)), in parallel blocks.
pub(crate) fn gated_grads<T: Real>(gate: Gate, a: &[T], b: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
    use rayon::prelude::*;
    let mut da = vec![T::from(0.0); a.len()];
    let mut db = vec![T::from(0.0); a.len()];
    let block = rows_per_task(1);
    da.par_chunks_mut(block)
        .zip(db.par_chunks_mut(block))
        .enumerate()
        .for_each(|(i, (da, db))| {
            let r = i * block..i * block + da.len();
            T::gated_grad_into(gate, &a[r.clone()], &b[r.clone()], &g[r], da, db);
        });
    (da, db)
}

/// act(a) * b for same-shaped a, b (the gated MLP of Llama/Qwen2 with [`Gate::Silu`], Gemma
/// with [`Gate::GeluTanh`]): one fused op on the CPU in f32 and f64, with backward; elsewhere
/// candle's activation and a product.
pub fn gated(a: &Tensor, b: &Tensor, gate: Gate) -> Result<Tensor> {
    if !fusable(a) || a.dtype() != b.dtype() || a.shape() != b.shape() {
        let act = match gate {
            Gate::Silu => candle_nn::ops::silu(a)?,
            Gate::GeluTanh => a.gelu()?,
        };
        return act * b;
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Gated(gate))
}

// ---------------------------------------------------------------- RoPE

/// Rotary embedding in the half-split layout: with x = [x1, x2] and the angle's cos c and sin s
/// (the tables repeat their first half), y = [x1 c - x2 s, x2 c + x1 s]. Its backward is the
/// inverse rotation: dx = [g1 c + g2 s, g2 c - g1 s]. `inverse` applies that one.
struct Rope {
    /// [B, 1, T, D] each, contiguous, the same dtype as x.
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
    /// `None`: x is [B, H, T, D]; `Some(h)`: x is [B, T, h * D] (heads side by side).
    heads: Option<usize>,
}

/// Rotates every row of D values of `x`; `table_of(row)` is the row of the cos/sin tables (its
/// batch and position) that row `row` uses.
pub(crate) fn rope_rows<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    d: usize,
    table_of: impl Fn(usize) -> usize + Sync,
    inverse: bool,
) -> Vec<T> {
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let rows = rows_per_task(d);
    par_blocks_out(x.len(), rows * d, |block, out: &mut [T]| {
        let x = &x[block * rows * d..block * rows * d + out.len()];
        {
            for (i, (out, x)) in out.chunks_mut(d).zip(x.chunks(d)).enumerate() {
                let table = table_of(block * rows + i) * d;
                for k in 0..half {
                    let c = cos[table + k].to();
                    let s = sin[table + k].to() * sign;
                    let x1 = x[k].to();
                    let x2 = x[half + k].to();
                    out[k] = T::from(x1 * c - x2 * s);
                    out[half + k] = T::from(x2 * c + x1 * s);
                }
                if d % 2 == 1 {
                    out[d - 1] = x[d - 1];
                }
            }
        }
    })
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, _, t, d) = self.cos.dims4()?;
        let (heads, heads_first) = match self.heads {
            None => (layout.shape().dims4()?.1, true),
            Some(h) => (h, false),
        };
        // Row r of D values: [B, H, T] order -> table (b, t) = (r / (H T), r % T); [B, T, H]
        // order -> table r / H.
        let table_of = move |r: usize| {
            if heads_first {
                r / (heads * t) * t + r % t
            } else {
                r / heads
            }
        };
        let (cos_s, cos_l) = self.cos.storage_and_layout();
        let (sin_s, sin_l) = self.sin.storage_and_layout();
        let name = self.name();
        let (cos_s, sin_s) = (cpu(&cos_s, name)?, cpu(&sin_s, name)?);
        let out = by_dtype!(storage.dtype(), name, |T| T::wrap(rope_rows::<T>(
            typed(storage, layout, name)?,
            typed(cos_s, cos_l, name)?,
            typed(sin_s, sin_l, name)?,
            d,
            table_of,
            self.inverse,
        )));
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
            heads: self.heads,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(inverse)?))
    }
}

/// RoPE for x [B, H, T, D] with tables cos, sin [B, 1, T, D] (fused on the CPU, with backward);
/// elsewhere x cos + rotate_half(x) sin.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    let fits = cos.dims4().ok() == Some((b, 1, t, d)) && sin.dims4().ok() == Some((b, 1, t, d));
    if !fusable(x) || !fits {
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        // The tables are f32; a bf16 x (GPU) is rotated in its own type.
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        return x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?;
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
        inverse: false,
        heads: None,
    })
}

/// RoPE for x [B, T, H * D] (the projection's layout, heads side by side) with tables cos, sin
/// [B, 1, T, D]: the same rotation as [`rope`] on the split heads, without the transposes.
pub fn rope_bthd(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let d = width / heads.max(1);
    let fits = heads * d == width
        && cos.dims4().ok() == Some((b, 1, t, d))
        && sin.dims4().ok() == Some((b, 1, t, d));
    if !fusable(x) || !fits {
        let split = x.reshape((b, t, heads, d))?.transpose(1, 2)?;
        let rotated = rope(&split, cos, sin)?;
        return rotated.transpose(1, 2)?.reshape((b, t, width));
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.to_dtype(x.dtype())?.contiguous()?,
        sin: sin.to_dtype(x.dtype())?.contiguous()?,
        inverse: false,
        heads: Some(heads),
    })
}

// ---------------------------------------------------------------- embedding

/// Rows of a table picked by ids, with a backward that scatters the rows' gradients into one
/// zero-filled table gradient (filled in parallel). candle's index_select backward fills a zero
/// table, copies it once more inside index_add, and adds; this writes the table once.
struct Embedding {
    ids: Vec<u32>,
}

impl CustomOp1 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (vocab, dim) = layout.shape().dims2()?;
        if let Some(&bad) = self.ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("embedding: id {bad} is outside the table of {vocab} rows");
        }
        let out = by_dtype!(storage.dtype(), name, |T| {
            let table = typed::<T>(storage, layout, name)?;
            let mut out = Vec::with_capacity(self.ids.len() * dim);
            for &id in &self.ids {
                let id = id as usize;
                out.extend_from_slice(&table[id * dim..(id + 1) * dim]);
            }
            T::wrap(out)
        });
        Ok((out, Shape::from((self.ids.len(), dim))))
    }

    fn bwd(&self, table: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let name = "embedding-grad";
        let (vocab, dim) = table.dims2()?;
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let dtable = by_dtype!(table.dtype(), name, |T| {
            let g = typed::<T>(cpu(&gs, name)?, gl, name)?;
            let mut d = Vec::new();
            d.par_extend(
                (0..vocab * dim)
                    .into_par_iter()
                    .map(|_| <T as Real>::from(0.0)),
            );
            for (row, &id) in g.chunks(dim.max(1)).zip(&self.ids) {
                let id = id as usize;
                for (t, v) in d[id * dim..(id + 1) * dim].iter_mut().zip(row) {
                    *t += *v;
                }
            }
            Tensor::from_vec(d, (vocab, dim), table.device())?
        });
        Ok(Some(dtable))
    }
}

/// table[ids] for a table [V, H] and ids [B, T] -> [B, T, H] (fused on the CPU in f32 and f64,
/// with the backward of [`Embedding`]); elsewhere index_select.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let dim = table.dim(1)?;
    if !fusable(table) || !ids.device().is_cpu() {
        return table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, dim));
    }
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    table
        .contiguous()?
        .apply_op1(Embedding { ids })?
        .reshape((b, t, dim))
}

// ---------------------------------------------------------------- norms

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

/// y = (x - mean) * rstd * scale + shift, with scale = w (+ 1 when `unit_offset`); blocks of
/// rows in parallel.
pub(crate) fn norm_rows<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, n: Norm) -> Vec<T> {
    par_rows(x, w.len(), |x, out| T::norm_rows_into(x, w, b, out, n))
}

/// Gradients of a norm: packed as [dx (rows * cols), dw (cols), db (cols)].
/// With x^ = (x - mean) rstd and gh = g * scale: dx = rstd (gh - mean(gh) - x^ mean(gh x^))
/// (RMSNorm: dx = rstd (gh - x^ mean(gh x^))), dw = sum_rows g x^, db = sum_rows g.
/// Blocks of rows run in parallel; their partial dw, db are summed in block order, so the
/// result does not depend on the number of threads.
pub(crate) fn norm_grad_rows<T: Real>(x: &[T], w: &[T], g: &[T], n: Norm) -> Vec<T> {
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

#[derive(Clone, Copy)]
pub(crate) struct Norm {
    eps: f64,
    centre: bool,
    unit_offset: bool,
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

    fn offset(&self) -> f64 {
        if self.unit_offset {
            1.0
        } else {
            0.0
        }
    }

    fn simd(&self) -> super::simd::NormParams {
        super::simd::NormParams {
            eps: self.eps as f32,
            centre: self.centre,
            offset: self.offset() as f32,
        }
    }

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
            let bias = match b {
                Some((s, l)) => Some(typed::<T>(s, l, name)?),
                None => None,
            };
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
        LayerNormOp(Norm {
            eps,
            centre: true,
            unit_offset: false,
        }),
    )
}

/// LN(x + r) with w, b packed as one [2, cols] input: the residual sum is formed inside the op
/// and kept for the backward, so it is not a graph tensor (no gradient edge of its own); x and
/// r receive the same gradient.
struct ResidualLayerNorm {
    norm: Norm,
    /// x + r from the forward.
    sum: std::sync::Mutex<Option<Tensor>>,
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
        *self.sum.lock().expect("residual layer norm sum") = Some(sum);
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
        let sum = self
            .sum
            .lock()
            .expect("residual layer norm sum")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("residual layer norm: backward before forward".into())
            })?;
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
            norm: Norm {
                eps,
                centre: true,
                unit_offset: false,
            },
            sum: std::sync::Mutex::new(None),
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
    use crate::ops::testing::{max_diff, random};
    use candle_core::{Device, Var};

    /// A scalar loss that weights every output element differently.
    fn probe_loss(y: &Tensor, seed: u64) -> Tensor {
        let p = random(y.dims(), seed, 1.0);
        (y * p).unwrap().sum_all().unwrap()
    }

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
    fn fused_gated_activation_matches_candle_in_values_and_gradients() {
        for (i, shape) in [vec![3usize, 5], vec![2, 3, 17], vec![1, 1]]
            .iter()
            .enumerate()
        {
            for gate in [Gate::Silu, Gate::GeluTanh] {
                let a = Var::from_tensor(&random(shape, 40 + i as u64, 6.0)).unwrap();
                let b = Var::from_tensor(&random(shape, 50 + i as u64, 2.0)).unwrap();
                let ours = gated(a.as_tensor(), b.as_tensor(), gate).unwrap();
                let act = match gate {
                    Gate::Silu => candle_nn::ops::silu(a.as_tensor()).unwrap(),
                    Gate::GeluTanh => a.as_tensor().gelu().unwrap(),
                };
                let plain = (act * b.as_tensor()).unwrap();
                assert!(max_diff(&ours, &plain) < 1e-12, "{gate:?} {shape:?}");
                let g1 = probe_loss(&ours, 7).backward().unwrap();
                let g2 = probe_loss(&plain, 7).backward().unwrap();
                for v in [&a, &b] {
                    let d = max_diff(
                        g1.get(v.as_tensor()).unwrap(),
                        g2.get(v.as_tensor()).unwrap(),
                    );
                    // candle's tanh-GELU backward rounds its constants to six digits
                    // (0.797885, 0.0356774); ours is exact (checked against finite
                    // differences in ops::simd's tests).
                    let tol = if gate == Gate::Silu { 1e-10 } else { 1e-6 };
                    assert!(d < tol, "{gate:?} {shape:?}: gradient {d}");
                }
            }
        }
    }

    #[test]
    fn fused_softmax_matches_the_decomposed_one_in_values_and_gradients() {
        for (i, shape) in [vec![3usize, 5], vec![2, 3, 4, 7], vec![1, 1], vec![4, 33]]
            .iter()
            .enumerate()
        {
            let x = Var::from_tensor(&random(shape, 10 + i as u64, 30.0)).unwrap();
            let ours = softmax_last_dim(x.as_tensor()).unwrap();
            let plain = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
            assert!(max_diff(&ours, &plain) < 1e-12, "{shape:?}");
            let g1 = probe_loss(&ours, 99).backward().unwrap();
            let g2 = probe_loss(&plain, 99).backward().unwrap();
            let d = max_diff(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert!(d < 1e-12, "{shape:?}: gradient {d}");
        }
        // f32, and huge logits stay finite
        let x = Tensor::new(&[[1e4f32, 0.0, -1e4], [3.0, 3.0, 3.0]], &Device::Cpu).unwrap();
        let y = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y[0], vec![1.0, 0.0, 0.0]);
        assert!((y[1][0] - 1.0 / 3.0).abs() < 1e-7);
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
    fn fused_gelu_matches_candle_in_values_and_gradients() {
        let x = Var::from_tensor(&random(&[3, 11], 41, 4.0)).unwrap();
        let ours = gelu_erf(x.as_tensor()).unwrap();
        let plain = x.as_tensor().gelu_erf().unwrap();
        assert!(max_diff(&ours, &plain) < 1e-12);
        let g1 = probe_loss(&ours, 5).backward().unwrap();
        let g2 = probe_loss(&plain, 5).backward().unwrap();
        // candle's backward rounds 1/sqrt(2 pi) to 0.398942
        let d = max_diff(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
        // against finite differences
        let h = 1e-6;
        let xs = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let p = random(&[3, 11], 5, 1.0)
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let grad = g1
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in [0usize, 7, 20, 32] {
            let f = |v: f64| {
                let t = Tensor::new(&[v], &Device::Cpu).unwrap();
                gelu_erf(&t).unwrap().to_vec1::<f64>().unwrap()[0]
            };
            let numeric = (f(xs[i] + h) - f(xs[i] - h)) / (2.0 * h) * p[i];
            assert!(
                (numeric - grad[i]).abs() < 1e-6,
                "{i}: {numeric} vs {}",
                grad[i]
            );
        }
    }

    #[test]
    fn fused_rope_matches_the_decomposed_one_in_values_and_gradients() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let positions = Tensor::from_vec(
            (0..(b * t) as u32).map(|i| i % 7 + 2).collect::<Vec<_>>(),
            (b, t),
            &Device::Cpu,
        )
        .unwrap();
        let (cos, sin) = crate::models::nn::Rope::new(d, 10000.0)
            .tables(&positions)
            .unwrap();
        let (cos, sin) = (
            cos.to_dtype(DType::F64).unwrap(),
            sin.to_dtype(DType::F64).unwrap(),
        );
        // a non-contiguous input, as attention produces it
        let base = Var::from_tensor(&random(&[b, t, h, d], 61, 2.0)).unwrap();
        let x = base.as_tensor().transpose(1, 2).unwrap();
        let ours = rope(&x, &cos, &sin).unwrap();
        let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
        let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let plain =
            (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap();
        assert!(max_diff(&ours, &plain) < 1e-12);
        let g1 = probe_loss(&ours, 62).backward().unwrap();
        let g2 = probe_loss(&plain, 62).backward().unwrap();
        let diff = max_diff(
            g1.get(base.as_tensor()).unwrap(),
            g2.get(base.as_tensor()).unwrap(),
        );
        assert!(diff < 1e-12, "{diff}");
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
        }
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
    fn embedding_matches_index_select_in_values_and_gradients() {
        let table = Var::from_tensor(&random(&[7, 5], 77, 1.0)).unwrap();
        // Repeated ids: their gradients add up in the table's row.
        let ids = Tensor::from_vec(vec![3u32, 0, 3, 6, 1, 3], (2, 3), &Device::Cpu).unwrap();
        let ours = embedding(table.as_tensor(), &ids).unwrap();
        let plain = table
            .as_tensor()
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap()
            .reshape((2, 3, 5))
            .unwrap();
        assert_eq!(ours.dims(), &[2, 3, 5]);
        assert_eq!(max_diff(&ours, &plain), 0.0);
        let g1 = probe_loss(&ours, 4).backward().unwrap();
        let g2 = probe_loss(&plain, 4).backward().unwrap();
        let d = max_diff(
            g1.get(table.as_tensor()).unwrap(),
            g2.get(table.as_tensor()).unwrap(),
        );
        assert!(d < 1e-15, "table gradient differs by {d}");
        let f32_out = embedding(&table.as_tensor().to_dtype(DType::F32).unwrap(), &ids).unwrap();
        assert_eq!(f32_out.dtype(), DType::F32);
        let bad = Tensor::from_vec(vec![7u32], (1, 1), &Device::Cpu).unwrap();
        let err = embedding(table.as_tensor(), &bad).unwrap_err().to_string();
        assert!(err.contains("id 7") && err.contains("7 rows"), "{err}");
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
