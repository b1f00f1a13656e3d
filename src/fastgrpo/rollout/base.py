"""The generation interface every backend implements (transformers, vLLM in-process, vLLM server).

Token ids in, token ids out: prompts are tokenized once by the trainer; no text round trip. The trainer only
ever calls these methods, so it never branches on which backend it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingParams:
    """How to sample; one instance per call. `n` completions are drawn for every prompt."""

    n: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    regex: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(slots=True)
class Generation:
    """Completions of `P` prompts x `n` samples, ordered prompt-major: index p * n + j.

    completion_ids: list[list[int]]      # [P*n][T_i], without padding, EOS included when sampled
    logprobs: list[list[float]] | None   # [P*n][T_i], the generator's logprob of each sampled token
                                         #   (after temperature/top-k/top-p); None if the backend has none
    finish_reasons: list[str]            # [P*n], "stop" (EOS or stop token) or "length" (hit max_tokens)
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]] | None
    finish_reasons: list[str]

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        if len(self.finish_reasons) != n or (self.logprobs is not None and len(self.logprobs) != n):
            raise ValueError("Generation: completion_ids, logprobs and finish_reasons differ in length")


class Generator(ABC):
    """A generation backend. `update_weights` receives the trainer's model (plain or PEFT) after each
    optimizer step; the backend decides what to copy (with LoRA: only the merged adapted weights)."""

    #: True when the backend samples from its own copy of the weights (vLLM, a server, the async HF copy):
    #: the trainer must then push weights after each update.
    owns_weights: bool = False
    #: True when generation runs in another process on the trainer's GPU: its kernels and the trainer's then take
    #: turns by time slice, and training beside it yields the GPU at layer boundaries (fastgrpo.sharing).
    shares_gpu_by_time_slice: bool = False

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation: ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next `generate` sample from `model`'s current weights."""

    def sleep(self) -> None:
        """Release generation memory (KV cache) for the training phase; no-op by default."""

    def wake(self) -> None:
        """Undo `sleep` before the next `generate`; no-op by default."""

    def close(self) -> None:
        """Free everything; the generator is unusable afterwards."""

    def stats(self) -> dict[str, float]:
        """Timings of the last calls (e.g. weight_sync_time) for the metrics."""
        return {}
