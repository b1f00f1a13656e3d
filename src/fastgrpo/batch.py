"""One generation round as a typed batch, and the forward/backward pass over a slice of it.

Stage order inside a round: generate -> decode -> rewards -> advantages -> loss weights -> (old / reference
logprobs, only when needed) -> passes. Old logprobs need an extra forward pass only when some micro-batch is
trained after an optimizer step taken since generation (num_iterations > 1 or steps_per_generation >
gradient_accumulation_steps); otherwise the policy that sampled is the current one and the detached current
logprobs are exact. The importance-sampling correction uses the generator's logprobs when it reports them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from . import advantages as adv_fns
from . import loss as L
from .data import Prompt
from .distributed import Dist, all_gather_cat
from .logprobs import Rows, completion_logprobs
from .rewards import RewardFunction, score
from .rollout import Generation


@dataclass(slots=True)
class Rollout:
    """N = prompts x num_generations completions of one round on this rank, prompt-major."""

    prompts: list[Prompt]               # [P]
    prompt_ids: list[list[int]]         # [N] ragged (each prompt repeated num_generations times)
    completion_ids: list[list[int]]     # [N] ragged
    gen_logprobs: list[list[float]] | None  # [N] ragged generator logprobs, or None
    truncated: torch.Tensor             # [N] bool, hit max_completion_length
    rewards_per_func: torch.Tensor      # [N, F] NaN where a function returned None
    rewards: torch.Tensor               # [N]
    advantages: torch.Tensor            # [N]
    group_std: torch.Tensor             # [N]
    loss_lengths: torch.Tensor          # [N] tokens counted by the loss (0 when a truncated one is masked)
    weights: torch.Tensor               # [N] float64 aggregation weight per sequence (loss.sequence_weights)
    reward_failures: int = 0
    old_logprobs: list[torch.Tensor] | None = None   # [N] ragged fp32, when precomputed
    ref_logprobs: list[torch.Tensor] | None = None   # [N] ragged fp32, when beta != 0
    metrics: dict = field(default_factory=dict)        # the round's logged statistics, over all ranks
    round_tokens: int = 0                            # completion tokens of the round, over all ranks

    def __len__(self) -> int:
        return len(self.completion_ids)


def _decode_kwargs(prompts: list[Prompt], gen: Generation, tokenizer, G: int, trainer_state=None) -> tuple[dict, int]:
    """The keyword arguments of a reward call (TRL's convention) for P prompts x G completions."""
    expanded = [p for p in prompts for _ in range(G)]
    texts = tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
    conversational = isinstance(expanded[0].prompt, list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    keys = dict.fromkeys(k for p in prompts for k in p.columns)  # rows of a list of dicts may differ: None fills in
    kwargs = {key: [p.columns.get(key) for p in expanded] for key in keys}
    kwargs.update(prompts=[p.prompt for p in expanded], completions=completions,  # over any column of the name
                  completion_ids=gen.completion_ids, trainer_state=trainer_state)
    return kwargs, len(expanded)


def build_rollout(prompts: list[Prompt], gen: Generation, tokenizer, reward_funcs: list[RewardFunction],
                  reward_weights: torch.Tensor, config, plan, d: Dist, trainer_state=None, timer=None) -> Rollout:
    """Decode, score, and turn rewards into advantages and loss weights. Under torchrun this is the round's one
    collective: a single all-gather of every completion's length, truncation, loss length, rewards and group std,
    which gives the token total of the loss weights, the batch std (scale_rewards="batch"), the round's token count
    and its logged statistics (`r.metrics`) at once. It is also where the ranks first meet after generating and
    scoring, so under `timer` its time is kept as `round_sync_time`: mostly the wait for the slowest rank."""
    G = config.num_generations
    kwargs, N = _decode_kwargs(prompts, gen, tokenizer, G, trainer_state)
    expanded = [p for p in prompts for _ in range(G)]
    scores = score(reward_funcs, kwargs, N, config.reward_timeout, config.reward_error)
    per_func, failures = scores.rewards, scores.failures
    rewards = adv_fns.combine_rewards(per_func, reward_weights)
    truncated = torch.tensor([r == "length" for r in gen.finish_reasons])
    lengths = torch.tensor([len(c) for c in gen.completion_ids], dtype=torch.float64)
    loss_lengths = lengths * (~truncated).double() if config.mask_truncated_completions else lengths
    if config.mask_truncated_completions and len(truncated) and bool(truncated.all()):
        warnings.warn("every completion of a round reached max_completion_length, and mask_truncated_completions=True "
                      "masks them all: that round trains nothing (loss and gradients 0). Fix: raise "
                      "max_completion_length, or set mask_truncated_completions=False.", stacklevel=2)
    _, group_std = adv_fns.group_advantages(rewards, G, "none")  # the group std alone (the metric)
    # Every column is exact in float64 (token counts, 0/1, float32 values), so each is recovered bit for bit.
    mine = torch.cat([torch.stack([lengths, truncated.double(), loss_lengths, rewards.double(), group_std.double()], 1),
                      per_func.double()], 1)                                          # [N, 5 + F]
    with (timer("round_sync_time") if timer is not None and d.enabled else contextlib.nullcontext()):
        every = all_gather_cat(mine, d)                                               # [world * N, 5 + F]
    column = lambda j: every[:, j].contiguous()  # noqa: E731
    total_tokens = float(column(2).sum())
    batch_std = adv_fns.nanstd(column(3).float()) if config.scale_rewards == "batch" else None
    advantages, group_std = adv_fns.group_advantages(rewards, G, config.scale_rewards, batch_std)
    weights = L.sequence_weights(loss_lengths, config.loss_type, plan.micro_batch, plan.grad_accum,
                                 plan.steps_per_generation, config.max_completion_length, total_tokens, d.world_size)
    r = Rollout(prompts, [p.ids for p in expanded], gen.completion_ids, gen.logprobs, truncated, per_func,
                rewards, advantages, group_std, loss_lengths, weights, failures)
    r.metrics = round_metrics(column(0).float(), column(1).float(), every[:, 5:].float(), column(3).float(),
                              column(4).float(), [f.name for f in reward_funcs], failures)
    r.metrics.update(scores.metrics)  # the reward functions' own log_metric values (this rank's)
    r.round_tokens = int(column(0).sum())
    return r


def round_metrics(lengths: torch.Tensor, trunc: torch.Tensor, per_func: torch.Tensor, rewards: torch.Tensor,
                  group_std: torch.Tensor, names: list[str], failures: int = 0) -> dict[str, float]:
    """TRL-named reward and completion statistics of a round, from every rank's completions."""
    term = lengths[trunc == 0]
    m = {"reward": torch.nanmean(rewards).item(), "reward_std": group_std.mean().item(),
         "frac_reward_zero_std": (group_std.abs() < 1e-8).float().mean().item(),
         "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
         "completions/max_length": lengths.max().item(), "completions/clipped_ratio": trunc.mean().item(),
         "completions/mean_terminated_length": term.mean().item() if term.numel() else 0.0}
    for j, name in enumerate(names):
        col = per_func[:, j].contiguous()
        m[f"rewards/{name}/mean"] = torch.nanmean(col).item()
        m[f"rewards/{name}/std"] = adv_fns.nanstd(col).item() if (~col.isnan()).sum() > 1 else 0.0
    if failures:
        m["rewards/failures"] = float(failures)
    return m


def _ragged(values: list[list[float]] | list[torch.Tensor], idx: list[int], rows: Rows, fill=float("nan")):
    flat = torch.cat([torch.as_tensor(values[i], dtype=torch.float32) for i in idx]).to(rows.targets.device)
    return rows.to_grid(flat, fill)


@torch.no_grad()
def precompute_logprobs(model, r: Rollout, passes: list[list[int]], config, pad_id: int, device,
                        autocast) -> list[torch.Tensor]:
    """Per-sequence logprobs of the round under `model` as it is now (the current policy, or the reference: the
    caller disables the adapters or passes the reference model)."""
    out: list[torch.Tensor | None] = [None] * len(r)
    for idx in passes:
        rows = Rows.build([r.prompt_ids[i] for i in idx], [r.completion_ids[i] for i in idx], pad_id, device)
        with autocast():
            lp, _ = completion_logprobs(model, rows, config.temperature, config.logprob_chunk_size)
        for i, chunk in zip(idx, torch.split(lp.cpu(), [len(r.completion_ids[i]) for i in idx])):
            out[i] = chunk
    return out  # type: ignore[return-value]


def train_pass(model, r: Rollout, idx: list[int], config, params: L.LossParams, pad_id: int, device,
               autocast) -> dict[str, torch.Tensor]:
    """Forward and backward over sequences `idx`; returns summed statistics (token sums and counts)."""
    rows = Rows.build([r.prompt_ids[i] for i in idx], [r.completion_ids[i] for i in idx], pad_id, device)
    want_entropy = True
    with autocast():
        lp_flat, ent_flat = completion_logprobs(model, rows, config.temperature, config.logprob_chunk_size, want_entropy)
    logp = rows.to_grid(lp_flat)
    valid = rows.to_grid(torch.ones_like(lp_flat))
    keep = (r.loss_lengths[idx] > 0).to(device=device, dtype=logp.dtype)
    mask = valid * keep[:, None]
    old = _ragged(r.old_logprobs, idx, rows, 0.0) if r.old_logprobs is not None else logp.detach()
    ref = _ragged(r.ref_logprobs, idx, rows, 0.0) if r.ref_logprobs is not None else None
    is_w, gen = None, None
    if config.vllm_importance_sampling_correction and r.gen_logprobs is not None:
        gen = _ragged(r.gen_logprobs, idx, rows)
        is_w = L.importance_weights(old, gen, mask, config.vllm_importance_sampling_mode,
                                    config.vllm_importance_sampling_clip_min, config.is_clip_max)
    entropy = rows.to_grid(ent_flat)
    token_mask = L.top_entropy_mask(entropy, mask, config.top_entropy_quantile) if config.top_entropy_quantile < 1 else None
    adv = r.advantages[idx].to(device)
    terms = L.per_token_loss(logp, old, adv, mask, params, ref, is_w, token_mask)
    seq_loss = (terms.per_token_loss * mask).sum(-1)
    loss = (seq_loss * r.weights[idx].to(device=device, dtype=seq_loss.dtype)).sum()
    loss.backward()

    with torch.no_grad():
        a = adv[:, None]
        ratio = terms.ratio.expand_as(mask) if terms.ratio.shape != mask.shape else terms.ratio
        if config.loss_type == "cispo":
            low = torch.zeros_like(mask, dtype=torch.bool)  # bool, as below: `low | high` needs two bool masks
            high = (ratio > params.eps_high) & (a > 0)
        else:
            low = (ratio < 1 - params.eps_low) & (a < 0)
            high = (ratio > 1 + params.eps_high) & (a > 0)
        s = {"loss": loss.detach(), "tokens": mask.sum(), "entropy": (entropy * mask).sum(),
             "clip_low": (low * mask).sum(), "clip_high": (high * mask).sum(), "clip_region": ((low | high) * mask).sum()}
        if terms.kl is not None:
            s["kl"] = (terms.kl * mask).sum()
        if gen is not None:
            m = mask.bool() & ~gen.isnan()
            diff = (old - gen).abs()[m]
            s["logp_diff_sum"] = diff.sum()
            s["logp_diff_max"] = diff.max() if diff.numel() else diff.new_zeros(())
            w = is_w.expand_as(mask)[m]
            s["is_sum"], s["is_min"], s["is_max"] = w.sum(), w.min() if w.numel() else w.new_ones(()), \
                w.max() if w.numel() else w.new_ones(())
            s["is_count"] = m.sum()
    return s


def plan_passes(order: list[int], micro_batch: int, token_budget: int | None, lengths: list[int]) -> list[list[int]]:
    """Split one optimizer step's sequences into forward passes: `micro_batch` at a time, or, with a token budget,
    as many length-sorted sequences as fit (less padding, fewer passes). The loss does not depend on the split."""
    if token_budget is None:
        return [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    passes, cur, widest = [], [], 0
    for i in sorted(order, key=lambda j: lengths[j]):
        w = max(widest, lengths[i])
        if cur and w * (len(cur) + 1) > token_budget:
            passes.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        widest = w
    if cur:
        passes.append(cur)
    return _even_tail(passes, token_budget, lengths)


def _even_tail(passes: list[list[int]], token_budget: int, lengths: list[int]) -> list[list[int]]:
    """A last pass holding the few rows left over gets rows from the pass before it, up to half of the two, as
    far as the budget allows at its width (the last pass holds the widest rows: moving narrower ones in does not
    widen it). Fewer nearly empty passes, and a single-row pass, which makes compiled layers compile a second
    graph (torch specialises a size of 1), is avoided where two rows fit."""
    if len(passes) < 2:
        return passes
    prev, last = passes[-2], passes[-1]
    width = max(lengths[i] for i in last)
    want = min((len(prev) + len(last)) // 2, token_budget // max(width, 1))
    if want <= len(last):
        return passes
    k = want - len(last)
    return passes[:-2] + [prev[:-k], prev[-k:] + last]


def split_passes(passes: list[list[int]], count: int) -> list[list[int]]:
    """Halve the largest passes until there are `count` (no pass grows, so a token budget still holds): FSDP2 ranks
    must run the same number of passes. `count` never exceeds the sequences of a step, equal on every rank."""
    passes = list(passes)
    while len(passes) < count:
        i = max(range(len(passes)), key=lambda j: len(passes[j]))
        if len(passes[i]) < 2:
            break
        half = len(passes[i]) // 2
        passes[i:i + 1] = [passes[i][:half], passes[i][half:]]
    return passes
