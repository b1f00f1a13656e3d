"""fastgrpo.loss and fastgrpo.advantages against independent loop implementations of TRL's definitions.

The system under test aggregates as `fastgrpo.batch.train_pass` does: per micro-batch, per_token_loss, then
sum_i w_i * sum_t loss_it * mask_it with w from `sequence_weights`, summed over micro-batches. The reference below
is written straight from the formulas with explicit Python loops over micro-batches, sequences and tokens, in
float64, and normalises each micro-batch the way TRL does:
  grpo    : mean over sequences of per-sequence token means, / gradient_accumulation_steps
  bnpo    : token mean over the micro-batch, / GA
  dr_grpo : token sum / (B * max_completion_length), / GA
  dapo, cispo: token sum / (tokens of the generation batch * GA / steps_per_generation)
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from fastgrpo import advantages as A
from fastgrpo import loss as L

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
LEVELS = ("token", "sequence")
VARIANTS = ("plain", "beta", "beta_uncorrected", "eps_high", "delta", "is_token", "is_sequence", "entropy_mask", "all")
TOL = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------ reference code
def ref_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default 'linear' method)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ref_entropy_mask(entropy, lengths, keep, quantile) -> list[list[float]]:
    """1 on tokens whose entropy is >= the (1 - quantile) quantile of the micro-batch's loss tokens."""
    vals = [float(entropy[i, t]) for i in range(len(lengths)) if keep[i] for t in range(lengths[i])]
    B, T = entropy.shape
    out = [[0.0] * T for _ in range(B)]
    if not vals:
        return out
    thr = ref_quantile(vals, 1.0 - quantile)
    for i in range(B):
        for t in range(lengths[i]):
            if keep[i] and float(entropy[i, t]) >= thr:
                out[i][t] = 1.0
    return out


def ref_is_weights(old, gen, lengths, keep, mode, clip_min, clip_max):
    """TRL's vLLM importance-sampling ratio exp(old - gen), per token or per sequence (sum of log-ratios),
    truncated (clamped) or masked (zeroed outside [clip_min, clip_max]); NaN generator logprobs count as equal."""
    B, T = old.shape
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max

    def fix(r):
        if mode.endswith("truncate"):
            return min(max(r, lo), hi)
        return 0.0 if (r < lo or r > hi) else r

    diffs = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(lengths[i]):
            if keep[i]:
                d = float(old[i, t]) - float(gen[i, t])
                diffs[i][t] = 0.0 if math.isnan(d) else d
    if mode.startswith("sequence"):
        return [[fix(math.exp(sum(diffs[i])))] for i in range(B)]
    return [[fix(math.exp(diffs[i][t])) for t in range(T)] for i in range(B)]


def ref_generation_loss(logp, old, adv, lengths, keep, ref, is_w, ent_mask, *, loss_type, level, eps_low, eps_high,
                        delta, beta, micro_batch, grad_accum, steps_per_generation, max_len, kl_bias_correction=True):
    """TRL's loss summed over the micro-batches of a generation batch, as scalar float64 autograd ops.

    logp: [N, T] leaf requiring grad; lengths[i]: completion tokens of sequence i; keep[i]: 0 when its loss mask is
    all zero (masked truncated completion); is_w[i]: per-token list or one-element list; ent_mask[i][t] or None.
    """
    N = logp.shape[0]
    total_tokens = sum(lengths[i] for i in range(N) if keep[i])
    total = logp.new_zeros(())
    per_mb = []
    for m0 in range(0, N, micro_batch):
        seqs = range(m0, min(m0 + micro_batch, N))
        seq_sums, seq_counts = [], []
        for i in seqs:
            n_i = lengths[i] if keep[i] else 0
            seq_ratio = None
            if level == "sequence":
                s = logp.new_zeros(())
                for t in range(n_i):
                    s = s + (logp[i, t] - old[i, t])
                seq_ratio = torch.exp(s / max(n_i, 1))
            acc = logp.new_zeros(())
            for t in range(n_i):
                r = torch.exp(logp[i, t] - old[i, t]) if level == "token" else seq_ratio
                a = float(adv[i])
                if loss_type == "cispo":
                    capped = r.detach() if float(r.detach()) <= eps_high else r.detach() * 0 + eps_high
                    lt = -capped * a * logp[i, t]
                else:
                    clipped = r.clamp(1 - eps_low, 1 + eps_high)
                    unclipped = r if delta is None or float(r.detach()) <= delta else r * 0 + delta
                    x, y = unclipped * a, clipped * a
                    lt = -(x if float(x.detach()) <= float(y.detach()) else y)
                if ent_mask is not None:
                    lt = lt * ent_mask[i][t]
                if is_w is not None:
                    lt = lt * (is_w[i][t] if len(is_w[i]) > 1 else is_w[i][0])
                if beta:
                    d = ref[i, t] - logp[i, t]
                    k3 = torch.exp(d) - d - 1
                    lt = lt + beta * (k3 * r if kl_bias_correction else k3)  # r: the ratio before any clip or cap
                acc = acc + lt
            seq_sums.append(acc)
            seq_counts.append(n_i)
        B = len(seq_sums)
        if loss_type == "grpo":
            mb = sum(s / max(c, 1) for s, c in zip(seq_sums, seq_counts)) / B / grad_accum
        elif loss_type == "bnpo":
            mb = sum(seq_sums) / max(sum(seq_counts), 1) / grad_accum
        elif loss_type == "dr_grpo":
            mb = sum(seq_sums) / (B * max_len) / grad_accum
        else:
            mb = sum(seq_sums) / (max(total_tokens, 1) * grad_accum / steps_per_generation)
        per_mb.append(mb)
        total = total + mb
    return total, per_mb


# ------------------------------------------------------------------------------------------------- data
def make_batch(seed: int, N: int, T: int, level: str):
    """Random float64 logprobs with old/ref/generator logprobs spread so that every clipping branch is hit.

    Sequences follow a pattern of (advantage sign, log-ratio offset): (+, ratio ~1.8: upper clip), (-, ratio ~0.55:
    lower clip), (-, ratio ~1.8: delta cap), (+, ratio ~1: inside, and a generator close to the trainer so that no
    IS mask drops it), on top of per-token noise; the first row's generator is far below the trainer (IS clipping). One sequence is fully masked (a truncated
    completion under mask_truncated_completions) and lengths are ragged. Entropies are fp32, as the model gives.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, T + 1, (N,), generator=g)]
    lengths[:3] = [T, T, T]  # the three clipping rows are long enough to surely clip; the others are ragged
    keep = [1] * N
    keep[N - 1] = 0
    signs = torch.tensor([[1.0], [-1.0], [-1.0], [1.0]], dtype=torch.float64).repeat(N, 1)[:N]
    offset = torch.tensor([[-0.6], [0.6], [-0.6], [0.0]], dtype=torch.float64).repeat(N, 1)[:N]
    token_noise = torch.tensor([[1.2], [1.2], [1.2], [0.2]], dtype=torch.float64).repeat(N, 1)[:N]
    gen_offset = torch.tensor([[-1.0], [0.0], [0.0], [0.0]], dtype=torch.float64).repeat(N, 1)[:N]
    gen_noise = torch.tensor([[4.0], [4.0], [4.0], [0.05]], dtype=torch.float64).repeat(N, 1)[:N]
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + offset + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * token_noise
    ref = logp + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * 0.8
    gen = old + gen_offset + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * gen_noise
    gen[1, 0] = float("nan")  # the generator did not report this token's logprob
    adv = (torch.rand(N, 1, generator=g, dtype=torch.float64) + 0.2) * signs
    entropy = torch.rand(N, T, generator=g, dtype=torch.float32) * 4
    mask = torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        mask[i, :lengths[i]] = float(keep[i])
    return dict(lengths=lengths, keep=keep, logp=logp, old=old, ref=ref, gen=gen, adv=adv.squeeze(1), entropy=entropy,
                mask=mask)


def variant_params(loss_type: str, variant: str) -> dict:
    p = dict(eps_low=0.2, eps_high=0.2, delta=None, beta=0.0, is_mode=None, quantile=1.0)
    if loss_type == "cispo":
        p["eps_high"] = 1.25  # CISPO's cap on the ratio itself (TRL: epsilon_high)
    p["kl_correction"] = variant != "beta_uncorrected"
    if variant in ("beta", "beta_uncorrected", "all"):
        p["beta"] = 0.04
    if variant in ("eps_high", "all"):
        p["eps_high"] = 0.28 if loss_type != "cispo" else 1.1
    if variant in ("delta", "all") and loss_type != "cispo":
        p["delta"] = 1.3
    if variant in ("is_token", "all"):
        p["is_mode"] = "token_truncate"
    if variant == "is_sequence":
        p["is_mode"] = "sequence_mask"
    if variant in ("entropy_mask", "all"):
        p["quantile"] = 0.6
    return p


def sut_generation_loss(b, p, *, loss_type, level, micro_batch, grad_accum, spg, max_len):
    """fastgrpo: per micro-batch per_token_loss + sequence_weights aggregation, as batch.train_pass does."""
    logp = b["logp"].clone().requires_grad_(True)
    lengths = torch.tensor([l * k for l, k in zip(b["lengths"], b["keep"])], dtype=torch.float64)
    w = L.sequence_weights(lengths, loss_type, micro_batch, grad_accum, spg, max_len)
    params = L.LossParams(loss_type, level, p["eps_low"], p["eps_high"], p["delta"], p["beta"], p["kl_correction"])
    N = logp.shape[0]
    total, per_mb, ratios = logp.new_zeros(()), [], []
    for m0 in range(0, N, micro_batch):
        idx = list(range(m0, min(m0 + micro_batch, N)))
        mask = b["mask"][idx]
        is_w = (L.importance_weights(b["old"][idx], b["gen"][idx], mask, p["is_mode"], None, 2.0)
                if p["is_mode"] else None)
        tm = L.top_entropy_mask(b["entropy"][idx], mask, p["quantile"]) if p["quantile"] < 1 else None
        terms = L.per_token_loss(logp[idx], b["old"][idx], b["adv"][idx], mask, params,
                                 b["ref"][idx] if p["beta"] else None, is_w, tm)
        mb = (w[idx] * (terms.per_token_loss * mask).sum(-1)).sum()
        per_mb.append(mb)
        total = total + mb
        ratios.append(terms.ratio.expand_as(mask) if terms.ratio.shape != mask.shape else terms.ratio)
    total.backward()
    return total, per_mb, logp.grad, torch.cat(ratios)


def ref_inputs(b, p, micro_batch):
    """The reference's IS weights and entropy masks, computed by loops per micro-batch."""
    N = b["logp"].shape[0]
    is_w, ent = ([] if p["is_mode"] else None), ([] if p["quantile"] < 1 else None)
    for m0 in range(0, N, micro_batch):
        sl = slice(m0, min(m0 + micro_batch, N))
        if p["is_mode"]:
            is_w += ref_is_weights(b["old"][sl], b["gen"][sl], b["lengths"][sl], b["keep"][sl], p["is_mode"], None, 2.0)
        if p["quantile"] < 1:
            ent += ref_entropy_mask(b["entropy"][sl], b["lengths"][sl], b["keep"][sl], p["quantile"])
    return is_w, ent


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("micro_batch,grad_accum,spg", [(4, 2, 2), (3, 1, 2)])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_match_trl_formulas(loss_type, level, variant, micro_batch, grad_accum, spg):
    N, T, max_len = micro_batch * spg, 7, 9
    seed = zlib.crc32(f"{loss_type}/{level}/{variant}/{micro_batch}".encode())
    b = make_batch(seed, N, T, level)
    p = variant_params(loss_type, variant)

    total, per_mb, grad, ratios = sut_generation_loss(b, p, loss_type=loss_type, level=level, micro_batch=micro_batch,
                                                      grad_accum=grad_accum, spg=spg, max_len=max_len)

    leaf = b["logp"].clone().requires_grad_(True)
    is_w, ent = ref_inputs(b, p, micro_batch)
    ref_total, ref_per_mb = ref_generation_loss(
        leaf, b["old"], b["adv"], b["lengths"], b["keep"], b["ref"], is_w, ent, loss_type=loss_type, level=level,
        eps_low=p["eps_low"], eps_high=p["eps_high"], delta=p["delta"], beta=p["beta"], micro_batch=micro_batch,
        grad_accum=grad_accum, steps_per_generation=spg, max_len=max_len, kl_bias_correction=p["kl_correction"])
    ref_total.backward()

    assert total.dtype == torch.float64
    torch.testing.assert_close(total, ref_total.detach(), **TOL)
    for a, r in zip(per_mb, ref_per_mb):  # each optimizer step's share matches, not only the sum
        torch.testing.assert_close(a.detach(), r.detach(), **TOL)
    torch.testing.assert_close(grad, leaf.grad, **TOL)
    assert grad.abs().sum() > 0

    # The data really exercises the clipping branches (else the test would not tell clipped from unclipped).
    m = b["mask"].bool()
    sign = b["adv"][:, None].expand_as(b["mask"])
    if loss_type == "cispo":
        assert ((ratios > p["eps_high"]) & m).any()
    else:
        assert ((ratios > 1 + p["eps_high"]) & (sign > 0) & m).any(), "upper clip never active"
        assert ((ratios < 1 - p["eps_low"]) & (sign < 0) & m).any(), "lower clip never active"
        if p["delta"] is not None:
            assert ((ratios > p["delta"]) & (sign < 0) & m).any(), "delta cap never active"
    if p["quantile"] < 1:
        assert 0 < sum(map(sum, ent)) < m.sum()
    if p["is_mode"] == "token_truncate":
        assert any(w == 2.0 for row in is_w for w in row), "IS truncation never active"
    if p["is_mode"] == "sequence_mask":
        assert any(row[0] == 0.0 for i, row in enumerate(is_w) if b["keep"][i])


def test_sequence_weights_multi_rank_dapo():
    """dapo/cispo normaliser with several ranks: global token count / world_size * GA / steps_per_generation."""
    lengths = torch.tensor([3.0, 5.0, 0.0, 7.0])
    for lt in ("dapo", "cispo"):
        w = L.sequence_weights(lengths, lt, micro_batch=2, grad_accum=2, steps_per_generation=2, max_completion_length=9,
                               total_tokens=40.0, world_size=4)
        expected = 1.0 / (40.0 / 4 * 2 / 2)
        assert all(abs(float(x) - expected) < 1e-15 for x in w)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min,clip_max", [(None, 2.0), (0.5, 1.5), (None, None)])
def test_importance_weights_modes(mode, clip_min, clip_max):
    b = make_batch(7, 6, 5, "token")
    mask = b["mask"]
    got = L.importance_weights(b["old"], b["gen"], mask, mode, clip_min, clip_max)
    expected = torch.tensor(ref_is_weights(b["old"], b["gen"], b["lengths"], b["keep"], mode, clip_min, clip_max),
                            dtype=torch.float64)
    assert got.shape == ((6, 1) if mode.startswith("sequence") else (6, 5))
    torch.testing.assert_close(got, expected, **TOL)
    assert not got.isnan().any()
    if clip_max is not None and clip_min is not None:  # some ratios really are outside the range
        outside = (expected == 0) if mode.endswith("mask") else ((expected == clip_max) | (expected == clip_min))
        assert outside.any()


@pytest.mark.parametrize("quantile", [1.0, 0.8, 0.5, 0.2, 0.05])
def test_top_entropy_mask(quantile):
    b = make_batch(11, 6, 8, "token")
    got = L.top_entropy_mask(b["entropy"], b["mask"], quantile)
    expected = torch.tensor(ref_entropy_mask(b["entropy"], b["lengths"], b["keep"], quantile), dtype=got.dtype)
    assert torch.equal(got, expected)
    kept, total = int(got.sum()), int(b["mask"].sum())
    assert 0 < kept and (quantile == 1.0) == (kept == total)
    assert not (got.bool() & ~b["mask"].bool()).any()
    assert torch.equal(L.top_entropy_mask(b["entropy"], torch.zeros_like(b["mask"]), quantile), torch.zeros_like(got))


# ------------------------------------------------------------------------------------------------ advantages
def ref_combine(per_func: list[list[float]], weights: list[float]) -> list[float]:
    out = []
    for row in per_func:
        vals = [w * v for w, v in zip(weights, row) if not math.isnan(v)]
        out.append(sum(vals) if vals else math.nan)
    return out


def ref_std(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    if len(v) < 2:
        return math.nan
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))  # unbiased (Bessel)


def ref_advantages(rewards: list[float], G: int, scale: str) -> list[float]:
    out = []
    batch_std = ref_std(rewards)
    for g0 in range(0, len(rewards), G):
        group = rewards[g0:g0 + G]
        valid = [x for x in group if not math.isnan(x)]
        mean = sum(valid) / len(valid) if valid else math.nan
        std = {"group": ref_std(group), "batch": batch_std, "none": None}[scale]
        for r in group:
            if math.isnan(r):
                out.append(0.0)
                continue
            a = r - mean
            if std is not None:
                a = 0.0 if math.isnan(std) else a / (std + 1e-4)
            out.append(a)
    return out


def test_combine_rewards_skips_none():
    nan = math.nan
    per_func = [[1.0, nan, 2.0], [nan, nan, nan], [0.5, -1.0, nan], [0.0, 3.0, 1.0]]
    weights = [0.7, 2.0, -1.5]
    got = A.combine_rewards(torch.tensor(per_func, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64))
    expected = ref_combine(per_func, weights)
    for g, e in zip(got.tolist(), expected):
        assert (math.isnan(g) and math.isnan(e)) or abs(g - e) < 1e-12


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("with_nan", [False, True])
def test_group_advantages(scale, with_nan):
    g = torch.Generator().manual_seed(3)
    G = 4
    rewards = (torch.randn(5 * G, generator=g, dtype=torch.float64) * 2).tolist()
    rewards[4:8] = [1.5] * 4                 # a group with zero std: advantages 0
    if with_nan:
        rewards[1] = math.nan                  # one None in a group: left out of its statistics
        rewards[8:12] = [math.nan, 2.0, math.nan, math.nan]  # one valid value: no std
        rewards[12:16] = [math.nan] * 4        # nobody scored this group
    adv, group_std = A.group_advantages(torch.tensor(rewards, dtype=torch.float64), G, scale)
    expected = ref_advantages(rewards, G, scale)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64), **TOL)
    exp_std = [0.0 if math.isnan(s) else s for g0 in range(0, len(rewards), G) for s in [ref_std(rewards[g0:g0 + G])] * G]
    torch.testing.assert_close(group_std, torch.tensor(exp_std, dtype=torch.float64), **TOL)
    assert torch.all(adv[4:8] == 0)
    if with_nan:
        assert adv[1] == 0 and torch.all(adv[12:16] == 0)
    # the unbiased std is what scales the group: torch's std agrees (correction=1)
    if scale == "group":
        assert abs(float(group_std[16]) - float(torch.tensor(rewards[16:20], dtype=torch.float64).std(correction=1))) < 1e-12


def test_nanstd_is_unbiased():
    x = torch.tensor([1.0, 2.0, math.nan, 4.0, 8.0], dtype=torch.float64)
    assert abs(float(A.nanstd(x)) - ref_std(x.tolist())) < 1e-12
    assert math.isnan(float(A.nanstd(torch.tensor([3.0, math.nan], dtype=torch.float64))))
    grid = torch.tensor([[1.0, 5.0, math.nan], [2.0, 2.0, 3.0]], dtype=torch.float64)
    got = A.nanstd(grid, dim=1)
    for row, g in zip(grid.tolist(), got.tolist()):
        assert abs(g - ref_std(row)) < 1e-12


def test_batch_scale_uses_given_std():
    """scale='batch' with a std gathered from other ranks divides by that std, not the local one."""
    r = torch.tensor([0.0, 1.0, 3.0, 5.0], dtype=torch.float64)
    adv, _ = A.group_advantages(r, 2, "batch", batch_std=torch.tensor(2.5, dtype=torch.float64))
    expected = [x - m for x, m in zip(r.tolist(), [0.5, 0.5, 4.0, 4.0])]
    torch.testing.assert_close(adv, torch.tensor([e / (2.5 + 1e-4) for e in expected], dtype=torch.float64), **TOL)



def test_kl_bias_correction_on_policy_keeps_the_value_and_changes_the_gradient():
    """TRL 1.16's use_bias_correction_kl (default on): on-policy the ratio is 1 in value, so the loss is the same,
    but its gradient adds beta * k3 per token (d(k3 r)/dlogp = dk3/dlogp + k3 where r = 1)."""
    g = torch.Generator().manual_seed(3)
    logp0 = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    ref = logp0 + (torch.rand(3, 5, generator=g, dtype=torch.float64) - 0.5)
    adv, mask, beta = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64), 0.1
    out = {}
    for correct in (True, False):
        logp = logp0.clone().requires_grad_(True)
        params = L.LossParams("dapo", "token", 0.2, 0.2, None, beta, correct)
        terms = L.per_token_loss(logp, logp.detach(), adv, mask, params, ref)
        terms.per_token_loss.sum().backward()
        out[correct] = (terms.per_token_loss.detach(), logp.grad)
    d = ref - logp0
    k3 = torch.exp(d) - d - 1
    torch.testing.assert_close(out[True][0], out[False][0], **TOL)
    torch.testing.assert_close(out[True][1] - out[False][1], beta * k3, **TOL)
    assert (k3 > 1e-3).any()
