"""Rewards to advantages: group-relative normalisation (GRPO), as pure tensor functions.

Choices (TRL-compatible):
- Reward functions may return None for "not applicable"; these arrive as NaN and are left out of the weighted
  sum. A completion that no function scored gets NaN reward, is left out of its group's statistics and receives
  advantage 0.
- advantage = (r - mean_group(r)) / (std + 1e-4), with std the unbiased (Bessel-corrected) std of the group
  (`scale_rewards="group"`), of the whole batch (`"batch"`), or no division (`"none"`).
"""

from __future__ import annotations

import torch

_EPS = 1e-4


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions ignoring NaN (None) entries.

    per_func: [N, F] rewards, NaN where a function returned None
    weights:  [F]
    returns:  [N] total reward, NaN where every function returned None
    """
    total = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(per_func).all(dim=1), float("nan"))


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std ignoring NaN; NaN where fewer than 2 values are present."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    return var.sqrt() if dim is None else var.sqrt().squeeze(dim)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group",
                     batch_std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages.

    rewards:   [N] with N = groups * num_generations, prompt-major (a group's completions are contiguous)
    scale:     "group" | "batch" | "none"
    batch_std: scalar std over the whole (possibly multi-rank) batch, used when scale == "batch";
               computed from `rewards` when None
    returns:   (advantages [N], group_std [N]) -- group_std is for the frac_reward_zero_std metric
    """
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    group_std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    adv = rewards - mean
    if scale == "group":
        adv = adv / (group_std + _EPS)
    elif scale == "batch":
        std = nanstd(rewards) if batch_std is None else batch_std
        adv = adv / (std + _EPS)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return torch.nan_to_num(adv, nan=0.0), torch.nan_to_num(group_std, nan=0.0)
