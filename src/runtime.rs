//! Process-wide settings for training speed.
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
