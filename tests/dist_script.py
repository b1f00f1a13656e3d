"""Worker of tests/test_distributed.py: a tiny LoRA GRPO run under torchrun (gloo on CPU). Writes, per rank, its LoRA
weights' checksum, the prompts and completion lengths it scored, its log history and the collectives it called during
train() to OUT_DIR/result-RANK.json.

    python -m torch.distributed.run ... tests/dist_script.py OUT_DIR [SCALE_REWARDS] [nanloss]

nanloss: rank 1's second training pass reports a NaN loss (its gradients stay finite), so only the agreement on
non-finite updates can make rank 0 skip that update too."""

import json
import os
import sys

import datasets
import torch
from peft import LoraConfig

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2

torch.set_num_threads(1)
seen: list[str] = []
lengths: list[int] = []
rewards: list[float] = []
collectives: list[list] = []  # [name, numel of the first tensor] per call during train()
rank = int(os.environ.get("RANK", 0))


def length_reward(prompts, completions, completion_ids, **kw):
    seen.extend(p[-1]["content"] for p in prompts)
    lengths.extend(len(c) for c in completion_ids)
    rewards.extend(float(len(c[0]["content"])) / 10 for c in completions)
    return [float(len(c[0]["content"])) / 10 for c in completions]


tok = build_char_tokenizer()
rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(16)]
cfg = GRPOConfig(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                 num_generations=4, max_completion_length=8, learning_rate=1e-3, report_to="none", disable_tqdm=True,
                 save_strategy="no", logging_steps=1, scale_rewards=sys.argv[2] if len(sys.argv) > 2 else "group")
trainer = GRPOTrainer(model=build_tiny_qwen2(tok), reward_funcs=[length_reward], args=cfg,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                      peft_config=LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))


def _counted(name, fn):
    def call(*args, **kwargs):
        first = args[0] if args else None
        t = first[0] if isinstance(first, list) and first else first
        collectives.append([name, t.numel() if isinstance(t, torch.Tensor) else 0])
        return fn(*args, **kwargs)
    return call


for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
             "reduce_scatter", "reduce_scatter_tensor", "all_gather_into_tensor", "gather", "scatter"):
    setattr(torch.distributed, name, _counted(name, getattr(torch.distributed, name)))
if len(sys.argv) > 3 and sys.argv[3] == "nanloss" and rank == 1:
    import fastgrpo.loop

    passes, train_pass = [], fastgrpo.loop.B.train_pass

    def nan_loss_pass(*args, **kwargs):
        s = train_pass(*args, **kwargs)
        passes.append(1)
        if len(passes) == 2:
            s["loss"] = s["loss"] * float("nan")
        return s

    fastgrpo.loop.B.train_pass = nan_loss_pass
trainer.train()
lora = torch.cat([p.detach().flatten() for n, p in trainer.model.named_parameters() if "lora_" in n])
os.makedirs(sys.argv[1], exist_ok=True)
with open(os.path.join(sys.argv[1], f"result-{rank}.json"), "w") as f:  # one file per rank: stdout interleaves
    json.dump({"rank": rank, "lora_sum": float(lora.double().sum()), "lora_abs": float(lora.double().abs().sum()),
               "prompts": seen, "lengths": lengths, "rewards": rewards, "log_history": trainer.state.log_history,
               "skipped_updates": trainer.state.skipped_updates, "collectives": collectives,
               "lora_numel": lora.numel()}, f)
