//! Products for inference with bf16 dot products (AVX512-BF16 or Intel AMX-BF16 tiles), near
//! f32's accuracy: y = x W^T + b with W
//! rounded to bf16 (lossless for checkpoints stored in bf16, as the HF releases of Qwen2.5,
//! SmolLM2 and Gemma 3 are; GGUF's de-quantized weights lose their last bits) and each
//! activation written as the sum of two bf16 values, hi = bf16(x) and lo = bf16(x - hi), which
//! together keep 16 of f32's 24 significant bits (|x - hi - lo| <= 2^-17 |x|). The tiles
//! multiply bf16 pairs exactly and add in f32, accumulating over all inputs. Greedy
//! continuations of the GGUF decoders agree with f32's on 96-99 of 100 prompts (int8: 44-88;
//! docs/results/inference.md).
//!
//! Definition (the kernel's values agree with it to f32 rounding of the sums, tested):
//!
//!   wb[c, j] = bf16(W[c, j])   (round to nearest, ties to even)
//!   hi[r, j] = bf16(x[r, j]),  lo[r, j] = bf16(x[r, j] - hi[r, j])
//!   y[r, c]  = sum_j hi[r, j] wb[c, j] + sum_j lo[r, j] wb[c, j] + bias[c]
//!
//! Layout. A tile row of activations holds 32 inputs; the 16 rows of a tile are the hi parts
//! of 8 rows of x then their lo parts, so one product gives both sums of 8 rows and a final
//! pass adds row i and row 8 + i. Each activation tile's 1 KB lies together (rows of x laid
//! out row after row made the decoding shapes' products ~15% slower). Weights are packed once
//! into panels of [`NR`] columns: for each pair of inputs, the two bf16 of each column lie
//! together (AMX's B-tile layout), so a tile of 16 columns is 16 rows of 64 bytes with a stride
//! of 128. Each step multiplies 2 tiles of activations (16 rows of x) by 2 of weights (32
//! columns) into 4 accumulator tiles, which are stored only once, after the last input.
//!
//! The tiles are used where the CPU has AMX-BF16 and Linux grants them ([`Kernel::Amx`]).
//! CPUs with AVX512-BF16 but no AMX (AMD Zen 4) read the same layouts with `vdpbf16ps`
//! ([`Kernel::Avx512`]): per pair of inputs, a vector of 16 columns' weight pairs times a row's
//! hi pair and its lo pair, broadcast; it issues as many instructions per product as f32's FMA
//! but reads half the weight bytes, and decoding's products (40 rows) ran 5-30% faster than
//! f32's (one thread, Zen 4). Elsewhere a scalar version of the definition runs (tests; the
//! precision is refused on such CPUs).

use super::aligned::Aligned;
use super::real::operand_values;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Columns per packed weight panel (two tiles of 16).
pub const NR: usize = 32;
/// Inputs per tile step (a bf16 tile row of 64 bytes).
pub const KSTEP: usize = 32;
/// Rows of x per activation tile (their hi parts, then their lo parts).
pub const ROWS_PER_TILE: usize = 8;

/// v rounded to bf16, to nearest with ties to even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// (hi, lo): hi = bf16(v), lo = bf16(v - hi).
#[inline(always)]
pub fn split(v: f32) -> (u16, u16) {
    let hi = to_bf16(v);
    let rest = v - from_bf16(hi);
    (hi, if rest.is_finite() { to_bf16(rest) } else { 0 })
}

/// [`split`] of each value of `src` into `hi` and `lo` (same lengths), with AVX-512 where the
/// CPU has it (the same integer rounding: the same values, tested).
fn split_into(src: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::ops::simd::has_avx512() {
            // SAFETY: the CPU has the features the function was compiled for.
            unsafe { split_avx512(src, hi, lo) };
            return;
        }
    }
    for ((h, l), &v) in hi.iter_mut().zip(lo.iter_mut()).zip(src) {
        (*h, *l) = split(v);
    }
}

/// [`split_into`] with AVX-512: 16 values per step, masked tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_avx512(src: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(hi.len()).min(lo.len());
    // to_bf16 on 16 lanes: (b + 0x7fff + ((b >> 16) & 1)) >> 16, NaN -> (b >> 16) | 0x40.
    let round = |v: __m512| -> __m512i {
        let b = _mm512_castps_si512(v);
        let top = _mm512_srli_epi32::<16>(b);
        let odd = _mm512_and_si512(top, _mm512_set1_epi32(1));
        let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(
            _mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)),
            odd,
        ));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(top, _mm512_set1_epi32(0x40)))
    };
    let inf = _mm512_set1_ps(f32::INFINITY);
    for i in (0..n).step_by(16) {
        let left = n - i;
        let k: __mmask16 = if left >= 16 {
            0xffff
        } else {
            ((1u32 << left) - 1) as __mmask16
        };
        let v = _mm512_maskz_loadu_ps(k, src.as_ptr().add(i));
        let h = round(v);
        let rest = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h)));
        let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(rest), inf);
        let l = _mm512_maskz_mov_epi32(finite, round(rest));
        _mm512_mask_cvtepi32_storeu_epi16(hi.as_mut_ptr().add(i) as *mut _, k, h);
        _mm512_mask_cvtepi32_storeu_epi16(lo.as_mut_ptr().add(i) as *mut _, k, l);
    }
}

/// The kernels of [`matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The definition in plain code (CPUs with neither of the others; tests).
    Scalar,
    /// AVX512-BF16 dot products (`vdpbf16ps`: two bf16 products added to each f32 lane), 8
    /// rows by 32 columns in registers: AMD Zen 4 and Intel CPUs without AMX. As many
    /// instructions per product as f32's FMA, but half the weight bytes; measured on a Zen 4
    /// (one thread, decoding's shapes): 84-107 GFLOP/s against f32's 77-102.
    Avx512,
    /// AMX-BF16 tiles (Intel Xeon 4th generation and later).
    Amx,
}

impl Kernel {
    /// The fastest this CPU has (within `WS2S_MAX_ISA`).
    pub fn detected() -> Kernel {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if super::int8::amx::available_bf16() {
                    return Kernel::Amx;
                }
            }
            if has_avx512_bf16() {
                return Kernel::Avx512;
            }
            Kernel::Scalar
        })
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            Kernel::Avx512 => has_avx512_bf16(),
            Kernel::Amx => Kernel::detected() == Kernel::Amx,
        }
    }

    /// How results name it.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "bf16-scalar",
            Kernel::Avx512 => "avx512-bf16",
            Kernel::Amx => "amx-bf16",
        }
    }
}

/// Whether the CPU has AVX-512 with BF16 dot products (within `WS2S_MAX_ISA`).
fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::has_avx512() && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has a kernel for the precision ([`Kernel::Avx512`] or [`Kernel::Amx`]):
/// where it has none, the precision is refused.
pub fn available() -> bool {
    Kernel::detected() != Kernel::Scalar
}

/// A weight matrix [n, k] in bf16, packed for [`matmul`].
#[derive(Clone)]
pub struct Bf16Weight {
    n: usize,
    k: usize,
    /// k rounded up to a multiple of [`KSTEP`].
    kp: usize,
    /// panels x kp x NR values (from a cache line: whole tile rows).
    data: Aligned<u16>,
}

impl std::fmt::Debug for Bf16Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16Weight[{}, {}]", self.n, self.k)
    }
}

impl Bf16Weight {
    /// Rounds W [n, k] (row-major, as PyTorch's nn.Linear stores it) to bf16 and packs it.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Bf16Weight {
        assert_eq!(
            w.len(),
            n * k,
            "bf16 pack: weight of {} values, not {n} x {k}",
            w.len()
        );
        let kp = k.max(1).next_multiple_of(KSTEP);
        let mut data = Aligned::filled(n.div_ceil(NR) * kp * NR, 0u16);
        data.par_chunks_mut(kp * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + c) * k..(p * NR + c + 1) * k];
                    for (j, &v) in row.iter().enumerate() {
                        panel[Self::at(c, j)] = to_bf16(v);
                    }
                }
            });
        Bf16Weight { n, k, kp, data }
    }

    /// Where wb[c, j] lies within its panel (c < NR).
    #[inline(always)]
    fn at(c: usize, j: usize) -> usize {
        (j / 2) * 2 * NR + c * 2 + j % 2
    }

    /// The shape [n, k] of the weight it packs.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        2 * self.data.len()
    }

    fn panel(&self, p: usize) -> &[u16] {
        &self.data[p * self.kp * NR..(p + 1) * self.kp * NR]
    }

    /// The packed value wb[c, j] as f32 (tests, the reference).
    pub fn value(&self, c: usize, j: usize) -> f32 {
        from_bf16(self.panel(c / NR)[Self::at(c % NR, j)])
    }
}

/// Rows [m, k] split into bf16 hi and lo parts, laid out in activation tiles.
pub struct SplitRows {
    m: usize,
    kp: usize,
    /// tiles x (kp / KSTEP) x 16 rows x KSTEP values: each tile's 1 KB lies together; its rows
    /// are the hi parts of 8 rows of x, then their lo parts (rows past m and inputs past k
    /// are zero). From a cache line: whole tile rows.
    data: Aligned<u16>,
}

impl SplitRows {
    pub fn new(x: &[f32], m: usize, k: usize) -> SplitRows {
        assert_eq!(
            x.len(),
            m * k,
            "bf16 rows: {} values, not {m} x {k}",
            x.len()
        );
        let kp = k.max(1).next_multiple_of(KSTEP);
        let tiles = m.div_ceil(ROWS_PER_TILE);
        let per_tile = 2 * ROWS_PER_TILE * kp;
        // Every value is written below (the split, or zeros for padding): no zeroing pass. The
        // buffer is this thread's last one, reused (fresh pages cost more than the split).
        let mut data = BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
        data.clear();
        data.reserve_total(tiles * per_tile);
        let out = super::real::SharedMut(data.spare_capacity_mut().as_mut_ptr() as *mut u16);
        let fill = |t: usize| {
            // SAFETY: tile t's values are written by this task alone, each exactly once.
            let tile =
                unsafe { std::slice::from_raw_parts_mut(out.ptr().add(t * per_tile), per_tile) };
            for i in 0..ROWS_PER_TILE {
                let r = t * ROWS_PER_TILE + i;
                let row = if r < m {
                    &x[r * k..(r + 1) * k]
                } else {
                    &[][..]
                };
                for s in 0..kp / KSTEP {
                    let at = s * 2 * ROWS_PER_TILE * KSTEP + i * KSTEP;
                    let (hi, lo) = tile[at..].split_at_mut(ROWS_PER_TILE * KSTEP);
                    let part = row.get(s * KSTEP..).unwrap_or(&[]);
                    let part = &part[..part.len().min(KSTEP)];
                    split_into(part, &mut hi[..part.len()], &mut lo[..part.len()]);
                    hi[part.len()..KSTEP].fill(0);
                    lo[part.len()..KSTEP].fill(0);
                }
            }
        };
        if m * k >= 1 << 16 {
            (0..tiles).into_par_iter().for_each(fill);
        } else {
            (0..tiles).for_each(fill);
        }
        // SAFETY: every tile's values were written above.
        unsafe { data.set_len(tiles * per_tile) };
        SplitRows { m, kp, data }
    }

    fn tiles(&self) -> usize {
        self.m.div_ceil(ROWS_PER_TILE)
    }
}

thread_local! {
    /// The activation buffer of this thread's last [`SplitRows`], for the next one.
    static BUFFER: std::cell::RefCell<Aligned<u16>> = const { std::cell::RefCell::new(Aligned::new()) };
}

impl Drop for SplitRows {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        // Buffers up to 64 MB are kept (a decoding step's largest is ~1 MB).
        if data.capacity() <= 32 << 20 {
            BUFFER.with(|b| {
                let mut b = b.borrow_mut();
                if b.capacity() < data.capacity() {
                    *b = data;
                }
            });
        }
    }
}

impl SplitRows {
    /// (hi, lo) of row r, input j, as stored.
    fn parts(&self, r: usize, j: usize) -> (u16, u16) {
        let (t, i) = (r / ROWS_PER_TILE, r % ROWS_PER_TILE);
        let at =
            (t * (self.kp / KSTEP) + j / KSTEP) * 2 * ROWS_PER_TILE * KSTEP + i * KSTEP + j % KSTEP;
        (self.data[at], self.data[at + ROWS_PER_TILE * KSTEP])
    }
}

/// y [m, n] = x W^T + bias per the module's definition, with the fastest kernel this CPU has.
pub fn matmul(x: &SplitRows, w: &Bf16Weight, bias: Option<&[f32]>) -> Vec<f32> {
    matmul_with(Kernel::detected(), x, w, bias)
}

/// [`matmul`] with `kernel` (panics if the CPU lacks it).
pub fn matmul_with(
    kernel: Kernel,
    x: &SplitRows,
    w: &Bf16Weight,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert!(
        kernel.available(),
        "the {} kernel is not available",
        kernel.name()
    );
    assert_eq!(
        x.kp, w.kp,
        "bf16 matmul: inputs of {} and {} values",
        x.kp, w.kp
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            w.n,
            "bf16 matmul: bias of {} values for {} columns",
            b.len(),
            w.n
        );
    }
    let (m, n) = (x.m, w.n);
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    // The tasks write disjoint elements (their own panels' columns).
    let out = super::real::SharedMut(y.spare_capacity_mut().as_mut_ptr() as *mut f32);
    let run = |p: usize| {
        let (cols, bias_panel) = super::real::panel_bias::<NR>(bias, n, p);
        let panel = Panel {
            w: w.panel(p),
            bias: &bias_panel,
            cols,
            col0: p * NR,
            n,
        };
        // SAFETY: the kernel is available (asserted above); the panel's columns are this
        // task's alone, and every row written is below m.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            match kernel {
                Kernel::Amx => return panel.tiles(x, out.ptr()),
                Kernel::Avx512 => {
                    for t in 0..x.tiles() {
                        panel.rows_avx512(x, t, out.ptr());
                    }
                    return;
                }
                Kernel::Scalar => {}
            }
            panel.scalar(x, out.ptr());
        }
    };
    let panels = n.div_ceil(NR);
    if m * x.kp * n >= 1 << 22 {
        (0..panels).into_par_iter().for_each(run);
    } else {
        (0..panels).for_each(run);
    }
    // SAFETY: every row and real column was written by its panel's task.
    unsafe { y.set_len(m * n) };
    y
}

/// One panel of up to NR columns against all rows.
struct Panel<'a> {
    w: &'a [u16],
    bias: &'a [f32; NR],
    cols: usize,
    col0: usize,
    n: usize,
}

impl Panel<'_> {
    /// The definition in scalar code (sums in f32, input by input).
    unsafe fn scalar(&self, x: &SplitRows, y: *mut f32) {
        for r in 0..x.m {
            for c in 0..self.cols {
                let (mut sh, mut sl) = (0f32, 0f32);
                for j in 0..x.kp {
                    let wv = from_bf16(self.w[Bf16Weight::at(c, j)]);
                    let (hi, lo) = x.parts(r, j);
                    sh = from_bf16(hi).mul_add(wv, sh);
                    sl = from_bf16(lo).mul_add(wv, sl);
                }
                *y.add(r * self.n + self.col0 + c) = sh + sl + self.bias[c];
            }
        }
    }

    /// The 8 rows of activation tile t against the panel's 32 columns with AVX512-BF16: for
    /// each pair of inputs, two vectors of the panel (16 columns each, a pair per lane) times
    /// each row's hi pair and lo pair (broadcast), hi and lo products added into the same 16
    /// accumulators (2 per row), then the bias; rows past m are computed (zeros) but not stored.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows_avx512(&self, x: &SplitRows, t: usize, y: *mut f32) {
        use std::arch::x86_64::*;
        let ksteps = x.kp / KSTEP;
        let tile = 2 * ROWS_PER_TILE * KSTEP;
        let a0 = x.data.as_ptr().add(t * ksteps * tile);
        let w0 = self.w.as_ptr();
        let pair = |p: *const u16| -> __m512bh {
            let four = (p as *const i32).read_unaligned();
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(four))
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS_PER_TILE];
        for s in 0..ksteps {
            let a = a0.add(s * tile);
            let w = w0.add(s * KSTEP * NR);
            for p in 0..KSTEP / 2 {
                let wp = w.add(p * 2 * NR);
                let wv = [wp, wp.add(NR)]
                    .map(|q| std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(q as _)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let hi = pair(a.add(i * KSTEP + 2 * p));
                    let lo = pair(a.add((ROWS_PER_TILE + i) * KSTEP + 2 * p));
                    for h in 0..2 {
                        acc[h] = _mm512_dpbf16_ps(acc[h], wv[h], hi);
                        acc[h] = _mm512_dpbf16_ps(acc[h], wv[h], lo);
                    }
                }
            }
        }
        let bias = [
            _mm512_loadu_ps(self.bias.as_ptr()),
            _mm512_loadu_ps(self.bias.as_ptr().add(16)),
        ];
        for (i, acc) in acc.iter().enumerate() {
            let r = t * ROWS_PER_TILE + i;
            if r >= x.m {
                break;
            }
            let out = y.add(r * self.n + self.col0);
            for h in 0..2 {
                let cols = self.cols.saturating_sub(16 * h).min(16);
                let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
                _mm512_mask_storeu_ps(out.add(16 * h), mask, _mm512_add_ps(acc[h], bias[h]));
            }
        }
    }

    /// All rows with the tile kernel: pairs of activation tiles, then a last single one.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tiles(&self, x: &SplitRows, y: *mut f32) {
        use super::int8::amx;
        amx::configure();
        let tiles = x.tiles();
        let mut t = 0;
        while t + 2 <= tiles {
            self.tile_rows::<2>(x, t, y);
            t += 2;
        }
        if t < tiles {
            self.tile_rows::<1>(x, t, y);
        }
        amx::release();
    }

    /// Activation tiles t0..t0+RT (rows 8 t0 .. of x) against the panel's 32 columns: the
    /// products accumulate over all inputs in tmm0-3, stored once at the end, then each row's
    /// hi and lo sums are added with the bias.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_rows<const RT: usize>(&self, x: &SplitRows, t0: usize, y: *mut f32) {
        use std::arch::asm;
        #[repr(C, align(64))]
        struct Sums([[f32; NR]; 32]);
        let rows = (t0 * ROWS_PER_TILE).min(x.m)..((t0 + RT) * ROWS_PER_TILE).min(x.m);
        super::int8::amx::prefetch_output(y, (self.n, self.col0, self.cols), rows);
        let ksteps = x.kp / KSTEP;
        let tile_bytes = 2 * 2 * ROWS_PER_TILE * KSTEP; // 1 KB
        let a0 = (x.data.as_ptr() as *const u8).add(t0 * ksteps * tile_bytes);
        let w0 = self.w.as_ptr() as *const u8;
        let step_bytes = 2 * KSTEP * NR; // a panel's 2 KB per step
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        if RT == 2 {
            asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
        for s in 0..ksteps {
            let a = a0.add(s * tile_bytes);
            let w = w0.add(s * step_bytes);
            asm!(
                "tileloadd tmm4, [{a} + {xs}*1]",
                "tileloadd tmm6, [{w} + {ws}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{w1} + {ws}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a = in(reg) a,
                xs = in(reg) 64usize,
                w = in(reg) w,
                w1 = in(reg) w.add(64),
                ws = in(reg) 4 * NR,
                options(nostack, readonly),
            );
            if RT == 2 {
                asm!(
                    "tileloadd tmm5, [{a1} + {xs}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a1 = in(reg) a.add(ksteps * tile_bytes),
                    xs = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }
        let mut sums = Sums([[0f32; NR]; 32]);
        let c = sums.0.as_mut_ptr() as *mut u8;
        asm!(
            "tilestored [{c} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            c = in(reg) c,
            c1 = in(reg) c.add(64),
            cs = in(reg) 4 * NR,
            options(nostack),
        );
        if RT == 2 {
            asm!(
                "tilestored [{c} + {cs}*1], tmm2",
                "tilestored [{c1} + {cs}*1], tmm3",
                c = in(reg) c.add(16 * 4 * NR),
                c1 = in(reg) c.add(16 * 4 * NR + 64),
                cs = in(reg) 4 * NR,
                options(nostack),
            );
        }
        for t in 0..RT {
            for i in 0..ROWS_PER_TILE {
                let r = (t0 + t) * ROWS_PER_TILE + i;
                if r >= x.m {
                    break;
                }
                let (hi, lo) = (&sums.0[16 * t + i], &sums.0[16 * t + ROWS_PER_TILE + i]);
                let out = y.add(r * self.n + self.col0);
                for c in 0..self.cols {
                    *out.add(c) = hi[c] + lo[c] + self.bias[c];
                }
            }
        }
    }
}

/// x W^T + bias with W in bf16 and x [.., k] split on the fly (inference only: no gradient).
pub fn linear(x: &Tensor, w: &Bf16Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("bf16 linear: a scalar input");
    };
    if k != w.k {
        candle_core::bail!(
            "bf16 linear: input of width {k} for a weight [{}, {}]",
            w.n,
            w.k
        );
    }
    let m = lead.iter().product::<usize>();
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let rows = SplitRows::new(
        operand_values::<f32, _>(&xf.storage_and_layout(), "bf16 linear")?,
        m,
        k,
    );
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let y = matmul(&rows, w, bias.as_deref());
    let mut out = lead.to_vec();
    out.push(w.n);
    Tensor::from_vec(y, out, x.device())?.to_dtype(x.dtype())
}

/// Packs a frozen weight tensor [n, k] (read in place when f32 and contiguous).
pub fn pack_tensor(w: &Tensor) -> Result<Bf16Weight> {
    let (n, k) = w.dims2()?;
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    let guard = w.storage_and_layout();
    Ok(Bf16Weight::pack(
        operand_values::<f32, _>(&guard, "bf16 pack")?,
        n,
        k,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::random_f32 as random;

    #[test]
    fn rounding_to_bf16_is_to_nearest_with_ties_to_even() {
        // Hand-made cases: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 (tie: even, 1);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6 (tie: even, 1 + 2^-6);
        // just above a tie rounds up.
        let cases = [
            (1.0f32, 1.0f32),
            (1.0 + 2f32.powi(-8), 1.0),
            (1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-6)),
            (1.0 + 2f32.powi(-8) + 2f32.powi(-20), 1.0 + 2f32.powi(-7)),
            (
                -(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
                -(1.0 + 2f32.powi(-7)),
            ),
            (0.0, 0.0),
            (f32::INFINITY, f32::INFINITY),
        ];
        for (v, want) in cases {
            assert_eq!(from_bf16(to_bf16(v)), want, "bf16({v})");
        }
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        // Against candle's conversion (the `half` crate) on many values.
        let xs = random(4096, 1, 100.0);
        let theirs = Tensor::new(xs.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (v, t) in xs.iter().zip(theirs) {
            assert_eq!(from_bf16(to_bf16(*v)), t, "bf16({v})");
        }
    }

    #[test]
    fn the_split_keeps_sixteen_bits() {
        for v in random(10_000, 2, 50.0) {
            let (hi, lo) = split(v);
            let back = from_bf16(hi) as f64 + from_bf16(lo) as f64;
            assert!(
                (back - v as f64).abs() <= (v as f64).abs() * 2f64.powi(-17),
                "{v}: {back}"
            );
        }
        assert_eq!(split(0.0), (0, 0));
        assert_eq!(split(f32::INFINITY).1, 0);
    }

    #[test]
    fn the_vector_split_gives_the_scalar_values() {
        let mut xs = random(1000, 3, 1e4);
        xs.extend([
            0.0,
            -0.0,
            1e-40,
            -3e-39,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0 + 2f32.powi(-8),
        ]);
        for len in [xs.len(), 17, 5, 0] {
            let (mut hi, mut lo) = (vec![7u16; len], vec![7u16; len]);
            split_into(&xs[..len], &mut hi, &mut lo);
            for j in 0..len {
                assert_eq!((hi[j], lo[j]), split(xs[j]), "{}", xs[j]);
            }
        }
    }

    /// The definition in f64: sum_j (hi + lo)[r, j] wb[c, j] + bias[c], and the sum of the
    /// terms' magnitudes (the scale of the f32 rounding of the sums).
    fn reference(x: &[f32], w: &Bf16Weight, bias: Option<&[f32]>, m: usize) -> Vec<(f64, f64)> {
        let (n, k) = w.dims();
        let mut y = Vec::with_capacity(m * n);
        for r in 0..m {
            for c in 0..n {
                let (mut s, mut mag) = (bias.map_or(0.0, |b| b[c] as f64), 0f64);
                for j in 0..k {
                    let (hi, lo) = split(x[r * k + j]);
                    let xv = from_bf16(hi) as f64 + from_bf16(lo) as f64;
                    s += xv * w.value(c, j) as f64;
                    mag += (xv * w.value(c, j) as f64).abs();
                }
                y.push((s, mag));
            }
        }
        y
    }

    #[test]
    fn the_kernels_compute_the_definition() {
        // Remainders in rows (not a multiple of 8 or 16), columns (not of 32 or 16) and inputs
        // (not of 32), one row, and one shape large enough for the threads.
        for (i, &(m, k, n)) in [
            (1, 3, 1),
            (7, 70, 45),
            (9, 32, 16),
            (17, 100, 33),
            (40, 200, 300),
            (100, 130, 70),
            (64, 512, 160),
        ]
        .iter()
        .enumerate()
        {
            let mut x = random(m * k, 10 + i as u64, 2.0);
            x[0] = 90.0;
            let w = random(n * k, 20 + i as u64, 0.3);
            let bias = random(n, 30 + i as u64, 1.0);
            let packed = Bf16Weight::pack(&w, n, k);
            let rows = SplitRows::new(&x, m, k);
            let want = reference(&x, &packed, Some(&bias), m);
            for kernel in [Kernel::Scalar, Kernel::Avx512, Kernel::Amx] {
                if !kernel.available() {
                    eprintln!("{} not available here: not tested", kernel.name());
                    continue;
                }
                let got = matmul_with(kernel, &rows, &packed, Some(&bias));
                assert_eq!(got.len(), m * n);
                for (g, (v, mag)) in got.iter().zip(&want) {
                    // f32 sums of k terms: a few units of 2^-24 of the terms' magnitude each.
                    let tol = (k as f64 + 4.0) * 2f64.powi(-23) * mag + 1e-6;
                    assert!(
                        (*g as f64 - v).abs() <= tol,
                        "{m}x{k}x{n} {kernel:?}: {g} vs {v}"
                    );
                }
            }
            // Near f32's product of the bf16 weights: the split loses at most 2^-17 per input.
            let got = matmul(&rows, &packed, Some(&bias));
            for r in 0..m.min(3) {
                for c in 0..n {
                    let exact: f64 = (0..k)
                        .map(|j| x[r * k + j] as f64 * packed.value(c, j) as f64)
                        .sum::<f64>()
                        + bias[c] as f64;
                    let (_, mag) = want[r * n + c];
                    let g = got[r * n + c] as f64;
                    assert!((g - exact).abs() <= 2f64.powi(-15) * mag + 1e-6);
                }
            }
        }
    }

    #[test]
    fn packing_rounds_each_weight_and_pads_with_zeros() {
        let (n, k) = (35, 40);
        let w = random(n * k, 7, 1.0);
        let p = Bf16Weight::pack(&w, n, k);
        for c in 0..n {
            for j in 0..k {
                assert_eq!(p.value(c, j), from_bf16(to_bf16(w[c * k + j])));
            }
            for j in k..p.kp {
                assert_eq!(p.value(c, j), 0.0);
            }
        }
        // Padding columns of the last panel are zero too.
        assert_eq!(p.value(n, 0), 0.0);
    }

    #[test]
    fn zero_rows_or_columns_give_empty_outputs_and_bad_shapes_are_refused() {
        let p = Bf16Weight::pack(&[], 0, 4);
        assert!(matmul(&SplitRows::new(&[0.0; 8], 2, 4), &p, None).is_empty());
        let p = Bf16Weight::pack(&[1.0; 8], 2, 4);
        assert!(matmul(&SplitRows::new(&[], 0, 4), &p, None).is_empty());
        let x = Tensor::zeros((3, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(linear(&x, &p, None).is_err());
    }

    #[test]
    fn linear_keeps_the_leading_dimensions() {
        let dev = candle_core::Device::Cpu;
        let (k, n) = (48, 20);
        let w = random(n * k, 3, 0.5);
        let x = random(2 * 3 * k, 4, 1.0);
        let p = Bf16Weight::pack(&w, n, k);
        let xt = Tensor::from_vec(x.clone(), (2, 3, k), &dev).unwrap();
        let y = linear(&xt, &p, None).unwrap();
        assert_eq!(y.dims(), &[2, 3, n]);
        let flat = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat, matmul(&SplitRows::new(&x, 6, k), &p, None));
    }
}
