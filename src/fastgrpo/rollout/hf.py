"""Generation with transformers models: the CPU backend, and the fallback when vLLM or a GPU is missing.

In the synchronous loop it samples from the trainer's own model object (no copy, nothing to sync) and returns no
logprobs: they would equal the trainer's. With `own_copy=True` (one-step off-policy mode) it samples from a
private copy, refreshed by `update_weights`, and returns the copy's logprobs of the sampled tokens, which the
importance-sampling correction needs because the trainer has moved on by then.

Sampling: on CPU, plain temperature sampling (the recipe's) skips `generate` for `decode.decode`, which samples from
hidden states in cache-sized tiles of the logits (~50 ms per decoding step for 128 rows of Qwen2's vocabulary on 2
cores, vs ~195 ms through `generate`). Otherwise `generate` runs greedy and `InverseCdfSampler`, the last logits
processor, draws the token itself (transformers' sampling ends in `torch.multinomial`, ~0.43 s per step for those
rows): temperature, top-k, min-p and top-p (as vLLM and transformers apply them), then one uniform per row against
the cumulative distribution (`searchsorted`); it returns logits that are 0 at the drawn token and -inf elsewhere,
which the greedy argmax picks. The repetition penalty stays transformers' own processor, applied before it.
On CUDA, `graphed.decode` replaces `generate` for full-attention models and any of those sampling settings but the
repetition penalty: a static KV cache and one CUDA graph per decoding step, tokens drawn by the same `draw`.

Under FSDP2 each decoding step all-gathers the layers, so ranks keep stepping (`synced_gpus`) until every rank's
sequences are done. The private copy is not supported there: it would be a second sharded model whose collectives,
run from the generation thread, would interleave with training's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import warnings

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..config_mappings import generate_arguments
from ..kernels import eager_layers
from ..logprobs import causal_lm_parts, logit_transform
from .base import Generation, Generator, SamplingParams
from . import graphed
from .decode import decode, left_padded, sample_tiles


def draw(scores: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
         min_p: float = 0.0) -> torch.Tensor:
    """logits [B, V] -> one token per row [B]: greedy at temperature 0, else drawn from softmax(logits /
    temperature) after top-k, min-p and top-p (as vLLM and transformers apply them) by one uniform per row against
    the cumulative distribution."""
    if temperature <= 0:
        return scores.argmax(-1)
    logits = scores.float() / temperature  # [B, V]
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before a token already reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(1)  # first cdf > u


class InverseCdfSampler(LogitsProcessor):
    """Draws one token per row with `draw`; see the module docstring."""

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> None:
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = draw(scores, self.temperature, self.top_k, self.top_p, self.min_p)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


class HFGenerator(Generator):
    def __init__(self, model: torch.nn.Module, eos_ids: list[int], pad_id: int, batch_size: int = 256,
                 own_copy: bool = False, dtype: torch.dtype | None = None, tokenizer=None) -> None:
        from ..config import ConfigError
        from ..distributed import is_sharded

        self.synced = is_sharded(model)
        if own_copy and self.synced:
            raise ConfigError("async_generation with the transformers generator needs a whole model per rank, but the "
                              "model is sharded (FSDP2). Fix: use_vllm=True (on GPUs), async_generation=False, or "
                              "fsdp='no_shard'.")
        self.owns_weights = own_copy
        self.model = copy.deepcopy(model).eval() if own_copy else model
        if own_copy:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.dtype = dtype
        self.tokenizer = tokenizer  # transformers' generate needs it for generation_kwargs' stop_strings
        self._stats: dict[str, float] = {}
        self._graph = "graph"  # graphed decoding on CUDA: "graph", "eager" after a failed capture, "off"

    @staticmethod
    def _generate_kwargs_only(params: SamplingParams) -> SamplingParams:
        """generation_kwargs meant for vLLM (use_vllm=True fell back to transformers): the keys transformers'
        generate does not take are dropped, with one warning, instead of failing in generate."""
        if not params.extra:
            return params
        known = generate_arguments()
        dropped = sorted(k for k in params.extra if k not in known)
        if not dropped:
            return params
        warnings.warn(f"generation_kwargs {dropped} are not arguments of transformers' generate (vLLM's, as "
                      "use_vllm=True asked for vLLM, which is not available here); the transformers backend leaves "
                      "them out.", stacklevel=3)
        return dataclasses.replace(params, extra={k: v for k, v in params.extra.items() if k in known})

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        params = self._generate_kwargs_only(params)
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out_ids, reasons = [], []
        per_call = max(1, self.batch_size // params.n)
        lean = self._lean(params, device)
        static = None if lean is not None else self._static(params, device)
        try:
            with eager_layers(model):  # compiled layers (torch_compile) were compiled for training passes
                for s in range(0, len(prompt_ids), per_call):
                    ids, att = left_padded(prompt_ids[s:s + per_call], self.pad_id)
                    # rows repeated here: transformers refuses num_return_sequences > 1 without do_sample
                    ids, att = ids.repeat_interleave(params.n, 0), att.repeat_interleave(params.n, 0)
                    rows = None  # rows cut after their first EOS, from a decoding loop of our own
                    if lean is not None:
                        rows = decode(*lean, ids.to(device), att.to(device), params.max_tokens, self.eos_ids)
                    elif static is not None:
                        rows = self._decode_static(static, ids.to(device), att.to(device), params)
                    if rows is not None:
                        out_ids.extend(rows)
                        reasons.extend("stop" if r and r[-1] in self.eos_ids else "length" for r in rows)
                        continue
                    kwargs = dict(max_new_tokens=params.max_tokens,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                  repetition_penalty=params.repetition_penalty, synced_gpus=self.synced, **params.extra)
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                    if "stop_strings" in kwargs and self.tokenizer is not None:
                        kwargs["tokenizer"] = self.tokenizer
                    if params.temperature > 0:
                        kwargs["logits_processor"] = LogitsProcessorList([InverseCdfSampler(
                            params.temperature, params.top_k, params.top_p, params.min_p)])
                    with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None):
                        seqs = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs)
                    for row in seqs[:, ids.shape[1]:].tolist():  # the prompt width
                        ids_, reason = _cut(row, self.eos_ids, self.pad_id)
                        out_ids.append(ids_)
                        reasons.append(reason)
                logprobs = self._logprobs(prompt_ids, out_ids, params) if self.owns_weights else None
        finally:
            model.train(was_training)
        return Generation(out_ids, logprobs, reasons)

    def _lean(self, params: SamplingParams, device: torch.device):
        """(backbone, pick) for `decode` when it and `sample_tiles` draw from the same distribution `generate` would
        (plain temperature sampling), on CPU, where they were measured to pay (see rollout/decode.py); else None."""
        backbone, head = causal_lm_parts(self.model)
        if not (device.type == "cpu" and params.temperature > 0 and not params.top_k and params.top_p >= 1.0
                and not params.min_p and params.repetition_penalty == 1.0 and not params.extra
                and params.regex is None and not self.synced and self.dtype is None
                and isinstance(head, torch.nn.Linear) and logit_transform(self.model) is None):
            return None
        return backbone, functools.partial(sample_tiles, weight=head.weight, bias=getattr(head, "bias", None),
                                           temperature=params.temperature)

    def _static(self, params: SamplingParams, device: torch.device):
        """(backbone, head, draw) for `graphed.decode` on CUDA where it samples as `generate` would (no repetition
        penalty, extra arguments or constrained decoding; a whole model whose logits are its output layer's); else
        None."""
        backbone, head = causal_lm_parts(self.model)
        if not (device.type == "cuda" and self._graph != "off" and params.repetition_penalty == 1.0
                and not params.extra and params.regex is None and not self.synced
                and logit_transform(self.model) is None and graphed.supported(backbone)):
            return None
        return backbone, head, functools.partial(draw, temperature=params.temperature, top_k=params.top_k,
                                                 top_p=params.top_p, min_p=params.min_p)

    def _decode_static(self, static, ids, att, params: SamplingParams) -> list[list[int]] | None:
        """`graphed.decode` of one chunk; a failed graph capture falls back to the same steps run eagerly, a failure
        of those to `generate` (None), each once for this generator's lifetime, with a warning."""
        while self._graph != "off":
            try:
                return graphed.decode(*static, ids, att, params.max_tokens, self.eos_ids,
                                      graph=self._graph == "graph", autocast=self.dtype)
            except Exception as e:  # an architecture or kernel the static path does not handle
                fallback = "eager" if self._graph == "graph" else "off"
                warnings.warn(f"static-cache decoding failed ({type(e).__name__}: {e}); continuing with "
                              f"{'the same steps without a CUDA graph' if fallback == 'eager' else 'generate()'}")
                self._graph = fallback
        return None

    def _logprobs(self, prompt_ids, completions, params: SamplingParams) -> list[list[float]]:
        from ..logprobs import Rows, completion_logprobs

        prompts = [p for p in prompt_ids for _ in range(params.n)]
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(prompts), self.batch_size):
            rows = Rows.build(prompts[s:s + self.batch_size], completions[s:s + self.batch_size], self.pad_id, device)
            lp, _ = completion_logprobs(self.model, rows, max(params.temperature, 1e-6))
            lengths = [len(c) for c in completions[s:s + self.batch_size]]
            out.extend(x.tolist() for x in torch.split(lp.cpu(), lengths))
        return out

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        if not self.owns_weights:
            return
        t = time.perf_counter()
        src = getattr(model, "module", model)
        for dst_p, src_p in zip(self.model.parameters(), src.parameters()):
            dst_p.copy_(src_p)
        self._stats["weight_sync_time"] = time.perf_counter() - t

    def stats(self) -> dict[str, float]:
        return dict(self._stats)


def _cut(row: list[int], eos_ids: list[int], pad_id: int) -> tuple[list[int], str]:
    """Completion up to and including the first EOS; 'length' if none was sampled."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i + 1], "stop"
    while row and row[-1] == pad_id and pad_id not in eos_ids:
        row = row[:-1]
    return row, "length"
