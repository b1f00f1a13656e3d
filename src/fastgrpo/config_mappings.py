"""GRPOConfig's mapping fields (model_init_kwargs, generation_kwargs, liger_kernel_config, vllm_engine_env,
gradient_checkpointing_kwargs, chat_template_kwargs): JSON text from a command line parsed, then keys and values
checked, as part of GRPOConfig's one validation (config._validate calls `check_mappings`)."""

from __future__ import annotations

import functools
import json

from . import trl_compat
from .config import FIELD_TYPES, ConfigError, GRPOConfig, closest_name

LIGER_LAYER_KERNELS = ("rope", "rms_norm", "swiglu", "geglu", "layer_norm", "relu_squared")
LIGER_LOSSES = ("cross_entropy", "fused_linear_cross_entropy")  # fastgrpo's own fused log-softmax replaces them


#: An example value per mapping field, for the error on text that is not JSON.
_MAPPING_EXAMPLES = {"model_init_kwargs": '{"dtype": "bfloat16"}',
                     "gradient_checkpointing_kwargs": '{"use_reentrant": false}',
                     "chat_template_kwargs": '{"enable_thinking": false}', "generation_kwargs": '{"min_tokens": 4}',
                     "liger_kernel_config": '{"rope": true, "swiglu": false}',
                     "vllm_engine_env": '{"CUDA_MPS_CLIENT_PRIORITY": "0"}'}


def _mapping(c: GRPOConfig, name: str) -> dict | None:
    """A field that takes a mapping (annotated `dict | str | None`, so that argument parsers give it an option):
    JSON text (from a command line) is parsed; the field holds a dict or None."""
    value = getattr(c, name)
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            example = _MAPPING_EXAMPLES.get(name, '{"name": "value"}')
            raise ConfigError(f"{name}={getattr(c, name)!r} is not JSON ({e}); write it as '{example}'.") from None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping (JSON object), got {value!r}.")
    setattr(c, name, None if value is None else dict(value))
    return getattr(c, name)


def _check_liger(c: GRPOConfig) -> None:
    """liger_kernel_config: every key one of Liger's switches, every value a bool."""
    known = LIGER_LAYER_KERNELS + LIGER_LOSSES
    for key, on in (c.liger_kernel_config or {}).items():  # a dict or None: _mapping ran first
        if key not in known:
            hint = closest_name(str(key), known)
            raise ConfigError(f"liger_kernel_config: {key!r} is not one of Liger's switches ({', '.join(known)})."
                              + (f" Did you mean '{hint}'?" if hint else ""))
        if not isinstance(on, bool):
            raise ConfigError(f"liger_kernel_config[{key!r}] must be true or false, got {on!r}.")


#: Keyword arguments torch.utils.checkpoint.checkpoint takes (through gradient_checkpointing_enable).
_CHECKPOINT_KWARGS = {"use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"}

#: generation_kwargs keys that the trainer sets from its own fields: a second value would contradict them.
_GENERATION_OWNED = {"max_tokens": "max_completion_length", "max_new_tokens": "max_completion_length",
                     "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "n": "num_generations",
                     "num_return_sequences": "num_generations", "do_sample": "temperature (0 means greedy)",
                     "logprobs": "vllm_importance_sampling_correction", "eos_token_id": "the tokenizer's EOS",
                     "pad_token_id": "the tokenizer's pad token", "seed": "seed"}


@functools.cache
def generate_arguments() -> frozenset[str]:
    """The arguments transformers' generate takes (GenerationConfig's fields): what the use_vllm=False backend
    accepts in generation_kwargs."""
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict())


def _check_generation_kwargs(c: GRPOConfig) -> None:
    for key in c.generation_kwargs or {}:  # a dict or None: _mapping ran first
        if key in _GENERATION_OWNED:
            raise ConfigError(f"generation_kwargs[{key!r}]: the trainer sets it from {_GENERATION_OWNED[key]}. Fix: "
                              "set that field instead and drop the key.")
    if c.generation_kwargs and not c.use_vllm:
        known = generate_arguments()
        for key in c.generation_kwargs:
            if key not in known:
                alt = {"min_tokens": "min_new_tokens", "stop": "stop_strings"}.get(key) or closest_name(key, known)
                raise ConfigError(f"generation_kwargs[{key!r}] is not an argument of transformers' generate (the "
                                  "use_vllm=False backend)." + (f" Did you mean '{alt}'?" if alt else ""))


def _check_model_init_kwargs(c: GRPOConfig) -> None:
    """TRL scripts write torch_dtype; transformers 5 reads dtype first and would set the trainer's default there, so
    a torch_dtype would be ignored without a word. It is renamed, and the value checked before any model loads."""
    kw = c.model_init_kwargs
    if not kw:
        return
    if "torch_dtype" in kw:
        old = kw.pop("torch_dtype")
        if "dtype" in kw and kw["dtype"] != old:
            raise ConfigError(f"model_init_kwargs sets both dtype={kw['dtype']!r} and torch_dtype={old!r}. Fix: keep "
                              "dtype (transformers' name; torch_dtype is its old name).")
        kw["dtype"] = old
    value = kw.get("dtype")
    if value is None or value == "auto":
        return
    import torch

    name = str(value).removeprefix("torch.")  # the config stays JSON: checkpoints and trackio record it
    if not isinstance(value, (str, torch.dtype)) or not isinstance(getattr(torch, name, None), torch.dtype):
        raise ConfigError(f"model_init_kwargs['dtype']={value!r} is not a torch dtype. Fix: 'bfloat16', 'float16', "
                          "'float32' or 'auto'.")
    kw["dtype"] = name


def _check_engine_env(c: GRPOConfig) -> None:
    """vllm_engine_env: names of environment variables to text; numbers are written as text, anything else is an
    error (os.environ holds text only)."""
    env = c.vllm_engine_env or {}  # a dict or None: _mapping ran first
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key:
            raise ConfigError(f"vllm_engine_env: {key!r} is not an environment variable name.")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"vllm_engine_env[{key!r}] must be text or a number, got {value!r}; write it as "
                              f"'{{\"{key}\": \"1\"}}'.")
        env[key] = str(value)


def check_mappings(c: GRPOConfig) -> None:
    for name, kinds in FIELD_TYPES.items():
        if "dict" in kinds and name not in trl_compat.NAMES:
            _mapping(c, name)
    _check_liger(c)
    _check_engine_env(c)
    _check_generation_kwargs(c)
    _check_model_init_kwargs(c)
    unknown = set(c.gradient_checkpointing_kwargs or {}) - _CHECKPOINT_KWARGS
    if unknown:
        raise ConfigError(f"gradient_checkpointing_kwargs: {sorted(unknown)} not among torch.utils.checkpoint's "
                          f"arguments ({', '.join(sorted(_CHECKPOINT_KWARGS))}).")
