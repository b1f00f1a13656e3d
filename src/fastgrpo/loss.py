"""The GRPO policy loss as pure functions of tensors.

One objective with its variants as parameters (all TRL-compatible):
- importance ratio per token (GRPO) or per sequence (GSPO: exp of the mean token log-ratio);
- surrogate: PPO-style clipped (`grpo`, `bnpo`, `dr_grpo`, `dapo`; clip-higher through `epsilon_high`,
  two-sided clipping through `delta`) or CISPO (clipped, detached ratio times the log-probability);
- optional k3 KL to a reference policy (`beta`), truncated importance-sampling correction between the
  trainer's and the generator's probabilities, and a top-entropy token mask.

Aggregation is kept apart: every loss type is a weighted sum of per-token losses with one weight per sequence
(`sequence_weights`). The weights reproduce TRL's normalisations for its micro-batches exactly, and because they
are fixed before training starts, the loss of an optimizer step does not depend on how the sequences are
physically grouped into forward passes (padding-free packing, larger or smaller passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

SurrogateFn = Callable[..., torch.Tensor]
SURROGATES: dict[str, SurrogateFn] = {}


def register_surrogate(*names: str):
    def wrap(fn: SurrogateFn) -> SurrogateFn:
        for n in names:
            SURROGATES[n] = fn
        return fn
    return wrap


@register_surrogate("grpo", "bnpo", "dr_grpo", "dapo")
def clipped_surrogate(ratio, advantages, logprobs, eps_low, eps_high, delta):
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A); with delta, r is capped at delta first (two-sided clip).

    ratio: [B, T] or [B, 1]; advantages: [B, 1]; returns [B, T] or [B, 1]
    """
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages)


@register_surrogate("cispo")
def cispo_surrogate(ratio, advantages, logprobs, eps_low, eps_high, delta):
    """CISPO: -sg(min(r, eps_high)) A log pi. eps_high is the cap itself, not 1 + eps_high (as in TRL)."""
    return -torch.clamp(ratio, max=eps_high).detach() * advantages * logprobs


@dataclass(frozen=True, slots=True)
class LossParams:
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    kl_bias_correction: bool = True  # KL term times the (differentiable) ratio, as TRL 1.16's use_bias_correction_kl


@dataclass(slots=True)
class LossTerms:
    """Per-token pieces of one micro-batch, all [B, T] (masked positions hold garbage and are ignored)."""

    per_token_loss: torch.Tensor     # what the weights aggregate
    ratio: torch.Tensor              # [B, T] or [B, 1] importance ratio pi / pi_old
    kl: torch.Tensor | None          # k3 KL to the reference (times the ratio with kl_bias_correction), beta != 0


def per_token_loss(
    logprobs: torch.Tensor,            # [B, T] current policy, requires grad
    old_logprobs: torch.Tensor,        # [B, T] policy that sampled, from the trainer's view (detached)
    advantages: torch.Tensor,          # [B]
    mask: torch.Tensor,                # [B, T] 1.0 on completion tokens
    params: LossParams,
    ref_logprobs: torch.Tensor | None = None,   # [B, T], needed when beta != 0
    is_weights: torch.Tensor | None = None,     # [B, T] or [B, 1] generator->trainer correction, detached
    token_mask: torch.Tensor | None = None,     # [B, T] extra 0/1 mask (top-entropy tokens)
) -> LossTerms:
    log_ratio = logprobs - old_logprobs
    if params.importance_sampling_level == "token":
        log_w = log_ratio
    elif params.importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"unknown importance_sampling_level {params.importance_sampling_level!r}")
    ratio = torch.exp(log_w)
    surrogate = SURROGATES[params.loss_type]
    loss = surrogate(ratio, advantages.unsqueeze(-1), logprobs, params.eps_low, params.eps_high, params.delta)
    if token_mask is not None:
        loss = loss * token_mask
    if is_weights is not None:
        loss = loss * is_weights
    kl = None
    if params.beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs")
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1
        if params.kl_bias_correction:  # the unbiased reverse-KL gradient: its value is kl where the ratio is 1
            kl = kl * ratio
        loss = loss + params.beta * kl
    return LossTerms(loss.expand_as(logprobs) if loss.shape != logprobs.shape else loss, ratio, kl)


def sequence_weights(
    lengths: torch.Tensor,       # [N] completion tokens counted by the loss mask, per sequence, generation order
    loss_type: str,
    micro_batch: int,            # logical micro-batch size (per_device_train_batch_size)
    grad_accum: int,
    steps_per_generation: int,
    max_completion_length: int,
    total_tokens: float | None = None,   # mask tokens of the generation batch summed over all ranks (dapo/cispo)
    world_size: int = 1,
) -> torch.Tensor:
    """Weight w_i of each sequence so that the optimizer-step loss is sum_i w_i * sum_t loss_it * mask_it.

    Matches TRL with logical micro-batches of `micro_batch` consecutive sequences, each micro-batch's loss divided
    by `grad_accum`:
      grpo    : mean over the micro-batch of per-sequence token means      -> 1 / (len_i * B * GA)
      bnpo    : token mean over the micro-batch                            -> 1 / (tokens_mb * GA)
      dr_grpo : sum over the micro-batch / (B * max_completion_length)     -> 1 / (B * L_max * GA)
      dapo, cispo: sum / (total tokens of the generation batch per rank * GA / steps_per_generation)
    returns: [N] float64 weights
    """
    lengths = lengths.double()
    n = lengths.numel()
    mb = torch.arange(n) // micro_batch
    sizes = torch.bincount(mb).double()[mb]           # size of each sequence's micro-batch (last may be short)
    if loss_type == "grpo":
        return 1.0 / (lengths.clamp(min=1.0) * sizes * grad_accum)
    if loss_type == "bnpo":
        tokens = torch.zeros(int(mb.max()) + 1, dtype=torch.float64).index_add_(0, mb, lengths)[mb]
        return 1.0 / (tokens.clamp(min=1.0) * grad_accum)
    if loss_type == "dr_grpo":
        return 1.0 / (sizes * max_completion_length * grad_accum)
    if loss_type in ("dapo", "cispo"):
        total = float(lengths.sum()) * world_size if total_tokens is None else float(total_tokens)
        normalizer = max(total, 1.0) / world_size * grad_accum / steps_per_generation
        return torch.full((n,), 1.0 / normalizer, dtype=torch.float64)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def importance_weights(
    trainer_logprobs: torch.Tensor,    # [B, T] the trainer's logprobs of the sampled tokens (detached)
    generator_logprobs: torch.Tensor,  # [B, T] the generator's (vLLM) logprobs; NaN where unknown
    mask: torch.Tensor,                # [B, T]
    mode: str = "token_truncate",
    clip_min: float | None = None,
    clip_max: float | None = 2.0,
) -> torch.Tensor:
    """Truncated (or masked) importance-sampling correction pi_trainer / pi_generator.

    token_*: one ratio per token [B, T]; sequence_*: exp of the summed log-ratio [B, 1].
    *_truncate clamps to [clip_min, clip_max]; *_mask zeroes ratios outside that range.
    """
    diff = torch.nan_to_num((trainer_logprobs - generator_logprobs) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        if clip_min is None and clip_max is None:  # no bounds set: nothing to truncate (torch.clamp would raise)
            return ratio
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """1.0 on tokens whose entropy is at or above the (1 - quantile) quantile of the masked tokens.

    entropy, mask: [B, T]; quantile: fraction of tokens kept (TRL's top_entropy_quantile)
    """
    values = entropy[mask.bool()].float()
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - quantile)
    return ((entropy >= threshold) & mask.bool()).to(mask.dtype)
