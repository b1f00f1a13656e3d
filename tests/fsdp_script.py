"""Worker of tests/test_fsdp.py: full fine-tuning of a tiny tied-embedding Qwen2 under torchrun (gloo on CPU) with
GRPOConfig.fsdp = argv[2]. Saves the final model with save_model (on every rank, as scripts do) to OUT_DIR/final
and writes OUT_DIR/result-RANK.json: how the model was held, and the logged loss and grad norm of every step.
argv[3], if given, is a checkpoint to resume from."""

import json
import os
import sys

import datasets
import torch
from torch.distributed.tensor import DTensor

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2

torch.set_num_threads(1)
out, fsdp = sys.argv[1], sys.argv[2]
resume = sys.argv[3] if len(sys.argv) > 3 else None


def char_reward(completions, **kw):  # varied within a group, so that advantages (and gradients) are not zero
    return [sum(map(ord, c[0]["content"])) % 7 / 7 for c in completions]


tok = build_char_tokenizer()
rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(16)]
# num_iterations=2: logprobs of the round are precomputed (forward passes without backward); beta: a reference
# model, sharded like the policy; 2 micro-batches per step: gradients reduced once per accumulation window.
cfg = GRPOConfig(output_dir=out, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                 num_iterations=2, beta=0.04, num_generations=4, max_completion_length=8, learning_rate=1e-3,
                 max_grad_norm=0.5, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="steps",
                 save_steps=2, fsdp=fsdp,
                 # a no-op generate() argument: the replicated run then samples through transformers' generate too, as a
                 # sharded model must (rollout/decode.py is for whole models), so both runs draw the same completions
                 generation_kwargs={"num_beams": 1})
trainer = GRPOTrainer(model=build_tiny_qwen2(tok), reward_funcs=[char_reward], args=cfg,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(os.path.join(out, "final"))
m = trainer.model
rank = int(os.environ.get("RANK", 0))
steps = [h for h in trainer.state.log_history if "loss" in h]
with open(os.path.join(out, f"result-{rank}.json"), "w") as f:  # one file per rank: stdout interleaves
    json.dump({"rank": rank, "fsdp": trainer.fsdp, "sharded": isinstance(m.model.layers[0].mlp.up_proj.weight, DTensor),
               "tied": m.lm_head.weight is m.model.embed_tokens.weight,
               "steps": [h["step"] for h in steps], "loss": [h["loss"] for h in steps],
               "grad_norm": [h["grad_norm"] for h in steps]}, f)
