"""Sampled-token logprobs read from vLLM's sampler on the GPU and handed back once per `generate` call.

Why: with `logprobs=0`, vLLM turns every decoding step's logprobs into per-request Python objects (the scheduler
slices them per request, the output processor appends them one by one): about 1 ms per step for 128 rows, so
0.55 s of a 2.3 s recipe generation on an H200 (`tools/gpu_gen_profile.py`). The values themselves are one small
kernel away from the sampler's processed logits.

How: `install` (run on the worker through `LLM.collective_rpc`) gives the V2 model runner's sampler a subclass that,
between `start` and `take`, keeps each step's (request ids, positions, sampled tokens, logprobs) with the tensors
left on the GPU. `take` returns them as NumPy arrays in one copy; `per_completion` maps them onto the completions
that `LLM.generate` returned and checks every sampled token against them.

The values are those of vLLM's `logprobs_mode="processed_logprobs"`: vLLM's own `compute_token_logprobs` on the
logits after temperature, penalties, bad words, logit bias, min-p and top-k/top-p. Supported: vLLM's V2 model
runner without speculative decoding (the default for dense models in vLLM 0.26); elsewhere `install` returns False
and the generator asks vLLM for `logprobs=0` as before.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

__all__ = ["install", "start", "take", "rpc", "per_completion", "SamplerLogprobsError"]

_ATTR = "_fastgrpo_logprobs"


class SamplerLogprobsError(RuntimeError):
    """The recorded steps do not cover a completion's tokens (set vllm_sampler_logprobs=False to bypass)."""


class _Recorder:
    __slots__ = ("on", "steps", "req_ids", "problem")

    def __init__(self) -> None:
        self.on = False
        self.steps: list[tuple[list[str], Any, Any, Any]] = []
        self.req_ids: list[str] | None = None
        self.problem: str | None = None


@functools.lru_cache(maxsize=None)
def _recording_class(base: type) -> type:
    from vllm.v1.worker.gpu.sample.logprob import compute_token_logprobs

    class RecordingSampler(base):  # type: ignore[misc, valid-type]
        def __call__(self, logits, input_batch):
            rec = getattr(self, _ATTR)
            if rec.on:
                rec.req_ids = list(input_batch.req_ids)
            return super().__call__(logits, input_batch)

        def sample(self, logits, expanded_idx_mapping, idx_mapping_np, pos, input_ids, expanded_local_pos,
                   return_logprobs=False):
            rec = getattr(self, _ATTR)
            if not rec.on:
                return super().sample(logits, expanded_idx_mapping, idx_mapping_np, pos, input_ids,
                                      expanded_local_pos, return_logprobs=return_logprobs)
            # return_logprobs=True keeps vLLM off its FlashInfer sampler, whose logits skip top-k/top-p.
            sampled, processed = super().sample(logits, expanded_idx_mapping, idx_mapping_np, pos, input_ids,
                                                expanded_local_pos, return_logprobs=True)
            if rec.req_ids is None or sampled.shape[0] != len(rec.req_ids):
                rec.problem = f"{sampled.shape[0]} sampled rows for {len(rec.req_ids or [])} requests"
            else:
                lp = compute_token_logprobs(processed, sampled.view(-1, 1)).view(-1)
                rec.steps.append((rec.req_ids, pos.clone(), sampled.view(-1).clone(), lp))
            rec.req_ids = None
            return sampled, processed

    RecordingSampler.__name__ = RecordingSampler.__qualname__ = f"Recording{base.__name__}"
    return RecordingSampler


def install(worker) -> bool:
    """Worker side (via collective_rpc): make the sampler record when asked; False where unsupported."""
    runner = getattr(worker, "model_runner", None)
    sampler = getattr(runner, "sampler", None)
    if sampler is None or getattr(runner, "speculator", None) is not None:
        return False
    try:
        from vllm.v1.worker.gpu.sample.sampler import Sampler
    except ImportError:
        return False
    if not isinstance(sampler, Sampler):  # the V1 model runner's sampler has another interface
        return False
    if not hasattr(sampler, _ATTR):
        sampler.__class__ = _recording_class(type(sampler))
        setattr(sampler, _ATTR, _Recorder())
    return True


def start(worker) -> None:
    rec = getattr(worker.model_runner.sampler, _ATTR)
    rec.on, rec.steps, rec.problem = True, [], None


def take(worker) -> dict:
    """Stop recording; the steps since `start` as flat arrays (one device-to-host copy)."""
    import torch

    rec = getattr(worker.model_runner.sampler, _ATTR)
    rec.on, steps, rec.steps = False, rec.steps, []
    req_ids = [rid for s in steps for rid in s[0]]
    if not steps:
        empty = np.zeros(0, dtype=np.int64)
        return {"req_ids": req_ids, "pos": empty, "tokens": empty, "logprobs": np.zeros(0, np.float32),
                "problem": rec.problem}
    pos, tokens, lps = (torch.cat([s[i].to(dtype) for s in steps]).cpu().numpy()
                        for i, dtype in ((1, torch.int64), (2, torch.int64), (3, torch.float32)))
    return {"req_ids": req_ids, "pos": pos, "tokens": tokens, "logprobs": lps, "problem": rec.problem}


def rpc(worker, action: str):
    """One entry point for `LLM.collective_rpc` (in-process: this function; engine process: the worker extension's
    method, since vLLM will not pickle a function there): "install", "start" or "take"."""
    if action not in ("install", "start", "take"):
        raise ValueError(f"unknown sampler-logprobs action {action!r}")
    return globals()[action](worker)


def _key(rid: str, n: int) -> tuple[str, int] | None:
    """vLLM 0.26 engine ids: '<external>-<8 chars>' for n == 1, '<index>_<external>-<8 chars>' for its children."""
    head, sep, _ = rid.rpartition("-")
    if not sep:
        return None
    if n == 1:
        return head, 0
    index, sep, external = head.partition("_")
    return (external, int(index)) if sep and index.isdigit() else None


def per_completion(recorded: dict, request_ids: Sequence[str], prompt_lens: Sequence[int], n: int,
                   completions: Sequence[Sequence[Sequence[int]]]) -> list[list[list[float]]]:
    """Logprobs of each request's completions ([request][index][token]) from `take`'s arrays.

    request_ids: the external ids of LLM.generate's outputs; prompt_lens: their prompt lengths; n: samples per
    request; completions[i][j]: the token ids of request i's completion j. A sampled token at position p + 1 was
    drawn from the logits of position p, so completion token k sits at p = prompt_len - 1 + k."""
    if recorded.get("problem"):
        raise SamplerLogprobsError(f"vLLM's sampler could not be followed: {recorded['problem']}")
    rows: dict[tuple[str, int], list[int]] = {}
    for i, rid in enumerate(recorded["req_ids"]):
        key = _key(rid, n)
        if key is not None:
            rows.setdefault(key, []).append(i)
    pos, tokens = np.asarray(recorded["pos"], np.int64), np.asarray(recorded["tokens"], np.int64)
    lps = np.asarray(recorded["logprobs"], np.float32)
    out = []
    for ext, plen, comps in zip(request_ids, prompt_lens, completions):
        per_request = []
        for j, ids in enumerate(comps):
            idx = np.asarray(rows.get((str(ext), j), []), dtype=np.int64)
            k = pos[idx] + 1 - plen
            keep = (k >= 0) & (k < len(ids))
            k, idx = k[keep], idx[keep]
            values = np.full(len(ids), np.nan, dtype=np.float32)
            values[k] = lps[idx]
            seen = np.full(len(ids), -1, dtype=np.int64)
            seen[k] = tokens[idx]
            if not np.array_equal(seen, np.asarray(ids, dtype=np.int64)) or np.isnan(values).any():
                raise SamplerLogprobsError(
                    f"request {ext!r}, completion {j}: the sampler's record covers {int((seen >= 0).sum())} of "
                    f"{len(ids)} tokens or disagrees with them. Set vllm_sampler_logprobs=False to take the "
                    "logprobs from vLLM's outputs instead.")
            per_request.append(values.tolist())
        out.append(per_request)
    return out
