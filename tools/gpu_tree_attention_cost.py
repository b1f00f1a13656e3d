"""What the PyTorch stand-in of FlashAttention 3 (fastgrpo.bench_server.varlen_attention) costs TRL's
AsyncGRPOTrainer per optimizer step, at the recipe's shapes on the benchmark model (Qwen2-0.5B: 24 layers, 14 query
heads, 2 KV heads, head dim 64, bf16). Its tree attention packs a prompt and its 8 completions into one row: a
prompt segment (P queries, P keys) and 8 completion segments (512 queries, P + 512 keys each), one varlen call per
layer; a step is 16 such rows, and with TRL's default gradient checkpointing each layer runs forward twice (once
without grad, once recomputed) and backward once. Prints the seconds per step that attention alone takes: an upper
bound on what a faster kernel could save TRL.

    python tools/gpu_tree_attention_cost.py [PROMPT_TOKENS]      # default 112 (TRL's forwarded_tokens_mean 624 - 512)
"""

import json
import sys
import time

import torch

from fastgrpo.bench_server import varlen_attention

P = int(sys.argv[1]) if len(sys.argv) > 1 else 112
G, L, LAYERS, ROWS, H, HKV, D = 8, 512, 24, 16, 14, 2, 64
dev = torch.device("cuda")
q_lens, k_lens = [P] + [L] * G, [P] + [P + L] * G
cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=dev)
cu_k = torch.tensor([0] + list(torch.tensor(k_lens).cumsum(0)), dtype=torch.int32, device=dev)
total_q, total_k = sum(q_lens), sum(k_lens)


def layer(q, k, v):
    return varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), softmax_scale=D ** -0.5, causal=True)


def step() -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(ROWS):
        qs = [torch.randn(total_q, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(LAYERS)]
        kv = [(torch.randn(total_k, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True),
               torch.randn(total_k, HKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)) for _ in range(LAYERS)]
        with torch.no_grad():  # the checkpointed forward
            for q, (k, v) in zip(qs, kv):
                layer(q, k, v)
        outs = [layer(q, k, v) for q, (k, v) in zip(qs, kv)]  # the recomputed forward, then backward
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    torch.cuda.synchronize()
    return time.perf_counter() - t


def inputs_only() -> float:  # the random inputs' cost, subtracted
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(ROWS):
        for _ in range(LAYERS):
            torch.randn(total_q, H, D, device=dev, dtype=torch.bfloat16)
            torch.randn(total_k, HKV, D, device=dev, dtype=torch.bfloat16)
            torch.randn(total_k, HKV, D, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    return time.perf_counter() - t


step()  # warm-up
runs = sorted(step() for _ in range(3))
base = min(inputs_only() for _ in range(3))
print(json.dumps({"prompt_tokens": P, "row_tokens": total_q, "rows_per_step": ROWS, "layers": LAYERS,
                  "attention_s_per_step": round(runs[1] - base, 3), "runs_s": [round(r, 3) for r in runs],
                  "random_inputs_s": round(base, 3), "device": torch.cuda.get_device_name()}))
