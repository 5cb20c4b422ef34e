//! f32 kernels written so that the compiler vectorizes them: the exponential by range reduction
//! and a polynomial (no libm call, no branch), lane-wise partial sums and maxima (a sequential
//! float reduction cannot be vectorized without reassociation), and an AVX2 build of each kernel
//! chosen at run time on x86-64.
//!
//! Accuracy: `exp` is within 2e-7 relative of the exact value on its whole range (Taylor series
//! of degree 7 on |r| <= ln 2 / 2 after x = n ln 2 + r); the normal CDF uses the Chebyshev fit of
//! erfc of Numerical Recipes (Press et al., 3rd ed., 6.2.2; fractional error below 1.2e-7).

const LANES: usize = 8;

/// The coefficients of e^r on [-ln 2 / 2, ln 2 / 2] in [`exp`], highest power first (Taylor to
/// r^7), for Horner's rule.
pub(crate) const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// e^x for f32, branch-free. Inputs below -87.3 give 0 (subnormal results are flushed), above 88.3
/// they are clamped to 88.3 (the results stay finite).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let input = x;
    let x = x.clamp(-87.3, 88.3);
    // Fused multiply-adds throughout (one rounding each; the compiler does not contract a * b + c
    // by itself): half the instructions of separate products and sums.
    let shifted = x.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let [first, rest @ ..] = EXP_TAYLOR;
    let mut p = first;
    for c in rest {
        p = p.mul_add(r, c);
    }
    // 2^n from the bits of `shifted` = 1.5 * 2^23 + n, whose integer part sits in the low
    // mantissa bits: no float-to-int conversion (which would not vectorize).
    let scale = f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    // Below the smallest normal scale: 0 (subnormal results are flushed, as a select).
    if input < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// Phi(x) = erfc(-x / sqrt 2) / 2, with erfc(z) = 2 - erfc(-z) for z < 0.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the coefficients as published
pub fn normal_cdf(x: f32) -> f32 {
    let z = -x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / 0.5f32.mul_add(a, 1.0);
    let mut poly: f32 = 0.170_872_77;
    for c in [
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        poly = poly.mul_add(t, c);
    }
    let poly = (-a).mul_add(a, poly);
    let half_erfc = 0.5 * t * exp(poly);
    if z >= 0.0 {
        half_erfc
    } else {
        1.0 - half_erfc
    }
}

/// Instruction sets ws2s's own kernels choose between at run time, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain code (what the compiler makes of it for the build's target).
    Scalar,
    /// AVX2 with FMA.
    Avx2,
    /// AVX2 with AVX-VNNI (256-bit integer dot products: Intel Core 12th generation and later,
    /// Xeon 6 E-cores, AMD Zen 5).
    AvxVnni,
    /// AVX-512 (with VNNI and BF16 where the CPU has them).
    Avx512,
    /// Intel AMX tiles (INT8, BF16).
    Amx,
}

impl Isa {
    /// The names `WS2S_MAX_ISA` takes.
    pub const NAMES: [&'static str; 5] = ["scalar", "avx2", "avxvnni", "avx512", "amx"];

    /// The set of a `WS2S_MAX_ISA` name.
    pub fn parse(name: &str) -> Option<Isa> {
        let all = [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512, Isa::Amx];
        Isa::NAMES.iter().position(|n| *n == name).map(|i| all[i])
    }
}

/// The widest set ws2s's kernels may use: `WS2S_MAX_ISA` (`scalar`, `avx2`, `avxvnni`,
/// `avx512` or `amx`) caps what the CPU has, to run and time a narrower CPU's paths on a wider one (e.g.
/// `avx2`: the paths of a CPU without AVX-512 or AMX); unset or empty, no cap. Read once. (The f32
/// products of the `gemm` crate choose their own kernels; a build without the `gemm-avx512`
/// feature keeps them to AVX2.) The command line rejects a value not in [`Isa::NAMES`]
/// ([`check_max_isa`]); here such a value caps nothing.
pub fn max_isa() -> Isa {
    static MAX: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("WS2S_MAX_ISA")
            .ok()
            .and_then(|v| Isa::parse(v.trim()))
            .unwrap_or(Isa::Amx)
    })
}

/// Whether kernels of `isa` may run: not above [`max_isa`] (the CPU's own features are
/// checked by each kernel's dispatch as well).
pub fn allows(isa: Isa) -> bool {
    isa <= max_isa()
}

/// An error naming the variable and the accepted values when `WS2S_MAX_ISA` is set to
/// something else.
pub fn check_max_isa() -> Result<(), String> {
    match std::env::var("WS2S_MAX_ISA") {
        Ok(v) if !v.trim().is_empty() && Isa::parse(v.trim()).is_none() => Err(format!(
            "WS2S_MAX_ISA={v:?} is not an instruction set ws2s knows; expected one of: {}",
            Isa::NAMES.join(", ")
        )),
        _ => Ok(()),
    }
}

/// Whether the CPU has the AVX-512 subsets the wide builds use (F, BW, DQ, VL), once, and
/// [`max_isa`] allows AVX-512.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            allows(Isa::Avx512)
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX2 and FMA, once, and [`max_isa`] allows them.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            allows(Isa::Avx2)
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX2, FMA and AVX-VNNI, once, and [`max_isa`] allows AVX-VNNI.
pub(crate) fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            allows(Isa::AvxVnni) && has_avx2() && std::is_x86_feature_detected!("avxvnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs the body as an AVX-512 function (the same element-wise arithmetic on 16 lanes: same
/// values) or an AVX2 + FMA one when the CPU has them, else as plain code.
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $crate::ops::simd::multiversion! { $(#[$meta])* pub fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn inner($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    inner($($arg),*)
                }
                if crate::ops::simd::has_avx512() {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if crate::ops::simd::has_avx2() {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in rest {
        m = m.max(v);
    }
    m
}

#[inline(always)]
fn sum_of(row: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// Lanes of the f64 dot product: element j is summed into lane j mod 16.
const F64_LANES: usize = 16;

multiversion! {
    /// sum_j a_j b_j in f64 over the shorter slice's length, in one order on every CPU: element
    /// j is added to lane j mod 16 with a fused multiply-add (lanes in index order), then the
    /// lanes are summed pairwise (l + 8, then + 4, + 2, + 1). The AVX-512 build (two 8-lane
    /// registers), the AVX2 build (four of 4) and the plain build compute the same value, and
    /// products of zeros leave it unchanged (a row's trailing zeros may be skipped).
    pub fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len().min(b.len());
        let mut lanes = [0f64; F64_LANES];
        dot_lanes_from(&mut lanes, &a[..n], &b[..n], 0);
        reduce_lanes_f64(lanes)
    }
}

/// Adds a_j b_j to lane j mod 16 for j from `from` (a multiple of 16) to the end.
#[inline(always)]
fn dot_lanes_from(lanes: &mut [f64; F64_LANES], a: &[f64], b: &[f64], from: usize) {
    let (a, b) = (&a[from..], &b[from..]);
    let ca = a.chunks_exact(F64_LANES);
    let cb = b.chunks_exact(F64_LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..F64_LANES {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        lanes[l] = x.mul_add(*y, lanes[l]);
    }
}

/// The lanes summed pairwise: l + 8, then + 4, + 2, + 1.
#[inline(always)]
fn reduce_lanes_f64(mut lanes: [f64; F64_LANES]) -> f64 {
    let mut width = F64_LANES / 2;
    while width > 0 {
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// y_j += c_r x_rj for the R rows in order (one fused multiply-add each), y's values loaded and
/// stored once for all rows over their common length: the values of [`axpy_f64`] row after row.
#[inline(always)]
fn axpy_rows<const R: usize>(y: &mut [f64], coefs: [f64; R], rows: [&[f64]; R]) {
    let lens = rows.map(|r| r.len().min(y.len()));
    let common = lens.iter().copied().min().unwrap_or(0);
    for (j, o) in y[..common].iter_mut().enumerate() {
        let mut v = *o;
        for r in 0..R {
            v = coefs[r].mul_add(rows[r][j], v);
        }
        *o = v;
    }
    for r in 0..R {
        for (o, x) in y[common..lens[r]].iter_mut().zip(&rows[r][common..]) {
            *o = coefs[r].mul_add(*x, *o);
        }
    }
}

/// out[i] = [`dot_f64`](w, rows[i]) for every row, the same values bit for bit. On AVX-512,
/// four rows at a time ([`dot4_avx512`]): eight independent accumulator chains instead of two,
/// and w's values loaded once per four rows; a single row's two chains wait on the
/// multiply-add latency (its rows being short, ~200-450 values in the probes).
pub fn dot_many_f64(w: &[f64], rows: &[&[f64]], out: &mut [f64]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        for (group, o) in rows.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
            // SAFETY: the CPU has AVX-512F (checked just above).
            let v = unsafe { dot4_avx512(w, [group[0], group[1], group[2], group[3]]) };
            o.copy_from_slice(&v);
        }
        done = rows.len() / 4 * 4;
    }
    for (row, o) in rows[done..].iter().zip(&mut out[done..]) {
        *o = dot_f64(w, row);
    }
}

/// [`dot_f64`] of `w` with four rows in AVX-512 registers: lanes 0-7 and 8-15 of each row in two
/// registers (element j in lane j mod 16, fused multiply-adds in index order), each row's last
/// partial block through zero-masked loads (a zero product adds nothing: a lane starts at +0
/// and never becomes -0), then lanes summed pairwise in [`dot_f64`]'s order (l + 8, + 4, + 2,
/// + 1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_avx512(w: &[f64], rows: [&[f64]; 4]) -> [f64; 4] {
    use std::arch::x86_64::*;
    let lens = rows.map(|r| r.len().min(w.len()));
    let common = lens.iter().copied().min().unwrap_or(0) / F64_LANES * F64_LANES;
    let (wp, xp) = (w.as_ptr(), rows.map(|r| r.as_ptr()));
    let mut lo = [_mm512_setzero_pd(); 4];
    let mut hi = [_mm512_setzero_pd(); 4];
    let mut j = 0;
    while j < common {
        let (w0, w1) = (_mm512_loadu_pd(wp.add(j)), _mm512_loadu_pd(wp.add(j + 8)));
        for r in 0..4 {
            lo[r] = _mm512_fmadd_pd(w0, _mm512_loadu_pd(xp[r].add(j)), lo[r]);
            hi[r] = _mm512_fmadd_pd(w1, _mm512_loadu_pd(xp[r].add(j + 8)), hi[r]);
        }
        j += F64_LANES;
    }
    let mut out = [0.0; 4];
    for r in 0..4 {
        let (mut a, mut b) = (lo[r], hi[r]);
        let mut k = common;
        while k < lens[r] {
            let m = tail_mask16(lens[r], k);
            let (m0, m1) = ((m & 0xff) as __mmask8, (m >> 8) as __mmask8);
            let w0 = _mm512_maskz_loadu_pd(m0, wp.add(k));
            let w1 = _mm512_maskz_loadu_pd(m1, wp.add(k + 8));
            a = _mm512_fmadd_pd(w0, _mm512_maskz_loadu_pd(m0, xp[r].add(k)), a);
            b = _mm512_fmadd_pd(w1, _mm512_maskz_loadu_pd(m1, xp[r].add(k + 8)), b);
            k += F64_LANES;
        }
        let v8 = _mm512_add_pd(a, b);
        let v4 = _mm256_add_pd(_mm512_castpd512_pd256(v8), _mm512_extractf64x4_pd::<1>(v8));
        let v2 = _mm_add_pd(_mm256_castpd256_pd128(v4), _mm256_extractf128_pd::<1>(v4));
        out[r] = _mm_cvtsd_f64(_mm_add_sd(v2, _mm_unpackhi_pd(v2, v2)));
    }
    out
}

multiversion! {
    /// y += sum_i coefs[i] rows[i], row after row: the values of [`axpy_f64`] applied to each
    /// row in order, with y read and written once per group of four rows (two without AVX-512).
    pub fn axpy_many_f64(y: &mut [f64], coefs: &[f64], rows: &[&[f64]]) {
        let group = if has_avx512() { 4 } else { 2 };
        let mut i = 0;
        while i < rows.len() {
            let rest = rows.len() - i;
            if group == 4 && rest >= 4 {
                let c = [coefs[i], coefs[i + 1], coefs[i + 2], coefs[i + 3]];
                axpy_rows(y, c, [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]]);
                i += 4;
            } else if rest >= 2 {
                axpy_rows(y, [coefs[i], coefs[i + 1]], [rows[i], rows[i + 1]]);
                i += 2;
            } else {
                axpy_rows(y, [coefs[i]], [rows[i]]);
                i += 1;
            }
        }
    }
}

multiversion! {
    /// y_j += alpha x_j (fused multiply-add) over the shorter slice's length.
    pub fn axpy_f64(y: &mut [f64], alpha: f64, x: &[f64]) {
        for (o, v) in y.iter_mut().zip(x) {
            *o = alpha.mul_add(*v, *o);
        }
    }
}

multiversion! {
    /// ln sum_j e^{row_j}, by the largest value (shifted exponentials, lane-wise sums); -inf
    /// for an empty row.
    pub fn log_sum_exp(row: &[f32]) -> f32 {
        let max = max_of(row);
        if !max.is_finite() {
            return max;
        }
        // Blocks of exponentials in a buffer, then their sum: the loop the compiler
        // vectorizes (accumulating each exponential straight into lane sums it does not).
        let mut buffer = [0f32; 512];
        let mut total = 0f32;
        for block in row.chunks(buffer.len()) {
            let e = &mut buffer[..block.len()];
            for (o, &v) in e.iter_mut().zip(block) {
                *o = exp(v - max);
            }
            total += sum_of(e);
        }
        max + total.ln()
    }
}

multiversion! {
    /// Softmax of every row of `cols` values, in place.
    pub fn softmax_rows(data: &mut [f32], cols: usize) {
        for row in data.chunks_mut(cols) {
            let max = max_of(row);
            for v in row.iter_mut() {
                *v = exp(*v - max);
            }
            let inv = 1.0 / sum_of(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// Per row: out = y * (g - sum(g * y)) * scale (the softmax backward, times `scale`).
    pub fn softmax_grad_rows(y: &[f32], g: &[f32], out: &mut [f32], cols: usize, scale: f32) {
        for ((yr, gr), or) in y.chunks(cols).zip(g.chunks(cols)).zip(out.chunks_mut(cols)) {
            let d = dot(yr, gr);
            for ((o, &yv), &gv) in or.iter_mut().zip(yr).zip(gr) {
                *o = yv * (gv - d) * scale;
            }
        }
    }
}

/// A LayerNorm (`centre`) or RMSNorm: epsilon, and the offset added to the weight (1 for
/// Gemma's RMSNorm, else 0).
#[derive(Clone, Copy, Debug)]
pub struct NormParams {
    pub eps: f32,
    pub centre: bool,
    pub offset: f32,
}

/// Sum of (v - mean)^2 over a row, in `LANES` partial sums.
#[inline(always)]
fn squared_deviations(row: &[f32], mean: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            lanes[i] += d * d;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// (mean, 1 / sqrt(var + eps)) of a row; mean 0 and the mean of squares when not `centre`
/// (RMSNorm).
#[inline(always)]
fn row_stats(row: &[f32], eps: f32, centre: bool) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = if centre { sum_of(row) / n } else { 0.0 };
    let var = squared_deviations(row, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Per row of `w.len()` values: out = (x - mean) rstd (w + offset) + b (LayerNorm; RMSNorm
/// when not `centre`: no mean, no b). With AVX-512 the row's sums run in four 16-lane
/// accumulators ([`norm_rows_avx512`]; one chain of 8 lanes was bound by the adds' latency:
/// a residual LayerNorm of MiniLM's 1,024 x 384 took ~0.18 ms of one thread).
pub fn norm_rows(x: &[f32], w: &[f32], b: Option<&[f32]>, out: &mut [f32], p: NormParams) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        assert!(out.len() == x.len() && b.is_none_or(|b| b.len() == w.len()));
        // SAFETY: the CPU has AVX-512F; the lengths were checked.
        return unsafe { norm_rows_avx512(x, w, b, out.as_mut_ptr(), p) };
    }
    norm_rows_lanes(x, w, b, out, p)
}

/// [`norm_rows`] into `out`, which may be uninitialized: its values are written, never read.
/// With AVX-512 only (None without: the caller's other path).
///
/// # Safety
/// `out` is valid for writes of `x.len()` values.
pub(crate) unsafe fn norm_rows_uninit(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    out: *mut f32,
    p: NormParams,
) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        assert!(
            (w.is_empty() || x.len().is_multiple_of(w.len()))
                && b.is_none_or(|b| b.len() == w.len())
        );
        norm_rows_avx512(x, w, b, out, p);
        return Some(());
    }
    let _ = (x, w, b, out, p);
    None
}

/// [`norm_rows`] with AVX-512: the row's sum and sum of squared deviations in four 16-lane
/// accumulators each (tails masked), the output's operations as in [`norm_rows_lanes`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn norm_rows_avx512(x: &[f32], w: &[f32], b: Option<&[f32]>, out: *mut f32, p: NormParams) {
    use std::arch::x86_64::*;
    let NormParams {
        eps,
        centre,
        offset,
    } = p;
    let cols = w.len();
    if cols == 0 {
        return;
    }
    let n = cols as f32;
    let lanes = |j: usize| tail_mask16(cols, j);
    let offset_v = _mm512_set1_ps(offset);
    for (r, row) in x.chunks_exact(cols).enumerate() {
        let o = out.add(r * cols);
        let rp = row.as_ptr();
        let mean = if centre {
            lane_sums16(rp, cols, |v| v) / n
        } else {
            0.0
        };
        let mv = _mm512_set1_ps(mean);
        let var = lane_sums16(rp, cols, |v| {
            let d = _mm512_sub_ps(v, mv);
            _mm512_mul_ps(d, d)
        }) / n;
        let rstd = _mm512_set1_ps(1.0 / (var + eps).sqrt());
        let mut j = 0;
        while j < cols {
            let m = lanes(j);
            let v = _mm512_maskz_loadu_ps(m, rp.add(j));
            let wv = _mm512_add_ps(_mm512_maskz_loadu_ps(m, w.as_ptr().add(j)), offset_v);
            let mut y = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(v, mv), rstd), wv);
            if let Some(b) = b {
                y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, b.as_ptr().add(j)));
            }
            _mm512_mask_storeu_ps(o.add(j), m, y);
            j += 16;
        }
    }
}

/// The lanes of values i..i + 16 that lie below n, as an AVX-512 mask (all 16 but in the last
/// step; none past n).
#[inline(always)]
pub(crate) fn tail_mask16(n: usize, i: usize) -> u16 {
    match n.saturating_sub(i) {
        left if left >= 16 => 0xffff,
        left => ((1u32 << left) - 1) as u16,
    }
}

/// The sum of f(v) over the `cols` values at `row`, in four 16-lane accumulators (64 values a
/// step, then masked vectors), for AVX-512 callers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lane_sums16(
    row: *const f32,
    cols: usize,
    f: impl Fn(std::arch::x86_64::__m512) -> std::arch::x86_64::__m512,
) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut j = 0;
    while j + 64 <= cols {
        for (a, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_add_ps(*acc, f(_mm512_loadu_ps(row.add(j + 16 * a))));
        }
        j += 64;
    }
    let mut a = 0;
    while j < cols {
        let m = tail_mask16(cols, j);
        let v = _mm512_maskz_mov_ps(m, f(_mm512_maskz_loadu_ps(m, row.add(j))));
        acc[a] = _mm512_add_ps(acc[a], v);
        a = (a + 1) % 4;
        j += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

multiversion! {
    /// [`norm_rows`] in `LANES` partial sums, for any CPU.
    pub fn norm_rows_lanes(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        out: &mut [f32],
        p: NormParams,
    ) {
        let NormParams { eps, centre, offset } = p;
        let cols = w.len();
        for (row, o) in x.chunks(cols).zip(out.chunks_mut(cols)) {
            let (mean, rstd) = row_stats(row, eps, centre);
            match b {
                Some(b) => {
                    for k in 0..cols {
                        o[k] = (row[k] - mean) * rstd * (w[k] + offset) + b[k];
                    }
                }
                None => {
                    for k in 0..cols {
                        o[k] = (row[k] - mean) * rstd * (w[k] + offset);
                    }
                }
            }
        }
    }
}

multiversion! {
    /// The backward of [`norm_rows`] for a block of rows: dx (written), and the block's sums
    /// dw += g x^, db += g (added). With x^ = (x - mean) rstd and gh = g (w + offset):
    /// dx = rstd (gh - mean(gh) - x^ mean(gh x^)) (without the mean(gh) term for RMSNorm).
    pub fn norm_grad_rows(
        x: &[f32],
        g: &[f32],
        w: &[f32],
        dx: &mut [f32],
        sums: (&mut [f32], &mut [f32]),
        p: NormParams,
    ) {
        let NormParams { eps, centre, offset } = p;
        let (dw, db) = sums;
        let cols = w.len();
        let n = cols as f32;
        for ((row, gr), d) in x.chunks(cols).zip(g.chunks(cols)).zip(dx.chunks_mut(cols)) {
            let (mean, rstd) = row_stats(row, eps, centre);
            let mut s_gh = [0f32; LANES];
            let mut s_ghx = [0f32; LANES];
            let whole = cols / LANES * LANES;
            for k0 in (0..whole).step_by(LANES) {
                for i in 0..LANES {
                    let k = k0 + i;
                    let xh = (row[k] - mean) * rstd;
                    let gh = gr[k] * (w[k] + offset);
                    s_gh[i] += gh;
                    s_ghx[i] += gh * xh;
                    dw[k] += gr[k] * xh;
                    db[k] += gr[k];
                }
            }
            let (mut sum_gh, mut sum_ghx) = (0f32, 0f32);
            for k in whole..cols {
                let xh = (row[k] - mean) * rstd;
                let gh = gr[k] * (w[k] + offset);
                sum_gh += gh;
                sum_ghx += gh * xh;
                dw[k] += gr[k] * xh;
                db[k] += gr[k];
            }
            sum_gh += s_gh.iter().sum::<f32>();
            sum_ghx += s_ghx.iter().sum::<f32>();
            let mean_gh = if centre { sum_gh / n } else { 0.0 };
            let mean_ghx = sum_ghx / n;
            for k in 0..cols {
                let xh = (row[k] - mean) * rstd;
                d[k] = rstd * (gr[k] * (w[k] + offset) - mean_gh - xh * mean_ghx);
            }
        }
    }
}

multiversion! {
    /// sums[j] += the sum over the rows of `x` (rows of `sums.len()` values) of column j.
    pub fn column_sums(x: &[f32], sums: &mut [f32]) {
        let cols = sums.len();
        for row in x.chunks(cols) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
    }
}

multiversion! {
    /// out = x Phi(x).
    pub fn gelu(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * normal_cdf(v);
        }
    }
}

/// d/dx x Phi(x) = Phi(x) + x phi(x).
#[inline(always)]
fn gelu_derivative(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    normal_cdf(x) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

multiversion! {
    /// g = g (Phi(x) + x phi(x)), in place (the GELU backward into the incoming gradient).
    pub fn gelu_grad_in_place(x: &[f32], g: &mut [f32]) {
        for (gv, &v) in g.iter_mut().zip(x) {
            *gv *= gelu_derivative(v);
        }
    }
}

multiversion! {
    /// out = x Phi(x), and x overwritten with the derivative Phi(x) + x phi(x): a forward that
    /// keeps what its backward multiplies by.
    pub fn gelu_keeping_grad(x: &mut [f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(x.iter_mut()) {
            let u = *v;
            *o = u * normal_cdf(u);
            *v = gelu_derivative(u);
        }
    }
}

/// The scalars of one AdamW update (see `train::optimizer`).
#[derive(Clone, Copy, Debug)]
pub struct AdamScalars {
    pub grad_scale: f32,
    pub b1: f32,
    pub b2: f32,
    pub step_size: f32,
    pub bias2_sqrt: f32,
    pub decay: f32,
    pub eps: f32,
}

multiversion! {
    /// One AdamW update of a block of parameters p with moments m, v and summed gradients g:
    /// g' = g grad_scale, m = b1 m + (1 - b1) g', v = b2 v + (1 - b2) g'^2,
    /// p = p decay - step_size m / (sqrt(v) / bias2_sqrt + eps).
    pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: AdamScalars) {
        let n = p.len().min(m.len()).min(v.len()).min(g.len());
        let (p, m, v, g) = (&mut p[..n], &mut m[..n], &mut v[..n], &g[..n]);
        for i in 0..n {
            let gi = g[i] * c.grad_scale;
            let mi = c.b1 * m[i] + (1.0 - c.b1) * gi;
            let vi = c.b2 * v[i] + (1.0 - c.b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] * c.decay - c.step_size * mi / (vi.sqrt() / c.bias2_sqrt + c.eps);
        }
    }
}

multiversion! {
    /// The sum of squares of a block, in f64 lanes.
    pub fn sum_of_squares(x: &[f32]) -> f64 {
        let mut lanes = [0f64; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                lanes[i] += (c[i] as f64) * (c[i] as f64);
            }
        }
        lanes.iter().sum::<f64>() + rest.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
    }
}

/// The activation of a gated MLP: out = act(a) * b.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// silu(a) = a sigmoid(a) (Llama, Qwen2).
    Silu,
    /// GELU with the tanh approximation, 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3))) (Gemma).
    GeluTanh,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044_715;

impl Gate {
    /// (act(a), act'(a)) in f64.
    pub fn eval_f64(self, a: f64) -> (f64, f64) {
        match self {
            Gate::Silu => {
                let s = 1.0 / (1.0 + (-a).exp());
                (a * s, s * (1.0 + a * (1.0 - s)))
            }
            Gate::GeluTanh => {
                let u = SQRT_2_OVER_PI * (a + GELU_CUBIC * a * a * a);
                let t = u.tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * a * a);
                (
                    0.5 * a * (1.0 + t),
                    0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * du,
                )
            }
        }
    }

    /// (act(a), act'(a)) in f32, vectorizable.
    #[inline(always)]
    pub(crate) fn eval(self, a: f32) -> (f32, f32) {
        match self {
            Gate::Silu => {
                let s = 1.0 / (1.0 + exp(-a));
                (a * s, s * (1.0 + a * (1.0 - s)))
            }
            Gate::GeluTanh => {
                let (c, k) = (SQRT_2_OVER_PI as f32, GELU_CUBIC as f32);
                let u = c * (a + k * a * a * a);
                // tanh(u) = 1 - 2 / (e^{2u} + 1), exact at both ends (exp clamps, 0 below).
                let t = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
                let du = c * (1.0 + 3.0 * k * a * a);
                (
                    0.5 * a * (1.0 + t),
                    0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * du,
                )
            }
        }
    }
}

multiversion! {
    /// out = act(a) * b.
    pub fn gated(gate: Gate, a: &[f32], b: &[f32], out: &mut [f32]) {
        match gate {
            Gate::Silu => {
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    *o = Gate::Silu.eval(x).0 * y;
                }
            }
            Gate::GeluTanh => {
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    *o = Gate::GeluTanh.eval(x).0 * y;
                }
            }
        }
    }
}

multiversion! {
    /// b = act(a) * b, in place (the values of [`gated`]).
    pub fn gated_in_place(gate: Gate, a: &[f32], b: &mut [f32]) {
        match gate {
            Gate::Silu => {
                for (y, &x) in b.iter_mut().zip(a) {
                    *y *= Gate::Silu.eval(x).0;
                }
            }
            Gate::GeluTanh => {
                for (y, &x) in b.iter_mut().zip(a) {
                    *y *= Gate::GeluTanh.eval(x).0;
                }
            }
        }
    }
}

multiversion! {
    /// da = g b act'(a), db = g act(a).
    pub fn gated_grad(gate: Gate, a: &[f32], b: &[f32], g: &[f32], da: &mut [f32], db: &mut [f32]) {
        // Zipped slices (no bounds checks) and the gate fixed per loop, so that each loop
        // vectorizes inside this function's AVX2 build.
        let lanes = da.iter_mut().zip(db.iter_mut()).zip(a.iter().zip(b).zip(g));
        match gate {
            Gate::Silu => {
                for ((da, db), ((&x, &y), &g)) in lanes {
                    let (act, d) = Gate::Silu.eval(x);
                    *da = g * y * d;
                    *db = g * act;
                }
            }
            Gate::GeluTanh => {
                for ((da, db), ((&x, &y), &g)) in lanes {
                    let (act, d) = Gate::GeluTanh.eval(x);
                    *da = g * y * d;
                    *db = g * act;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_names_parse_in_order_and_the_cap_is_consistent() {
        let parsed: Vec<Isa> = Isa::NAMES.iter().map(|n| Isa::parse(n).unwrap()).collect();
        assert_eq!(
            parsed,
            [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512, Isa::Amx]
        );
        assert!(parsed.windows(2).all(|w| w[0] < w[1]));
        for bad in ["", "AVX2", "avx3", "sse"] {
            assert_eq!(Isa::parse(bad), None, "{bad}");
        }
        // Whatever the cap in this process, a set above it is never reported usable.
        if !allows(Isa::Avx512) {
            assert!(!has_avx512());
        }
        if !allows(Isa::AvxVnni) {
            assert!(!has_avx_vnni());
        }
        if !allows(Isa::Avx2) {
            assert!(!has_avx2() && !has_avx_vnni());
        }
        assert!(allows(Isa::Scalar));
    }

    /// The order `dot_f64` documents, written plainly.
    fn dot_in_documented_order(a: &[f64], b: &[f64]) -> f64 {
        let mut lanes = [0f64; 16];
        for j in 0..a.len().min(b.len()) {
            lanes[j % 16] = a[j].mul_add(b[j], lanes[j % 16]);
        }
        for width in [8, 4, 2, 1] {
            for l in 0..width {
                lanes[l] += lanes[l + width];
            }
        }
        lanes[0]
    }

    #[test]
    fn f64_dot_follows_its_documented_order_and_skips_zeros_exactly() {
        let mut rng = crate::rng::Rng::new(7);
        for n in (0..=50).chain([449, 1536]) {
            let a: Vec<f64> = (0..n).map(|_| (rng.next_f64() - 0.5) * 6.0).collect();
            let b: Vec<f64> = (0..n).map(|_| rng.next_f64() - 0.5).collect();
            let got = dot_f64(&a, &b);
            assert_eq!(
                got.to_bits(),
                dot_in_documented_order(&a, &b).to_bits(),
                "n = {n}"
            );
            // Against the exact sum in f64's precision (well-conditioned random data).
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (got - plain).abs() <= 1e-12 * (1.0 + plain.abs()),
                "n = {n}"
            );
            // Trailing zeros in either operand change nothing, bit for bit.
            for cut in [0, n / 3, n / 2] {
                let mut z = b.clone();
                z[cut..].iter_mut().for_each(|v| *v = 0.0);
                assert_eq!(
                    dot_f64(&a, &z).to_bits(),
                    dot_f64(&a[..cut], &z[..cut]).to_bits()
                );
            }
        }
        // Integers: exact. The shorter slice sets the length.
        let a: Vec<f64> = (1..=40).map(f64::from).collect();
        assert_eq!(dot_f64(&a, &a), (40.0 * 41.0 * 81.0) / 6.0);
        assert_eq!(dot_f64(&a[..3], &a), 14.0);
        assert_eq!(dot_f64(&[], &a), 0.0);
    }

    #[test]
    fn f64_products_of_many_rows_equal_row_by_row_bit_for_bit() {
        let mut rng = crate::rng::Rng::new(11);
        let d = 75;
        let w: Vec<f64> = (0..d).map(|_| (rng.next_f64() - 0.5) * 3.0).collect();
        let data: Vec<Vec<f64>> = (0..9)
            .map(|_| (0..d).map(|_| rng.next_f64() - 0.5).collect())
            .collect();
        // Rows of different lengths (as a row space's lower-triangular coordinates), some empty,
        // some shorter than a lane group, some longer than w.
        for lens in [
            [0, 3, 16, 17, 33, 40, 64, 70, 75],
            [75, 74, 50, 31, 16, 15, 1, 0, 75],
        ] {
            let rows: Vec<&[f64]> = data.iter().zip(lens).map(|(r, n)| &r[..n]).collect();
            let want: Vec<u64> = rows.iter().map(|r| dot_f64(&w, r).to_bits()).collect();
            let mut out = vec![0.0; rows.len()];
            dot_many_f64(&w, &rows, &mut out);
            assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
            // A shorter w sets the length, as in dot_f64.
            dot_many_f64(&w[..40], &rows, &mut out);
            for (o, r) in out.iter().zip(&rows) {
                assert_eq!(o.to_bits(), dot_f64(&w[..40], r).to_bits());
            }
            let coefs: Vec<f64> = (0..rows.len()).map(|i| (i as f64 * 0.9).sin()).collect();
            let mut want = w.clone();
            for (c, r) in coefs.iter().zip(&rows) {
                axpy_f64(&mut want, *c, r);
            }
            let mut got = w.clone();
            axpy_many_f64(&mut got, &coefs, &rows);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            for group in [2, 4] {
                let mut got = w.clone();
                for (c, r) in coefs.chunks(group).zip(rows.chunks(group)) {
                    match (group, c.len()) {
                        (4, 4) => {
                            axpy_rows(&mut got, [c[0], c[1], c[2], c[3]], [r[0], r[1], r[2], r[3]])
                        }
                        (2, 2) => axpy_rows(&mut got, [c[0], c[1]], [r[0], r[1]]),
                        _ => (0..c.len()).for_each(|i| axpy_rows(&mut got, [c[i]], [r[i]])),
                    }
                }
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "groups of {group}"
                );
            }
        }
    }

    #[test]
    fn f64_axpy_is_a_fused_multiply_add_per_element() {
        let x: Vec<f64> = (0..37).map(|i| (i as f64 * 0.7).sin()).collect();
        let mut y: Vec<f64> = (0..40).map(|i| (i as f64 * 0.3).cos()).collect();
        let before = y.clone();
        axpy_f64(&mut y, -1.3, &x);
        for j in 0..40 {
            let want = if j < 37 {
                (-1.3f64).mul_add(x[j], before[j])
            } else {
                before[j]
            };
            assert_eq!(y[j].to_bits(), want.to_bits(), "element {j}");
        }
    }

    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            let rel = ((exp(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn normal_cdf_is_accurate_in_both_tails() {
        // Known values: Phi(-10) and Phi(-5). In the lower tail the relative error is that of
        // exp(-x^2 / 2 + ...) with x^2 rounded to f32: ~x^2 * 6e-8.
        assert!((normal_cdf(-10.0) as f64 / 7.619_853_024_160_527e-24 - 1.0).abs() < 1e-5);
        assert!((normal_cdf(-5.0) as f64 / 2.866_515_718_791_939e-7 - 1.0).abs() < 1e-5);
        for i in -1200..=1200 {
            let x = i as f64 / 100.0;
            // erfc keeps relative accuracy in the lower tail, where 1 + erf cancels.
            let exact = 0.5 * candle_core::cpu::erf::erfc_f64(-x / std::f64::consts::SQRT_2);
            let ours = normal_cdf(x as f32) as f64;
            // Relative accuracy in both tails (about 1e-7 absolute near the centre).
            let tol = 3e-5 * exact + 2e-7 * exact.min(1.0 - exact) + 1e-37;
            assert!((ours - exact).abs() <= tol, "x = {x}: {ours} vs {exact}");
        }
    }

    #[test]
    fn gated_kernels_match_f64_and_finite_differences() {
        let a: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.09).collect();
        let b: Vec<f32> = (0..203).map(|i| (i as f32 * 0.37).cos()).collect();
        let g: Vec<f32> = (0..203).map(|i| (i as f32 * 0.11).sin()).collect();
        for gate in [Gate::Silu, Gate::GeluTanh] {
            let mut out = vec![0f32; a.len()];
            let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; a.len()]);
            gated(gate, &a, &b, &mut out);
            gated_grad(gate, &a, &b, &g, &mut da, &mut db);
            for i in 0..a.len() {
                let x = a[i] as f64;
                let (act, d) = gate.eval_f64(x);
                // The f64 derivative against a central difference of the f64 activation.
                let h = 1e-5;
                let fd = (gate.eval_f64(x + h).0 - gate.eval_f64(x - h).0) / (2.0 * h);
                assert!((fd - d).abs() < 1e-8, "{gate:?} at {x}: {d} vs {fd}");
                if gate == Gate::Silu {
                    assert!((act - x / (1.0 + (-x).exp())).abs() < 1e-12);
                }
                let tol = 1e-6 * (1.0 + x.abs());
                assert!(
                    (out[i] as f64 - act * b[i] as f64).abs() < tol,
                    "{gate:?} value at {x}"
                );
                let exact_da = g[i] as f64 * b[i] as f64 * d;
                assert!((da[i] as f64 - exact_da).abs() < tol, "{gate:?} da at {x}");
                assert!(
                    (db[i] as f64 - g[i] as f64 * act).abs() < tol,
                    "{gate:?} db at {x}"
                );
            }
        }
    }

    #[test]
    fn log_sum_exp_matches_f64_and_its_edge_cases() {
        // A vocabulary-sized row (a remainder past the lanes), values spread over +-30.
        let row: Vec<f32> = (0..151_939)
            .map(|i| ((i * 7919 % 6007) as f32 / 100.0) - 30.0)
            .collect();
        let max = row
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
        let exact = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let got = log_sum_exp(&row) as f64;
        assert!((got - exact).abs() < 1e-5, "{got} vs {exact}");
        // ln(e^1000 + e^1000) = 1000 + ln 2: no overflow.
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f32.ln())).abs() < 1e-3);
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY, 0.0]), 0.0);
        assert_eq!(log_sum_exp(&[3.5]), 3.5);
    }

    #[test]
    fn row_kernels_match_plain_loops() {
        let cols = 21;
        let x: Vec<f32> = (0..cols * 3)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
            .collect();
        let mut sm = x.clone();
        softmax_rows(&mut sm, cols);
        for (row, out) in x.chunks(cols).zip(sm.chunks(cols)) {
            let max = row
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (&v, &o) in row.iter().zip(out) {
                let exact = (v as f64 - max).exp() / z;
                assert!((o as f64 - exact).abs() < 1e-6 * exact.max(1e-3));
            }
        }
        let g: Vec<f32> = (0..cols * 3).map(|i| (i as f32 * 0.31).sin()).collect();
        let mut out = vec![0f32; g.len()];
        softmax_grad_rows(&sm, &g, &mut out, cols, 0.5);
        for ((y, g), o) in sm.chunks(cols).zip(g.chunks(cols)).zip(out.chunks(cols)) {
            let d: f64 = y.iter().zip(g).map(|(&a, &b)| a as f64 * b as f64).sum();
            for k in 0..cols {
                let exact = y[k] as f64 * (g[k] as f64 - d) * 0.5;
                assert!((o[k] as f64 - exact).abs() < 1e-6);
            }
        }
        let mut ge = vec![0f32; x.len()];
        let mut gg = g.clone();
        gelu(&x, &mut ge);
        gelu_grad_in_place(&x, &mut gg);
        // The forward that keeps the derivative: x becomes gelu'(x), out gelu(x).
        let (mut kept, mut ke) = (x.clone(), vec![0f32; x.len()]);
        gelu_keeping_grad(&mut kept, &mut ke);
        for i in 0..x.len() {
            let v = x[i] as f64;
            let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(v / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((ge[i] as f64 - v * cdf).abs() < 1e-6 * (1.0 + v.abs()));
            let exact = g[i] as f64 * (cdf + v * pdf);
            assert!((gg[i] as f64 - exact).abs() < 1e-6 * (1.0 + v.abs()));
            assert!((ke[i] as f64 - v * cdf).abs() < 1e-6 * (1.0 + v.abs()));
            assert!((kept[i] as f64 - (cdf + v * pdf)).abs() < 1e-6 * (1.0 + v.abs()));
        }
    }

    /// The f32 norm kernels against a plain f64 evaluation of the same formulas, row lengths
    /// below, at and above the vector width, LayerNorm, RMSNorm and RMSNorm with unit offset.
    #[test]
    fn norm_kernels_match_f64_formulas() {
        for (cols, centre, offset) in [
            (5usize, true, 0.0f32),
            (8, true, 0.0),
            (37, false, 0.0),
            (64, false, 1.0),
            (17, true, 0.0),
            (130, true, 0.0),
            (384, false, 1.0),
        ] {
            let rows = 3;
            let x: Vec<f32> = (0..rows * cols)
                .map(|i| (i as f32 * 0.71).sin() * 3.0 + 0.4)
                .collect();
            let g: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).cos()).collect();
            let w: Vec<f32> = (0..cols).map(|i| 0.5 + (i as f32 * 0.13).sin()).collect();
            let b: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.29).cos()).collect();
            let p = NormParams {
                eps: 1e-5,
                centre,
                offset,
            };
            let mut y = vec![0f32; x.len()];
            norm_rows(&x, &w, centre.then_some(&b[..]), &mut y, p);
            // The portable lanes (what AVX2 runs) agree with the dispatched kernel.
            let mut lanes = vec![0f32; x.len()];
            norm_rows_lanes(&x, &w, centre.then_some(&b[..]), &mut lanes, p);
            for (a, l) in y.iter().zip(&lanes) {
                assert!((a - l).abs() < 2e-6, "cols {cols}: {a} vs {l}");
            }
            let mut dx = vec![0f32; x.len()];
            let (mut dw, mut db) = (vec![0f32; cols], vec![0f32; cols]);
            norm_grad_rows(&x, &g, &w, &mut dx, (&mut dw, &mut db), p);
            let (mut dw64, mut db64) = (vec![0f64; cols], vec![0f64; cols]);
            for r in 0..rows {
                let row: Vec<f64> = x[r * cols..(r + 1) * cols]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let gr: Vec<f64> = g[r * cols..(r + 1) * cols]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let n = cols as f64;
                let mean = if centre {
                    row.iter().sum::<f64>() / n
                } else {
                    0.0
                };
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                let rstd = 1.0 / (var + 1e-5).sqrt();
                let xh: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
                let scale: Vec<f64> = w.iter().map(|&v| v as f64 + offset as f64).collect();
                let gh: Vec<f64> = (0..cols).map(|k| gr[k] * scale[k]).collect();
                let mean_gh = if centre {
                    gh.iter().sum::<f64>() / n
                } else {
                    0.0
                };
                let mean_ghx = (0..cols).map(|k| gh[k] * xh[k]).sum::<f64>() / n;
                for k in 0..cols {
                    let shift = if centre { b[k] as f64 } else { 0.0 };
                    let want = xh[k] * scale[k] + shift;
                    assert!(
                        (y[r * cols + k] as f64 - want).abs() < 1e-5,
                        "y cols {cols}"
                    );
                    let want = rstd * (gh[k] - mean_gh - xh[k] * mean_ghx);
                    assert!(
                        (dx[r * cols + k] as f64 - want).abs() < 1e-5,
                        "dx cols {cols}"
                    );
                    dw64[k] += gr[k] * xh[k];
                    db64[k] += gr[k];
                }
            }
            for k in 0..cols {
                assert!((dw[k] as f64 - dw64[k]).abs() < 1e-5, "dw cols {cols}");
                assert!((db[k] as f64 - db64[k]).abs() < 1e-5, "db cols {cols}");
            }
        }
    }
}
