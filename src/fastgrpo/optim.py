"""AdamW over the trainable parameters and the learning-rate schedule (warmup, then linear/cosine/constant)."""

from __future__ import annotations

import math

import torch


def make_optimizer(params: list[torch.nn.Parameter], config) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the model has no trainable parameters: with LoRA, check peft_config.target_modules.")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                             fused=fused or None)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at optimizer step `step`, as transformers' schedules compute it."""
    def f(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant_with_warmup":
            return 1.0
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine
    return f


def make_scheduler(optimizer, config, total_steps: int):
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.lr_scheduler_type, warmup, total_steps))
