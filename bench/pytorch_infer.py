"""PyTorch side of bench/compare-forward.sh: the same inference workloads as `ws2s bench
forward` and `ws2s bench decode`, on a model of the same shape with random weights (built from
its config.json with transformers), in f32 or bf16. Prints one JSON object.

  pytorch_infer.py --config CONFIG.json --dtype f32|bf16 forward --batch 32 --seq-len 24
  pytorch_infer.py --config CONFIG.json --dtype f32|bf16 decode --prompts 8 --prompt-len 24 \
      --beams 5 --new-tokens 40
  (--repeats N --warmup N before the mode; --turns: run by run on cue, see timed())
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import transformers

from turns import Cues  # bench/turns.py, beside this script


def cpu_seconds():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def timed(warmup, repeats, run, turns=False):
    """run() warmup times, then repeats times timed: (times, median, share of the threads' CPU
    time busy during the timed runs). With turns, as `ws2s bench --turns`: `ready` on stderr
    after the warm-up, then each timed run waits for a line on stdin and reports `turn SECONDS`
    on stderr; the runs end early where stdin ends."""
    for _ in range(max(1, warmup)):
        run()
    cues = Cues(turns)
    times, busy_s = [], 0.0
    for _ in range(max(1, repeats)):
        if not cues.wait():
            break
        cpu0 = cpu_seconds()
        start = time.perf_counter()
        run()
        t = time.perf_counter() - start
        busy_s += cpu_seconds() - cpu0
        times.append(t)
        cues.report(t)
    if not times:
        sys.exit("no timed run: the input ended before the first turn")
    return times, statistics.median(times), busy_s / sum(times) / torch.get_num_threads()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (at least one)")
    p.add_argument("--turns", action="store_true",
                   help="take turns with another program run by run (as `ws2s bench --turns`)")
    sub = p.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("forward")
    f.add_argument("--batch", type=int, default=32)
    f.add_argument("--seq-len", type=int, default=24)
    d = sub.add_parser("decode")
    d.add_argument("--prompts", type=int, default=8)
    d.add_argument("--prompt-len", type=int, default=24)
    d.add_argument("--beams", type=int, default=5)
    d.add_argument("--new-tokens", type=int, default=40)
    a = p.parse_args()

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    config = transformers.AutoConfig.for_model(**json.load(open(a.config)))
    load0 = time.perf_counter()
    cls = transformers.AutoModel if a.mode == "forward" else transformers.AutoModelForCausalLM
    model = cls.from_config(config, dtype=dtype).eval()
    load_s = time.perf_counter() - load0
    vocab = config.vocab_size
    g = torch.Generator().manual_seed(0)
    if a.mode == "forward":
        ids = torch.randint(0, vocab, (a.batch, a.seq_len), generator=g)
        mask = torch.ones_like(ids)

        def run():
            with torch.inference_mode():
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                float(h.float().sum())

        tokens = a.batch * a.seq_len
        workload = f"forward {a.batch}x{a.seq_len}"
    else:
        ids = torch.randint(0, vocab, (a.prompts, a.prompt_len), generator=g)
        mask = torch.ones_like(ids)

        def run():
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    num_beams=a.beams,
                    num_return_sequences=1,
                    do_sample=False,
                    max_new_tokens=a.new_tokens,
                    min_new_tokens=a.new_tokens,
                    use_cache=True,
                    early_stopping=False,
                    pad_token_id=0,
                )
                assert out.shape[1] == a.prompt_len + a.new_tokens, out.shape

        tokens = a.prompts * a.new_tokens
        workload = f"decode {a.prompts}x{a.prompt_len} beam {a.beams} +{a.new_tokens}"
    runs, med, util = timed(a.warmup, a.repeats, run, a.turns)
    print(json.dumps({
        "side": "pytorch",
        "dtype": a.dtype,
        "workload": workload,
        "tokens": tokens,
        "median_s": med,
        "runs": runs,
        "warmup": max(1, a.warmup),
        "tokens_per_s": tokens / med,
        "cpu_utilisation": util,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # ATen's kernel level (ATEN_CPU_CAPABILITY caps it), to show what ran.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }))


if __name__ == "__main__":
    main()
