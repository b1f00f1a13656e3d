"""Worker of tests/test_distributed.py: a tiny LoRA GRPO run under torchrun (gloo on CPU). Prints one JSON line per
rank with its LoRA weights' checksum and the prompts it trained on to OUT_DIR/result-RANK.json."""

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


def length_reward(prompts, completions, **kw):
    seen.extend(p[-1]["content"] for p in prompts)
    return [float(len(c[0]["content"])) / 10 for c in completions]


tok = build_char_tokenizer()
rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(16)]
cfg = GRPOConfig(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                 num_generations=4, max_completion_length=8, learning_rate=1e-3, report_to="none", disable_tqdm=True,
                 save_strategy="no", scale_rewards=sys.argv[2] if len(sys.argv) > 2 else "group")
trainer = GRPOTrainer(model=build_tiny_qwen2(tok), reward_funcs=[length_reward], args=cfg,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                      peft_config=LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
trainer.train()
lora = torch.cat([p.detach().flatten() for n, p in trainer.model.named_parameters() if "lora_" in n])
rank = int(os.environ.get("RANK", 0))
os.makedirs(sys.argv[1], exist_ok=True)
with open(os.path.join(sys.argv[1], f"result-{rank}.json"), "w") as f:  # one file per rank: stdout interleaves
    json.dump({"rank": rank, "lora_sum": float(lora.double().sum()), "lora_abs": float(lora.double().abs().sum()),
               "prompts": seen}, f)
