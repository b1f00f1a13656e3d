"""rollout.vllm_logprobs: mapping the sampler's per-step records onto completions (CPU). The recording itself runs
inside vLLM; its GPU test (tests/test_vllm_colocate.py, `-k sampler_logprobs`) compares it with vLLM's logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from fastgrpo.rollout.vllm_logprobs import SamplerLogprobsError, _key, per_completion, rpc


def record(rows):
    """rows: (engine request id, position of the logits row, sampled token, logprob), in step order."""
    return {"req_ids": [r[0] for r in rows], "pos": np.array([r[1] for r in rows], dtype=np.int64),
            "tokens": np.array([r[2] for r in rows], dtype=np.int64),
            "logprobs": np.array([r[3] for r in rows], dtype=np.float32), "problem": None}


def test_engine_ids_parse_for_children_and_single_requests():
    assert _key("0_12-1a2b3c4d", 2) == ("12", 0)
    assert _key("3_12-1a2b3c4d", 4) == ("12", 3)
    assert _key("12-1a2b3c4d", 1) == ("12", 0)
    assert _key("req_0_abc", 2) is None  # vLLM's dummy-run ids are not ours
    assert _key("nodash", 1) is None


def test_rows_land_on_their_completion_tokens():
    # Request "5": prompt of 3 tokens, n=2; request "6": prompt of 4 tokens. Steps interleave the requests, as
    # a batch does; a non-final prefill chunk (position 1 of a 4-token prompt) samples a token that is dropped;
    # the row after a completion's last token (async scheduling runs one step past a stop) is ignored; a row of
    # an unrelated request is skipped.
    rows = [
        ("0_6-aaaaaaaa", 1, 99, -9.0),  # non-final prefill chunk: no completion token
        ("0_5-bbbbbbbb", 2, 10, -0.5), ("1_5-bbbbbbbb", 2, 20, -1.5), ("0_6-aaaaaaaa", 3, 30, -2.5),
        ("1_6-aaaaaaaa", 3, 40, -3.5), ("other-cccccccc", 7, 1, -0.1),
        ("0_5-bbbbbbbb", 3, 11, -0.25), ("1_5-bbbbbbbb", 3, 21, -1.25), ("0_6-aaaaaaaa", 4, 31, -2.25),
        ("1_6-aaaaaaaa", 4, 41, -3.25),
        ("0_5-bbbbbbbb", 4, 12, -0.125), ("1_6-aaaaaaaa", 5, 77, -7.0),  # "1_6" stopped after 2 tokens
    ]
    completions = [[[10, 11, 12], [20, 21]], [[30, 31], [40, 41]]]
    out = per_completion(record(rows), ["5", "6"], [3, 4], 2, completions)
    assert out == [[[-0.5, -0.25, -0.125], [-1.5, -1.25]], [[-2.5, -2.25], [-3.5, -3.25]]]


@pytest.mark.parametrize("as_lists", [False, True], ids=["numpy", "lists from an engine process"])
def test_single_sample_requests_and_empty_completions(as_lists):
    rows = [("8-dddddddd", 1, 5, -1.0), ("9-eeeeeeee", 0, 6, -2.0), ("9-eeeeeeee", 1, 7, -3.0)]
    rec = record(rows)
    if as_lists:
        rec = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in rec.items()}
    out = per_completion(rec, ["8", "9", "10"], [2, 1, 4], 1, [[[5]], [[6, 7]], [[]]])
    assert out == [[[-1.0]], [[-2.0, -3.0]], [[]]]


@pytest.mark.parametrize("rows, why", [
    ([("0_5-bbbbbbbb", 2, 10, -0.5)], "a missing step"),
    ([("0_5-bbbbbbbb", 2, 10, -0.5), ("0_5-bbbbbbbb", 3, 12, -0.2)], "a token that disagrees"),
    ([("0_4-bbbbbbbb", 2, 10, -0.5), ("0_4-bbbbbbbb", 3, 11, -0.2)], "another request's rows"),
])
def test_gaps_and_disagreements_raise_naming_the_switch(rows, why):
    with pytest.raises(SamplerLogprobsError, match="vllm_sampler_logprobs=False"):
        per_completion(record(rows), ["5"], [3], 2, [[[10, 11]]])


def test_a_problem_seen_in_the_sampler_raises():
    rec = record([("0_5-bbbbbbbb", 2, 10, -0.5)])
    rec["problem"] = "3 sampled rows for 2 requests"
    with pytest.raises(SamplerLogprobsError, match="3 sampled rows"):
        per_completion(rec, ["5"], [3], 2, [[[10]]])


def test_rpc_runs_only_the_three_actions():
    with pytest.raises(ValueError, match="unknown sampler-logprobs action 'per_completion'"):
        rpc(object(), "per_completion")
