//! What every fused CPU op shares. The ops (softmax in [`super::softmax`], norms in
//! [`super::norm`], activations in [`super::activation`], RoPE and embedding lookup in
//! [`super::rope`], products in [`super::linear`]) each make one pass forward and one or two
//! backward, where the decomposed forms allocate a tensor and record a graph node per step
//! (candle-nn's own fused norms and softmax have no backward, STACK.md). They share:
//!
//! - [`Real`]: the number types they compute in, f32 and f64. Each op's row kernels sit beside the
//!   op as a trait over `Real` (`SoftmaxRows`, `NormRows`, `GeluRows`, `GatedRows`,
//!   `ColumnSums`): f64 data is computed in f64; f32 data in f32 by the vectorized kernels of
//!   [`super::simd`] (row
//!   statistics with eight partial sums, as PyTorch's CPU kernels do; sums over rows per block of
//!   rows in f32, the blocks added in f64 in a fixed order).
//! - the storage plumbing: [`cpu`], [`typed`] (values of an operand), [`by_dtype`];
//! - [`Kept`], the handle for activations an op keeps for its backward;
//! - the row-parallel loops ([`par_rows`] and its siblings).
//!
//! Rows are the last dimension; inputs are made contiguous. On other devices (and dtypes) the
//! ops fall back to the decomposed forms.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// The number types the fused ops compute in, f32 and f64, and where their values sit in a CPU
/// storage. Each op's row kernels for the two types are beside the op, as a trait of its own over
/// `Real` (softmax's in softmax.rs, the norms' in norm.rs, GELU's and the gated activations' in
/// activation.rs, the sums over rows in linear.rs).
pub(crate) trait Real:
    Copy + Send + Sync + 'static + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self>
{
    fn to(self) -> f64;
    fn from(v: f64) -> Self;
    /// The values of a storage of this type.
    fn borrow(storage: &CpuStorage) -> Option<&[Self]>;
    fn wrap(values: Vec<Self>) -> CpuStorage;
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
}

/// Rows per parallel task: about 32k values, so that small tensors stay on one thread.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (32_768 / cols.max(1)).max(1)
}

/// `out` (same length as `x`) filled in parallel, blocks of whole rows of `cols` values each:
/// `f(x_rows, out_rows)`.
pub(crate) fn par_rows<T: Real>(x: &[T], cols: usize, f: impl Fn(&[T], &mut [T]) + Sync) -> Vec<T> {
    par_row_pieces(x.len(), cols, |at, o| f(&x[at], o))
}

/// Values per piece of [`par_row_pieces`] (16 KB of f32): a piece zeroed and then written
/// stays in L1, where a whole task's block (32k values) was zeroed through L2 and then
/// written again (the zeroing was 2.3% of MiniLM-L6's int8 forward, through its norms).
const PIECE_VALUES: usize = 4096;

/// A new vector of `len` values, rows of `cols`, filled in parallel by `f(range, out)` on
/// pieces of whole rows (`range`: the piece's positions), each zeroed just before.
fn par_row_pieces<T: Real>(
    len: usize,
    cols: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) -> Vec<T> {
    let block = rows_per_task(cols) * cols;
    let piece = (PIECE_VALUES / cols.max(1)).max(1) * cols;
    par_pieces_out(len, (block, piece), |start, p| f(start..start + p.len(), p))
}

/// A new vector of `len` values filled by `f(block index, block)` over blocks of `block`
/// values in parallel; each block is zeroed by its own task just before (a serial zeroing of
/// the whole output would leave the other threads idle).
pub(crate) fn par_blocks_out<T: Real>(
    len: usize,
    block: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let block = block.max(1);
    par_pieces_out(len, (block, block), |start, o| f(start / block, o))
}

/// A new vector of `len` values, one task per block of `block` values in parallel; each task
/// zeroes a piece of `piece` values of its block and fills it, `f(piece's start, piece)`, then
/// the next.
fn par_pieces_out<T: Real>(
    len: usize,
    (block, piece): (usize, usize),
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let (block, piece) = (block.max(1), piece.max(1));
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(i, o)| {
            for (j, p) in o.chunks_mut(piece).enumerate() {
                for v in p.iter_mut() {
                    v.write(T::from(0.0));
                }
                // SAFETY: every value of the piece was just initialized.
                let p = unsafe { &mut *(p as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
                f(i * block + j * piece, p)
            }
        });
    // SAFETY: the pieces cover all len values, each initialized above.
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
    par_row_pieces(a.len(), cols, |r, o| f(&a[r.clone()], &b[r], o))
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

/// The columns of panel `p` (NR columns from p NR, of n) and their bias values, zero past n or
/// without a bias: what a packed product's panel adds to its sums.
pub(crate) fn panel_bias<const NR: usize>(
    bias: Option<&[f32]>,
    n: usize,
    p: usize,
) -> (usize, [f32; NR]) {
    let cols = (n - p * NR).min(NR);
    let mut values = [0f32; NR];
    if let Some(b) = bias {
        values[..cols].copy_from_slice(&b[p * NR..p * NR + cols]);
    }
    (cols, values)
}
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

/// The gradients of a layer op's two inputs (x and its packed parameters p), computed as
/// vectors, as tensors of the inputs' shapes on x's device.
#[allow(clippy::type_complexity)]
pub(crate) fn tensors_of<T: Real + candle_core::WithDType>(
    (dx, dp): (Option<Vec<T>>, Option<Vec<T>>),
    (x, p): (&Tensor, &Tensor),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = dx
        .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
        .transpose()?;
    let dp = dp
        .map(|v| Tensor::from_vec(v, p.shape(), x.device()))
        .transpose()?;
    Ok((dx, dp))
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
