//! What every fused CPU op shares. The ops (softmax in [`super::softmax`], norms in
//! [`super::norm`], activations in [`super::activation`], RoPE and embedding lookup in
//! [`super::rope`], products in [`super::linear`]) each make one pass forward and one or two
//! backward, where the decomposed forms allocate a tensor and record a graph node per step
//! (candle-nn's own fused norms and softmax have no backward, STACK.md). They share:
//!
//! - [`Real`]: the number types they compute in, f32 and f64, with each op's row kernel. f64 data
//!   is computed in f64; f32 data in f32 by the vectorized kernels of [`super::simd`] (row
//!   statistics with eight partial sums, as PyTorch's CPU kernels do; sums over rows per block of
//!   rows in f32, the blocks added in f64 in a fixed order).
//! - the storage plumbing: [`cpu`], [`typed`] (values of an operand), [`by_dtype`];
//! - [`Kept`], the handle for activations an op keeps for its backward;
//! - the row-parallel loops ([`par_rows`] and its siblings).
//!
//! Rows are the last dimension; inputs are made contiguous. On other devices (and dtypes) the
//! ops fall back to the decomposed forms.

use super::simd::Gate;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// The settings of a norm over rows (its ops are in [`super::norm`]): LayerNorm is centred,
/// RMSNorm is not; Gemma's RMSNorm scales by (1 + w).
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
pub(crate) fn row_stats(row: &[f64], eps: f64, centre: bool) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = if centre {
        row.iter().sum::<f64>() / n
    } else {
        0.0
    };
    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

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

/// The values (contiguous, of type T) of an operand held as a (storage guard, layout) pair.
pub(crate) fn operand_values<'a, T: Real, G: std::ops::Deref<Target = candle_core::Storage>>(
    (guard, layout): &'a (G, &'a Layout),
    name: &str,
) -> Result<&'a [T]> {
    typed::<T>(cpu(guard, name)?, layout, name)
}

/// The values of an optional operand held as a (storage guard, layout) pair (a bias).
pub(crate) fn optional_values<'a, T: Real, G: std::ops::Deref<Target = candle_core::Storage>>(
    pair: &'a Option<(G, &'a Layout)>,
    name: &str,
) -> Result<Option<&'a [T]>> {
    pair.as_ref()
        .map(|p| operand_values::<T, G>(p, name))
        .transpose()
}

/// The values of an optional CPU operand (a bias).
pub(crate) fn optional_typed<'a, T: Real>(
    pair: Option<(&'a CpuStorage, &'a Layout)>,
    name: &str,
) -> Result<Option<&'a [T]>> {
    pair.map(|(s, l)| typed::<T>(s, l, name)).transpose()
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

/// A raw pointer that may cross threads, for kernels whose tasks each write a disjoint set of
/// elements of one output (the caller of every write states which).
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: the wrapper only carries the pointer; every write through it is to elements that one
// task alone writes (see the `SAFETY` comment at each use).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, not the field, so that closures capture the whole wrapper).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

/// Whether a tensor can go through the fused CPU ops: on the CPU, in f32 or f64.
pub(crate) fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The CPU storage behind a tensor's storage.
pub(crate) fn cpu<'a>(storage: &'a candle_core::Storage, what: &str) -> Result<&'a CpuStorage> {
    match storage {
        candle_core::Storage::Cpu(s) => Ok(s),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

pub(crate) fn last_dim(layout: &Layout) -> usize {
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
