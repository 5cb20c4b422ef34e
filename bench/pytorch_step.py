"""The training steps of `ws2s bench train`, in PyTorch (CPU, eager), for bench/compare.sh.

Same workloads, same shapes, same step: forward, a linear head on pooled hidden states,
cross-entropy against one-hot labels, backward, gradient clipping to norm 1, AdamW.
Prints one JSON object per workload with the median times in milliseconds.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from turns import Cues  # bench/turns.py, beside this script
from transformers import BertConfig, BertModel, Qwen2Config, Qwen2Model

WORKLOADS = ["minilm-full", "minilm-lora", "qwen-full", "qwen-lora"]
MINILM_DIR = os.path.join(os.environ.get("WS2S_HOME", os.path.expanduser("~/.cache/ws2s")), "models", "all-minilm-l6-v2")


class LoRALinear(nn.Module):
    """y = base(x) + scale * x A^T B^T with the base frozen (rank r, alpha / r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.empty(rank, base.in_features).uniform_(-base.in_features ** -0.5, base.in_features ** -0.5))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.a.t() @ self.b.t()) * self.scale


def add_lora(model: nn.Module, targets, rank=8, alpha=16.0):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))


def build(name):
    minilm = name.startswith("minilm")
    if minilm:
        if os.path.isdir(MINILM_DIR):
            model = BertModel.from_pretrained(MINILM_DIR, attn_implementation="eager", add_pooling_layer=False)
        else:
            config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                                vocab_size=30522, attn_implementation="eager")
            model = BertModel(config, add_pooling_layer=False)
        batch, targets = 16, ["query", "value"]
    else:
        config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                             tie_word_embeddings=True, attn_implementation="eager")
        model = Qwen2Model(config)
        batch, targets = 2, ["q_proj", "v_proj"]
    if name.endswith("lora"):
        add_lora(model, targets)
    head = nn.Linear(model.config.hidden_size, 2)
    model.train()
    return model, head, batch, minilm


def bench(name, warmup, steps, turns=False):
    torch.manual_seed(0)
    model, head, batch, minilm = build(name)
    seq = 128
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.tensor([[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(batch)])
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    forward, backward, update = [], [], []
    cues = None
    for step in range(warmup + steps):
        if step == warmup:
            cues = Cues(turns)
        if cues and not cues.wait():
            break
        t0 = time.perf_counter()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = hidden.mean(dim=1) if minilm else hidden[:, -1]
        logits = head(pooled)
        loss = -(labels * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= warmup:
            forward.append((t1 - t0) * 1e3)
            backward.append((t2 - t1) * 1e3)
            update.append((t3 - t2) * 1e3)
            cues.report(t3 - t0)
    if not forward:
        sys.exit("no timed step: the input ended before the first turn")
    total = [f + b + u for f, b, u in zip(forward, backward, update)]
    return {
        "workload": name, "batch": batch, "seq_len": seq,
        "trainable_parameters": sum(p.numel() for p in params),
        "forward_ms": statistics.median(forward), "backward_ms": statistics.median(backward),
        "optimizer_ms": statistics.median(update), "step_ms": statistics.median(total),
        "step_runs_ms": total, "steps": len(total), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="all", choices=["all"] + WORKLOADS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--turns", action="store_true",
                        help="take turns with another program step by step (one workload; as `ws2s bench train --turns`)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    args = parser.parse_args()
    if args.turns and args.workload == "all":
        parser.error("--turns times one workload: name it with --workload")
    torch.set_num_threads(args.threads)
    for name in WORKLOADS if args.workload == "all" else [args.workload]:
        print(json.dumps(bench(name, args.warmup, args.steps, args.turns)), flush=True)


if __name__ == "__main__":
    main()
