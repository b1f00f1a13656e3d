"""Time pushing the FULL weights of a model to a `fastgrpo vllm-serve` server over NCCL (issue 7: < 0.3 s for 0.5B).

    SERVER_GPUS=1 CUDA_VISIBLE_DEVICES=0 python tools/gpu_sync_full.py /tmp/assets/model OUT_DIR

Starts the server on SERVER_GPUS, loads the model in bf16 on this process's GPU, and pushes every tensor with
VLLMServerGenerator.update_weights (the path full fine-tuning takes) several times. Checks that the weights
arrive: greedy tokens after pushing the unchanged weights equal the server's own; after pushing perturbed weights
they differ; after pushing the originals back they are equal again. Then times the server generating one recipe
step's tokens through the same client (16 prompts of 200 tokens x n=8 x 512 tokens, ignore_eos), as the trainer
asks for them. Prints one JSON line.
"""

import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from fastgrpo import GRPOConfig
from fastgrpo.bench_server import serving
from fastgrpo.rollout.base import SamplingParams
from fastgrpo.rollout.vllm_client import VLLMServerGenerator

model_path, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
spec = dict(framework="fastgrpo", model=model_path, out_dir=out, server_gpus=os.environ.get("SERVER_GPUS", "1"),
            server_gpu_memory_utilization=0.3)
with serving(spec, 1024) as (port, group_port, ready_s):
    cfg = GRPOConfig(output_dir=out, use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1",
                     vllm_server_port=port, vllm_group_port=group_port, bf16=True, report_to="none")
    gen = VLLMServerGenerator(cfg, rank=0, world_size=1)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda()
    greedy = SamplingParams(n=1, max_tokens=32, temperature=0.0)
    prompts = [[9707, 11, 1879, 0, 785, 1156], [3838, 374, 220, 17, 10, 17, 30]]
    before = gen.generate(prompts, greedy).completion_ids
    times, names = [], sum(1 for _ in model.state_dict())
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        gen.update_weights(model)
        times.append(time.perf_counter() - t)
    same = gen.generate(prompts, greedy).completion_ids
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    gen.update_weights(model)
    perturbed = gen.generate(prompts, greedy).completion_ids
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    gen.update_weights(model)
    restored = gen.generate(prompts, greedy).completion_ids
    rng = torch.Generator().manual_seed(0)
    step_prompts = [torch.randint(100, 150000, (200,), generator=rng).tolist() for _ in range(16)]
    gen_times = []
    for seed in (None, None, None, 0, 0):
        t = time.perf_counter()
        g = gen.generate(step_prompts, SamplingParams(n=8, max_tokens=512, seed=seed, extra={"ignore_eos": True}))
        gen_times.append(round(time.perf_counter() - t, 3))
    tokens = sum(map(len, g.completion_ids))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"server_ready_s": round(ready_s, 1), "tensors": names, "gib": round(nbytes / 2**30, 3),
              "first_push_s (includes NCCL set-up)": round(times[0], 3),
              "push_s (median of 5 after the first)": round(statistics.median(times[1:]), 4),
              "push_s_all": [round(x, 4) for x in times], "unchanged_push_keeps_greedy": same == before,
              "perturbed_push_changes_greedy": perturbed != before, "restored_push_restores_greedy": restored == before,
              "generator_stats": gen.stats(), "server_generate_s (unseeded x3, seeded x2)": gen_times,
              "tokens_per_generate": tokens}
    gen.close()
print("SYNC_FULL " + json.dumps(result), flush=True)
os._exit(0)
