"""Loading the policy and its tokenizer, and the checks that make a wrong model, tokenizer or vocabulary fail at
construction, with the fix, instead of deep in the first forward pass."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from .config import ConfigError, GRPOConfig
from .modeling import base_model


def is_model_file(name: str) -> bool:
    """A file of a saved model's weights or adapter, as save_pretrained names them."""
    return (name.startswith(("adapter_model.", "model.safetensors", "pytorch_model")) or name == "adapter_config.json"
            or (name.startswith("model-") and name.endswith(".safetensors")))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(model: Any):
    from transformers import AutoTokenizer

    path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ConfigError("cannot tell which tokenizer to use: pass processing_class=tokenizer.")
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)
    if os.path.isfile(os.path.join(path, "config.json")) and not has_tokenizer:
        # AutoTokenizer would build an empty tokenizer from config.json alone, and every prompt would fail later
        raise ConfigError(f"model folder {path!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}). Fix: "
                          "pass processing_class=AutoTokenizer.from_pretrained(<the tokenizer's folder or hub id>), "
                          "or save it next to the model with tokenizer.save_pretrained(folder).")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"could not load a tokenizer for {path!r} ({type(e).__name__}: {str(e)[:200]}). If it is a "
                          "hub id, check the name and the network; else pass a local folder or processing_class.") from e


def check_model_path(model: Any) -> None:
    """A local path that does not exist, or a folder that holds no model, fails here, before any loading. Names
    with at most one '/' that are not on disk are taken for hub ids."""
    if not isinstance(model, str):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise ConfigError(f"model must be a hub id, a model folder or a loaded transformers model, got "
                              f"{type(model).__name__} {model!r:.60}.")
        return
    if not model.strip():
        raise ConfigError("model is an empty string: pass a hub id or a model folder.")
    if os.path.isdir(model):
        if not any(os.path.isfile(os.path.join(model, f)) for f in ("config.json", "adapter_config.json")):
            raise ConfigError(f"model folder {model!r} holds no config.json: it is not a saved model. Fix: pass the "
                              "folder that save_pretrained wrote (config.json + *.safetensors), or a hub id.")
    elif os.path.exists(model):
        raise ConfigError(f"model {model!r} is a file; pass the folder that holds it (config.json + weights).")
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"model path {model!r} does not exist. Fix: check the path (relative paths start from "
                          f"{os.getcwd()}), or pass a hub id such as 'Qwen/Qwen2-0.5B-Instruct'.")


def check_policy(model) -> None:
    """A model without a language-model head, or one still on the meta device, would fail at the first generation."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not hasattr(inner, "generate"):
        raise ConfigError(f"the model ({type(inner).__name__}) has no language-model head to generate with. Fix: load "
                          "it with AutoModelForCausalLM (e.g. Qwen2ForCausalLM, not Qwen2Model or a "
                          "*ForSequenceClassification), or pass its folder or hub id.")
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError("the model's weights are on the meta device (built without weights, e.g. under "
                          "init_empty_weights or device_map='meta'). Fix: load the weights (from_pretrained) first.")


def resolve_bf16(bf16: bool | None, device: torch.device) -> bool:
    """GRPOConfig.bf16, with None (the default) meaning: on where the device is a GPU that supports it."""
    return bf16 if bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())


def load_model(model: Any, args: GRPOConfig, bf16: bool):
    if not isinstance(model, str):
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model must be a model id, a folder, a PreTrainedModel or a PeftModel; got {type(model).__name__}.")
        return model
    from transformers import AutoModelForCausalLM

    kwargs = dict(args.model_init_kwargs or {})
    kwargs.setdefault("dtype", torch.bfloat16 if bf16 else torch.float32)
    kwargs.pop("device_map", None)
    try:
        return AutoModelForCausalLM.from_pretrained(model, trust_remote_code=args.trust_remote_code, **kwargs)
    except Exception as e:  # noqa: BLE001
        extra = f", and model_init_kwargs={args.model_init_kwargs}" if args.model_init_kwargs else ""
        raise ConfigError(f"could not load model {model!r} ({type(e).__name__}: {str(e)[:200]}). Check the path or hub "
                          f"id{extra}; without network, pass a local folder.") from e


def gather_dispatched(model, device) -> None:
    """A model loaded with device_map="auto" may be split over several GPUs (and, under torchrun, every rank splits
    it over all of them). Each rank trains a whole copy on its own device, so the dispatch hooks are removed."""
    # vars(), not hasattr(): a PeftModel forwards attribute reads to the model it wraps, so hasattr() sees the inner
    # model's hook on the wrapper too, and removing it there fails (seen under torchrun, 2 ranks on H200s)
    hooked = [m for m in model.modules() if "_hf_hook" in vars(m)]
    if not hooked:
        return
    from accelerate.hooks import remove_hook_from_module

    base = base_model(model)
    devices = sorted({str(d) for d in (getattr(base, "hf_device_map", None) or {}).values()})
    for m in hooked:
        remove_hook_from_module(m)
    if len(devices) > 1:
        warnings.warn(f"the model was dispatched over {devices} (device_map); fastgrpo trains a whole copy on {device} "
                      "per process, so it was gathered there. Load it with device_map=None to skip the detour.")


def check_vocabulary(model, tokenizer, prompts, eos_ids: list[int]) -> None:
    """Token ids beyond the embedding's rows (tokens added to the tokenizer, the model not resized) fail deep in
    the first forward pass, on a GPU as a device-side assert; here they fail before any step, with the fix."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is None:
        return
    top = max((max(p.ids) for p in prompts if len(p.ids)), default=-1)
    top = max([top, tokenizer.pad_token_id or 0, *eos_ids])
    if top >= rows:
        raise ConfigError(f"the tokenizer gives token id {top}, but the model's embedding has {rows} rows "
                          f"(len(tokenizer) = {len(tokenizer)}): tokens were added to the tokenizer without resizing "
                          "the model. Fix: model.resize_token_embeddings(len(tokenizer)) before passing the model, "
                          "or the tokenizer that belongs to it.")


def eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_cfg = getattr(getattr(model, "get_base_model", lambda: model)(), "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)
