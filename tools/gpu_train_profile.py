"""Where the training half of a recipe step spends its time (GPU host):

    python tools/gpu_train_profile.py MODEL_DIR TRAIN_JSONL [OUT_DIR]

Builds the bench's fastgrpo trainer (recipe config, LoRA r8 q/v, use_vllm=False so no engine takes memory), then
one round of 16 real prompts x 8 completions of 512 random tokens, and times the optimizer step of the loop
(the passes' forward + backward, then the optimizer) for several tokens-per-pass budgets, 5 steps each. Then one
step under torch.profiler: the wall time against the summed CUDA kernel time says whether the step waits for the
GPU or for Python, and the top kernels and ops say on what.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from fastgrpo import GRPOConfig, GRPOTrainer  # noqa: E402
from fastgrpo import batch as B  # noqa: E402
from fastgrpo.bench import _trainer_kwargs, recipe_config  # noqa: E402
from fastgrpo.config import FIELD_NAMES  # noqa: E402
from fastgrpo.loop import _optimizer_step, _accumulate  # noqa: E402
from fastgrpo.loss import LossParams  # noqa: E402
from fastgrpo.optim import make_optimizer  # noqa: E402
from fastgrpo.rollout import Generation  # noqa: E402


def main(model: str, data: str, out: str = "/tmp/train-profile") -> None:
    os.makedirs(out, exist_ok=True)
    spec = dict(model=model, data=data, G=8, L=512, steps=1, completions_per_step=128, per_device_batch=8,
                gpu_memory_utilization=0.3, mode="novllm", out_dir=out)
    values = {k: v for k, v in recipe_config(spec, "fastgrpo", True).items() if k in FIELD_NAMES}
    # FG_VARIANT: the layers as the trainer sets them up; "plain" (no Liger), "liger" (the default on CUDA) or
    # "compile" (torch_compile=True)
    variant = os.environ.get("FG_VARIANT", "liger")
    values.update({"plain": {"use_liger_kernel": False}, "liger": {}, "compile": {"torch_compile": True}}[variant])
    trainer = GRPOTrainer(args=GRPOConfig(**values), **_trainer_kwargs(spec))
    args, model_, dev = trainer.args, trainer.model, trainer.device
    print(f"variant: {variant}, layers: {trainer.speedups or ['plain']}")
    g = torch.Generator().manual_seed(0)
    prompts = trainer.train_prompts[:16]
    V = model_.get_output_embeddings().weight.shape[0]
    comps = [torch.randint(max(V // 8, 4), max(V - 300, V // 2), (512,), generator=g).tolist() for _ in range(128)]
    lps = [(-torch.rand(512, generator=g) * 8).tolist() for _ in range(128)]
    gen = Generation(comps, lps, ["stop"] * 128)
    t = time.perf_counter()
    r = B.build_rollout(prompts, gen, trainer.processing_class, trainer.reward_funcs, trainer.reward_weights, args,
                        trainer.plan, trainer.dist)
    print(f"rewards + rollout: {time.perf_counter() - t:.3f} s; prompt tokens {sum(map(len, r.prompt_ids[::8]))} "
          f"over 16 prompts")
    lengths = [len(p) + len(c) for p, c in zip(r.prompt_ids, r.completion_ids)]
    params = LossParams(args.loss_type, args.importance_sampling_level, args.epsilon_low, args.clip_high,
                        args.delta, args.beta)
    trainable = [p for p in model_.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, args)
    run = type("R", (), {})()
    run.trainable, run.dist, run.config, run.optimizer = trainable, trainer.dist, args, opt
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(budget):
        sums = {}
        for idx in B.plan_passes(list(range(128)), 8, budget, lengths):
            _accumulate(sums, B.train_pass(model_, r, idx, args, params, trainer.processing_class.pad_token_id, dev, trainer._autocast))
        return _optimizer_step(run, sums)

    auto = trainer._token_budget() or 4096
    print(f"auto token budget: {auto}")
    quick = bool(os.environ.get("FG_QUICK"))
    for budget in (auto, 8192, 32768, 65536, None) if cuda and not quick else (auto,):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        walls = []
        for i in range(7 if quick else 5):
            t = time.perf_counter()
            norm, _ = step(budget)
            sync()
            walls.append(time.perf_counter() - t)
            if i == 0:
                print(f"first step's grad norm: {norm:.6f}")
        n = len(B.plan_passes(list(range(128)), 8, budget, lengths))
        print(f"budget {budget} ({n} passes): {statistics.median(walls[1:]):.3f} s/step (median of {len(walls) - 1} after one), "
              f"peak allocated {torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.1f} GiB, walls "
              f"{[round(w, 3) for w in walls]}")
    if quick:
        return
    # forward alone (no grad) of the auto budget's passes
    with torch.no_grad():
        sync()
        t = time.perf_counter()
        B.precompute_logprobs(model_, r, B.plan_passes(list(range(128)), 8, auto, lengths), args, trainer.processing_class.pad_token_id, dev,
                              trainer._autocast)
        sync()
        print(f"forward only (no grad, auto budget): {time.perf_counter() - t:.3f} s")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step(auto)
        sync()
        wall = time.perf_counter() - t
    ka = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ka) / 1e6
    print(f"profiled step: wall {wall:.3f} s (profiler on), summed self CUDA time {cuda_total:.3f} s")
    table = ka.table(sort_by="self_device_time_total", row_limit=30)
    cpu_table = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    print(cpu_table)
    with open(os.path.join(out, "profile.txt"), "w") as f:
        f.write(table + "\n\n" + cpu_table)


if __name__ == "__main__":
    main(*sys.argv[1:])
