//! The GELU of the int8 products' epilogue: x Phi(x), Phi the standard normal CDF, from a table
//! of polynomials instead of erfc and an exponential. Phi(-|x|) for -|x| in [-6.5, 0] comes
//! from 8 intervals of 0.8125, each a degree-6 polynomial in the position u in [0, 1) inside
//! it (coefficients fitted by `scripts/fit-gelu-table.py`: least squares weighted for relative
//! error, rounded to f32), evaluated by Horner's rule with fused multiply-adds; Phi(x) = 1 -
//! Phi(-x) for x > 0, and Phi(x) = 0 below -6.5. Largest error against erfc in f64 (the
//! script's check, every f32 in [-10, 10] on a grid of 5e-5, and this module's test):
//! |Phi error| 1.4e-7, |gelu error| 1.3e-7 max(1, |x|), against 1.0e-7 for the float path's
//! [`crate::ops::simd::normal_cdf`] near the centre, and far below the 8-bit products' own
//! error. One vector permute per coefficient picks each lane's interval, so the whole GELU is
//! about 25 vector instructions for 16 values, where erfc and the exponential took about 38 and
//! a division (MiniLM's forward spent ~13% of its time in that GELU, session 22).
//!
//! Every implementation (plain, AVX2, AVX-512) runs the same operations in the same order, so
//! they give the same bits (tested), and the fused epilogues equal the separate pass.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The lower end of the table: below it Phi is taken as 0 (Phi(-6.5) = 4e-11).
const LO: f32 = -6.5;
/// Intervals per unit of x: 8 / 6.5.
const PER_UNIT: f32 = 8.0 / 6.5;
/// The position t = x PER_UNIT + 8 of -|x| is clamped to [0, T_MAX] (interval 7 at 0).
const T_MAX: f32 = 8.0 - 8.0 * f32::EPSILON / 2.0;
const DEGREE: usize = 6;

/// TABLE[n][i]: coefficient of u^n on interval i (x in [-6.5 + 0.8125 i, -6.5 + 0.8125 (i + 1))).
#[allow(clippy::excessive_precision)]
const TABLE: [[f32; 8]; 7] = [
    [
        4.0194441525143176e-11,
        6.447458567038211e-09,
        5.44078773145884e-07,
        2.4275135729112662e-05,
        0.0005770241259597242,
        0.007394605316221714,
        0.05208129063248634,
        0.20825238525867462,
    ],
    [
        2.1087685764253905e-10,
        3.035618689750663e-08,
        2.2335582343657734e-06,
        8.449539745924994e-05,
        0.001648726756684482,
        0.016618026420474052,
        0.08656106889247894,
        0.23301507532596588,
    ],
    [
        7.258473266880117e-10,
        7.808358049032904e-08,
        4.563997663353803e-06,
        0.00014001659292262048,
        0.0021741401869803667,
        0.01645086705684662,
        0.05716809630393982,
        0.07689794152975082,
    ],
    [
        -3.3197716797772614e-10,
        4.603278114245768e-08,
        4.584435373544693e-06,
        0.0001400863257003948,
        0.0017524525756016374,
        0.009068910963833332,
        0.015470138750970364,
        -0.008624857291579247,
    ],
    [
        6.1251572702758494e-09,
        3.291636971880507e-07,
        8.659219020046294e-06,
        0.00011799870117101818,
        0.0008488361490890384,
        0.002545849187299609,
        -0.0006548508536070585,
        -0.010127809830009937,
    ],
    [
        -7.129861590016162e-09,
        -2.65192682036286e-07,
        -2.5320312033727532e-06,
        2.9309790988918394e-05,
        0.0003915703564416617,
        0.0003650456201285124,
        -0.002562588779255748,
        -0.0001940379588631913,
    ],
    [
        6.798244189809566e-09,
        3.189629467215127e-07,
        6.2198650994105265e-06,
        4.0839353459887207e-05,
        1.8709156393015292e-06,
        -0.0003620159695856273,
        0.00018919806461781263,
        0.0007813327247276902,
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
    let p = if x < LO { 0.0 } else { p };
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
    let p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(LO)), p);
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
    let p = _mm256_and_ps(p, _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(LO)));
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
            -6.500001,
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
            let tol = 1.4e-7 * (x.abs() as f64).max(1.0);
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
