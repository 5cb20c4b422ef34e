#!/usr/bin/env bash
# ws2s against PyTorch on this machine: the four training steps of `ws2s bench train`, run
# interleaved (ws2s, then PyTorch, per workload) with the same number of threads, then a table of
# the ratios ws2s / PyTorch of the median step times. Installs PyTorch and transformers into a
# throwaway venv (bench/.venv) when missing.
#   bench/compare.sh [--steps N] [--warmup N] [--rounds N] [--isa native|avx512|avx2|avxvnni]
# With --rounds N (default 1) every workload is measured N times, ws2s and PyTorch taking turns
# to go first, and each side's time is the median over the rounds: on a shared machine whose
# speed drifts from minute to minute, this keeps the drift from favouring one side.
# --isa avx2 (or avxvnni) times the paths of a CPU without AVX-512 or AMX on this one, --isa
# avx512 those of a CPU with AVX-512 but no AMX, both sides capped (bench/isa.sh says how).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=5
warmup=2
rounds=1
isa=native
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --isa) isa="$2"; shift 2 ;;
    *) echo "usage: bench/compare.sh [--steps N] [--warmup N] [--rounds N] [--isa native|avx512|avx2|avxvnni]" >&2; exit 2 ;;
  esac
done
threads="${BENCH_THREADS:-$(nproc)}"
venv=bench/.venv
if ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
  echo "installing PyTorch and transformers into $venv (once)..." >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers
fi
source bench/isa.sh
select_isa "$isa"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run_ws2s() {
  env "${ws2s_env[@]}" RAYON_NUM_THREADS="$threads" "$ws2s" bench train --workload "$1" \
    --steps "$steps" --warmup "$warmup" --json >> "$out/ws2s.jsonl"
}
run_torch() {
  env "${torch_env[@]}" BENCH_THREADS="$threads" "$venv/bin/python" bench/pytorch_step.py --workload "$1" \
    --steps "$steps" --warmup "$warmup" >> "$out/torch.jsonl"
}
for workload in minilm-full minilm-lora qwen-full qwen-lora; do
  for round in $(seq 1 "$rounds"); do
    echo "running $workload (round $round of $rounds) ..." >&2
    if [ $((round % 2)) -eq 1 ]; then
      run_ws2s "$workload"; run_torch "$workload"
    else
      run_torch "$workload"; run_ws2s "$workload"
    fi
  done
done
python3 - "$out/ws2s.jsonl" "$out/torch.jsonl" "$isa" <<'PY'
import json, statistics, sys

def by_workload(path):
    runs = {}
    for line in open(path):
        r = json.loads(line)
        runs.setdefault(r["workload"], []).append(r)
    return runs

def median(runs, key):
    return statistics.median(r[key] for r in runs)

ours, theirs = by_workload(sys.argv[1]), by_workload(sys.argv[2])
print(f"{'workload':<12} {'ws2s ms':>9} {'torch ms':>9} {'ratio':>6}   (forward / backward / optimizer, ms: ws2s | torch)")
worst = 0.0
for name, runs in ours.items():
    t = theirs[name]
    ratio = median(runs, "step_ms") / median(t, "step_ms")
    worst = max(worst, ratio)
    parts = lambda rs: " / ".join(f"{median(rs, k):.0f}" for k in ("forward_ms", "backward_ms", "optimizer_ms"))
    print(f"{name:<12} {median(runs, 'step_ms'):>9.0f} {median(t, 'step_ms'):>9.0f} {ratio:>6.2f}   {parts(runs)} | {parts(t)}")
first = next(iter(ours.values()))
rounds = len(first)
print(f"threads {first[0]['threads']}, torch {next(iter(theirs.values()))[0]['torch']}, median of {first[0]['steps']} steps after warm-up"
      + (f", median over {rounds} rounds" if rounds > 1 else ""))
if sys.argv[3] != "native":
    print(f"instruction sets capped at {sys.argv[3]} on both sides (bench/isa.sh)")
print(f"worst ratio: {worst:.2f}")
PY
