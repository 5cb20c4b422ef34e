//! y += x W^T in f32 for few rows of x: decoding, where the batch is one row per live beam.
//!
//! A general product (gemm) first copies W [n, k] into panels laid out for its inner kernel.
//! That copy costs about as much as the product itself when x has a few dozen rows, and with a
//! language-model head (151,936 x 896) it is most of a decoding step. Here W is read in its own
//! layout, once per call: each output is a dot product of a row of x and a row of W, both
//! contiguous, and a step of the inner loop multiplies C rows of W by R rows of x, 16 (AVX-512)
//! or 8 (AVX2) inputs at a time, into C x R vector accumulators summed across lanes at the end.
//! Columns are split between threads; each thread walks its columns a tile at a time, so the
//! tile's rows of W stay in cache while every row of x passes over them.
//!
//! The order of the additions differs from gemm's (values agree to rounding, tested against
//! f64). `WS2S_SKINNY_ROWS` sets the most rows that take this path (0: never; default
//! [`DEFAULT_MAX_ROWS`]); `WS2S_SKINNY_KERNEL=scalar|avx2|avx512` forces a kernel.

use rayon::prelude::*;
use std::sync::OnceLock;

/// Default for the most rows of x that take this path (measured: `ws2s bench decode`).
pub const DEFAULT_MAX_ROWS: usize = 64;

/// The most rows of x that use this product: `WS2S_SKINNY_ROWS` or [`DEFAULT_MAX_ROWS`].
pub(crate) fn max_rows() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("WS2S_SKINNY_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_ROWS)
    })
}

/// Whether a product of `rows` rows with inner size `k` takes this path.
pub(crate) fn applies(rows: usize, k: usize) -> bool {
    rows > 0 && rows <= max_rows() && k >= 16
}

/// The inner kernels; the widest the CPU has is used unless one is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    Avx2,
    Avx512,
}

impl Kernel {
    /// The kernel used: `WS2S_SKINNY_KERNEL=scalar|avx2|avx512` if set and available, else
    /// the widest this CPU has.
    pub fn detected() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            let widest = Kernel::widest();
            match std::env::var("WS2S_SKINNY_KERNEL").as_deref() {
                Ok("scalar") => Kernel::Scalar,
                Ok("avx2") if widest != Kernel::Scalar => Kernel::Avx2,
                _ => widest,
            }
        })
    }

    /// How results name f32 products: gemm, and this kernel for few rows.
    pub fn label(self) -> &'static str {
        match self {
            Kernel::Scalar => "gemm-f32+rows-scalar",
            Kernel::Avx2 => "gemm-f32+rows-avx2",
            Kernel::Avx512 => "gemm-f32+rows-avx512",
        }
    }

    fn widest() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if crate::ops::simd::has_avx512() {
                    return Kernel::Avx512;
                }
                if crate::ops::simd::has_avx2() {
                    return Kernel::Avx2;
                }
            }
            Kernel::Scalar
        })
    }

    /// Whether this CPU can run the kernel.
    pub(crate) fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            Kernel::Avx2 => Kernel::widest() != Kernel::Scalar,
            Kernel::Avx512 => Kernel::widest() == Kernel::Avx512,
        }
    }

    /// Columns of W per tile.
    fn columns(self) -> usize {
        match self {
            Kernel::Scalar => 1,
            Kernel::Avx2 => 3,
            Kernel::Avx512 => 4,
        }
    }
}

/// out [rows, n] (row-major, already holding the bias or residual) += x [rows, k] W^T, with
/// W [n, k] row-major.
pub(crate) fn accumulate(
    x: &[f32],
    w: &[f32],
    (rows, k, n): (usize, usize, usize),
    out: &mut [f32],
) {
    accumulate_with(Kernel::detected(), x, w, (rows, k, n), out)
}

/// [`accumulate`] with a given kernel (falls back to the scalar one when the CPU lacks it).
pub(crate) fn accumulate_with(
    kernel: Kernel,
    x: &[f32],
    w: &[f32],
    (rows, k, n): (usize, usize, usize),
    out: &mut [f32],
) {
    assert!(x.len() >= rows * k, "skinny product: x too small");
    assert!(w.len() >= n * k, "skinny product: W too small");
    assert!(out.len() >= rows * n, "skinny product: output too small");
    if rows == 0 || n == 0 || k == 0 {
        return;
    }
    let kernel = if kernel.available() {
        kernel
    } else {
        Kernel::Scalar
    };
    let tile = kernel.columns();
    // For the AVX-512 kernel, x in the order its inner loop reads it (see [`pack_rows`]).
    let packed = (kernel == Kernel::Avx512).then(|| pack_rows(x, rows, k));
    let packed = packed.as_deref();
    // Chunks of whole tiles, about eight per thread (uneven speeds even out), at least 16 tiles.
    let tiles = n.div_ceil(tile);
    let per_chunk = tiles
        .div_ceil(8 * rayon::current_num_threads())
        .max(16)
        .min(tiles);
    let chunks = tiles.div_ceil(per_chunk);
    // The tasks write disjoint columns of the output.
    let dst = super::real::SharedMut(out.as_mut_ptr());
    let run = |chunk: usize| {
        let first = chunk * per_chunk * tile;
        let last = ((chunk + 1) * per_chunk * tile).min(n);
        let mut c = first;
        while c < last {
            let cols = tile.min(last - c);
            // SAFETY: columns c..c + cols of every row are inside `out` (checked above) and
            // belong to this chunk alone; x and W cover rows * k and n * k values.
            unsafe {
                columns(
                    kernel,
                    (x, packed),
                    &w[c * k..(c + cols) * k],
                    (rows, k, n),
                    dst.ptr().wrapping_add(c),
                    cols,
                )
            };
            c += cols;
        }
    };
    if chunks > 1 && rows * k * n > 1 << 15 {
        (0..chunks).into_par_iter().for_each(run);
    } else {
        (0..chunks).for_each(run);
    }
}

/// Rows of x per step of the AVX-512 kernel.
const PACK_ROWS: usize = 6;

/// x [rows, k] as groups of [`PACK_ROWS`] rows, each group as k/16 (rounded up) blocks of
/// [`PACK_ROWS`] x 16 values (row by row): the inner loop reads one contiguous stream. Missing
/// rows and inputs are zero.
fn pack_rows(x: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let kp = k.div_ceil(16) * 16;
    let groups = rows.div_ceil(PACK_ROWS);
    let mut packed = vec![0f32; groups * kp * PACK_ROWS];
    for (r, row) in x.chunks_exact(k).take(rows).enumerate() {
        let group = &mut packed[r / PACK_ROWS * kp * PACK_ROWS..];
        for (b, block) in row.chunks(16).enumerate() {
            let at = (b * PACK_ROWS + r % PACK_ROWS) * 16;
            group[at..at + block.len()].copy_from_slice(block);
        }
    }
    packed
}

/// `cols` columns (the rows of `w`) for every row of x, into `out` (column 0 of the tile, row
/// stride n). `x` is given as is and, for the AVX-512 kernel, packed by [`pack_rows`].
///
/// # Safety
/// `out` must be valid for rows x n with the tile's columns at offsets 0..cols of each row.
unsafe fn columns(
    kernel: Kernel,
    (x, packed): (&[f32], Option<&[f32]>),
    w: &[f32],
    (rows, k, n): (usize, usize, usize),
    out: *mut f32,
    cols: usize,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            let packed = packed.expect("x packed for the AVX-512 kernel");
            x86::columns_avx512((x, packed), w, (rows, k, n), out, cols)
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => x86::columns_avx2(x, w, (rows, k, n), out, cols),
        _ => {
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                for c in 0..cols {
                    let wc = &w[c * k..(c + 1) * k];
                    let dot: f32 = xr.iter().zip(wc).map(|(a, b)| a * b).sum();
                    *out.add(r * n + c) += dot;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    // Rows of x per AVX-512 step (4 columns x 6 rows = 24 accumulators of 32 registers): the
    // rows of a packed group.
    use super::PACK_ROWS as ROWS_512;
    /// Rows of x per AVX2 step (3 columns x 4 rows = 12 accumulators of 16 registers).
    const ROWS_256: usize = 4;

    /// # Safety
    /// AVX-512F must be present; see [`super::columns`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns_avx512(
        (x, packed): (&[f32], &[f32]),
        w: &[f32],
        (rows, k, n): (usize, usize, usize),
        out: *mut f32,
        cols: usize,
    ) {
        let kp = k.div_ceil(16) * 16;
        if cols == 4 {
            for (g, group) in packed.chunks_exact(kp * ROWS_512).enumerate() {
                let r = g * ROWS_512;
                let rs = ROWS_512.min(rows - r);
                tile512_4x6(group.as_ptr(), w.as_ptr(), k, out.add(r * n), (n, rs));
            }
            return;
        }
        // The last tile of the columns, narrower: one row at a time.
        for r in 0..rows {
            let xp = x.as_ptr().add(r * k);
            let op = out.add(r * n);
            match cols {
                3 => tile512::<3, 1>(xp, w.as_ptr(), k, op, n),
                2 => tile512::<2, 1>(xp, w.as_ptr(), k, op, n),
                _ => tile512::<1, 1>(xp, w.as_ptr(), k, op, n),
            }
        }
    }

    /// The full tile of [`tile512`] (4 columns, 6 rows) with its 24 accumulators named, so that
    /// they stay in registers (as arrays, some were kept on the stack).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile512_4x6(
        x: *const f32,
        w: *const f32,
        k: usize,
        out: *mut f32,
        (n, rs): (usize, usize),
    ) {
        macro_rules! zero {
            ($($a:ident),*) => { $(let mut $a = _mm512_setzero_ps();)* };
        }
        zero!(a00, a01, a02, a03, a04, a05, a10, a11, a12, a13, a14, a15);
        zero!(a20, a21, a22, a23, a24, a25, a30, a31, a32, a33, a34, a35);
        let full = k / 16 * 16;
        let mut j = 0;
        macro_rules! step {
            ($load:ident $(, $mask:expr)?) => {{
                let w0 = $load($($mask,)? w.add(j));
                let w1 = $load($($mask,)? w.add(k + j));
                let w2 = $load($($mask,)? w.add(2 * k + j));
                let w3 = $load($($mask,)? w.add(3 * k + j));
                macro_rules! row {
                    ($r:expr, $b0:ident, $b1:ident, $b2:ident, $b3:ident) => {{
                        let xv = _mm512_loadu_ps(x.add(j * ROWS_512 + $r * 16));
                        $b0 = _mm512_fmadd_ps(w0, xv, $b0);
                        $b1 = _mm512_fmadd_ps(w1, xv, $b1);
                        $b2 = _mm512_fmadd_ps(w2, xv, $b2);
                        $b3 = _mm512_fmadd_ps(w3, xv, $b3);
                    }};
                }
                row!(0, a00, a10, a20, a30);
                row!(1, a01, a11, a21, a31);
                row!(2, a02, a12, a22, a32);
                row!(3, a03, a13, a23, a33);
                row!(4, a04, a14, a24, a34);
                row!(5, a05, a15, a25, a35);
            }};
        }
        while j < full {
            step!(_mm512_loadu_ps);
            j += 16;
        }
        if j < k {
            let mask: __mmask16 = (1u16 << (k - j)) - 1;
            step!(_mm512_maskz_loadu_ps, mask);
        }
        let rows = [
            [a00, a10, a20, a30],
            [a01, a11, a21, a31],
            [a02, a12, a22, a32],
            [a03, a13, a23, a33],
            [a04, a14, a24, a34],
            [a05, a15, a25, a35],
        ];
        for (r, &[p, q, s, t]) in rows.iter().enumerate().take(rs) {
            let o = out.add(r * n);
            _mm_storeu_ps(o, _mm_add_ps(_mm_loadu_ps(o), sum4(p, q, s, t)));
        }
    }

    /// [sum of p's lanes, of q's, of s's, of t's].
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn sum4(p: __m512, q: __m512, s: __m512, t: __m512) -> __m128 {
        // Within each 128-bit lane: [p0+p2, q0+q2, p1+p3, q1+q3], the same for s and t, then
        // [p0+p1+p2+p3, q.., s.., t..]; then the four lanes added.
        let pq = _mm512_add_ps(_mm512_unpacklo_ps(p, q), _mm512_unpackhi_ps(p, q));
        let st = _mm512_add_ps(_mm512_unpacklo_ps(s, t), _mm512_unpackhi_ps(s, t));
        let (pq, st) = (_mm512_castps_pd(pq), _mm512_castps_pd(st));
        let all = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(pq, st)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(pq, st)),
        );
        let half = _mm256_add_ps(
            _mm512_castps512_ps256(all),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(all), 1)),
        );
        _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1))
    }

    /// out[r, c] += sum_j x[r, j] w[c, j] for C columns and R rows.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // r also addresses x
    unsafe fn tile512<const C: usize, const R: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        out: *mut f32,
        n: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); R]; C];
        let full = k / 16 * 16;
        let mut j = 0;
        while j < full {
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(w.add(c * k + j));
            }
            for r in 0..R {
                let xv = _mm512_loadu_ps(x.add(r * k + j));
                for c in 0..C {
                    acc[c][r] = _mm512_fmadd_ps(wv[c], xv, acc[c][r]);
                }
            }
            j += 16;
        }
        if j < k {
            let mask: __mmask16 = (1u16 << (k - j)) - 1;
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, w.add(c * k + j));
            }
            for r in 0..R {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + j));
                for c in 0..C {
                    acc[c][r] = _mm512_fmadd_ps(wv[c], xv, acc[c][r]);
                }
            }
        }
        for (c, column) in acc.iter().enumerate() {
            for (r, &v) in column.iter().enumerate() {
                *out.add(r * n + c) += _mm512_reduce_add_ps(v);
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA must be present; see [`super::columns`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns_avx2(
        x: &[f32],
        w: &[f32],
        (rows, k, n): (usize, usize, usize),
        out: *mut f32,
        cols: usize,
    ) {
        let mut r = 0;
        while r < rows {
            let rs = ROWS_256.min(rows - r);
            let xp = x.as_ptr().add(r * k);
            let op = out.add(r * n);
            macro_rules! tile {
                ($c:literal, $r:literal) => {
                    tile256::<$c, $r>(xp, w.as_ptr(), k, op, n)
                };
            }
            match (cols, rs) {
                (3, 4) => tile!(3, 4),
                (3, 3) => tile!(3, 3),
                (3, 2) => tile!(3, 2),
                (3, 1) => tile!(3, 1),
                (2, _) => tile!(2, 1),
                _ => tile!(1, 1),
            }
            r += if cols == 3 { rs } else { 1 };
        }
    }

    /// The sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn sum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // r also addresses x
    unsafe fn tile256<const C: usize, const R: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        out: *mut f32,
        n: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        let full = k / 8 * 8;
        let mut j = 0;
        while j < full {
            let mut wv = [_mm256_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(w.add(c * k + j));
            }
            for r in 0..R {
                let xv = _mm256_loadu_ps(x.add(r * k + j));
                for c in 0..C {
                    acc[c][r] = _mm256_fmadd_ps(wv[c], xv, acc[c][r]);
                }
            }
            j += 8;
        }
        let mut tail = [[0f32; R]; C];
        for (c, column) in tail.iter_mut().enumerate() {
            for (r, t) in column.iter_mut().enumerate() {
                for jj in j..k {
                    *t += *x.add(r * k + jj) * *w.add(c * k + jj);
                }
            }
        }
        for c in 0..C {
            for r in 0..R {
                *out.add(r * n + c) += sum256(acc[c][r]) + tail[c][r];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..len)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect()
    }

    /// Every kernel against an f64 reference, on shapes with every kind of remainder (rows past
    /// a step, columns past a tile, inputs past a vector), onto a non-zero output.
    #[test]
    fn every_kernel_matches_f64() {
        for kernel in [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512] {
            if !kernel.available() {
                eprintln!("skipping {kernel:?}: not on this CPU");
                continue;
            }
            for &(rows, k, n) in &[
                (1, 16, 1),
                (7, 37, 9),
                (13, 64, 130),
                (6, 100, 4),
                (40, 896, 67),
            ] {
                let x = values(rows * k, 1);
                let w = values(n * k, 2);
                let start = values(rows * n, 3);
                let mut out = start.clone();
                accumulate_with(kernel, &x, &w, (rows, k, n), &mut out);
                for r in 0..rows {
                    for c in 0..n {
                        let dot: f64 = (0..k)
                            .map(|j| x[r * k + j] as f64 * w[c * k + j] as f64)
                            .sum();
                        let want = start[r * n + c] as f64 + dot;
                        let got = out[r * n + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
                            "{kernel:?} {rows}x{k}x{n} at ({r}, {c}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn empty_products_leave_the_output() {
        let mut out = vec![1.0f32; 4];
        accumulate(&[], &[1.0; 32], (0, 8, 4), &mut out);
        accumulate(&[0.0; 4], &[], (1, 4, 0), &mut out);
        assert_eq!(out, vec![1.0; 4]);
    }
}
