//! Process-wide settings for speed: the allocator and the worker threads.
//!
//! Every candle operation allocates its output. With glibc's defaults, large buffers come from
//! fresh `mmap`s (or from heap memory that is trimmed back to the kernel as soon as it is freed),
//! so each step pays a page fault and a page clear per 4 KiB of every activation and gradient:
//! a quarter of a MiniLM training step on this machine (measured with `perf`, `ws2s bench train`).
//! [`tune_allocator`] keeps freed memory in the process for reuse instead.

/// Serves every allocation from the heap (no `mmap`), keeps freed memory there (no trimming;
/// 256 MiB of padding per heap extension). Peak memory is unchanged; memory
/// is returned to the system at exit rather than between steps. A no-op on other platforms.
/// Setting the environment variable `WS2S_DEFAULT_ALLOCATOR` (to anything) keeps glibc's
/// defaults, and its `MALLOC_*_` variables then apply.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("WS2S_DEFAULT_ALLOCATOR").is_none() {
        const MIB: libc::c_int = 1 << 20;
        // SAFETY: mallopt only changes allocator parameters; called before any threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * MIB);
            // No mmap at all: buffers above the threshold (a 0.5B model's embedding gradient,
            // 544 MB) would otherwise be mapped fresh and faulted in page by page each step.
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // -1 is SIZE_MAX once glibc converts it: never trim.
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
            libc::mallopt(libc::M_TOP_PAD, 256 * MIB);
        }
    }
}

/// Allocations of at least this many bytes are advised to use transparent huge pages.
pub const HUGE_PAGE_MIN: usize = 4 << 20;

const HUGE_PAGE: usize = 2 << 20;

/// Allocations of at least this many bytes start on a cache line ([`HugePageAlloc`]).
pub const LINE_ALIGN_MIN: usize = 64 << 10;

/// Bytes per cache line: the alignment of large allocations.
const LINE: usize = 64;

/// The system allocator, with two changes for large buffers (model weights, activations and
/// the outputs of products):
///
/// - every allocation of [`LINE_ALIGN_MIN`] bytes or more starts on a 64-byte cache line
///   (glibc's heap gives 16-byte alignment). The int8 and bf16 kernels write each output row
///   32 columns (128 bytes) at a time; off a line, each such write touches three lines, two of
///   them shared with the neighbouring panels, instead of two whole ones. Products of 1,024
///   rows with the small decoders' shapes (k = 384-896) ran 4-24% faster with the output on a
///   line than 16 bytes past one (both in turn in one process, Intel Xeon with AMX;
///   docs/results/inference.md, session 26); no slower with k = 1,536 or 8,960.
/// - every allocation of [`HUGE_PAGE_MIN`] bytes or more is advised (`madvise(MADV_HUGEPAGE)`,
///   on Linux) to be backed by 2 MiB transparent huge pages where the kernel offers them on
///   request (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise, a common default): with
///   4 KiB pages, loading a 1.5B-parameter model takes millions of page faults.
///
/// The binary installs it (`#[global_allocator]` in main.rs); neither change alters a value.
pub struct HugePageAlloc;

impl HugePageAlloc {
    /// The layout the system allocator is asked for: `layout`, on a cache line when large.
    /// A function of the caller's layout alone, so `dealloc` and `realloc` find the layout
    /// that `alloc` used.
    #[inline]
    fn system_layout(layout: std::alloc::Layout) -> std::alloc::Layout {
        if layout.size() >= LINE_ALIGN_MIN && layout.align() < LINE {
            // A size of at least 64 KiB rounded up to 64 bytes cannot overflow isize.
            std::alloc::Layout::from_size_align(layout.size(), LINE).unwrap_or(layout)
        } else {
            layout
        }
    }

    /// Advises the whole 2 MiB pages inside `[ptr, ptr + size)`.
    #[inline]
    fn advise(ptr: *mut u8, size: usize) {
        #[cfg(target_os = "linux")]
        if size >= HUGE_PAGE_MIN && !ptr.is_null() {
            let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
            let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
            if end > start {
                // SAFETY: the range lies inside a live allocation; MADV_HUGEPAGE changes how
                // pages are backed, never their contents. A failure (no THP) is harmless.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (ptr, size);
    }
}

// SAFETY: every call is forwarded to the system allocator with the caller's layout or the same
// size at a larger alignment (`system_layout`, the same for the allocation and its release);
// `advise` only adds advice.
unsafe impl std::alloc::GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let ptr = std::alloc::System.alloc(Self::system_layout(layout));
        Self::advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() < HUGE_PAGE_MIN {
            return std::alloc::System.alloc_zeroed(Self::system_layout(layout));
        }
        // Advised before it is zeroed: calloc's own memset would fault the pages in as 4 KiB.
        let ptr = std::alloc::System.alloc(Self::system_layout(layout));
        Self::advise(ptr, layout.size());
        if !ptr.is_null() {
            std::ptr::write_bytes(ptr, 0, layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, Self::system_layout(layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let old = Self::system_layout(layout);
        // The caller guarantees that new_size with layout's alignment is a valid layout.
        let wanted = std::alloc::Layout::from_size_align_unchecked(new_size, layout.align());
        let new = Self::system_layout(wanted);
        let moved = if old.align() == new.align() {
            std::alloc::System.realloc(ptr, old, new_size)
        } else {
            // Across the line-alignment threshold: a fresh block, the values copied over.
            let fresh = std::alloc::System.alloc(new);
            if !fresh.is_null() {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                std::alloc::System.dealloc(ptr, old);
            }
            fresh
        };
        Self::advise(moved, new_size);
        moved
    }
}

/// How many times candle's element-wise worker threads spin waiting for the next operation
/// before they sleep, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set (candle's default: 25,000).
pub const CANDLE_SPIN_LIMIT: &str = "1";

/// Keeps candle's own worker threads (its pool for element-wise binary operations, started
/// beside rayon's) from spinning long after each operation: with as many rayon workers as
/// cores, a spinning candle worker takes a core from them. Measured on a 2-core AMD EPYC
/// (Zen 4), `ws2s bench forward` 32 x 32 tokens, int8, 10 paired runs: SmolLM2-135M 8% faster
/// (median ratio 0.92; 1,000 spins were no better than 1), MiniLM-L6 4%; training steps
/// unchanged within noise. Call it before the first candle operation (it sets an environment
/// variable; no threads yet).
pub fn tune_threads() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
}

/// Stack of each rayon worker thread: the command runs on one (see [`on_worker`]), so it gets
/// the main thread's usual 8 MiB rather than rayon's default 2 MiB.
const WORKER_STACK: usize = 8 << 20;

/// Runs `f` on a worker of rayon's global pool (started here, with [`WORKER_STACK`]) and
/// returns its result. Each parallel operation `f` starts then begins on that worker and the
/// other workers steal from it, instead of the main thread handing every operation to the
/// pool and sleeping until it is done (a wake-up and a sleep per operation, thousands per
/// forward pass).
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // An error means the pool was already built (by a library user): use it as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK)
        .build_global();
    // From outside the pool, join injects its closures into the pool and waits: `f` runs on a
    // worker.
    rayon::join(f, || ()).0
}

/// The CPU's model name and its vector extensions that matter for ws2s's kernels, from
/// /proc/cpuinfo (e.g. "Intel(R) Xeon(R) Processor; avx2 avx512f avx512_bf16 avx512_vnni; 2 threads").
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let flags = field("flags").unwrap_or_default();
    let wanted = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "amx_bf16",
        "amx_int8",
    ];
    let present: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| flags.split_whitespace().any(|f| f == *w))
        .collect();
    format!(
        "{model}; {}; {} threads",
        if present.is_empty() {
            "no AVX2".to_string()
        } else {
            present.join(" ")
        },
        rayon::current_num_threads()
    )
}

/// Where tensors live: the `device` config key and the `--device` option ("cpu", "cuda",
/// "cuda:N"). CUDA needs a build with the `cuda` feature (scripts/build-cuda) and a GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceSetting {
    #[default]
    Cpu,
    /// The GPU of this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "cpu" => Ok(DeviceSetting::Cpu),
            "cuda" => Ok(DeviceSetting::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSetting::Cuda)
                .ok_or_else(|| {
                    format!("`{other}` is not a device; expected \"cpu\", \"cuda\" or \"cuda:N\"")
                }),
        }
    }
}

impl std::fmt::Display for DeviceSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            DeviceSetting::Cpu => write!(f, "cpu"),
            DeviceSetting::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether this binary was built with CUDA support.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSetting {
    /// The candle device; an error that says what is missing when CUDA is asked for and this
    /// build has no CUDA, or no GPU answers.
    pub fn device(self) -> anyhow::Result<candle_core::Device> {
        match self {
            DeviceSetting::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSetting::Cuda(n) => {
                if !CUDA_BUILT {
                    anyhow::bail!(
                        "device cuda:{n}: this ws2s was built without CUDA; build the GPU version with scripts/build-cuda (cargo build --release --features cuda)"
                    );
                }
                candle_core::Device::new_cuda(n).map_err(|e| {
                    // candle's message may carry a backtrace: its first line says it all.
                    let why = e.to_string();
                    let why = why.lines().next().unwrap_or_default().trim_end_matches('(');
                    anyhow::anyhow!(
                        "device cuda:{n}: no GPU found ({why}); check that the NVIDIA driver is loaded and that LD_LIBRARY_PATH holds the CUDA libraries (scripts/gpu-check sets it from PyTorch's)"
                    )
                })
            }
        }
    }
}

/// What a device adds to the cache key of a trained stage: nothing on the CPU (keys as before
/// devices existed), "|bf16-gpu" on a GPU, whose frozen bf16 weights give other results.
pub fn stage_key_suffix(device: &candle_core::Device) -> &'static str {
    if device.is_cpu() {
        ""
    } else {
        "|bf16-gpu"
    }
}

/// The number type of frozen weights (feature extraction, scoring, decoding, LoRA bases) on a
/// device: bf16 on a GPU (its tensor cores' type), f32 on the CPU (the fused kernels' type; int8
/// is chosen separately, see `Precision`). Trained parameters stay f32 everywhere.
pub fn frozen_dtype(device: &candle_core::Device) -> candle_core::DType {
    if device.is_cuda() {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn device_settings_parse_and_cuda_is_refused_without_it() {
        assert_eq!("cpu".parse(), Ok(DeviceSetting::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSetting::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSetting::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let err = bad.parse::<DeviceSetting>().unwrap_err();
            assert!(err.contains("cuda:N"), "{err}");
        }
        assert_eq!(DeviceSetting::Cuda(1).to_string(), "cuda:1");
        assert!(DeviceSetting::Cpu.device().unwrap().is_cpu());
        if !CUDA_BUILT {
            let err = DeviceSetting::Cuda(0).device().unwrap_err().to_string();
            assert!(err.contains("built without CUDA"), "{err}");
        }
    }
}

#[cfg(test)]
mod allocator_tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout};

    #[test]
    fn large_blocks_start_on_a_line_and_keep_their_values_across_reallocation() {
        let a = HugePageAlloc;
        let small = LINE_ALIGN_MIN - 4;
        let large = LINE_ALIGN_MIN + 12;
        // SAFETY: every block is used within its size and released with its layout.
        unsafe {
            // f32 layouts (alignment 4): large ones on a line, zeroed ones all zero.
            for zeroed in [false, true] {
                let layout = Layout::from_size_align(large, 4).unwrap();
                let p = if zeroed {
                    a.alloc_zeroed(layout)
                } else {
                    a.alloc(layout)
                };
                assert!(!p.is_null());
                assert_eq!(p as usize % LINE, 0, "zeroed: {zeroed}");
                if zeroed {
                    assert!(std::slice::from_raw_parts(p, large).iter().all(|&b| b == 0));
                }
                a.dealloc(p, layout);
            }
            // Growing from below the threshold to above it and back: the values stay.
            let layout = Layout::from_size_align(small, 4).unwrap();
            let p = a.alloc(layout);
            for i in 0..small {
                *p.add(i) = (i % 251) as u8;
            }
            let q = a.realloc(p, layout, large);
            assert_eq!(q as usize % LINE, 0);
            assert!((0..small).all(|i| *q.add(i) == (i % 251) as u8));
            let grown = Layout::from_size_align(large, 4).unwrap();
            let bigger = a.realloc(q, grown, 4 * large);
            assert_eq!(bigger as usize % LINE, 0);
            assert!((0..small).all(|i| *bigger.add(i) == (i % 251) as u8));
            let r = a.realloc(bigger, Layout::from_size_align(4 * large, 4).unwrap(), 100);
            assert!((0..100).all(|i| *r.add(i) == (i % 251) as u8));
            a.dealloc(r, Layout::from_size_align(100, 4).unwrap());
            // A larger alignment than a line is kept as asked.
            let wide = Layout::from_size_align(large, 4096).unwrap();
            let w = a.alloc(wide);
            assert_eq!(w as usize % 4096, 0);
            a.dealloc(w, wide);
        }
    }
}
