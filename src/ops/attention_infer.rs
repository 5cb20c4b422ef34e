//! Attention when nothing needs a gradient (inference), in f32: for each (batch, head), blocks
//! of query rows form their scores, softmax and weighted values in register-sized blocks (8
//! rows x 32 columns of accumulators with AVX-512, 4 x 16 with AVX2), and the probabilities are
//! not kept. With at most 32 keys (the demo's texts) the AVX-512 path takes the softmax in the
//! scores' registers. The fused op of [`super::attention`] runs two gemm calls and a softmax
//! pass per (batch, head) and keeps P for the backward; at MiniLM's shapes (heads of 32
//! values, 32 tokens) those calls cost more than their arithmetic (MiniLM int8 forward 6.8%
//! faster with this path, paired runs, Intel Xeon with AMX).
//!
//! Same definition as [`super::attention::attention`]: S = scale Q K^T + mask, P = softmax(S)
//! by rows, O = P V, query head h reading key/value head h / (H / KVH); sums in another order
//! (the values agree to rounding, tested).

use super::attention::Dims;
use super::real::SharedMut;
use rayon::prelude::*;

/// Key positions per block of scores (two 16-lane vectors); keys are padded to a multiple.
const KEYS: usize = 32;
/// Query rows per block.
const ROWS: usize = 8;

/// Whether [`forward`] takes heads of `d` values (whole 16-lane vectors of output).
pub(crate) fn supports(d: usize) -> bool {
    d > 0 && d.is_multiple_of(16)
}

/// O [B, Tq, H D] from q [B, Tq, H D], k and v [B, Tk, KVH D] (contiguous) and the additive
/// mask [B, Tq, Tk].
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dm: Dims,
    scale: f32,
) -> Vec<f32> {
    forward_with(Path::detected(), q, k, v, mask, dm, scale)
}

/// The kernels of [`forward`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// 8 rows x 32 keys in AVX-512 registers (the softmax in registers up to 32 keys).
    Avx512,
    /// 4 rows x 16 keys in AVX2 registers.
    Avx2,
    /// Plain code.
    Portable,
}

impl Path {
    /// The widest the CPU has.
    pub(crate) fn detected() -> Path {
        if super::simd::has_avx512() {
            Path::Avx512
        } else if super::simd::has_avx2() {
            Path::Avx2
        } else {
            Path::Portable
        }
    }

    /// Whether this CPU can run it.
    #[cfg(test)]
    fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let (z, y) = (
            std::is_x86_feature_detected!("avx512f"),
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (z, y) = (false, false);
        match self {
            Path::Avx512 => z,
            Path::Avx2 => y,
            Path::Portable => true,
        }
    }
}

/// [`forward`] with the kernels of `path` (which the CPU must have).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_with(
    path: Path,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dm: Dims,
    scale: f32,
) -> Vec<f32> {
    check(q, k, v, mask, dm);
    let (b, tq, qr) = (dm.b, dm.tq, dm.heads * dm.d);
    let len = b * tq * qr;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = SharedMut(out.as_mut_ptr());
    (0..b * dm.kv_heads).into_par_iter().for_each_init(
        || Scratch::new(dm),
        // SAFETY: one task per (batch, key/value head); the sizes were checked above.
        |scratch, bg| unsafe {
            batch_group(path, (q, k, v, mask), dm, scale, scratch, bg, dst.ptr())
        },
    );
    // SAFETY: every (batch, row, head) stripe was written above.
    unsafe { out.set_len(len) };
    out
}

/// [`forward`] on this thread alone, into `out` [B, Tq, H D] (for a caller's task that keeps
/// its rows in its core's caches).
pub(crate) fn forward_serial(
    (q, k, v): (&[f32], &[f32], &[f32]),
    mask: &[f32],
    dm: Dims,
    scale: f32,
    out: &mut [f32],
) {
    let path = Path::detected();
    check(q, k, v, mask, dm);
    assert!(
        out.len() >= dm.b * dm.tq * dm.heads * dm.d,
        "attention: output too small"
    );
    let mut scratch = Scratch::new(dm);
    for bg in 0..dm.b * dm.kv_heads {
        // SAFETY: the sizes were checked above; this thread writes every stripe in turn.
        unsafe {
            batch_group(
                path,
                (q, k, v, mask),
                dm,
                scale,
                &mut scratch,
                bg,
                out.as_mut_ptr(),
            )
        };
    }
}

/// Checks the operands' sizes for [`forward_with`] and [`forward_serial`].
fn check(q: &[f32], k: &[f32], v: &[f32], mask: &[f32], dm: Dims) {
    let Dims {
        b,
        tq,
        tk,
        heads,
        kv_heads,
        d,
    } = dm;
    assert!(
        supports(d) && heads % kv_heads == 0,
        "attention: {heads} heads of {d} values"
    );
    let (qr, kr) = (heads * d, kv_heads * d);
    assert!(q.len() >= b * tq * qr && k.len() >= b * tk * kr && v.len() >= b * tk * kr);
    assert!(mask.len() >= b * tq * tk, "attention: mask too small");
}

/// One task's scratch: K^T, a block of scores, the head's output.
struct Scratch {
    kt: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
}

impl Scratch {
    fn new(dm: Dims) -> Scratch {
        let tkp = dm.tk.next_multiple_of(KEYS);
        Scratch {
            kt: vec![0f32; dm.d * tkp],
            s: vec![0f32; ROWS * tkp],
            o: vec![0f32; dm.tq * dm.d],
        }
    }
}

/// Batch bg / KVH, key/value head bg % KVH: the query heads that read it, each written to its
/// stripe of `out` [B, Tq, H D]. K^T is formed once for all of them (with grouped-query
/// attention, 2 key/value heads for 14 query heads in Qwen2.5-0.5B, forming it per query head
/// cost six times the scores' arithmetic in decoding, one query row per beam).
///
/// # Safety
/// The operands' sizes checked ([`check`]); `out` holds B Tq H D values, and no other thread
/// writes these stripes meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn batch_group(
    path: Path,
    (q, k, v, mask): (&[f32], &[f32], &[f32], &[f32]),
    dm: Dims,
    scale: f32,
    scratch: &mut Scratch,
    bg: usize,
    out: *mut f32,
) {
    let (tq, tk, d, heads) = (dm.tq, dm.tk, dm.d, dm.heads);
    let (qr, kr) = (heads * d, dm.kv_heads * d);
    let (bi, g) = (bg / dm.kv_heads, bg % dm.kv_heads);
    let per_group = heads / dm.kv_heads;
    let Scratch { kt, s, o } = scratch;
    let (k, v) = (&k[bi * tk * kr + g * d..], &v[bi * tk * kr + g * d..]);
    // What the transpose reads and writes (`head` checks the rest).
    assert!(tk == 0 || k.len() > (tk - 1) * kr + d - 1);
    assert!(kt.len() >= d * tk.next_multiple_of(KEYS) && d.is_multiple_of(16));
    transpose_keys(path, k, kr, (tk, d), kt);
    for h in g * per_group..(g + 1) * per_group {
        head(
            path,
            &q[bi * tq * qr + h * d..],
            qr,
            (kt, v),
            kr,
            &mask[bi * tq * tk..(bi + 1) * tq * tk],
            (tq, tk, d),
            scale,
            s,
            o,
        );
        for i in 0..tq {
            // Row i of batch bi, columns h D..(h + 1) D of out, 16 values at a time (d is a
            // multiple of 16: checked above): copies of a fixed size are inlined, where one of
            // d values was a call to memcpy per row (MiniLM-L6: 32 calls of 128 bytes per
            // head).
            let row = out.add((bi * tq + i) * qr + h * d);
            for c in (0..d).step_by(16) {
                std::ptr::copy_nonoverlapping(o.as_ptr().add(i * d + c), row.add(c), 16);
            }
        }
    }
}

/// K [tk, d] (rows `kr` apart) into kt [d][tk rounded up to KEYS] with the widest vectors the
/// CPU has.
fn transpose_keys(path: Path, k: &[f32], kr: usize, (tk, d): (usize, usize), kt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx512 {
        // SAFETY: the CPU has AVX-512F (path); the caller checked the sizes.
        return unsafe { x86::transpose_avx512(k, kr, (tk, d), kt) };
    }
    let _ = path;
    transpose(k, kr, (tk, d), kt);
}

/// One (batch, head): o [tq, d] (rows d apart) from q rows `qr` apart, K^T `kt` (d x tk
/// rounded up to KEYS, [`transpose_keys`]), v rows `kr` apart (the head's d values at the start
/// of its row) and the head's mask [tq, tk]; `s` (ROWS x tk rounded up) is scratch. The widest
/// vectors the CPU has.
#[allow(clippy::too_many_arguments)]
fn head(
    path: Path,
    q: &[f32],
    qr: usize,
    (kt, v): (&[f32], &[f32]),
    kr: usize,
    mask: &[f32],
    (tq, tk, d): (usize, usize, usize),
    scale: f32,
    s: &mut [f32],
    o: &mut [f32],
) {
    let tkp = tk.next_multiple_of(KEYS);
    assert!(
        q.len() > (tq - 1) * qr + d - 1 || tq == 0,
        "attention: q too short"
    );
    assert!(tk == 0 || v.len() > (tk - 1) * kr + d - 1);
    assert!(mask.len() >= tq * tk && kt.len() >= d * tkp && s.len() >= ROWS * tkp);
    assert!(o.len() >= tq * d && d.is_multiple_of(16));
    let block = Block {
        q: q.as_ptr(),
        qr,
        kt: kt.as_ptr(),
        tkp,
        v: v.as_ptr(),
        kr,
        mask,
        tk,
        d,
        scale,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if path == Path::Avx512 {
            // SAFETY: the CPU has AVX-512F (path); the sizes were checked above.
            return unsafe { block.all_avx512(tq, s, o) };
        }
        if path == Path::Avx2 {
            // SAFETY: the CPU has AVX2 and FMA (path); the sizes were checked above.
            return unsafe { block.all_avx2(tq, s, o) };
        }
    }
    // SAFETY: the sizes were checked above.
    unsafe { block.all::<Scalar, 4, 1>(tq, s, o) }
}

/// K [tk, d] (rows kr apart) transposed into kt [d][tk rounded up to KEYS], zeros past the
/// last key.
fn transpose(k: &[f32], kr: usize, (tk, d): (usize, usize), kt: &mut [f32]) {
    let tkp = tk.next_multiple_of(KEYS);
    for c in 0..d {
        let row = &mut kt[c * tkp..(c + 1) * tkp];
        for (j, x) in row[..tk].iter_mut().enumerate() {
            *x = k[j * kr + c];
        }
        row[tk..].fill(0.0);
    }
}

/// Vectors of f32 lanes, as the kernels use them.
trait Vector: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// self * b + c, rounded once.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
}

/// One lane: the portable kernel.
#[derive(Clone, Copy)]
struct Scalar(f32);

impl Vector for Scalar {
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar(0.0)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Scalar(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Scalar(*p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        *p = self.0
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Scalar(self.0.mul_add(b.0, c.0))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Block, Vector};
    use crate::ops::simd::tail_mask16 as tail_mask;
    use std::arch::x86_64::*;

    /// A [`Vector`] of `$lanes` lanes over the register type `$reg` and its intrinsics.
    macro_rules! vector {
        ($(#[$doc:meta])* $name:ident($reg:ty, $lanes:expr): $zero:ident, $splat:ident, $load:ident, $store:ident, $fma:ident) => {
            $(#[$doc])*
            #[derive(Clone, Copy)]
            pub(super) struct $name($reg);

            impl Vector for $name {
                const LANES: usize = $lanes;
                #[inline(always)]
                unsafe fn zero() -> Self {
                    $name($zero())
                }
                #[inline(always)]
                unsafe fn splat(x: f32) -> Self {
                    $name($splat(x))
                }
                #[inline(always)]
                unsafe fn load(p: *const f32) -> Self {
                    $name($load(p))
                }
                #[inline(always)]
                unsafe fn store(self, p: *mut f32) {
                    $store(p, self.0)
                }
                #[inline(always)]
                unsafe fn mul_add(self, b: Self, c: Self) -> Self {
                    $name($fma(self.0, b.0, c.0))
                }
            }
        };
    }

    vector!(
        /// 16 lanes (AVX-512F).
        Z(__m512, 16): _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps
    );
    vector!(
        /// 8 lanes (AVX2 with FMA).
        Y(__m256, 8): _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps
    );

    /// [`super::transpose`] with AVX-512: each row of kt gathered 16 keys at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_avx512(
        k: &[f32],
        kr: usize,
        (tk, d): (usize, usize),
        kt: &mut [f32],
    ) {
        let tkp = tk.next_multiple_of(super::KEYS);
        let step = _mm512_set1_epi32(16 * kr as i32);
        for c in 0..d {
            let mut at = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(kr as i32),
            );
            let base = k.as_ptr().add(c);
            for j0 in (0..tkp).step_by(16) {
                let lanes = tail_mask(tk, j0);
                let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), lanes, at, base);
                _mm512_storeu_ps(kt.as_mut_ptr().add(c * tkp + j0), v);
                at = _mm512_add_epi32(at, step);
            }
        }
    }

    /// e^x of 16 values: the operations of [`crate::ops::simd::exp`] in AVX-512.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(input: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        let x = _mm512_min_ps(_mm512_max_ps(input, set(-87.3)), set(88.3));
        let round = set(12_582_912.0);
        let shifted = _mm512_fmadd_ps(x, set(std::f32::consts::LOG2_E), round);
        let n = _mm512_sub_ps(shifted, round);
        let r = _mm512_fnmadd_ps(
            n,
            set(1.428_606_8e-6),
            _mm512_fnmadd_ps(n, set(0.693_145_75), x),
        );
        let [first, rest @ ..] = crate::ops::simd::EXP_TAYLOR;
        let mut p = set(first);
        for c in rest {
            p = _mm512_fmadd_ps(p, r, set(c));
        }
        let bits = _mm512_sub_epi32(
            _mm512_castps_si512(shifted),
            _mm512_set1_epi32(0x4B40_0000 - 127),
        );
        let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits));
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(input, set(-87.3));
        _mm512_maskz_mul_ps(keep, p, scale)
    }

    impl Block<'_> {
        /// 8 rows x 32 keys of accumulators (16 of the 32 registers); at most 32 keys: the
        /// scores' softmax in those registers ([`Block::short_rows`]).
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn all_avx512(&self, tq: usize, s: &mut [f32], o: &mut [f32]) {
            if self.tk > 32 || self.tk == 0 {
                return self.all::<Z, 8, 2>(tq, s, o);
            }
            let mut i0 = 0;
            while i0 + 8 <= tq {
                self.short_rows::<8>(i0, s, o);
                i0 += 8;
            }
            while i0 < tq {
                self.short_rows::<1>(i0, s, o);
                i0 += 1;
            }
        }

        /// Rows i0..i0 + R of o when there are at most 32 keys: scores, softmax and the
        /// probabilities' store from registers, then P V.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn short_rows<const R: usize>(&self, i0: usize, s: &mut [f32], o: &mut [f32]) {
            let (tk, tkp) = (self.tk, self.tkp);
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for c in 0..self.d {
                let kt = self.kt.add(c * tkp);
                let keys = [_mm512_loadu_ps(kt), _mm512_loadu_ps(kt.add(16))];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*self.q.add((i0 + r) * self.qr + c));
                    acc[0] = _mm512_fmadd_ps(x, keys[0], acc[0]);
                    acc[1] = _mm512_fmadd_ps(x, keys[1], acc[1]);
                }
            }
            let lanes = [tail_mask(tk, 0), tail_mask(tk, 16)];
            let scale = _mm512_set1_ps(self.scale);
            let none = _mm512_set1_ps(f32::NEG_INFINITY);
            for (r, acc) in acc.iter().enumerate() {
                let mask = self.mask.as_ptr().add((i0 + r) * tk);
                let v: [__m512; 2] = std::array::from_fn(|h| {
                    let m = _mm512_maskz_loadu_ps(lanes[h], mask.add(16 * h));
                    _mm512_mask_blend_ps(lanes[h], none, _mm512_fmadd_ps(acc[h], scale, m))
                });
                let max = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(v[0], v[1])));
                let e = v.map(|v| exp16(_mm512_sub_ps(v, max)));
                let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(_mm512_add_ps(e[0], e[1])));
                let row = s.as_mut_ptr().add(r * tkp);
                _mm512_storeu_ps(row, _mm512_mul_ps(e[0], inv));
                _mm512_storeu_ps(row.add(16), _mm512_mul_ps(e[1], inv));
            }
            let mut c0 = 0;
            while c0 < self.d {
                c0 += if self.d - c0 >= 32 {
                    self.weighted::<Z, R, 2>(i0, c0, s, o)
                } else {
                    self.weighted::<Z, R, 1>(i0, c0, s, o)
                };
            }
        }

        /// 4 rows x 16 keys of accumulators (8 of the 16 registers).
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn all_avx2(&self, tq: usize, s: &mut [f32], o: &mut [f32]) {
            self.all::<Y, 4, 2>(tq, s, o)
        }
    }
}

/// The operands of one head's blocks of rows (sizes checked by [`head`]).
struct Block<'a> {
    q: *const f32,
    qr: usize,
    /// K^T, [d][tkp].
    kt: *const f32,
    tkp: usize,
    v: *const f32,
    kr: usize,
    mask: &'a [f32],
    tk: usize,
    d: usize,
    scale: f32,
}

impl Block<'_> {
    /// Every row of o, blocks of R rows (then 1 at a time) and N vectors of keys and columns.
    #[inline(always)]
    unsafe fn all<V: Vector, const R: usize, const N: usize>(
        &self,
        tq: usize,
        s: &mut [f32],
        o: &mut [f32],
    ) {
        let mut i0 = 0;
        while i0 + R <= tq {
            self.rows::<V, R, N>(i0, s, o);
            i0 += R;
        }
        while i0 < tq {
            self.rows::<V, 1, N>(i0, s, o);
            i0 += 1;
        }
    }

    /// Rows i0..i0 + R of o.
    #[inline(always)]
    unsafe fn rows<V: Vector, const R: usize, const N: usize>(
        &self,
        i0: usize,
        s: &mut [f32],
        o: &mut [f32],
    ) {
        let (tk, tkp, d) = (self.tk, self.tkp, self.d);
        let width = N * V::LANES;
        // Scores, `width` keys at a time: s[r][j] = scale (q_r . k_j) + mask (past the last
        // key: padding, not read).
        for j0 in (0..tkp).step_by(width) {
            let mut acc = [[V::zero(); N]; R];
            for c in 0..d {
                let kt = self.kt.add(c * tkp + j0);
                let keys: [V; N] = std::array::from_fn(|n| V::load(kt.add(n * V::LANES)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = V::splat(*self.q.add((i0 + r) * self.qr + c));
                    for n in 0..N {
                        acc[n] = x.mul_add(keys[n], acc[n]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let row = s.as_mut_ptr().add(r * tkp + j0);
                for (n, a) in acc.iter().enumerate() {
                    a.store(row.add(n * V::LANES));
                }
            }
            let n = width.min(tk.saturating_sub(j0));
            for r in (0..R).filter(|_| n > 0) {
                let m = &self.mask[(i0 + r) * tk + j0..][..n];
                for (x, &m) in s[r * tkp + j0..][..n].iter_mut().zip(m) {
                    *x = x.mul_add(self.scale, m);
                }
            }
        }
        for r in 0..R {
            super::simd::softmax_rows(&mut s[r * tkp..r * tkp + tk], tk);
        }
        // o[r] = sum_j p[r][j] v_j, `width` columns at a time (then one vector).
        let mut c0 = 0;
        while c0 < d {
            c0 += if d - c0 >= width {
                self.weighted::<V, R, N>(i0, c0, s, o)
            } else {
                self.weighted::<V, R, 1>(i0, c0, s, o)
            };
        }
    }

    /// Columns c0..c0 + N lanes of rows i0..i0 + R of o = P V; returns the columns' count.
    #[inline(always)]
    unsafe fn weighted<V: Vector, const R: usize, const N: usize>(
        &self,
        i0: usize,
        c0: usize,
        s: &[f32],
        o: &mut [f32],
    ) -> usize {
        let tkp = self.tkp;
        let mut acc = [[V::zero(); N]; R];
        for j in 0..self.tk {
            let row = self.v.add(j * self.kr + c0);
            let values: [V; N] = std::array::from_fn(|n| V::load(row.add(n * V::LANES)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let p = V::splat(*s.get_unchecked(r * tkp + j));
                for n in 0..N {
                    acc[n] = p.mul_add(values[n], acc[n]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = o.as_mut_ptr().add((i0 + r) * self.d + c0);
            for (n, a) in acc.iter().enumerate() {
                a.store(row.add(n * V::LANES));
            }
        }
        N * V::LANES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::random_f32 as random;

    /// The definition in f64: softmax(scale q k^T + mask) v per (batch, head).
    fn reference(q: &[f32], k: &[f32], v: &[f32], mask: &[f32], dm: Dims, scale: f32) -> Vec<f64> {
        let Dims {
            b,
            tq,
            tk,
            heads,
            kv_heads,
            d,
        } = dm;
        let (qr, kr) = (heads * d, kv_heads * d);
        let mut out = vec![0f64; b * tq * qr];
        for bi in 0..b {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                for i in 0..tq {
                    let scores: Vec<f64> = (0..tk)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|c| {
                                    q[(bi * tq + i) * qr + h * d + c] as f64
                                        * k[(bi * tk + j) * kr + g * d + c] as f64
                                })
                                .sum();
                            scale as f64 * dot + mask[(bi * tq + i) * tk + j] as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let o: f64 = (0..tk)
                            .map(|j| e[j] / sum * v[(bi * tk + j) * kr + g * d + c] as f64)
                            .sum();
                        out[(bi * tq + i) * qr + h * d + c] = o;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_path_matches_the_definition() {
        // Fewer and more keys than a block of 32 (tails of 1 and 16), rows below and above a
        // block of 8, heads of 16 to 64 values, grouped heads (up to three query heads per
        // key/value head, one query row as in decoding), a causal mask with padding.
        let cases = [
            (2, 1, 1, 2, 1, 16),
            (1, 5, 5, 2, 2, 32),
            (2, 8, 32, 4, 2, 32),
            (1, 13, 33, 2, 1, 48),
            (2, 17, 17, 1, 1, 64),
            (1, 40, 70, 3, 3, 16),
            (1, 1, 64, 2, 1, 64),
            (3, 1, 40, 6, 2, 32),
        ];
        for (case, &(b, tq, tk, heads, kv_heads, d)) in cases.iter().enumerate() {
            let dm = Dims {
                b,
                tq,
                tk,
                heads,
                kv_heads,
                d,
            };
            let seed = 10 * case as u64;
            let q = random(b * tq * heads * d, seed, 1.0);
            let k = random(b * tk * kv_heads * d, seed + 1, 1.0);
            let v = random(b * tk * kv_heads * d, seed + 2, 1.0);
            let mut mask = vec![0f32; b * tq * tk];
            for bi in 0..b {
                let valid = tk - bi * (tk / 3);
                for i in 0..tq {
                    for j in 0..tk {
                        let visible = j < valid && j <= i + (tk - tq);
                        mask[(bi * tq + i) * tk + j] = if visible { 0.0 } else { -1e9 };
                    }
                }
            }
            let scale = 1.0 / (d as f32).sqrt();
            let want = reference(&q, &k, &v, &mask, dm, scale);
            for path in [Path::Avx512, Path::Avx2, Path::Portable] {
                if !path.available() {
                    continue;
                }
                let got = forward_with(path, &q, &k, &v, &mask, dm, scale);
                assert_eq!(got.len(), want.len());
                for (i, (&a, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a as f64 - w).abs() < 2e-5,
                        "{path:?} case {case}, value {i}: {a} vs {w}"
                    );
                }
            }
            // On the caller's thread: the same values as the parallel path.
            let mut serial = vec![0f32; want.len()];
            forward_serial((&q, &k, &v), &mask, dm, scale, &mut serial);
            let parallel = forward_with(Path::detected(), &q, &k, &v, &mask, dm, scale);
            assert_eq!(serial, parallel, "case {case}");
        }
    }
}
