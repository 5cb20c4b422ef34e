//! The GELU of the int8 products' epilogue: x Phi(x), Phi the standard normal CDF, from a table
//! of polynomials instead of erfc and an exponential. Phi(-|x|) for -|x| in [-5, 0] comes from 8
//! intervals of 0.625, each a degree-4 polynomial in the position u in [0, 1) inside it
//! (coefficients fitted by `scripts/fit-gelu-table.py`: least squares weighted for relative
//! error, rounded to f32), evaluated by Horner's rule with fused multiply-adds; Phi(x) = 1 -
//! Phi(-x) for x > 0. The first interval's polynomial has no constant term, so every x below
//! -5 (whose position is clamped to 0) gets Phi = 0 from the table itself (Phi(-5) = 2.9e-7),
//! with no step of its own. Largest error against erfc in f64 (the script's check, every f32 in
//! [-10, 10] on a grid of 5e-5, and this module's test): |Phi error| 2.1e-6, |gelu error|
//! 1.9e-6 max(1, |x|): four orders of magnitude below the 8-bit products' own error (the GELU's
//! output is rotated and quantized to 8 bits for the down projection: steps of ~1/127 of the
//! row's largest value). One vector permute per coefficient picks each lane's interval, so the
//! whole GELU is 17 vector instructions for 16 values. Session 22's table (8 intervals on
//! [-6.5, 0] of degree 6, and a step for x below the table: 23 instructions, error 1.4e-7) cost
//! MiniLM-L6's forward 2.5% more on an Intel Xeon with AMX; erfc and an exponential before it
//! took about 38 instructions and a division (~13% of that forward, session 22).
//!
//! Every implementation (plain, AVX2, AVX-512) runs the same operations in the same order, so
//! they give the same bits (tested), and the fused epilogues equal the separate pass.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The lower end of the table: below it Phi is taken as 0 (Phi(-5) = 2.9e-7).
const LO: f32 = -5.0;
/// Intervals per unit of x: 8 / 5.
const PER_UNIT: f32 = 8.0 / -LO;
/// The position t = x PER_UNIT + 8 of -|x| is clamped to [0, T_MAX] (interval 7 at 0).
const T_MAX: f32 = 8.0 - 8.0 * f32::EPSILON / 2.0;
const DEGREE: usize = 4;

/// TABLE[n][i]: coefficient of u^n on interval i (x in [-5 + 0.625 i, -5 + 0.625 (i + 1))); 0 for
/// n = 0 on interval 0.
#[allow(clippy::excessive_precision)]
const TABLE: [[f32; 8]; 5] = [
    [
        0.0,
        6.077925263525685e-06,
        8.84510955074802e-05,
        0.0008891035104170442,
        0.006209615617990494,
        0.03039584681391716,
        0.10564935952425003,
        0.26598647236824036,
    ],
    [
        7.017246844043257e-06,
        1.691284342086874e-05,
        0.0002178997383452952,
        0.001883418532088399,
        0.010958160273730755,
        0.04302337020635605,
        0.11418116837739944,
        0.20504869520664215,
    ],
    [
        -2.90928001049906e-05,
        2.8964359444216825e-05,
        0.0002839021326508373,
        0.0019005115609616041,
        0.008534443564713001,
        0.024897227063775063,
        0.044351451098918915,
        0.04049189016222954,
    ],
    [
        5.276977026369423e-05,
        3.2237794584943913e-06,
        0.00010277812543790787,
        0.0008924072608351707,
        0.003798205405473709,
        0.00792661216109991,
        0.004967520013451576,
        -0.009333078749477863,
    ],
    [
        -2.5140290745184757e-05,
        3.31318769895006e-05,
        0.0001956212508957833,
        0.0006436832481995225,
        0.000896313285920769,
        -0.0005913992645218968,
        -0.0031631269957870245,
        -0.0021959238220006227,
    ],
];

/// gelu(x) = x Phi(x), per the module's definition.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let t = (-x.abs()).mul_add(PER_UNIT, 8.0).clamp(0.0, T_MAX);
    let i = t as usize;
    let u = t - i as f32;
    let mut p = TABLE[DEGREE][i];
    for n in (0..DEGREE).rev() {
        p = p.mul_add(u, TABLE[n][i]);
    }
    x * if x > 0.0 { 1.0 - p } else { p }
}

/// [`gelu`] of 16 values (AVX-512F).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn gelu16(x: __m512) -> __m512 {
    let a = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(x),
        _mm512_set1_epi32(i32::MIN),
    ));
    let t = _mm512_fmadd_ps(a, _mm512_set1_ps(PER_UNIT), _mm512_set1_ps(8.0));
    let t = _mm512_min_ps(_mm512_max_ps(t, _mm512_setzero_ps()), _mm512_set1_ps(T_MAX));
    let i = _mm512_cvttps_epi32(t);
    let u = _mm512_sub_ps(t, _mm512_cvtepi32_ps(i));
    let row = |n: usize| {
        let r = _mm256_loadu_ps(TABLE[n].as_ptr());
        _mm512_permutexvar_ps(i, _mm512_castps256_ps512(r))
    };
    let mut p = row(DEGREE);
    for n in (0..DEGREE).rev() {
        p = _mm512_fmadd_ps(p, u, row(n));
    }
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_setzero_ps());
    let phi = _mm512_mask_sub_ps(p, positive, _mm512_set1_ps(1.0), p);
    _mm512_mul_ps(x, phi)
}

/// [`gelu`] of 8 values (AVX2 with FMA).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu8(x: __m256) -> __m256 {
    let a = _mm256_or_ps(x, _mm256_set1_ps(-0.0));
    let t = _mm256_fmadd_ps(a, _mm256_set1_ps(PER_UNIT), _mm256_set1_ps(8.0));
    let t = _mm256_min_ps(_mm256_max_ps(t, _mm256_setzero_ps()), _mm256_set1_ps(T_MAX));
    let i = _mm256_cvttps_epi32(t);
    let u = _mm256_sub_ps(t, _mm256_cvtepi32_ps(i));
    let row = |n: usize| _mm256_permutevar8x32_ps(_mm256_loadu_ps(TABLE[n].as_ptr()), i);
    let mut p = row(DEGREE);
    for n in (0..DEGREE).rev() {
        p = _mm256_fmadd_ps(p, u, row(n));
    }
    let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_setzero_ps());
    let phi = _mm256_blendv_ps(p, _mm256_sub_ps(_mm256_set1_ps(1.0), p), positive);
    _mm256_mul_ps(x, phi)
}

/// y = gelu(y) for every value, with the widest vectors the CPU has.
pub fn gelu_in_place(y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::ops::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { in_place_avx512(y) };
        }
        if crate::ops::simd::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { in_place_avx2(y) };
        }
    }
    y.iter_mut().for_each(|v| *v = gelu(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn in_place_avx512(y: &mut [f32]) {
    let mut chunks = y.chunks_exact_mut(16);
    for c in &mut chunks {
        _mm512_storeu_ps(c.as_mut_ptr(), gelu16(_mm512_loadu_ps(c.as_ptr())));
    }
    chunks
        .into_remainder()
        .iter_mut()
        .for_each(|v| *v = gelu(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn in_place_avx2(y: &mut [f32]) {
    let mut chunks = y.chunks_exact_mut(8);
    for c in &mut chunks {
        _mm256_storeu_ps(c.as_mut_ptr(), gelu8(_mm256_loadu_ps(c.as_ptr())));
    }
    chunks
        .into_remainder()
        .iter_mut()
        .for_each(|v| *v = gelu(*v));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(x: f64) -> f64 {
        x * 0.5 * candle_core::cpu::erf::erfc_f64(-x / std::f64::consts::SQRT_2)
    }

    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (-240_000..=240_000).map(|i| i as f32 * 5e-5).collect();
        v.extend([
            0.0,
            -0.0,
            LO,
            -5.000001,
            -6.5,
            -7.0,
            -30.0,
            6.0,
            40.0,
            1e30,
            -1e30,
            f32::MIN_POSITIVE,
        ]);
        v.extend([f32::INFINITY, -1.0 - f32::EPSILON, 1e-30, -1e-30]);
        v
    }

    #[test]
    fn close_to_the_erf_gelu_everywhere() {
        for x in values().into_iter().filter(|x| x.abs() < 1e6) {
            let want = exact(x as f64);
            let got = gelu(x) as f64;
            let tol = 2.1e-6 * (x.abs() as f64).max(1.0);
            assert!((got - want).abs() <= tol, "x = {x}: {got} vs {want}");
        }
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(1e30), 1e30);
        assert_eq!(gelu(-1e30), 0.0);
        assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
        assert!(gelu(f32::NAN).is_nan());
    }

    #[test]
    fn every_implementation_gives_the_same_bits() {
        let mut x = values();
        x.push(f32::NAN);
        x.push(f32::NEG_INFINITY);
        let plain: Vec<f32> = x.iter().map(|&v| gelu(v)).collect();
        let mut vector = x.clone();
        gelu_in_place(&mut vector);
        #[cfg(target_arch = "x86_64")]
        let mut kernels: Vec<Vec<f32>> = vec![vector];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                let mut y = x.clone();
                unsafe { in_place_avx512(&mut y) };
                kernels.push(y);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                let mut y = x.clone();
                unsafe { in_place_avx2(&mut y) };
                kernels.push(y);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let kernels = vec![vector];
        for y in kernels {
            for ((a, b), v) in y.iter().zip(&plain).zip(&x) {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "x = {v}: {a} vs {b}"
                );
            }
        }
    }
}
