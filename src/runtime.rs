//! Process-wide settings for training speed.
//!
//! Every candle operation allocates its output. With glibc's defaults, large buffers come from
//! fresh `mmap`s (or from heap memory that is trimmed back to the kernel as soon as it is freed),
//! so each step pays a page fault and a page clear per 4 KiB of every activation and gradient:
//! a quarter of a MiniLM training step on this machine (measured with `perf`, `ws2s bench train`).
//! [`tune_allocator`] keeps freed memory in the process for reuse instead.

/// Raises glibc's mmap threshold to its maximum (32 MiB on 64-bit) and keeps freed memory in the
/// heap (no trimming; 256 MiB of padding per heap extension). Peak memory is unchanged; memory
/// is returned to the system at exit rather than between steps. A no-op on other platforms.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MIB: libc::c_int = 1 << 20;
        // SAFETY: mallopt only changes allocator parameters; called before any threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * MIB);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 * MIB);
        }
    }
}
