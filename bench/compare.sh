#!/usr/bin/env bash
# ws2s against PyTorch on this machine: the four training steps of `ws2s bench train`, run
# interleaved (step by step, per workload) with the same number of threads, then a table of
# the ratios ws2s / PyTorch of the median step times. Installs PyTorch and transformers into a
# throwaway venv (bench/.venv) when missing.
#   bench/compare.sh [--steps N] [--warmup N] [--rounds N] [--isa native|avx512|avx2|avxvnni]
# Within a round, both sides warm up alone, then take turns step by step (bench/turns.py); the
# table gives the median of each step's ratio to PyTorch's step of the same turn, with its
# distribution-free 95% interval, beside the ratio of the medians. With --rounds N (default 1)
# every workload is measured N times, ws2s and PyTorch taking turns to go first, and each side's
# time is the median over the rounds: on a shared machine whose speed drifts from minute to
# minute, this keeps the drift from favouring one side.
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
cmd_ws2s() { # workload: the ws2s side's command line (takes turns, step by step)
  printf '%q ' env "${ws2s_env[@]}" RAYON_NUM_THREADS="$threads" "$ws2s" bench train --workload "$1" \
    --steps "$steps" --warmup "$warmup" --turns --json
}
cmd_torch() { # workload: PyTorch's command line (takes turns, step by step)
  printf '%q ' env "${torch_env[@]}" BENCH_THREADS="$threads" "$venv/bin/python" bench/pytorch_step.py \
    --workload "$1" --steps "$steps" --warmup "$warmup" --turns
}
for workload in minilm-full minilm-lora qwen-full qwen-lora; do
  for round in $(seq 1 "$rounds"); do
    echo "running $workload (round $round of $rounds: $steps turns) ..." >&2
    rm -f "$out/round.jsonl"
    # Both sides warm up alone, then take turns step by step (bench/turns.py); who goes first
    # alternates by round.
    if [ $((round % 2)) -eq 1 ]; then
      python3 bench/turns.py "$steps" "$out/round.jsonl" -- "$(cmd_ws2s "$workload")" -- "$(cmd_torch "$workload")"
      sed -n 1p "$out/round.jsonl" >> "$out/ws2s.jsonl"; sed -n 2p "$out/round.jsonl" >> "$out/torch.jsonl"
    else
      python3 bench/turns.py "$steps" "$out/round.jsonl" -- "$(cmd_torch "$workload")" -- "$(cmd_ws2s "$workload")"
      sed -n 1p "$out/round.jsonl" >> "$out/torch.jsonl"; sed -n 2p "$out/round.jsonl" >> "$out/ws2s.jsonl"
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
sys.path.insert(0, "bench")
from turns import median_interval
print(f"{'workload':<12} {'ws2s ms':>9} {'torch ms':>9} {'ratio':>6} {'per step (95% CI)':>22}   (forward / backward / optimizer, ms: ws2s | torch)")
worst = 0.0
for name, runs in ours.items():
    t = theirs[name]
    ratio = median(runs, "step_ms") / median(t, "step_ms")
    worst = max(worst, ratio)
    # Step by step: each ws2s step against PyTorch's step of the same turn.
    pairs = [a / b for r, q in zip(runs, t) for a, b in zip(r["step_runs_ms"], q["step_runs_ms"])]
    med, ci = median_interval(pairs)
    paired = f"{med:.2f} ({ci[0]:.2f}-{ci[1]:.2f}), {len(pairs)}" if ci else f"{med:.2f}, {len(pairs)}"
    parts = lambda rs: " / ".join(f"{median(rs, k):.0f}" for k in ("forward_ms", "backward_ms", "optimizer_ms"))
    print(f"{name:<12} {median(runs, 'step_ms'):>9.0f} {median(t, 'step_ms'):>9.0f} {ratio:>6.2f} {paired:>22}   {parts(runs)} | {parts(t)}")
first = next(iter(ours.values()))
rounds = len(first)
print(f"threads {first[0]['threads']}, torch {next(iter(theirs.values()))[0]['torch']}, median of {first[0]['steps']} steps after warm-up"
      + (f", median over {rounds} rounds" if rounds > 1 else ""))
if sys.argv[3] != "native":
    print(f"instruction sets capped at {sys.argv[3]} on both sides (bench/isa.sh)")
print(f"worst ratio: {worst:.2f}")
PY
