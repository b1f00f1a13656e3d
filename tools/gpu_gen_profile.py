"""Where does colocated generation lose time against vLLM alone? One recipe step's generation (16 prompts x n=8 x
512 tokens, ignore_eos), timed in one engine layout per process, with and without the sampled-token logprobs:

    python tools/gpu_gen_profile.py colocate MODEL PROMPTS.jsonl     # VLLMColocateGenerator, as the trainer builds it
    python tools/gpu_gen_profile.py alone-mp MODEL PROMPTS.jsonl     # vllm.LLM defaults (engine core in its process)
    python tools/gpu_gen_profile.py alone-inproc MODEL PROMPTS.jsonl # vllm.LLM defaults, engine core in this process
    ENGINE_KWARGS='{"max_num_batched_tokens": 16384}' python tools/gpu_gen_profile.py colocate ...  # overrides

Prints one JSON line per timed call and, for `colocate`, the top of a cProfile of one call (tottime).
"""

import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

layout, model, data = sys.argv[1], sys.argv[2], sys.argv[3]
if layout == "alone-inproc":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from transformers import AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(model)
rows = [json.loads(line) for line in open(data)][:16]
prompts = []
for r in rows:
    p = tok.apply_chat_template([{"role": "user", "content": r["problem"]}], add_generation_prompt=True, tokenize=True)
    prompts.append(list(p["input_ids"]) if hasattr(p, "keys") else list(p))


REPS = int(os.environ.get("REPS", "3"))


def timed(label, fn, reps=3):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        n_tok = fn()
        times.append(time.perf_counter() - t)
    print(json.dumps({"layout": layout, "variant": label, "median_s": round(statistics.median(times), 3),
                      "s": [round(x, 3) for x in times], "tokens": n_tok}), flush=True)


if layout == "colocate":
    from fastgrpo.config import GRPOConfig
    from fastgrpo.rollout.base import SamplingParams
    from fastgrpo.rollout.vllm_colocate import VLLMColocateGenerator

    cfg = GRPOConfig(use_vllm=True, vllm_mode="colocate", num_generations=8, per_device_train_batch_size=8,
                     gradient_accumulation_steps=16, max_completion_length=512, max_prompt_length=512, bf16=True)
    gen = VLLMColocateGenerator(model, cfg, tokenizer=tok, engine_kwargs=json.loads(os.environ.get("ENGINE_KWARGS", "{}")))
    print(json.dumps({"engine_kwargs": {k: v for k, v in gen.engine_kwargs.items() if k != "model"}}, default=str))

    def run(extra):
        def fn():
            out = gen.generate(prompts, SamplingParams(n=8, max_tokens=512, extra=dict(ignore_eos=True, **extra)))
            return sum(map(len, out.completion_ids))
        return fn

    def bare():  # the same engine through LLM.generate, without logprobs (the generator insists on them)
        sp = gen._sampling_params(SamplingParams(n=8, max_tokens=512, extra=dict(ignore_eos=True, logprobs=None)), 8)
        outs = gen.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=sp, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    hook = gen.sampler_logprobs

    def vllm_logprobs():  # vLLM's own per-token logprobs (vllm_sampler_logprobs=False)
        gen.sampler_logprobs = False
        try:
            return run({})()
        finally:
            gen.sampler_logprobs = hook

    for _ in range(2):
        timed(f"logprobs as the trainer (sampler record: {hook})", run({}), REPS)
        timed("logprobs=0 from vLLM's outputs", vllm_logprobs, REPS)
        timed("no logprobs", bare, REPS)
    prof = cProfile.Profile()
    prof.enable()
    run({})()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print(s.getvalue()[:9000])
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
    print(s.getvalue()[:9000])
else:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, gpu_memory_utilization=0.3, seed=0, max_model_len=1024)
    requests = [{"prompt_token_ids": p} for p in prompts]

    def run(**kw):
        def fn():
            outs = llm.generate(requests, SamplingParams(n=8, max_tokens=512, ignore_eos=True, **kw), use_tqdm=False)
            return sum(len(o.token_ids) for r in outs for o in r.outputs)
        return fn

    for _ in range(2):
        timed("no logprobs (vLLM alone as the bench runs it)", run(), REPS)
        timed("logprobs=0 flat", run(logprobs=0, flat_logprobs=True, detokenize=False), REPS)
