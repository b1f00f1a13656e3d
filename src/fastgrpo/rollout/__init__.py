"""Generation backends behind one interface (`base.Generator`); `make_generator` picks one from the config."""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch

from .base import Generation, Generator, SamplingParams

__all__ = ["Generation", "Generator", "SamplingParams", "make_generator", "vllm_available"]
log = logging.getLogger("fastgrpo")


def vllm_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def make_generator(model, model_path: str | None, tokenizer, config, eos_ids: list[int], pad_id: int,
                   rank: int = 0, world_size: int = 1, dtype: torch.dtype | None = None,
                   max_model_len: int | None = None) -> Generator:
    """vLLM (colocated or server) when asked for and possible, else transformers (with one warning).
    `max_model_len`: colocated vLLM's context where the config sets none (the trainer's longest prompt + the
    completion length when max_prompt_length is None)."""
    if config.use_vllm and config.vllm_mode == "server":
        from .vllm_client import VLLMServerGenerator

        return VLLMServerGenerator(config, rank=rank, world_size=world_size)  # rank 0 pushes weights
    if config.use_vllm and vllm_available():
        from .vllm_colocate import VLLMColocateGenerator

        if model_path is None:
            raise ValueError("colocated vLLM needs the model on disk (model_path)")
        return VLLMColocateGenerator(model_path, config, tokenizer, local_rank=rank, world_size=world_size,
                                     max_model_len=max_model_len)
    if config.use_vllm:
        missing = "a CUDA GPU" if not torch.cuda.is_available() else "the vllm package"
        warnings.warn(f"use_vllm=True but {missing} is not available: generating with transformers instead "
                      "(slower, same training).", stacklevel=2)
    own_copy = config.async_generation
    batch = config.batch_plan(world_size).completions_per_rank  # one round per generate call
    return HFGenerator(model, eos_ids, pad_id, batch_size=batch, own_copy=own_copy, dtype=dtype, tokenizer=tokenizer)


from .hf import HFGenerator  # noqa: E402
