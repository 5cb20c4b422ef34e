"""PyTorch (eager) on a GPU, beside `ws2s bench train` and `ws2s bench forward --device cuda`,
for scripts/gpu-check. Random weights of Qwen2.5-0.5B / 1.5B shapes (no checkpoint travels to
the GPU machine). Prints one JSON object per call with the median milliseconds.

  train:   forward, a linear head on the last token, cross-entropy, backward, clipping to
           norm 1, AdamW; `full` (every weight) or `lora` (r 8, alpha 16 on q_proj and v_proj),
           batch 2 x 128 as `ws2s bench train` (qwen-full, qwen-lora). bf16: frozen base in
           bf16, trained weights f32, products under autocast (what ws2s does).
  forward: final hidden states of batch x seq_len random ids, weights in the given type.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2Model

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
}


class Lora(nn.Module):
    """y = base(x) + (alpha / r) x A^T B^T, the base frozen, A and B in f32."""

    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__()
        self.base = base
        bound = base.in_features ** -0.5
        device = base.weight.device
        self.a = nn.Parameter(torch.empty(rank, base.in_features, device=device).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scale = alpha / rank

    def forward(self, x):
        delta = (x.float() @ self.a.t() @ self.b.t()) * self.scale
        return self.base(x) + delta.to(x.dtype)


def model_of(shape, dtype, device):
    config = Qwen2Config(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                         attn_implementation="eager", **SHAPES[shape])
    return Qwen2Model(config).to(device=device, dtype=dtype)


def timed(run, warmup, steps):
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def train(a, device):
    torch.manual_seed(0)
    lora = a.workload == "lora"
    # Full fine-tuning keeps f32 master weights either way; LoRA's frozen base takes the type.
    base_dtype = torch.bfloat16 if (a.dtype == "bf16" and lora) else torch.float32
    model = model_of(a.shape, base_dtype, device)
    if lora:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.layers:
            layer.self_attn.q_proj = Lora(layer.self_attn.q_proj)
            layer.self_attn.v_proj = Lora(layer.self_attn.v_proj)
    head = nn.Linear(model.config.hidden_size, 2, device=device)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len), device=device)
    labels = torch.tensor([[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(a.batch)], device=device)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            hidden = model(input_ids=ids).last_hidden_state[:, -1, :]
            logits = head(hidden.float())
        loss = -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, a.warmup, a.steps)


def forward(a, device):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = model_of(a.shape, dtype, device).eval()
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len), device=device)

    def run():
        with torch.inference_mode():
            float(model(input_ids=ids).last_hidden_state.float().sum())

    return timed(run, a.warmup, a.steps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "forward"])
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--workload", choices=["full", "lora"], default="lora")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    ms = train(a, device) if a.mode == "train" else forward(a, device)
    print(json.dumps({"side": "pytorch", "mode": a.mode, "shape": a.shape, "workload": a.workload,
                      "dtype": a.dtype, "batch": a.batch, "seq_len": a.seq_len, "ms": ms}))


if __name__ == "__main__":
    main()
