//! The AMX kernel of [`super::matmul`] (Intel AMX-INT8, Sapphire Rapids and later): the
//! integer sums p[r, c] for 32 rows x 32 columns accumulate in four tiles (16 x 16 i32 each)
//! over all inputs, one `tdpbsud` (signed activation bytes x the panel's unsigned weight bytes,
//! 64 inputs deep) per tile and step; then they are stored once and take the float step of
//! the AVX-512 kernel (offset correction, scale), so the results are the same bit for bit.
//! That float step runs while the tiles sum the next 32 rows, and each step's activation
//! lines are asked for two steps ahead: with both, products of 1,024 rows ran 15-25% faster
//! (k x n = 896 x 896, 896 x 4864, 4864 x 896, 1536 x 8960; docs/results/inference.md,
//! session 20).
//!
//! The panel layout of the other kernels is already AMX's B-tile layout: for a group of four
//! inputs, the four bytes of each column lie together, and a group's 32 columns are 128
//! bytes, so a tile of 16 columns is 16 rows of 64 bytes with a stride of 128. Activation
//! rows are padded with zero rows to a multiple of [`ROWS`] ([`super::Int8Rows`]) so every
//! tile load is whole. For products where it pays ([`super::tile_major_pays`]), the kernel
//! reads a copy of the rows laid out tile by tile (each step's 16 rows x 64 bytes in one
//! 1 KB piece, which the hardware prefetchers follow) and asks for no activation lines itself.
//!
//! Rust has no stable AMX intrinsics or target features; the assembler takes the
//! instructions in `asm!` as they are. Linux hands out the tile registers' state only to a
//! process that asks for it (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which
//! [`available`] does once; elsewhere the kernel is not used.

// The epilogue indexes several register arrays by the same row.
#![allow(clippy::needless_range_loop)]

use super::{x86, Rows, Tile, BLOCK, NR};
use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

// Each step is one 64-input tile product.
const _: () = assert!(BLOCK == 64);

/// Rows of a tile: the padding of activation rows.
pub(super) const ROWS: usize = super::PAD_ROWS;

/// Whether the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7), the AVX-512 the epilogue uses
/// (the VNNI kernel's, which also runs the few-row products), the operating system lets this
/// process use the tiles, and `WS2S_MAX_ISA` allows AMX.
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if !(crate::ops::simd::allows(crate::ops::simd::Isa::Amx)
            && super::Kernel::Vnni512.available()
            && std::is_x86_feature_detected!("fma"))
        {
            return false;
        }
        tiles_with(25)
    })
}

/// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7), the AVX-512 the split of the
/// activations uses, the operating system lets this process use the tiles, and `WS2S_MAX_ISA`
/// allows AMX ([`crate::ops::bf16x2`]).
pub(crate) fn available_bf16() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        crate::ops::simd::allows(crate::ops::simd::Isa::Amx)
            && crate::ops::simd::has_avx512()
            && tiles_with(22)
    })
}

/// Whether CPUID leaf 7 reports AMX-TILE (EDX bit 24) and the AMX feature at EDX bit
/// `feature` (25: AMX-INT8, 22: AMX-BF16), and Linux granted the tiles.
fn tiles_with(feature: u32) -> bool {
    let edx = __cpuid_count(7, 0).edx;
    (edx >> 24) & 1 == 1 && (edx >> feature) & 1 == 1 && tiles_granted()
}

/// [`request_tiles`], asked once for the process.
fn tiles_granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(request_tiles)
}

/// Asks Linux for the tile data state (once per process; every thread may then use it).
#[cfg(target_os = "linux")]
fn request_tiles() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl with this request reads and writes no user memory; the syscall
    // instruction clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tiles() -> bool {
    false
}

/// The tile configuration (palette 1): all eight tiles 16 rows of 64 bytes. tmm0-3 hold
/// products (16 x 16 i32), tmm4-5 activations (16 rows x 64 bytes), tmm6-7 weights (16 groups
/// of four inputs x 16 columns).
#[repr(C, align(64))]
struct Config([u8; 64]);

fn config() -> Config {
    let mut c = [0u8; 64];
    c[0] = 1;
    for t in 0..8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = ROWS as u8;
    }
    Config(c)
}

/// The i32 sums for up to 32 rows x 32 columns (row stride 128 bytes).
#[repr(C, align(64))]
struct Products([[i32; NR]; 2 * ROWS]);

/// The sums tmm0-3 set to zero.
#[inline(always)]
unsafe fn zero_sums() {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
}

/// One 64-input step for RT row tiles: the activation and weight tiles loaded, their products
/// added to tmm0-3. Loads and products interleave so that each product starts as soon as its
/// two tiles are in.
#[inline(always)]
unsafe fn step<const RT: usize>(
    a: *const u8,
    (xstride, next): (usize, usize),
    [w, w1]: [*const u8; 2],
) {
    // The first row tile against both column tiles (tmm0, tmm1) ...
    asm!(
        "tileloadd tmm4, [{a} + {xs}*1]",
        "tileloadd tmm6, [{w} + {ws}*1]",
        "tdpbsud tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{w1} + {ws}*1]",
        "tdpbsud tmm1, tmm4, tmm7",
        a = in(reg) a,
        xs = in(reg) xstride,
        w = in(reg) w,
        w1 = in(reg) w1,
        ws = in(reg) NR * 4,
        options(nostack, readonly),
    );
    // ... and the second (tmm2, tmm3) with the same weight tiles.
    if RT == 2 {
        asm!(
            "tileloadd tmm5, [{a1} + {xs}*1]",
            "tdpbsud tmm2, tmm5, tmm6",
            "tdpbsud tmm3, tmm5, tmm7",
            a1 = in(reg) a.add(next),
            xs = in(reg) xstride,
            options(nostack, readonly),
        );
    }
}

/// The sums of RT row tiles stored to `c` (row stride [`NR`] i32).
#[inline(always)]
unsafe fn store_sums<const RT: usize>(c: *mut u8) {
    asm!(
        "tilestored [{c} + {cs}*1], tmm0",
        "tilestored [{c1} + {cs}*1], tmm1",
        cs = in(reg) NR * 4,
        c = in(reg) c,
        c1 = in(reg) c.add(64),
        options(nostack),
    );
    if RT == 2 {
        asm!(
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c3} + {cs}*1], tmm3",
            cs = in(reg) NR * 4,
            c2 = in(reg) c.add(ROWS * NR * 4),
            c3 = in(reg) c.add(ROWS * NR * 4 + 64),
            options(nostack),
        );
    }
}

/// Loads the tile configuration on this thread (before [`amx`]; ~120 ns).
///
/// # Safety
/// [`available`].
pub(crate) unsafe fn configure() {
    let cfg = config();
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
}

/// Gives the tiles back (after the last [`amx`] of a [`configure`]).
///
/// # Safety
/// [`available`].
pub(crate) unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
}

/// Steps ahead at which a row block's activation lines are asked for (`prefetcht0`; rows as
/// they are, not tile by tile): the tile loads otherwise wait for them from L2, one step's
/// tiles after the other.
const AHEAD: usize = 2;

/// Steps ahead at which the first row block of a group asks for the panel's weight lines
/// (`prefetcht0`). That block reads them from memory (the later blocks find them in L2), one
/// tile load after the other without it. Qwen2.5-1.5B's forward 5% faster, Qwen2.5-0.5B 7%
/// (paired runs, Intel Xeon with AMX); 2 steps ahead gave 4% on 1.5B, 12 steps less than 6.
const WEIGHTS_AHEAD: usize = 6;

/// A row block whose sums wait in the panel's sums buffer for their float step.
#[derive(Clone, Copy)]
struct Pending {
    r0: usize,
    rows: usize,
}

/// All rows of the tile (m >= 16), all its columns, 32 rows at a time. The float step of each
/// row block runs while the tiles sum the next one (a share of its rows after each step), so
/// the vector work and the tile work overlap. One buffer is enough: a block's sums are stored
/// after the last of the previous block's rows is finished.
///
/// # Safety
/// [`available`], [`configure`]d on this thread; the activation rows padded to a multiple of
/// [`ROWS`].
#[target_feature(enable = "avx512f,avx512bw,fma")]
pub(super) unsafe fn panel(t: &Tile, x: &Rows, y: *mut f32) {
    panel_beside(t, x, y, &mut ());
}

/// Vector work a product's task does beside its tiles: [`Beside::step`] once after each
/// tile step, so that the vector units work while the tile unit does (the epilogue's float
/// step overlaps the tiles that way too).
pub(super) trait Beside {
    /// Work for one tile step.
    fn step(&mut self);
}

impl Beside for () {
    #[inline(always)]
    fn step(&mut self) {}
}

/// [`panel`] with `beside` stepped once per tile step.
///
/// # Safety
/// As [`panel`].
#[target_feature(enable = "avx512f,avx512bw,fma")]
pub(super) unsafe fn panel_beside<B: Beside>(t: &Tile, x: &Rows, y: *mut f32, beside: &mut B) {
    // Not zeroed first (the compiler made it a memset): the tiles' stores write every sum read.
    let mut buffer = MaybeUninit::<Products>::uninit();
    let sums = buffer.as_mut_ptr() as *mut i32;
    let mut pending: Option<Pending> = None;
    let mut r0 = 0;
    while r0 < x.m {
        let rows = (x.m - r0).min(2 * ROWS);
        if rows > ROWS {
            block::<2, B>(t, x, (r0, rows), y, (pending, sums), beside);
        } else {
            block::<1, B>(t, x, (r0, rows), y, (pending, sums), beside);
        }
        pending = Some(Pending { r0, rows });
        r0 += rows;
    }
    if let Some(p) = pending {
        finish(t, x, (sums, p), 0..p.rows, y);
    }
}

/// Rows r0..r0+rows (rows <= 16 RT; RT = 1 or 2 row tiles): their sums over all inputs into
/// `sums`, with the float step of the `pending` block (whose sums `sums` holds until then)
/// spread over the steps.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn block<const RT: usize, B: Beside>(
    t: &Tile,
    x: &Rows,
    (r0, rows): (usize, usize),
    y: *mut f32,
    (pending, sums): (Option<Pending>, *mut i32),
    beside: &mut B,
) {
    debug_assert!(rows <= RT * ROWS && (r0 + RT * ROWS) * x.kp <= x.q.len());
    let nb = x.blocks();
    // Row by row: step b at b BLOCK bytes, rows kp apart, the second row tile 16 rows down.
    // Tile by tile: row tile r0 / 16's steps of 1 KB each, the next tile's nb KB further.
    let (a0, step_bytes, strides) = match x.tiles {
        None => (x.q.as_ptr(), BLOCK, (x.kp, ROWS * x.kp)),
        Some(t) => (t.as_ptr(), ROWS * BLOCK, (BLOCK, nb * ROWS * BLOCK)),
    };
    let a0 = a0.add(r0 * x.kp);
    zero_sums();
    for b in 0..nb {
        if x.tiles.is_none() && b + AHEAD < nb {
            let at = a0.add((b + AHEAD) * BLOCK);
            for r in 0..RT * ROWS {
                _mm_prefetch::<_MM_HINT_T0>(at.add(r * x.kp));
            }
        }
        if r0 == 0 && b + WEIGHTS_AHEAD < nb {
            // Each half's line of each group of four inputs (a whole panel: all its lines).
            for half in t.halves {
                let wp = half.add((b + WEIGHTS_AHEAD) * BLOCK * NR);
                for group in 0..BLOCK / 4 {
                    _mm_prefetch::<_MM_HINT_T0>(wp.add(4 * NR * group) as *const i8);
                }
            }
        }
        // The output rows' lines asked for in write state a few rows per step (the stores
        // otherwise wait for each line from L3 in turn).
        let ahead = r0 + b * rows / nb..r0 + (b + 1) * rows / nb;
        prefetch_output(y, (t.n, t.col0, t.cols), ahead.clone());
        prefetch_operand(t, ahead);
        step::<RT>(
            a0.add(b * step_bytes) as *const u8,
            strides,
            t.halves.map(|h| h.add(b * BLOCK * NR)),
        );
        if let Some(p) = pending {
            finish(t, x, (sums, p), b * p.rows / nb..(b + 1) * p.rows / nb, y);
        }
        beside.step();
    }
    store_sums::<RT>(sums as *mut u8);
}

/// The float step of rows `part` of a pending block (offset correction, scales, bias), stored.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn finish(
    t: &Tile,
    x: &Rows,
    (sums, p): (*const i32, Pending),
    part: std::ops::Range<usize>,
    y: *mut f32,
) {
    let ws = [
        _mm512_loadu_ps(t.scales.as_ptr()),
        _mm512_loadu_ps(t.scales.as_ptr().add(16)),
    ];
    for i in part {
        let r = p.r0 + i;
        let corr = _mm512_set1_epi32(*x.corr.get_unchecked(r));
        let xs = _mm512_set1_ps(*x.scales.get_unchecked(r));
        let acc: [__m512; 2] = std::array::from_fn(|h| {
            let sum = _mm512_load_si512(sums.add(i * NR + 16 * h) as *const _);
            x86::scaled(_mm512_add_epi32(sum, corr), xs, ws[h])
        });
        x86::store_row(t, acc, r, y);
    }
}

/// Asks for the lines of the tile epilogue's operand (if it has one) at rows `rows`, columns
/// col0..col0 + cols (`prefetcht0`: a hint): read one row at a time at a stride of n values,
/// they otherwise arrive from memory only as the epilogue asks for each.
#[inline(always)]
pub(super) unsafe fn prefetch_operand(t: &Tile, rows: std::ops::Range<usize>) {
    let (super::Epilogue::Add(r) | super::Epilogue::Gated(_, r)) = t.then else {
        return;
    };
    for_each_line(r, (t.n, t.col0, t.cols), rows, |at| {
        _mm_prefetch::<_MM_HINT_T0>(at as *const i8)
    });
}

/// Asks for the lines of rows `rows` of an output [.., n] (row-major), columns col0..col0 +
/// cols, in write state (`prefetchw`: a hint, no fault, no effect on any value). A kernel calls
/// it well before its stores, which otherwise wait for each line from L3 in turn.
#[inline(always)]
pub(crate) unsafe fn prefetch_output(
    y: *mut f32,
    (n, col0, cols): (usize, usize, usize),
    rows: std::ops::Range<usize>,
) {
    for_each_line(
        y,
        (n, col0, cols),
        rows,
        |at| asm!("prefetchw [{}]", in(reg) at, options(nostack, readonly, preserves_flags)),
    );
}

/// `f` on the address of each cache line holding columns col0..col0 + cols of rows `rows` of
/// a row-major [.., n] matrix at `base` (addresses only: nothing is read).
#[inline(always)]
unsafe fn for_each_line(
    base: *const f32,
    (n, col0, cols): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    mut f: impl FnMut(*const u8),
) {
    if cols == 0 {
        return;
    }
    for r in rows {
        let first = base.wrapping_add(r * n + col0) as *const u8;
        let last = first.wrapping_add(4 * cols - 1);
        let mut at = first;
        while (at as usize) >> 6 <= (last as usize) >> 6 {
            f(at);
            at = at.wrapping_add(64);
        }
    }
}
