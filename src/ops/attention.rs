//! Scaled dot-product attention as one CPU op with its own backward.
//!
//! The decomposed form (split heads, copy to contiguous, Q K^T, scale, add the mask, softmax,
//! P V, merge heads) records eight graph nodes per layer, each with a [B, H, Tq, Tk] or
//! [B, H, T, D] output and, in the backward, a gradient that candle zero-fills and adds. Here the
//! projections stay in their [B, T, heads * D] layout (heads are column stripes, addressed by
//! strides), grouped-query heads read their shared key/value stripe directly (no repetition),
//! and every (batch, head) runs its three products with gemm on one thread, the pairs in
//! parallel. The forward keeps the probabilities P for the backward:
//!
//!   S = scale Q K^T + mask, P = softmax(S), O = P V;
//!   dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = scale dS K, dK = scale dS^T Q.

use super::real::{by_dtype, cpu, typed, Kept, Real, SharedMut};
use super::softmax::SoftmaxRows;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A strided matrix: base pointer, row stride, column stride (in elements).
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

impl<T> Mat<T> {
    /// Rows `stride` apart, columns adjacent.
    fn rows(ptr: *const T, stride: usize) -> Self {
        Mat {
            ptr,
            rs: stride as isize,
            cs: 1,
        }
    }

    /// The transpose of [`Mat::rows`]: the matrix whose columns are rows `stride` apart.
    fn transposed(ptr: *const T, stride: usize) -> Self {
        Mat {
            ptr,
            rs: 1,
            cs: stride as isize,
        }
    }
}

/// dst [m, n] = (dst if `accumulate`) + beta * lhs [m, k] rhs [k, n], single-threaded gemm.
///
/// # Safety
/// Every pointer must address the elements its strides reach for the given sizes, and `dst`
/// must not alias `lhs` or `rhs` or be written by another thread at the same time.
#[allow(clippy::too_many_arguments)]
unsafe fn product<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    beta: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        T::from(1.0),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
}

/// Row strides (in elements) of the projections an attention call reads, and of their
/// gradients it writes: Q and dQ rows `q` apart, K, V, dK and dV rows `kv` apart. The output O
/// and its gradient dO are always [B, Tq, H D] (rows H D apart).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strides {
    pub q: usize,
    pub kv: usize,
}

impl Dims {
    pub fn q_row(&self) -> usize {
        self.heads * self.d
    }
    fn kv_row(&self) -> usize {
        self.kv_heads * self.d
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

struct Attention {
    dims: Dims,
    scale: f64,
    /// The additive mask [B, Tq, Tk], contiguous, in the inputs' dtype.
    mask: Tensor,
    /// P [B, H, Tq, Tk], kept by the forward for the backward.
    probs: Kept,
}

/// Forward of every (batch, head): returns (O [B, Tq, H D], P [B, H, Tq, Tk]).
fn forward<T: SoftmaxRows>(
    q: &[T],
    k: &[T],
    v: &[T],
    mask: &[T],
    dm: Dims,
    scale: f64,
) -> (Vec<T>, Vec<T>) {
    // Written in full by forward_into (every (batch, head) stripe) before its length is set.
    let out_len = dm.b * dm.tq * dm.heads * dm.d;
    let probs_len = dm.b * dm.heads * dm.tq * dm.tk;
    let mut out: Vec<T> = Vec::with_capacity(out_len);
    let mut probs: Vec<T> = Vec::with_capacity(probs_len);
    let strides = Strides {
        q: dm.q_row(),
        kv: dm.kv_row(),
    };
    assert!(q.len() >= out_len && k.len() >= dm.b * dm.tk * strides.kv && v.len() >= k.len());
    // SAFETY: q, k, v are contiguous [B, T, heads D] buffers of at least the sizes checked
    // above; out and probs have room for the elements forward_into writes, all of them.
    unsafe {
        forward_into(
            (q.as_ptr(), k.as_ptr(), v.as_ptr()),
            strides,
            mask,
            dm,
            scale,
            out.as_mut_ptr(),
            probs.as_mut_ptr(),
        );
        out.set_len(out_len);
        probs.set_len(probs_len);
    }
    (out, probs)
}

/// O [B, Tq, H D] written to `out` and P [B, H, Tq, Tk] to `probs`, from projections addressed
/// by base pointers and row strides. Each head's scores start as a copy of its mask, onto which
/// the product accumulates (no separate pass for the mask).
///
/// # Safety
/// q must address B Tq rows of `strides.q` elements, k and v B Tk rows of `strides.kv` (each
/// head's D columns inside its row); out must be valid for B Tq H D writes and probs for
/// B H Tq Tk writes, neither aliasing the inputs or each other; mask is [B, Tq, Tk].
pub(crate) unsafe fn forward_into<T: SoftmaxRows>(
    (q, k, v): (*const T, *const T, *const T),
    strides: Strides,
    mask: &[T],
    dm: Dims,
    scale: f64,
    out: *mut T,
    probs: *mut T,
) {
    let Dims { tq, tk, d, .. } = dm;
    let (qr, kr) = (strides.q, strides.kv);
    let (q, k, v, out_ptr, probs) = (
        SharedMut(q as *mut T),
        SharedMut(k as *mut T),
        SharedMut(v as *mut T),
        SharedMut(out),
        SharedMut(probs),
    );
    assert!(mask.len() >= dm.b * tq * tk, "attention: mask too small");
    (0..dm.b * dm.heads).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / dm.heads, bh % dm.heads);
        let g = h / dm.group();
        let q0 = bi * tq * qr + h * d;
        let kv0 = bi * tk * kr + g * d;
        // SAFETY: this task's chunk of probs (head bh) is written here in full (the mask
        // copied into it) before the slice is formed; Q_bh, K_bg, V_bg lie inside q, k, v; the
        // output stripe (batch bi, columns h D..(h + 1) D) is written by this task only.
        let p = unsafe {
            let p = { probs }.0.add(bh * tq * tk);
            std::ptr::copy_nonoverlapping(mask.as_ptr().add(bi * tq * tk), p, tq * tk);
            let qm = Mat::rows({ q }.0.add(q0) as *const T, qr);
            let kt = Mat::transposed({ k }.0.add(kv0) as *const T, kr);
            product((tq, tk, d), p, tk, true, qm, kt, T::from(scale));
            std::slice::from_raw_parts_mut(p, tq * tk)
        };
        T::softmax_rows_in_place(p, tk);
        unsafe {
            let pm = Mat::rows(p.as_ptr(), tk);
            let vm = Mat::rows({ v }.0.add(kv0) as *const T, kr);
            let dst = { out_ptr }.0.add(bi * tq * dm.q_row() + h * d);
            product((tq, d, tk), dst, dm.q_row(), false, pm, vm, T::from(1.0));
        }
    });
}

/// Backward: (dQ [B, Tq, H D], dK, dV [B, Tk, KVH D]).
#[allow(clippy::too_many_arguments)]
fn backward<T: SoftmaxRows>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    grad: &[T],
    dm: Dims,
    scale: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let strides = Strides {
        q: dm.q_row(),
        kv: dm.kv_row(),
    };
    assert!(q.len() >= dm.b * dm.tq * strides.q && grad.len() >= q.len());
    assert!(k.len() >= dm.b * dm.tk * strides.kv && v.len() >= k.len());
    assert!(probs.len() >= dm.b * dm.heads * dm.tq * dm.tk);
    // Written in full by backward_into (the stripes tile each gradient) before the lengths are
    // set.
    let mut dq: Vec<T> = Vec::with_capacity(q.len());
    let mut dk: Vec<T> = Vec::with_capacity(k.len());
    let mut dv: Vec<T> = Vec::with_capacity(v.len());
    // SAFETY: the inputs are contiguous buffers of the sizes checked above; the gradients are
    // fresh allocations of the same sizes.
    unsafe {
        backward_into(
            (q.as_ptr(), k.as_ptr(), v.as_ptr()),
            strides,
            probs,
            grad.as_ptr(),
            dm,
            scale,
            (dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()),
        );
        dq.set_len(q.len());
        dk.set_len(k.len());
        dv.set_len(v.len());
    }
    (dq, dk, dv)
}

/// dQ, dK, dV written through base pointers with the strides of Q, K, V. One task per (batch,
/// kv head), which loops over the query heads of its group, so that dK and dV are summed
/// without races. Every element of dQ's, dK's and dV's head columns is written.
///
/// # Safety
/// As [`forward_into`] for q, k, v; grad addresses B Tq rows of H D elements and probs holds P
/// from the forward; dq, dk, dv are valid for writes at the strided positions of q, k, v, do
/// not alias any input, and no two of them address the same element.
pub(crate) unsafe fn backward_into<T: SoftmaxRows>(
    (q, k, v): (*const T, *const T, *const T),
    strides: Strides,
    probs: &[T],
    grad: *const T,
    dm: Dims,
    scale: f64,
    (dq, dk, dv): (*mut T, *mut T, *mut T),
) {
    let Dims { tq, tk, d, .. } = dm;
    let (qr, kr, or) = (strides.q, strides.kv, dm.q_row());
    let (q, k, v, grad) = (
        SharedMut(q as *mut T),
        SharedMut(k as *mut T),
        SharedMut(v as *mut T),
        SharedMut(grad as *mut T),
    );
    let (dq_ptr, dk_ptr, dv_ptr) = (SharedMut(dq), SharedMut(dk), SharedMut(dv));
    (0..dm.b * dm.kv_heads).into_par_iter().for_each(|bg| {
        let (bi, g) = (bg / dm.kv_heads, bg % dm.kv_heads);
        let kv0 = bi * tk * kr + g * d;
        let mut dp = vec![T::from(0.0); tq * tk];
        let mut ds = vec![T::from(0.0); tq * tk];
        for j in 0..dm.group() {
            let h = g * dm.group() + j;
            let q0 = bi * tq * qr + h * d;
            let o0 = bi * tq * or + h * d;
            let p = &probs[(bi * dm.heads + h) * tq * tk..][..tq * tk];
            // SAFETY: all reads lie inside the inputs; dQ's stripe (bi, h) and dK/dV's stripe
            // (bi, g) belong to this task alone; dp and ds are local.
            unsafe {
                let go = Mat::rows({ grad }.0.add(o0) as *const T, or);
                let pt = Mat::transposed(p.as_ptr(), tk);
                let dv_dst = { dv_ptr }.0.add(kv0);
                product((tk, d, tq), dv_dst, kr, j > 0, pt, go, T::from(1.0));
                let vt = Mat::transposed({ v }.0.add(kv0) as *const T, kr);
                product(
                    (tq, tk, d),
                    dp.as_mut_ptr(),
                    tk,
                    false,
                    go,
                    vt,
                    T::from(1.0),
                );
            }
            // dS = scale * P * (dP - rowsum(dP * P)).
            T::softmax_grad_rows_into(p, &dp, &mut ds, tk, scale);
            unsafe {
                let dsm = Mat::rows(ds.as_ptr(), tk);
                let km = Mat::rows({ k }.0.add(kv0) as *const T, kr);
                let dq_dst = { dq_ptr }.0.add(q0);
                product((tq, d, tk), dq_dst, qr, false, dsm, km, T::from(1.0));
                let dst = Mat::transposed(ds.as_ptr(), tk);
                let qm = Mat::rows({ q }.0.add(q0) as *const T, qr);
                let dk_dst = { dk_ptr }.0.add(kv0);
                product((tk, d, tq), dk_dst, kr, j > 0, dst, qm, T::from(1.0));
            }
        }
    });
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let dm = self.dims;
        let (mask_s, mask_l) = self.mask.storage_and_layout();
        let mask_s = cpu(&mask_s, name)?;
        let device = self.mask.device().clone();
        let out = by_dtype!(s1.dtype(), name, |T| {
            let (out, probs) = forward::<T>(
                typed(s1, l1, name)?,
                typed(s2, l2, name)?,
                typed(s3, l3, name)?,
                typed(mask_s, mask_l, name)?,
                dm,
                self.scale,
            );
            let probs = Tensor::from_vec(probs, (dm.b, dm.heads, dm.tq, dm.tk), &device)?;
            self.probs.keep(probs);
            T::wrap(out)
        });
        Ok((out, Shape::from((dm.b, dm.tq, dm.q_row()))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let probs = self.probs.get::<Tensor>("fused-attention")?;
        let grad = grad.contiguous()?;
        let (dm, device) = (self.dims, q.device().clone());
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (ps, pl) = probs.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (qs, ks, vs, ps, gs) = (
            cpu(&qs, name)?,
            cpu(&ks, name)?,
            cpu(&vs, name)?,
            cpu(&ps, name)?,
            cpu(&gs, name)?,
        );
        let (dq, dk, dv) = by_dtype!(q.dtype(), name, |T| {
            let (dq, dk, dv) = backward::<T>(
                typed(qs, ql, name)?,
                typed(ks, kl, name)?,
                typed(vs, vl, name)?,
                typed(ps, pl, name)?,
                typed(gs, gl, name)?,
                dm,
                self.scale,
            );
            (
                Tensor::from_vec(dq, q.shape(), &device)?,
                Tensor::from_vec(dk, k.shape(), &device)?,
                Tensor::from_vec(dv, v.shape(), &device)?,
            )
        });
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The forward alone, in f32 ([`super::attention_infer`]), where nothing needs a gradient.
struct Inference {
    dims: Dims,
    scale: f64,
    /// The additive mask [B, Tq, Tk], contiguous, f32.
    mask: Tensor,
}

impl CustomOp3 for Inference {
    fn name(&self) -> &'static str {
        "attention-inference"
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
        let dm = self.dims;
        let (mask_s, mask_l) = self.mask.storage_and_layout();
        let mask = typed::<f32>(cpu(&mask_s, name)?, mask_l, name)?;
        let out = super::attention_infer::forward(
            typed(s1, l1, name)?,
            typed(s2, l2, name)?,
            typed(s3, l3, name)?,
            mask,
            dm,
            self.scale as f32,
        );
        Ok((CpuStorage::F32(out), Shape::from((dm.b, dm.tq, dm.q_row()))))
    }
}

/// Attention from the projections: q [B, Tq, H * D], k and v [B, Tk, KVH * D] (H a multiple of
/// KVH; query head h reads key/value head h / (H / KVH)), an additive mask [B, 1, Tq, Tk]
/// (0 or a large negative number) and the score scale. Returns [B, Tq, H * D].
///
/// One fused op on the CPU in f32 and f64; elsewhere the decomposed form
/// ([`attention_decomposed`] after splitting and repeating heads).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    (heads, kv_heads): (usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let (b, tq, qw) = q.dims3()?;
    let (_, tk, kw) = k.dims3()?;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || qw % heads != 0 {
        candle_core::bail!("attention: {heads} query heads and {kv_heads} key/value heads do not fit widths {qw} and {kw}");
    }
    let d = qw / heads;
    if kw != kv_heads * d || v.dims3()? != (b, tk, kw) || mask.dims4()? != (b, 1, tq, tk) {
        candle_core::bail!(
            "attention: shapes q {:?}, k {:?}, v {:?}, mask {:?} do not agree",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        );
    }
    let fusable =
        q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64) && b * tq * tk * d > 0;
    if !fusable {
        let groups = heads / kv_heads;
        let q = split_heads(q, heads, d)?;
        let k = repeat_kv(&split_heads(k, kv_heads, d)?, groups)?;
        let v = repeat_kv(&split_heads(v, kv_heads, d)?, groups)?;
        return attention_decomposed(&q, &k, &v, mask, scale);
    }
    let dims = Dims {
        b,
        tq,
        tk,
        heads,
        kv_heads,
        d,
    };
    // The mask [B, Tq, Tk], contiguous, in the inputs' dtype (both ops read it so).
    let mask = mask
        .to_dtype(q.dtype())?
        .reshape((b, tq, tk))?
        .contiguous()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let frozen = ![&q, &k, &v].iter().any(|t| t.track_op());
    if frozen && q.dtype() == DType::F32 && super::attention_infer::supports(d) {
        let op = Inference { dims, scale, mask };
        return q.apply_op3_no_bwd(&k, &v, &op);
    }
    let op = Attention {
        dims,
        scale,
        mask,
        probs: Kept::default(),
    };
    q.apply_op3(&k, &v, op)
}

/// The unfused forms (any device and dtype; autograd differentiates them).
/// Splits [B, T, H * D] into heads [B, H, T, D].
pub fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    x.reshape((b, t, heads, head_dim))?.transpose(1, 2)
}

/// Repeats key/value heads for grouped-query attention: [B, KVH, T, D] -> [B, KVH * n, T, D].
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kvh, n, t, d))?
        .contiguous()?
        .reshape((b, kvh * n, t, d))
}

/// Scaled dot-product attention with an additive mask [B, 1, Tq, Tk] (0 or `models::nn::MASK_VALUE`).
/// q [B, H, Tq, D], k and v [B, H, Tk, D]; returns [B, Tq, H * D].
pub fn attention_decomposed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    let probs = super::softmax::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?;
    out.transpose(1, 2)?.contiguous()?.reshape((b, tq, h * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    // Test inputs only: masks as the models build them.
    use crate::models::nn;
    use crate::ops::testing::max_diff;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        crate::ops::testing::random(shape, seed, 1.0)
    }

    /// The decomposed reference: heads split, key/value heads repeated, candle ops only.
    fn decomposed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        h: usize,
        kvh: usize,
        scale: f64,
    ) -> Tensor {
        let d = q.dim(2).unwrap() / h;
        let q = split_heads(q, h, d).unwrap();
        let k = repeat_kv(&split_heads(k, kvh, d).unwrap(), h / kvh).unwrap();
        let v = repeat_kv(&split_heads(v, kvh, d).unwrap(), h / kvh).unwrap();
        let scores = (q
            .contiguous()
            .unwrap()
            .matmul(&k.t().unwrap().contiguous().unwrap())
            .unwrap()
            * scale)
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
        let (b, _, tq, _) = q.dims4().unwrap();
        probs
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, tq, h * d))
            .unwrap()
    }

    #[test]
    fn values_and_gradients_match_the_decomposed_attention() {
        // (batch, tq, tk, heads, kv heads, head dim, causal): plain, grouped-query, cross-length
        // (queries at the last tq of tk positions), odd sizes.
        for (case, &(b, tq, tk, h, kvh, d, causal)) in [
            (2, 5, 5, 3, 3, 4, false),
            (2, 6, 6, 4, 2, 3, true),
            (1, 3, 7, 6, 1, 5, true),
            (3, 1, 4, 2, 2, 2, false),
        ]
        .iter()
        .enumerate()
        {
            let seed = case as u64 * 10;
            let q = Var::from_tensor(&random(&[b, tq, h * d], seed)).unwrap();
            let k = Var::from_tensor(&random(&[b, tk, kvh * d], seed + 1)).unwrap();
            let v = Var::from_tensor(&random(&[b, tk, kvh * d], seed + 2)).unwrap();
            // Padding: the first key of batch row 0 is masked out.
            let key_mask: Vec<Vec<u32>> = (0..b)
                .map(|i| {
                    (0..tk)
                        .map(|j| u32::from(!(i == 0 && j == 0 && tk > 1)))
                        .collect()
                })
                .collect();
            let mask = nn::additive_mask(&key_mask, tq, causal, None, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let probe = random(&[b, tq, h * d], seed + 3);
            let ours = attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &mask,
                (h, kvh),
                scale,
            )
            .unwrap();
            let reference = decomposed(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &mask,
                h,
                kvh,
                scale,
            );
            let diff = max_diff(&ours, &reference);
            assert!(diff < 1e-12, "case {case}: values differ by {diff}");
            let g_ours = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g_ref = (reference * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let a = g_ours.get(var.as_tensor()).unwrap();
                let r = g_ref.get(var.as_tensor()).unwrap();
                let diff = max_diff(a, r);
                assert!(diff < 1e-12, "case {case}: d{name} differs by {diff}");
            }
        }
    }

    #[test]
    fn f32_agrees_with_f64() {
        let (b, t, h, kvh, d) = (2, 9, 4, 2, 8);
        let q = random(&[b, t, h * d], 1);
        let k = random(&[b, t, kvh * d], 2);
        let v = random(&[b, t, kvh * d], 3);
        let mask = nn::additive_mask(&vec![vec![1; t]; b], t, true, None, &Device::Cpu).unwrap();
        let f64_out = attention(&q, &k, &v, &mask, (h, kvh), 0.3).unwrap();
        let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let f32_out = attention(&f32(&q), &f32(&k), &f32(&v), &mask, (h, kvh), 0.3)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(max_diff(&f64_out, &f32_out) < 1e-5);
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let q = random(&[1, 3, 8], 1);
        let k = random(&[1, 3, 4], 2);
        let mask = nn::additive_mask(&[vec![1; 3]], 3, false, None, &Device::Cpu).unwrap();
        assert!(attention(&q, &k, &k, &mask, (2, 2), 1.0).is_err());
        assert!(attention(&q, &k, &k, &mask, (3, 1), 1.0).is_err());
        assert!(attention(&q, &k, &k, &mask, (2, 1), 1.0).is_ok());
    }
}
