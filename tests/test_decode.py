"""The CPU decoding loop (fastgrpo.rollout.decode): `sample_tiles` draws from softmax(logits / temperature), checked
against the distribution computed independently in float64; `decode` with an argmax pick reproduces transformers'
greedy `generate` token for token (KV cache, positions and left padding right, rows leave at EOS); HFGenerator takes
it only for plain temperature sampling."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fastgrpo.logprobs import causal_lm_parts
from fastgrpo.rollout.base import SamplingParams
from fastgrpo.rollout.decode import decode, sample_tiles
from fastgrpo.rollout.hf import HFGenerator
from fastgrpo.rollout.decode import left_padded


def _softmax64(h, w, b, t):
    z = (h.double() @ w.double().t() + (0 if b is None else b.double())) / t
    p = torch.exp(z - z.max())
    return (p / p.sum()).numpy()


@pytest.mark.parametrize("block", [7, 16, 50, 64])
@pytest.mark.parametrize("t,with_bias", [(1.0, False), (0.6, True), (1.7, False)])
def test_tiles_draw_from_the_softmax(block, t, with_bias):
    g = torch.Generator().manual_seed(1)
    V, H, n = 50, 6, 40_000
    w = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if with_bias else None
    h = torch.randn(1, H, generator=g) * 0.7
    torch.manual_seed(0)
    tokens = sample_tiles(h.expand(n, -1).contiguous(), w, b, t, block)
    assert tokens.shape == (n,) and tokens.dtype == torch.long
    counts = np.bincount(tokens.numpy(), minlength=V)
    assert len(counts) == V, "a token id past the vocabulary was drawn"
    want = _softmax64(h[0], w, b, t)
    np.testing.assert_allclose(counts / n, want, atol=4 * np.sqrt(want * (1 - want) / n).max() + 1e-3)


def test_tiles_rows_are_independent_and_follow_their_own_logits():
    V, H = 40, 4
    w = torch.eye(V, H) * 30.0  # row i of h picks token i: each row's softmax is nearly one-hot
    h = torch.zeros(V // 10, H)
    for i in range(H):
        h[i, i] = 1.0
    torch.manual_seed(0)
    assert sample_tiles(h, w, None, 1.0, block=3).tolist() == [0, 1, 2, 3]
    flat = torch.zeros(5000, H)  # every logit equal: uniform over the whole vocabulary, across uneven blocks
    drawn = sample_tiles(flat, w, None, 1.0, block=7)
    assert set(drawn.tolist()) == set(range(V))


def _greedy_pick(head, h):
    return torch.nn.functional.linear(h, head.weight).argmax(-1)


def test_decode_matches_greedy_generate(tiny_model_factory, char_tokenizer):
    model = tiny_model_factory(seed=5, hidden=64, tie=False).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # large random weights: greedy output then depends on the whole context, not an echo
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p is model.lm_head.weight else 0.3))
    pad = char_tokenizer.pad_token_id
    prompts = [torch.randint(0, 95, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    ids, att = left_padded(prompts, pad)
    width, steps = ids.shape[1], 12
    ref = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=steps, do_sample=False,
                         eos_token_id=None, pad_token_id=pad)[:, width:].tolist()
    backbone, head = causal_lm_parts(model)
    pick = functools.partial(_greedy_pick, head)
    assert decode(backbone, pick, ids, att, steps, eos_ids=[]) == ref
    # an EOS: a token greedy emits in row 1 after its first step but never in some other row; each row stops at
    # its first occurrence, the others go on to the limit
    eos = next(t for t in ref[1][1:] if t not in ref[1][:1] and any(t not in r for r in ref))
    want = [r[:r.index(eos) + 1] if eos in r else r for r in ref]
    got = decode(backbone, pick, ids, att, steps, eos_ids=[eos])
    assert got == want and 1 < len(got[1]) < steps and any(len(r) == steps for r in got)


def test_generator_samples_with_the_loop_only_for_plain_temperature(tiny_model_factory, char_tokenizer, monkeypatch):
    model = tiny_model_factory(seed=2)
    gen = HFGenerator(model, [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id)
    plain = SamplingParams(n=3, max_tokens=6, temperature=0.9)
    assert gen._lean(plain, torch.device("cpu"))
    for change in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(repetition_penalty=1.2),
                   dict(temperature=0.0), dict(extra={"no_repeat_ngram_size": 2})):
        params = SamplingParams(**{**dict(n=3, max_tokens=6, temperature=0.9), **change})
        assert not gen._lean(params, torch.device("cpu")), change
    assert not gen._lean(plain, torch.device("cuda"))
    out = gen.generate([[5, 6, 7], [8]], plain)
    assert len(out.completion_ids) == 6 and all(1 <= len(c) <= 6 for c in out.completion_ids)
    for c, r in zip(out.completion_ids, out.finish_reasons):
        assert (r == "stop") == (c[-1] == char_tokenizer.eos_token_id) and (r == "stop" or len(c) == 6)
