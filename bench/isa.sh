# Sourced by bench/compare*.sh: `select_isa ISA` builds ws2s and sets `ws2s` (the binary),
# `ws2s_env` and `torch_env` (arrays of VAR=value for `env`) for the instruction sets to time.
#   native: everything this CPU has, on both sides.
#   avx2:   the paths of a CPU without AVX-512 or AMX, on this one. ws2s is built without gemm's
#           AVX-512 kernels (--no-default-features, in target/avx2) and run with WS2S_MAX_ISA=avx2;
#           PyTorch runs with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and
#           MKL_ENABLE_INSTRUCTIONS=AVX2. Same cores and caches: the instruction sets' effect,
#           not another machine's.
#   avx512: AVX-512 with its VNNI and BF16 but no AMX, on both sides (the class of CPU the issue was
#           filed on: AMD Zen 4, Intel Cooper Lake): ws2s with WS2S_MAX_ISA=avx512, PyTorch with
#           ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (its bf16 products on AVX512-BF16 instead of AMX;
#           MKL's f32 uses no AMX anyway). On an Intel Xeon with AMX, PyTorch's bf16 under that
#           cap was slower than its f32 (oneDNN's avx512_core_bf16 matmul), unlike on an AMD Zen 4
#           where its bf16 ran ~2x its f32: the cap times ws2s's paths for such CPUs on these
#           cores, not a Zen 4's ratio (docs/results/inference.md, session 29).
#   avxvnni: the same as avx2 with AVX-VNNI allowed (CPUs with AVX2 and 256-bit integer dot products but
#           no AVX-512: Intel Core 12th generation and later, Xeon 6 E-cores): WS2S_MAX_ISA=avxvnni,
#           ONEDNN_MAX_CPU_ISA=AVX2_VNNI.
select_isa() {
  case "$1" in
    native)
      cargo build --release --quiet
      ws2s=./target/release/ws2s
      ws2s_env=()
      torch_env=() ;;
    avx512)
      cargo build --release --quiet
      ws2s=./target/release/ws2s
      ws2s_env=(WS2S_MAX_ISA=avx512)
      torch_env=(ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) ;;
    avx2|avxvnni)
      echo "building ws2s without gemm's AVX-512 kernels into target/avx2 (once) ..." >&2
      cargo build --release --quiet --no-default-features --target-dir target/avx2
      ws2s=./target/avx2/release/ws2s
      ws2s_env=(WS2S_MAX_ISA="$1")
      local onednn=AVX2
      if [ "$1" = avxvnni ]; then onednn=AVX2_VNNI; fi
      torch_env=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=$onednn MKL_ENABLE_INSTRUCTIONS=AVX2) ;;
    *) echo "--isa: native, avx512, avx2 or avxvnni, not $1" >&2; exit 2 ;;
  esac
}
