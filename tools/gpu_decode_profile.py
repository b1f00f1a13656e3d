"""Where a decoding step of the transformers generator goes on a GPU: `graphed.decode` (static KV cache, CUDA graph
per step) against `generate`, for 128 rows of the random Qwen2-0.5B shape (bf16), no vLLM, no tokenizer.

    python tools/gpu_decode_profile.py [--tiny] [--rows 128] [--prompt 200] [--new 512]

Prints ms per decoding step of: the whole `graphed.decode` call, the graph replay alone, the sampling (`draw`) alone,
and `generate` with fastgrpo's sampler (a shorter run, per step). --tiny: a 2-layer model (a CPU smoke of the script).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from transformers import LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

from fastgrpo.logprobs import causal_lm_parts
from fastgrpo.rollout import graphed
from fastgrpo.rollout.decode import cache_kwarg
from fastgrpo.rollout.hf import InverseCdfSampler, draw
from fastgrpo.testing import qwen2_0_5b_config


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, n=1):
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    _sync()
    return (time.perf_counter() - t) / n, out


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--tiny", action="store_true")
    a.add_argument("--rows", type=int, default=128)
    a.add_argument("--prompt", type=int, default=200)
    a.add_argument("--new", type=int, default=512)
    args = a.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = qwen2_0_5b_config()
    if args.tiny:
        cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    backbone, head = causal_lm_parts(model)
    ids = torch.randint(0, cfg.vocab_size, (args.rows, args.prompt), device=device)
    att = torch.ones_like(ids)
    sample = functools.partial(draw, temperature=1.0)
    run = functools.partial(graphed.decode, backbone, head, sample, ids, att, args.new, eos_ids=[], graph=cuda)
    with torch.no_grad():
        run()  # warm-up (cuBLAS, allocator)
        total, rows = _timed(run)
        assert len(rows) == args.rows and all(len(r) == args.new for r in rows)
        logits = torch.randn(args.rows, cfg.vocab_size, device=device, dtype=dtype)
        t_draw, _ = _timed(lambda: sample(logits), 50)
        # the replay alone: capture one step as decode does, then replay it
        kv = graphed.StaticKV(args.prompt + args.new, device)
        mask = torch.ones(args.rows, 1, 1, kv.length, dtype=torch.bool, device=device)
        tok = ids[:, -1:].clone()
        pos = torch.full((args.rows, 1), args.prompt, device=device)
        kw = cache_kwarg(backbone)
        kv.col.fill_(args.prompt)

        def step():
            h = backbone(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: kv})
            return head(h.last_hidden_state[:, -1])

        graphed._register()
        with graphed._attention(backbone, graphed.ATTENTION):
            replay = graphed._capture(step) if cuda else step
            t_replay, _ = _timed(replay, 100)
            t_eager, _ = _timed(step, 20)
        gen_new = min(args.new, 64)
        proc = LogitsProcessorList([InverseCdfSampler(1.0)])
        t_gen, _ = _timed(lambda: model.generate(input_ids=ids, attention_mask=att, max_new_tokens=gen_new,
                                                 min_new_tokens=gen_new, do_sample=False, logits_processor=proc,
                                                 pad_token_id=0))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"DECODE_PROFILE device={name} rows={args.rows} prompt={args.prompt} new={args.new} "
          f"graphed_total_ms_per_step={1e3 * total / args.new:.2f} replay_ms={1e3 * t_replay:.2f} "
          f"eager_step_ms={1e3 * t_eager:.2f} draw_ms={1e3 * t_draw:.2f} "
          f"generate_ms_per_step={1e3 * t_gen / gen_new:.2f} (over {gen_new} steps, prefill included)")


if __name__ == "__main__":
    main()
