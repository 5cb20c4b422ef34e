#!/usr/bin/env bash
# ws2s against PyTorch on this machine: the four training steps of `ws2s bench train`, run
# interleaved (ws2s, then PyTorch, per workload) with the same number of threads, then a table of
# the ratios ws2s / PyTorch of the median step times. Installs PyTorch and transformers into a
# throwaway venv (bench/.venv) when missing.
#   bench/compare.sh [--steps N] [--warmup N]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=5
warmup=2
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    *) echo "usage: bench/compare.sh [--steps N] [--warmup N]" >&2; exit 2 ;;
  esac
done
threads="${BENCH_THREADS:-$(nproc)}"
venv=bench/.venv
if ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
  echo "installing PyTorch and transformers into $venv (once)..." >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers
fi
cargo build --release --quiet
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for workload in minilm-full minilm-lora qwen-full qwen-lora; do
  echo "running $workload ..." >&2
  RAYON_NUM_THREADS="$threads" ./target/release/ws2s bench train --workload "$workload" \
    --steps "$steps" --warmup "$warmup" --json >> "$out/ws2s.jsonl"
  BENCH_THREADS="$threads" "$venv/bin/python" bench/pytorch_step.py --workload "$workload" \
    --steps "$steps" --warmup "$warmup" >> "$out/torch.jsonl"
done
python3 - "$out/ws2s.jsonl" "$out/torch.jsonl" <<'PY'
import json, sys
ours = [json.loads(l) for l in open(sys.argv[1])]
theirs = {r["workload"]: r for r in (json.loads(l) for l in open(sys.argv[2]))}
print(f"{'workload':<12} {'ws2s ms':>9} {'torch ms':>9} {'ratio':>6}   (forward / backward / optimizer, ms: ws2s | torch)")
worst = 0.0
for r in ours:
    t = theirs[r["workload"]]
    ratio = r["step_ms"] / t["step_ms"]
    worst = max(worst, ratio)
    print(f"{r['workload']:<12} {r['step_ms']:>9.0f} {t['step_ms']:>9.0f} {ratio:>6.2f}   "
          f"{r['forward_ms']:.0f} / {r['backward_ms']:.0f} / {r['optimizer_ms']:.0f} | "
          f"{t['forward_ms']:.0f} / {t['backward_ms']:.0f} / {t['optimizer_ms']:.0f}")
print(f"threads {ours[0]['threads']}, torch {list(theirs.values())[0]['torch']}, median of {ours[0]['steps']} steps after warm-up")
print(f"worst ratio: {worst:.2f}")
PY
