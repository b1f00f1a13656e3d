"""CPU micro-benchmarks behind docs/benchmarks.md section 6 (issue 6), each in one process so that figures compare
(this kind of shared host drifts in speed between minutes):

    python tools/cpu_micro.py logsoftmax 2048x151936 512x1024 256x2048   # ROWSxBLOCK tiles of chunked_logprobs
    python tools/cpu_micro.py decode 64                                  # ms per decoding step, HFGenerator

logsoftmax: forward + backward of `fastgrpo.logprobs.chunked_logprobs` for 4,096 tokens, hidden 64, Qwen2's
151,936-token vocabulary, 6 repeats per tile shape. decode: 16 prompts of 200 tokens x 8 samples (128 rows) on a
2-layer, 64-wide Qwen2 with Qwen2's tokenizer, temperature 1. Threads: OMP_NUM_THREADS or 2.
"""
import os
import sys
import time

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def logsoftmax(shapes: list[str]) -> None:
    from fastgrpo.logprobs import chunked_logprobs

    torch.manual_seed(0)
    M, H, V = 4096, 64, 151936
    h0, W, y = torch.randn(M, H), torch.randn(V, H) * 0.05, torch.randint(0, V, (M,))
    for rows, block in (tuple(map(int, s.split("x"))) for s in shapes):
        h, times = h0.clone().requires_grad_(), []
        for _ in range(6):
            t0 = time.perf_counter()
            lp, _ = chunked_logprobs(h, W, None, y, 1.0, rows, True, block)
            lp.sum().backward()
            times.append(time.perf_counter() - t0)
        print(f"tile {rows} x {block}: " + " ".join(f"{t:.2f}" for t in times) + " s", flush=True)


def decode(steps: int) -> None:
    from fastgrpo import testing
    from fastgrpo.rollout.base import SamplingParams
    from fastgrpo.rollout.hf import HFGenerator

    tok = testing.build_qwen2_tokenizer()
    gen = HFGenerator(testing.build_tiny_qwen2(tok, num_layers=2), [tok.eos_token_id], tok.pad_token_id, 128)
    torch.manual_seed(0)
    prompts = [torch.randint(0, 150000, (200,)).tolist() for _ in range(16)]
    gen.generate(prompts, SamplingParams(n=8, max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    gen.generate(prompts, SamplingParams(n=8, max_tokens=steps))
    print(f"{(time.perf_counter() - t0) / steps * 1e3:.1f} ms per decoding step ({steps} steps, 128 rows)")


if __name__ == "__main__":
    {"logsoftmax": lambda: logsoftmax(sys.argv[2:]), "decode": lambda: decode(int(sys.argv[2]))}[sys.argv[1]]()
