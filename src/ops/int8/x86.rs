//! The x86-64 kernels of [`super::matmul`]: AVX-512 VNNI, AVX-VNNI and AVX2, and the vectorized
//! activation quantization.

// The kernels index several register arrays by the same row.
#![allow(clippy::needless_range_loop)]

use super::{quantize_value, Epilogue, Rows, Tile, NR};
use crate::ops::simd::{tail_mask16 as tail_mask, Gate};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// [`super::quantize_block_plain`] with AVX-512: 16 values per step, masked tail.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_avx512(values: &[f32], out: &mut [MaybeUninit<i8>]) -> (f32, i32) {
    let n = values.len().min(out.len());
    let mask = |i: usize| tail_mask(n, i);
    let mut m = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        let v = _mm512_maskz_loadu_ps(mask(i), values.as_ptr().add(i));
        // max(|v|, m) keeps m where v is NaN (as f32::max).
        m = _mm512_max_ps(_mm512_abs_ps(v), m);
    }
    quantize_avx512_amax(values, out, _mm512_reduce_max_ps(m))
}

/// [`quantize_avx512`] with max |v| known (`amax`, as [`quantize_avx512`] computes it).
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_avx512_amax(
    values: &[f32],
    out: &mut [MaybeUninit<i8>],
    amax: f32,
) -> (f32, i32) {
    let n = values.len().min(out.len());
    let mask = |i: usize| tail_mask(n, i);
    if amax == 0.0 || !amax.is_finite() {
        out[..n].iter_mut().for_each(|o| {
            o.write(0);
        });
        return (0.0, 0);
    }
    let inv = _mm512_set1_ps(127.0 / amax);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let mut sum = _mm512_setzero_si512();
    // Whole blocks of 64 values packed to bytes, then the rest 16 at a time (masked); all of
    // them the second way where 127 / amax overflows (amax below ~3.7e-37), whose products
    // are then infinite or NaN and need the clamp.
    let blocks = if (127.0 / amax).is_finite() {
        n / 64
    } else {
        0
    };
    let (body, total) =
        quantize_blocks64(values.as_ptr(), out.as_mut_ptr() as *mut i8, blocks, inv);
    sum = _mm512_mask_set1_epi32(sum, 1, total);
    for i in (body..n).step_by(16) {
        let k = mask(i);
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, values.as_ptr().add(i)), inv);
        let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
        let v = _mm512_maskz_mov_ps(ordered, _mm512_min_ps(_mm512_max_ps(v, lo), hi));
        let q = _mm512_cvtps_epi32(v);
        sum = _mm512_add_epi32(sum, q);
        _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(i) as *mut _, k, q);
    }
    (amax / 127.0, _mm512_reduce_add_epi32(sum))
}

/// The first 64 `blocks` values of a row quantized with `inv` = 127 / max |v| (the row's
/// max): (values done, their sum). Four vectors at a time, packed to bytes with signed
/// saturation and stored as one; no clamp is needed (|v| inv <= 127 up to rounding, which
/// rounds to 127), and NaN, which converts to the integer indefinite value and saturates to
/// -128 (no other value does), becomes 0. The sum from the bytes (offset by 128 and summed
/// without sign by `vpsadbw`, the offset taken back).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_blocks64(
    values: *const f32,
    out: *mut i8,
    blocks: usize,
    inv: __m512,
) -> (usize, i32) {
    // Dwords of the packed result (lane i: A_i B_i C_i D_i) into A0..A3 B0..B3 C.. D..
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let nan = _mm512_set1_epi8(i8::MIN);
    let mut sad = _mm512_setzero_si512();
    for b in 0..blocks {
        let q: [__m512i; 4] = std::array::from_fn(|j| {
            let v = _mm512_loadu_ps(values.add(64 * b + 16 * j));
            _mm512_cvtps_epi32(_mm512_mul_ps(v, inv))
        });
        let ab = _mm512_packs_epi32(q[0], q[1]);
        let cd = _mm512_packs_epi32(q[2], q[3]);
        let bytes = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(ab, cd));
        let bytes = _mm512_mask_blend_epi8(
            _mm512_cmpeq_epi8_mask(bytes, nan),
            bytes,
            _mm512_setzero_si512(),
        );
        _mm512_storeu_si512(out.add(64 * b) as *mut _, bytes);
        sad = _mm512_add_epi64(
            sad,
            _mm512_sad_epu8(_mm512_xor_si512(bytes, nan), _mm512_setzero_si512()),
        );
    }
    let total = _mm512_reduce_add_epi64(sad) - 128 * 64 * blocks as i64;
    (64 * blocks, total as i32)
}

/// [`super::quantize_block_plain`] with AVX2: 8 values per step, the tail value by value.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_avx2(values: &[f32], out: &mut [MaybeUninit<i8>]) -> (f32, i32) {
    let n = values.len().min(out.len());
    let body = n - n % 8;
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for i in (0..body).step_by(8) {
        let v = _mm256_andnot_ps(sign, _mm256_loadu_ps(values.as_ptr().add(i)));
        m = _mm256_max_ps(v, m);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let amax = lanes
        .iter()
        .chain(&values[body..n])
        .fold(0f32, |a, v| a.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        out[..n].iter_mut().for_each(|o| {
            o.write(0);
        });
        return (0.0, 0);
    }
    let inv_s = 127.0 / amax;
    let inv = _mm256_set1_ps(inv_s);
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let mut total = 0i32;
    let mut q32 = [0i32; 8];
    for i in (0..body).step_by(8) {
        let v = _mm256_mul_ps(_mm256_loadu_ps(values.as_ptr().add(i)), inv);
        let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(v, v);
        let v = _mm256_and_ps(ordered, _mm256_min_ps(_mm256_max_ps(v, lo), hi));
        _mm256_storeu_si256(q32.as_mut_ptr() as *mut __m256i, _mm256_cvtps_epi32(v));
        for (o, q) in out[i..i + 8].iter_mut().zip(q32) {
            o.write(q as i8);
            total += q;
        }
    }
    for (o, &v) in out[body..n].iter_mut().zip(&values[body..n]) {
        let q = quantize_value(v * inv_s);
        o.write(q as i8);
        total += q;
    }
    (amax / 127.0, total)
}

/// Rows r0..r0+R of the tile with AVX-512 VNNI: two 16-column halves, R rows, the integer
/// sums over all inputs, then the float step.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
pub(super) unsafe fn vnni512<const R: usize>(t: &Tile, x: &Rows, r0: usize, y: *mut f32) {
    let xrows: [*const u8; R] =
        std::array::from_fn(|i| x.q.as_ptr().add((r0 + i) * x.kp) as *const u8);
    super::amx::prefetch_output(y, (t.n, t.col0, t.cols), r0..r0 + R);
    super::amx::prefetch_operand(t, r0..r0 + R);
    let mut iacc = [[_mm512_setzero_si512(); 2]; R];
    for i in 0..R {
        let c = _mm512_set1_epi32(*x.corr.get_unchecked(r0 + i));
        iacc[i] = [c, c];
    }
    for g in 0..x.kp / 4 {
        let w0 = _mm512_loadu_si512(t.halves[0].add(g * NR * 4) as *const _);
        let w1 = _mm512_loadu_si512(t.halves[1].add(g * NR * 4) as *const _);
        for i in 0..R {
            let xv = _mm512_set1_epi32((xrows[i].add(4 * g) as *const i32).read_unaligned());
            iacc[i][0] = _mm512_dpbusd_epi32(iacc[i][0], w0, xv);
            iacc[i][1] = _mm512_dpbusd_epi32(iacc[i][1], w1, xv);
        }
    }
    let ws = [
        _mm512_loadu_ps(t.scales.as_ptr()),
        _mm512_loadu_ps(t.scales.as_ptr().add(16)),
    ];
    let facc: [[__m512; 2]; R] = std::array::from_fn(|i| {
        let xs = _mm512_set1_ps(*x.scales.get_unchecked(r0 + i));
        [scaled(iacc[i][0], xs, ws[0]), scaled(iacc[i][1], xs, ws[1])]
    });
    for (i, acc) in facc.into_iter().enumerate() {
        store_row(t, acc, r0 + i, y);
    }
}

/// Rows r0..r0+R of the tile with AVX-VNNI (256-bit `vpdpbusd`): the 32 columns as four
/// groups of 8, R rows; the same integer sums and float step as [`vnni512`] (same values).
#[target_feature(enable = "avx2,fma,avxvnni")]
pub(super) unsafe fn avx_vnni<const R: usize>(t: &Tile, x: &Rows, r0: usize, y: *mut f32) {
    let xrows: [*const u8; R] =
        std::array::from_fn(|i| x.q.as_ptr().add((r0 + i) * x.kp) as *const u8);
    super::amx::prefetch_output(y, (t.n, t.col0, t.cols), r0..r0 + R);
    // Two passes of 16 columns: 2R integer sums, two weight vectors and the broadcast
    // activations fit the 16 registers for R <= 6.
    for c16 in [0, 16] {
        if c16 >= t.cols {
            break;
        }
        let wp = t.panel.as_ptr().add(c16 * 4);
        let mut iacc = [[_mm256_setzero_si256(); 2]; R];
        for i in 0..R {
            let c = _mm256_set1_epi32(*x.corr.get_unchecked(r0 + i));
            iacc[i] = [c, c];
        }
        for g in 0..x.kp / 4 {
            let w = wp.add(g * NR * 4);
            let w0 = _mm256_loadu_si256(w as *const __m256i);
            let w1 = _mm256_loadu_si256(w.add(32) as *const __m256i);
            for i in 0..R {
                let four = (xrows[i].add(4 * g) as *const i32).read_unaligned();
                let xv = _mm256_set1_epi32(four);
                iacc[i][0] = _mm256_dpbusd_avx_epi32(iacc[i][0], w0, xv);
                iacc[i][1] = _mm256_dpbusd_avx_epi32(iacc[i][1], w1, xv);
            }
        }
        let ws = [
            _mm256_loadu_ps(t.scales.as_ptr().add(c16)),
            _mm256_loadu_ps(t.scales.as_ptr().add(c16 + 8)),
        ];
        for h in 0..2 {
            let rows: [__m256; R] = std::array::from_fn(|i| {
                let xs = _mm256_set1_ps(*x.scales.get_unchecked(r0 + i));
                scaled8(iacc[i][h], xs, ws[h])
            });
            store8(t, &rows, r0, c16 + 8 * h, y);
        }
    }
}

/// The definition's float step for 8 columns: f32(p) x (xs x ws).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn scaled8(p: __m256i, xs: __m256, ws: __m256) -> __m256 {
    _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(xs, ws))
}

/// Rows r0.. of the tile's output, columns c8..c8 + 8: each row's accumulator plus the bias,
/// stored (only the panel's real columns).
#[target_feature(enable = "avx2")]
unsafe fn store8(t: &Tile, facc: &[__m256], r0: usize, c8: usize, y: *mut f32) {
    if c8 >= t.cols {
        return;
    }
    let bias = _mm256_loadu_ps(t.bias.as_ptr().add(c8));
    let cols = (t.cols - c8).min(8);
    for (i, acc) in facc.iter().enumerate() {
        let v = _mm256_add_ps(*acc, bias);
        let out = y.add((r0 + i) * t.n + t.col0 + c8);
        if cols == 8 {
            _mm256_storeu_ps(out, v);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, cols);
        }
    }
}

/// The definition's float step for 16 columns: f32(p) x (xs x ws).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scaled(p: __m512i, xs: __m512, ws: __m512) -> __m512 {
    _mm512_mul_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(xs, ws))
}

/// Row r of the tile's output: [`store_rows`] for one row, written out here for a whole panel
/// with no epilogue or a residual (the call and the general epilogue cost more than the tile
/// products of a row when k is small: a product of 1,024 rows with k = n = 384 took 0.28 ms
/// with the call, 0.21 ms without, one thread of this Intel Xeon with AMX; GELU and gating
/// applied to several rows at a time after their stores were slower than in the call).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_row(t: &Tile, acc: [__m512; 2], r: usize, y: *mut f32) {
    let at = r * t.n + t.col0;
    let bias = |h: usize| _mm512_loadu_ps(t.bias.as_ptr().add(16 * h));
    if let Some(gate) = t.pair {
        // act(gate's 16 values) x the up projection's: what the gate's output, stored and
        // read back by the up projection's epilogue, gives.
        let (g, u) = (
            _mm512_add_ps(acc[0], bias(0)),
            _mm512_add_ps(acc[1], bias(1)),
        );
        _mm512_storeu_ps(y.add(at), gated16(gate, g, u));
        return;
    }
    match t.then {
        Epilogue::None if t.cols == NR => {
            for h in 0..2 {
                _mm512_storeu_ps(y.add(at + 16 * h), _mm512_add_ps(acc[h], bias(h)));
            }
        }
        Epilogue::Add(o) if t.cols == NR => {
            for h in 0..2 {
                let v = _mm512_add_ps(acc[h], bias(h));
                let v = _mm512_add_ps(_mm512_loadu_ps(o.add(at + 16 * h)), v);
                _mm512_storeu_ps(y.add(at + 16 * h), v);
            }
        }
        _ => store_rows(t, &[acc], r, y),
    }
}

/// Rows r0.. of the tile's output: each row's two 16-column accumulators plus the bias, then
/// the tile's epilogue, stored (masked past the panel's real columns).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_rows(t: &Tile, facc: &[[__m512; 2]], r0: usize, y: *mut f32) {
    let bias = [
        _mm512_loadu_ps(t.bias.as_ptr()),
        _mm512_loadu_ps(t.bias.as_ptr().add(16)),
    ];
    for (i, acc) in facc.iter().enumerate() {
        let at = (r0 + i) * t.n + t.col0;
        for h in 0..2 {
            let lo = 16 * h;
            if t.cols <= lo {
                break;
            }
            let mask = tail_mask(t.cols, lo);
            let v = then16(t.then, _mm512_add_ps(acc[h], bias[h]), at + lo, mask);
            if mask == 0xffff {
                _mm512_storeu_ps(y.add(at + lo), v);
            } else {
                _mm512_mask_storeu_ps(y.add(at + lo), mask, v);
            }
        }
    }
}

/// The epilogue on 16 values y, at `at` of the output (the operand's values there; lanes
/// outside `mask` are not read): the separate operations' formulas, element by element, so
/// the same values bit for bit.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn then16(then: Epilogue<*const f32>, y: __m512, at: usize, mask: __mmask16) -> __m512 {
    match then {
        Epilogue::None => y,
        Epilogue::Add(r) => _mm512_add_ps(_mm512_maskz_loadu_ps(mask, r.add(at)), y),
        Epilogue::Gelu => super::gelu::gelu16(y),
        Epilogue::Gated(gate, g) => gated16(gate, _mm512_maskz_loadu_ps(mask, g.add(at)), y),
    }
}

/// act(g) x y for 16 values, lane by lane as [`crate::ops::simd::gated_in_place`] computes it.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn gated16(gate: Gate, g: __m512, y: __m512) -> __m512 {
    let (mut v, mut a) = ([0f32; 16], [0f32; 16]);
    _mm512_storeu_ps(v.as_mut_ptr(), y);
    _mm512_storeu_ps(a.as_mut_ptr(), g);
    match gate {
        Gate::Silu => {
            for (y, &a) in v.iter_mut().zip(&a) {
                *y *= Gate::Silu.eval(a).0;
            }
        }
        Gate::GeluTanh => {
            for (y, &a) in v.iter_mut().zip(&a) {
                *y *= Gate::GeluTanh.eval(a).0;
            }
        }
    }
    _mm512_loadu_ps(v.as_ptr())
}

/// Rows r0..r0+R, columns c8..c8+8 of the tile with AVX2: the unsigned weight bytes widened
/// to i16, the four activation bytes of a group broadcast and widened, `vpmaddwd` (two
/// products per i32 lane, exact: at most 2 x 255 x 127 per group), lane pairs added at the end.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn avx2<const R: usize>(t: &Tile, x: &Rows, r0: usize, c8: usize, y: *mut f32) {
    let xrows: [*const u8; R] =
        std::array::from_fn(|i| x.q.as_ptr().add((r0 + i) * x.kp) as *const u8);
    let wp = t.panel.as_ptr().add(c8 * 4);
    let mut lo = [_mm256_setzero_si256(); R];
    let mut hi = [_mm256_setzero_si256(); R];
    for g in 0..x.kp / 4 {
        let w = wp.add(g * NR * 4);
        let w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(w as *const __m128i));
        let w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(w.add(16) as *const __m128i));
        for i in 0..R {
            let four = (xrows[i].add(4 * g) as *const i32).read_unaligned();
            let xv = _mm256_cvtepi8_epi16(_mm_set1_epi32(four));
            lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(w0, xv));
            hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(w1, xv));
        }
    }
    let ws = _mm256_loadu_ps(t.scales.as_ptr().add(c8));
    let facc: [__m256; R] = std::array::from_fn(|i| {
        // [c0 c1 c4 c5 | c2 c3 c6 c7] -> columns in order.
        let sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[i], hi[i]), 0b11_01_10_00);
        let c = _mm256_set1_epi32(*x.corr.get_unchecked(r0 + i));
        let xs = _mm256_set1_ps(*x.scales.get_unchecked(r0 + i));
        scaled8(_mm256_add_epi32(sums, c), xs, ws)
    });
    store8(t, &facc, r0, c8, y);
}
