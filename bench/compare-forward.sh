#!/usr/bin/env bash
# ws2s against PyTorch on this machine, inference: the frozen forward (final hidden states, no
# LM head) of the five models of the demo at the demo's batch shape (32 texts of ~32 tokens:
# SciQ's "Q: .. A: ..\nIs this answer correct?" texts have a median of ~125 characters), and beam
# decoding (Qwen2.5-Coder-0.5B shape, 8 prompts of 24 tokens, beam 5, exactly 40 new tokens, KV
# cache on both sides). PyTorch runs models of the same shapes with random weights (transformers,
# from each model's config) in f32 and in bf16; the faster of the two is PyTorch's time. Sides
# take turns run by run, with the same number of threads: in each round (--rounds) one process per
# side (ws2s, PyTorch f32, PyTorch bf16) warms up alone, then the three run one timed run each in
# turn, --repeats times (bench/turns.py), so that outside load falls on the sides alike and each
# ws2s run pairs with a PyTorch run of the same turn. Each side's time is the median of its runs,
# timed after the same number of untimed warm-up runs on both sides (--warmup, default 3: the
# first forwards of a process are slower on both sides while their memory is faulted in: after
# one warm-up, a 13-14 ms MiniLM forward paid up to 3,200 page faults, 14-17.5 ms, in its first
# three timed runs).
# Installs PyTorch and transformers into a throwaway venv (bench/.venv) when missing.
#   bench/compare-forward.sh [--precision auto|f32|int8|bf16x2] [--repeats N] [--warmup N] [--rounds N]
#                            [--models "a b .."] [--no-decode] [--isa native|avx512|avx2|avxvnni]
# (--models "" measures decoding only; auto: int8 features where the CPU has AVX-512 VNNI,
# bf16x2 decoding where it has AVX512-BF16 or AMX-BF16.)
# --isa avx2 (or avxvnni) times the paths of a CPU without AVX-512 or AMX on this one, --isa
# avx512 those of a CPU with AVX-512 but no AMX, both sides capped (bench/isa.sh says how).
set -euo pipefail
cd "$(dirname "$0")/.."
precision=auto
repeats=3
warmup=3
rounds=1
models="all-minilm-l6-v2 smollm2-135m gemma3-270m qwen2.5-coder-0.5b qwen2.5-coder-1.5b"
decode=1
isa=native
batch=32
seq_len=32
while [ $# -gt 0 ]; do
  case "$1" in
    --precision) precision="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    --no-decode) decode=0; shift ;;
    --isa) isa="$2"; shift 2 ;;
    *) echo "usage: bench/compare-forward.sh [--precision P] [--repeats N] [--warmup N] [--rounds N] [--models \"a b\"] [--no-decode] [--isa native|avx512|avx2|avxvnni]" >&2; exit 2 ;;
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
config_of() {
  "$ws2s" model info "$1" --json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["config"]))' > "$out/$1.json"
}
cmd_ws2s() { # model, bench args...: the ws2s side's command line (takes turns)
  local model="$1"; shift
  printf '%q ' env "${ws2s_env[@]}" RAYON_NUM_THREADS="$threads" "$ws2s" bench "$@" --model "$model" \
    --precision "$precision" --repeats "$repeats" --warmup "$warmup" --turns --json
}
cmd_torch() { # model, dtype, mode args...: a PyTorch side's command line (takes turns)
  local model="$1" dtype="$2"; shift 2
  printf '%q ' env "${torch_env[@]}" BENCH_THREADS="$threads" "$venv/bin/python" bench/pytorch_infer.py \
    --config "$out/$model.json" --dtype "$dtype" --repeats "$repeats" --warmup "$warmup" --turns "$@"
}
measure() { # model, ws2s args (quoted), torch args (quoted)
  local model="$1" wargs="$2" targs="$3"
  for round in $(seq 1 "$rounds"); do
    echo "$model: $wargs (round $round of $rounds: $repeats turns) ..." >&2
    rm -f "$out/round.jsonl"
    # The three sides take turns run by run (bench/turns.py); the first side alternates by round.
    if [ $((round % 2)) -eq 1 ]; then
      python3 bench/turns.py "$repeats" "$out/round.jsonl" -- "$(cmd_ws2s "$model" $wargs)" \
        -- "$(cmd_torch "$model" f32 $targs)" -- "$(cmd_torch "$model" bf16 $targs)"
    else
      python3 bench/turns.py "$repeats" "$out/round.jsonl" -- "$(cmd_torch "$model" bf16 $targs)" \
        -- "$(cmd_torch "$model" f32 $targs)" -- "$(cmd_ws2s "$model" $wargs)"
    fi
    python3 -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    r.setdefault('side', 'ws2s')
    r['name'], r['round'] = sys.argv[2], int(sys.argv[3])
    print(json.dumps(r))" "$out/round.jsonl" "$model" "$round" >> "$out/runs.jsonl"
  done
}
for model in $models; do
  config_of "$model"
  measure "$model" "forward --batch $batch --seq-len $seq_len" "forward --batch $batch --seq-len $seq_len"
done
if [ "$decode" = 1 ]; then
  model=qwen2.5-coder-0.5b
  config_of "$model"
  measure "$model" "decode --prompts 8 --prompt-len 24 --beams 5 --new-tokens 40" \
    "decode --prompts 8 --prompt-len 24 --beams 5 --new-tokens 40"
fi
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_bf16|avx512_vnni|avx_vnni|amx_bf16|amx_int8)$' | tr '\n' ' ')
python3 - "$out/runs.jsonl" "$cpu" "$flags" "$threads" "$isa" "$warmup" <<'PY'
import json, statistics, sys
path, cpu, flags, threads, isa, warmup = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
def key(r):
    return (r["name"], r["workload"])
order = []
for r in rows:
    if key(r) not in order:
        order.append(key(r))
print(f"CPU: {cpu}; flags: {flags}; {threads} threads")
torch_version = next((r["torch"] for r in rows if r.get("side") == "pytorch"), "?")
if isa != "native":
    caps = sorted({r.get("cpu_capability", "?") for r in rows if r.get("side") == "pytorch"})
    if isa == "avx512":
        print("Instruction sets capped at AVX-512 (with VNNI and BF16, no AMX) on both sides "
              "(ws2s: WS2S_MAX_ISA=avx512; PyTorch: ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16; "
              f"ATen reports {', '.join(caps)})")
    else:
        print(f"Instruction sets capped at {isa} on both sides (ws2s: WS2S_MAX_ISA={isa}, gemm built "
              f"without AVX-512; PyTorch: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, "
              f"MKL_ENABLE_INSTRUCTIONS; ATen reports {', '.join(caps)})")
print(f"PyTorch {torch_version}; times are medians over runs (and rounds), each side after {warmup} untimed runs; ratio = ws2s time / PyTorch's best time; "
      "per round: the same ratio from each round's runs alone (sides run in turn within a round), lowest-highest; "
      "per turn: the median of the ratios of each ws2s run to the same turn's run of PyTorch's faster dtype "
      "(the sides take turns run by run: bench/turns.py), with its distribution-free 95% interval\n")
print("| model | workload | ws2s (precision, kernel) tok/s | CPU busy | PyTorch f32 tok/s | PyTorch bf16 tok/s | ratio | per round | per turn (95% CI), turns |")
print("|---|---|---|---|---|---|---|---|---|")
sys.path.insert(0, "bench")
from turns import median_interval
# Per kind of workload measured (forward, decode): a kind not measured prints no line.
worst, highest, highest_upper = {}, {}, {}
for k in order:
    group = [r for r in rows if key(r) == k]
    def side(pred):
        sel = [r for r in group if pred(r)]
        if not sel:
            return None, None, None
        t = statistics.median([x for r in sel for x in r["runs"]])
        util = statistics.mean(r["cpu_utilisation"] for r in sel)
        return t, sel[0], util
    w, wr, wu = side(lambda r: r.get("side") == "ws2s")
    f, _, fu = side(lambda r: r.get("side") == "pytorch" and r["dtype"] == "f32")
    b, _, bu = side(lambda r: r.get("side") == "pytorch" and r["dtype"] == "bf16")
    tokens = group[0]["tokens"]
    best = min(t for t in (f, b) if t is not None)
    ratio = w / best
    # The ratio within each round: the machine's speed drifts between rounds more than
    # between the sides of one round.
    per_round = []
    for rnd in sorted({r["round"] for r in group}):
        def round_median(pred):
            times = [x for r in group if r["round"] == rnd and pred(r) for x in r["runs"]]
            return statistics.median(times) if times else None
        rw = round_median(lambda r: r.get("side") == "ws2s")
        rt = [t for t in (round_median(lambda r: r.get("side") == "pytorch" and r["dtype"] == d) for d in ("f32", "bf16")) if t is not None]
        if rw is not None and rt:
            per_round.append(rw / min(rt))
    spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if len(per_round) > 1 else "-"
    kind = "decode" if k[1].startswith("decode") else "forward"
    # Turn by turn: each ws2s run against the same turn's run of PyTorch's faster dtype.
    best_dtype = "f32" if b is None or (f is not None and f < b) else "bf16"
    per_turn = []
    for rnd in sorted({r["round"] for r in group}):
        ours = [r for r in group if r["round"] == rnd and r.get("side") == "ws2s"]
        theirs = [r for r in group if r["round"] == rnd and r.get("side") == "pytorch" and r["dtype"] == best_dtype]
        if ours and theirs:
            per_turn += [x / y for x, y in zip(ours[0]["runs"], theirs[0]["runs"])]
    turn_median, turn_ci = median_interval(per_turn)
    interval = f"{turn_median:.2f} ({turn_ci[0]:.2f}-{turn_ci[1]:.2f}), {len(per_turn)}" if turn_ci else f"{turn_median:.2f}, {len(per_turn)}"
    highest_upper[kind] = max(highest_upper.get(kind, 0.0), turn_ci[1] if turn_ci else turn_median)
    worst[kind] = max(worst.get(kind, 0.0), ratio)
    highest[kind] = max(highest.get(kind, 0.0), max(per_round, default=ratio))
    print(f"| {k[0]} | {k[1]} | {tokens / w:.0f} ({wr['precision']}, {wr['kernel']}) | {100 * wu:.0f}% (PyTorch {100 * min(fu, bu):.0f}-{100 * max(fu, bu):.0f}%) | {tokens / f:.0f} | {tokens / b:.0f} | {ratio:.2f} | {spread} | {interval} |")
print()
if "forward" in worst:
    print(f"highest forward ratio of any round: {highest['forward']:.2f}")
    print(f"highest upper 95% bound of a forward's per-turn ratio: {highest_upper['forward']:.2f}")
for kind in ("forward", "decode"):
    if kind in worst:
        print(f"worst {kind} ratio: {worst[kind]:.2f}")
print(f"worst ratio: {max(worst.values()):.2f}")
PY
