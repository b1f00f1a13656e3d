"""Time one recipe step's generation (128 prompts x 512 tokens: 16 requests of n=8, ignore_eos) through a running
`fastgrpo vllm-serve` server, alternating its compact route and vLLM's /inference/v1/generate, with the trainer's
client. Prints one JSON line per round and a summary.

    python tools/gpu_server_gen.py PORT PROMPTS.jsonl [ROUNDS]     # PROMPTS: the bench's train.jsonl
"""

import json
import statistics
import sys
import time

from transformers import AutoTokenizer

from fastgrpo.config import GRPOConfig
from fastgrpo.rollout.base import SamplingParams
from fastgrpo.rollout.vllm_client import FAST_GENERATE_PATH, GENERATE_PATH, VLLMServerGenerator

port, data = int(sys.argv[1]), sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
model = sys.argv[4] if len(sys.argv) > 4 else "/tmp/assets/model"
tok = AutoTokenizer.from_pretrained(model)
rows = [json.loads(line) for line in open(data)][:16]
prompts = [tok.apply_chat_template([{"role": "user", "content": r["problem"]}], add_generation_prompt=True,
                                   tokenize=True) for r in rows]
prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
client = VLLMServerGenerator(GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_port=port,
                                        vllm_server_timeout=300))
print(json.dumps({"probe": client.generate_path}), flush=True)
times = {FAST_GENERATE_PATH: [], GENERATE_PATH: []}
params = SamplingParams(n=8, max_tokens=512, seed=0, extra={"ignore_eos": True})
client.generate_path = FAST_GENERATE_PATH
client.generate(prompts, params)  # warm-up
for r in range(rounds):
    for path in (FAST_GENERATE_PATH, GENERATE_PATH):
        client.generate_path = path
        t = time.perf_counter()
        out = client.generate(prompts, params)
        dt = time.perf_counter() - t
        times[path].append(dt)
        print(json.dumps({"round": r, "path": path, "s": round(dt, 3),
                          "tokens": sum(map(len, out.completion_ids))}), flush=True)
print(json.dumps({"median_s": {p: round(statistics.median(v), 3) for p, v in times.items()}}), flush=True)
client.close()
