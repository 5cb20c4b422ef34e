//! The rotation applied to both operands of an int8 product before they are quantized: random
//! signs, then a Walsh-Hadamard transform on each chunk of `s` inputs, `s` the largest power of
//! two dividing k ([`size`]). With D the signs and H the (unnormalized) block-diagonal
//! Hadamard matrix, H H^T = s I, so (x D H)(W D H)^T = s x W^T: the product is unchanged up to
//! the factor s, which the weight's scale takes back.
//!
//! Why: activations of decoder models have a few channels far larger than the rest; with one
//! scale per row they flatten every other channel to a few integer levels. The transform
//! spreads each channel over the s channels of its chunk (a large value of one channel becomes
//! s values of magnitude |v| / sqrt(s) after the normalization the scale implies), so one
//! scale per row and per weight row keeps the products' accuracy (measured against f32 in
//! docs/results/inference.md, session 20), and the integer sums need no float step until the
//! whole row is summed. The random signs keep a constant or periodic row from folding into a
//! single coefficient.
//!
//! Every step is an exact sign flip, an addition or a subtraction in f32, in the same order in
//! every implementation, so the portable and AVX-512 versions give the same bits (tested).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// The chunk size of the transform for rows of k inputs: the largest power of two dividing k
/// (1, no transform, for odd k).
pub fn size(k: usize) -> usize {
    if k == 0 {
        1
    } else {
        1 << k.trailing_zeros()
    }
}

/// Inputs whose signs come from the table (beyond, from the hash directly).
const TABLE: usize = 1 << 16;

/// Whether input j's sign is flipped: one bit of SplitMix64's output for j (a fixed,
/// well-mixed pattern, the same on every machine).
fn flipped(j: usize) -> bool {
    let mut z = (j as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 1 == 1
}

/// The sign flips of inputs 16 c .. 16 c + 16 as a bit mask (bit i: input 16 c + i).
fn flips16(c: usize) -> u16 {
    flips_from(masks(), c)
}

/// The table of [`flips16`] for inputs below [`TABLE`] (made once).
fn masks() -> &'static [u16] {
    static MASKS: OnceLock<Vec<u16>> = OnceLock::new();
    MASKS.get_or_init(|| (0..TABLE / 16).map(compute_flips16).collect())
}

/// [`flips16`] from the table [`masks`] (taken once by a loop over many vectors).
#[inline(always)]
fn flips_from(masks: &[u16], c: usize) -> u16 {
    match masks.get(c) {
        Some(&m) => m,
        None => compute_flips16(c),
    }
}

#[cold]
fn compute_flips16(c: usize) -> u16 {
    (0..16).fold(0u16, |m, i| m | (u16::from(flipped(16 * c + i)) << i))
}

/// Rotates `row` (k values, k = its length) in place: signs flipped, then each chunk of
/// [`size`]`(k)` values replaced by its Walsh-Hadamard transform (unnormalized).
pub fn rotate(row: &mut [f32]) {
    let s = size(row.len());
    if s < 2 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if s >= 16 && crate::ops::simd::has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked above); source and destination are the same
        // k values (the first pass reads each vector before it writes it).
        unsafe { rotate_avx512(row.as_ptr(), row.as_mut_ptr(), row.len(), s) };
        return;
    }
    rotate_plain(row, s);
}

/// `dst` = [`rotate`]`(src)` (same lengths), without a copy first where the vector version
/// runs; that version also returns max |dst| (NaN values skipped, as `f32::max` does), which
/// the quantizer would otherwise compute in a pass of its own.
pub fn rotate_into(src: &[f32], dst: &mut [f32]) -> Option<f32> {
    assert_eq!(src.len(), dst.len(), "rotate_into: lengths differ");
    let s = size(src.len());
    #[cfg(target_arch = "x86_64")]
    if s >= 16 && crate::ops::simd::has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked above); both slices hold k values.
        return Some(unsafe { rotate_avx512(src.as_ptr(), dst.as_mut_ptr(), src.len(), s) });
    }
    dst.copy_from_slice(src);
    if s >= 2 {
        rotate_plain(dst, s);
    }
    None
}

crate::ops::simd::multiversion! {
    /// [`rotate`] written plainly (s >= 2): the definition. Compiled for AVX-512 and AVX2 as
    /// well (the compiler vectorizes the sign flips and the stages of 8 and more; same values).
    pub fn rotate_plain(row: &mut [f32], s: usize) {
        for (c, chunk) in row.chunks_mut(16).enumerate() {
            let flips = flips16(c) as u32;
            for (i, v) in chunk.iter_mut().enumerate() {
                *v = f32::from_bits(v.to_bits() ^ (((flips >> i) & 1) << 31));
            }
        }
        for chunk in row.chunks_exact_mut(s) {
            let mut h = 1;
            while h < s {
                for pair in chunk.chunks_exact_mut(2 * h) {
                    let (a, b) = pair.split_at_mut(h);
                    for (x, y) in a.iter_mut().zip(b) {
                        let (p, q) = (*x, *y);
                        *x = p + q;
                        *y = p - q;
                    }
                }
                h *= 2;
            }
        }
    }
}

/// One butterfly stage within 16 lanes: lanes in `high` (the second of each pair) get
/// partner - own, the others own + partner (`t` holds each lane's partner). As one fused
/// own x (+-1) + partner: the product is exact, so the values are the sum's and the
/// difference's (signed zeros included), in one instruction instead of two.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn stage(v: __m512, t: __m512, high: __mmask16) -> __m512 {
    let signs = _mm512_mask_blend_ps(high, _mm512_set1_ps(1.0), _mm512_set1_ps(-1.0));
    _mm512_fmadd_ps(v, signs, t)
}

/// Vectors of 16 values transformed in registers at a time: chunks of up to 256 values.
#[cfg(target_arch = "x86_64")]
const IN_REGISTERS: usize = 16;

/// [`rotate_plain`] with AVX-512 (s >= 16) from `src` into `p` (n values each; they may be
/// the same), returning max |p|: chunks of min(s, 256) values go through the sign flips and
/// all their stages in registers ([`chunks`]); the stages across larger distances follow in
/// memory, two at a time (four vectors h apart per step), then the last one if their number is
/// odd. Each value goes through the same additions and subtractions as in [`rotate_plain`], in
/// the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rotate_avx512(src: *const f32, p: *mut f32, n: usize, s: usize) -> f32 {
    debug_assert!(s >= 16 && n.is_multiple_of(s));
    let registers = (s / 16).min(IN_REGISTERS);
    let last = s / 16 <= IN_REGISTERS;
    let m = match registers {
        1 => chunks::<1>(src, p, (n, 0), last),
        2 => chunks::<2>(src, p, (n, 0), last),
        4 => chunks::<4>(src, p, (n, 0), last),
        8 => chunks::<8>(src, p, (n, 0), last),
        _ => chunks::<16>(src, p, (n, 0), last),
    };
    if last {
        return _mm512_reduce_max_ps(m);
    }
    // The last pass over memory also takes max |value| of what it writes (no pass of its own).
    let mut h = 16 * IN_REGISTERS;
    let mut m = _mm512_setzero_ps();
    let track = |m: __m512, v: __m512| _mm512_max_ps(_mm512_abs_ps(v), m);
    while 4 * h <= s {
        // Stages h and 2h: (a, b, c, d) at offsets 0, h, 2h, 3h.
        let last = 4 * h == s;
        for base in (0..n).step_by(4 * h) {
            for i in (0..h).step_by(16) {
                let at = [0, h, 2 * h, 3 * h].map(|o| p.add(base + o + i));
                let [a, b, c, d] = at.map(|q| _mm512_loadu_ps(q));
                let (a, b) = (_mm512_add_ps(a, b), _mm512_sub_ps(a, b));
                let (c, d) = (_mm512_add_ps(c, d), _mm512_sub_ps(c, d));
                let out = [
                    _mm512_add_ps(a, c),
                    _mm512_add_ps(b, d),
                    _mm512_sub_ps(a, c),
                    _mm512_sub_ps(b, d),
                ];
                for (q, v) in at.into_iter().zip(out) {
                    _mm512_storeu_ps(q, v);
                    if last {
                        m = track(m, v);
                    }
                }
            }
        }
        h *= 4;
    }
    if h < s {
        for base in (0..n).step_by(2 * h) {
            for i in (0..h).step_by(16) {
                let (x, y) = (p.add(base + i), p.add(base + h + i));
                let (a, b) = (_mm512_loadu_ps(x), _mm512_loadu_ps(y));
                let (sum, difference) = (_mm512_add_ps(a, b), _mm512_sub_ps(a, b));
                _mm512_storeu_ps(x, sum);
                _mm512_storeu_ps(y, difference);
                m = track(track(m, sum), difference);
            }
        }
    }
    _mm512_reduce_max_ps(m)
}

/// Chunks `range` of s values (s = [`size`]`(k)` in 16..=256) of a row of k values at `row`,
/// rotated in place; max |value| of what they became (NaN skipped). Chunk by chunk, the
/// same bits as [`rotate_into`] of the whole row, and the maximum of the parts' maxima is its
/// maximum: a row can be rotated a piece at a time.
///
/// # Safety
/// AVX-512F; `row` holds the chunks' values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn rotate_chunks_avx512(
    row: *mut f32,
    s: usize,
    range: std::ops::Range<usize>,
) -> f32 {
    debug_assert!((16..=16 * IN_REGISTERS).contains(&s) && s.is_power_of_two());
    let (at, n, first) = (range.start * s, range.len() * s, range.start * s / 16);
    let p = row.add(at);
    let m = match s / 16 {
        1 => chunks::<1>(p, p, (n, first), true),
        2 => chunks::<2>(p, p, (n, first), true),
        4 => chunks::<4>(p, p, (n, first), true),
        8 => chunks::<8>(p, p, (n, first), true),
        _ => chunks::<16>(p, p, (n, first), true),
    };
    _mm512_reduce_max_ps(m)
}

/// The sign flips and the stages up to 8 V of each chunk of 16 V values of `src`, in
/// registers, into `p` (n values; `src` starts at the row's 16-value group `first`, whose
/// signs it takes); with `track`, the lanes' max |value| of what was written (NaN skipped).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn chunks<const V: usize>(
    src: *const f32,
    p: *mut f32,
    (n, first): (usize, usize),
    track: bool,
) -> __m512 {
    let sign = _mm512_set1_epi32(i32::MIN);
    let mut m = _mm512_setzero_ps();
    let masks = masks();
    for chunk in 0..n / (16 * V) {
        // The chunk's sign masks first: the vector loop below then has no call in it, so it
        // is unrolled and its array stays in registers (with the table's fallback call inside,
        // it was kept on the stack: three more memory operations per vector).
        let flips: [u16; V] = std::array::from_fn(|i| flips_from(masks, first + chunk * V + i));
        let mut r = [_mm512_setzero_ps(); V];
        for (i, r) in r.iter_mut().enumerate() {
            let c = chunk * V + i;
            let v = _mm512_castps_si512(_mm512_loadu_ps(src.add(16 * c)));
            let mut v = _mm512_castsi512_ps(_mm512_mask_xor_epi32(v, flips[i], v, sign));
            v = stage(v, _mm512_permute_ps::<0b10_11_00_01>(v), 0xAAAA);
            v = stage(v, _mm512_permute_ps::<0b01_00_11_10>(v), 0xCCCC);
            v = stage(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v), 0xF0F0);
            *r = stage(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v), 0xFF00);
        }
        let mut h = 1;
        while h < V {
            for i in 0..V {
                if i & h == 0 {
                    let (a, b) = (r[i], r[i + h]);
                    r[i] = _mm512_add_ps(a, b);
                    r[i + h] = _mm512_sub_ps(a, b);
                }
            }
            h *= 2;
        }
        for (i, v) in r.iter().enumerate() {
            _mm512_storeu_ps(p.add(16 * (chunk * V + i)), *v);
            if track {
                m = _mm512_max_ps(_mm512_abs_ps(*v), m);
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::random_f32 as random;

    #[test]
    fn sizes_are_the_largest_power_of_two_dividing_k() {
        for (k, s) in [
            (0, 1),
            (1, 1),
            (7, 1),
            (6, 2),
            (896, 128),
            (1536, 512),
            (4864, 256),
        ] {
            assert_eq!(size(k), s, "{k}");
        }
        assert_eq!(size(8960), 256);
        assert_eq!(size(2048), 2048);
    }

    #[test]
    fn the_transform_is_s_times_an_orthogonal_map() {
        // H H^T = s I and D D = I: rotating twice gives s times the flipped-twice row, and
        // dot products scale by s.
        for k in [6, 16, 48, 64, 96, 384] {
            let s = size(k) as f64;
            let (a, b) = (random(k, 1, 1.0), random(k, 2, 1.0));
            let (mut ra, mut rb) = (a.clone(), b.clone());
            rotate(&mut ra);
            rotate(&mut rb);
            let dot = |x: &[f32], y: &[f32]| -> f64 {
                x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum()
            };
            let (want, got) = (dot(&a, &b) * s, dot(&ra, &rb));
            assert!(
                (want - got).abs() < 1e-4 * s * k as f64,
                "{k}: {want} vs {got}"
            );
            assert!((dot(&ra, &ra) - s * dot(&a, &a)).abs() < 1e-3 * s * k as f64);
        }
    }

    #[test]
    fn matches_the_hadamard_matrix_written_out() {
        // H[i][j] = (-1)^popcount(i & j) (Sylvester's construction), applied to each chunk of
        // the sign-flipped row, in f64: an independent statement of the definition.
        for k in [12, 48, 640, 896] {
            let s = size(k);
            let x = random(k, 3, 2.0);
            let mut got = x.clone();
            rotate(&mut got);
            for c in 0..k / s {
                for j in 0..s {
                    let want: f64 = (0..s)
                        .map(|i| {
                            let at = c * s + i;
                            let v = if flipped(at) { -x[at] } else { x[at] } as f64;
                            if (i & j).count_ones() % 2 == 1 {
                                -v
                            } else {
                                v
                            }
                        })
                        .sum();
                    let g = got[c * s + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * s as f64,
                        "{k} {j}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_single_large_channel_is_spread_over_its_chunk() {
        let k = 128;
        let mut row = vec![0f32; k];
        row[37] = 100.0;
        rotate(&mut row);
        // Each of the 128 values is +-100.
        assert!(row.iter().all(|v| v.abs() == 100.0), "{row:?}");
        // Hand-checked small case: k = 2, signs (f0, f1): [x0', x1'] = [a + b, a - b].
        let mut two = [3.0f32, 5.0];
        let (a, b) = (
            if flipped(0) { -3.0 } else { 3.0 },
            if flipped(1) { -5.0 } else { 5.0 },
        );
        rotate(&mut two);
        assert_eq!(two, [a + b, a - b]);
    }

    #[test]
    fn a_row_rotated_chunk_by_chunk_is_the_row_rotated_whole() {
        if !crate::ops::simd::has_avx512() {
            eprintln!("no AVX-512 here: the chunk-wise rotation is not tested");
            return;
        }
        // Chunks of 256 (k = 8,960 and 4,864), 128 (4,992), 32 (96), 16 (48), in pieces of
        // one chunk and of several; a NaN, an infinity and a signed zero among the values.
        for (i, k) in [8960, 4864, 4992, 96, 48].into_iter().enumerate() {
            let s = size(k);
            let mut row = random(k, 20 + i as u64, 3.0);
            row[7] = -0.0;
            row[k - 3] = f32::NAN;
            row[k / 2] = f32::INFINITY;
            let mut whole = vec![0f32; k];
            let want = rotate_into(&row, &mut whole).expect("AVX-512");
            for piece in [1, 3] {
                let mut parts = row.clone();
                let mut amax = 0f32;
                let mut c = 0;
                while c < k / s {
                    let end = (c + piece).min(k / s);
                    // SAFETY: AVX-512 (checked above); the row holds every chunk.
                    let m = unsafe { rotate_chunks_avx512(parts.as_mut_ptr(), s, c..end) };
                    amax = amax.max(m);
                    c = end;
                }
                assert_eq!(amax.to_bits(), want.to_bits(), "{k} {piece}");
                for (a, b) in parts.iter().zip(&whole) {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "{k}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_vector_version_gives_the_same_bits() {
        if !crate::ops::simd::has_avx512() {
            eprintln!("no AVX-512 here: the vector rotation is not tested");
            return;
        }
        for (i, k) in [16, 32, 64, 96, 384, 896, 1536, 2048, 4096, 4864]
            .into_iter()
            .enumerate()
        {
            let mut row = random(k, 10 + i as u64, 3.0);
            row[3] = -0.0;
            row[5] = f32::INFINITY;
            let mut plain = row.clone();
            rotate_plain(&mut plain, size(k));
            let mut into = vec![7f32; k];
            let amax = rotate_into(&row, &mut into);
            let want = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(amax, Some(want), "{k}");
            rotate(&mut row);
            for got in [&row, &into] {
                for (a, b) in got.iter().zip(&plain) {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "{k}"
                    );
                }
            }
        }
        // Inputs past the table take their signs from the hash.
        assert_eq!(flips16(TABLE / 16 + 3), compute_flips16(TABLE / 16 + 3));
    }
}
