"""The transformers generator's own sampler (fastgrpo.rollout.hf.InverseCdfSampler): the drawn tokens follow the
processed distribution, computed here independently in float64 from the definitions of temperature, top-k, min-p
and top-p."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgrpo.rollout.hf import InverseCdfSampler


def _expected(logits: np.ndarray, t: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    z = logits.astype(np.float64) / t
    if top_k:
        z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if min_p:
        p = np.where(p >= min_p * p.max(), p, 0.0)
    if top_p < 1:
        keep, mass = np.zeros_like(p, dtype=bool), 0.0
        for i in np.argsort(-p, kind="stable"):
            if mass >= top_p:
                break
            keep[i], mass = True, mass + p[i]
        p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("t,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 4, 1.0, 0.0),
                                                  (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.9, 6, 0.9, 0.05)])
def test_drawn_tokens_follow_the_processed_distribution(t, top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, float("-inf"), 0.2])
    n = 40_000
    out = InverseCdfSampler(t, top_k, top_p, min_p)(None, logits.expand(n, -1).clone())
    assert torch.isinf(out).sum(-1).eq(logits.numel() - 1).all() and out.max(-1).values.eq(0).all()
    counts = np.bincount(out.argmax(-1).numpy(), minlength=logits.numel()) / n
    want = _expected(logits.numpy(), t, top_k, top_p, min_p)
    assert counts[want == 0].sum() == 0, "a token outside the kept set was drawn"
    np.testing.assert_allclose(counts, want, atol=4 * np.sqrt(want * (1 - want) / n).max() + 1e-3)


def test_rows_are_drawn_independently_and_reproducibly():
    logits = torch.zeros(1000, 50)
    torch.manual_seed(3)
    a = InverseCdfSampler(1.0)(None, logits.clone()).argmax(-1)
    torch.manual_seed(3)
    b = InverseCdfSampler(1.0)(None, logits.clone()).argmax(-1)
    assert torch.equal(a, b) and len(set(a.tolist())) > 40  # uniform over 50 tokens: nearly all of them appear
