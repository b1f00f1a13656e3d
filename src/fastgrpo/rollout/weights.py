"""Which tensors a generation engine needs after an optimizer step, named as the base model names them.

`iter_sync_weights(model)` yields `(name, tensor)` pairs in the plain Hugging Face parameter naming
(`model.layers.0.self_attn.q_proj.weight`), which vLLM's `load_weights` (and `nn.Module.load_state_dict`)
accept. Choices:

- PEFT LoRA: the engine holds the *base* architecture, so each LoRA-wrapped Linear is sent as the merged weight
  `W + sum_a scaling_a * B_a @ A_a` over the active adapters. The merge is computed on the side (fp32 matmul and
  add, rounded once to W's dtype), never through `merge_adapter()`: the trainer's module is not touched, so there is
  no unmerge round trip whose bf16 rounding would drift the base weights step after step, and no race with autograd.
  Dropout plays no part in a merge. Adapters already merged into W (`module.merged`) are not added twice.
- `only_changed=True` with PEFT yields only what training can change: merged LoRA weights (and merged biases when
  `lora_bias=True`) plus the trained copies of `modules_to_save`. For a Qwen2 recipe with q_proj/v_proj targets
  that is 2 tensors per layer. Everything else in the engine stays as loaded from the base checkpoint.
- `only_changed=False`, or a plain model: every parameter once, LoRA factors skipped, wrapper names removed.
  A parameter shared by two modules (tied embeddings) is yielded once, under its first name; `lm_head.weight` is
  never yielded when `tie_word_embeddings` is set (vLLM skips it then and the base model's state_dict aliases it).
- Tensors are fresh objects (`detach()` or new results): vLLM's loader sets attributes (`shard_id`) on the tensors
  it receives, which must not land on the trainer's parameters.
- FSDP2 (parameters are DTensor shards): each tensor is all-gathered (`full_tensor()`) as it is yielded, so
  every rank must iterate to the end, in the same order (the order depends only on the model), even a rank
  that discards the result (`drain`); only then do all ranks meet in each all-gather.
- Unsupported PEFT features (DoRA and other LoRA variants, LoRA on embeddings/convolutions, trainable-token
  wrappers) raise NotImplementedError instead of silently sending wrong weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["iter_sync_weights", "bucketed", "unwrap_model", "is_peft_model", "gathers_on_every_rank", "drain"]

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, which would prefix every name."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gathers_on_every_rank(model: nn.Module) -> bool:
    """Whether iter_sync_weights(model) all-gathers, so that ranks that push nothing must still iterate it."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap_model(model).parameters())


def drain(weights: Iterator) -> None:
    """Run an iterator of weights to its end, discarding them: a rank's share of the all-gathers under FSDP2."""
    for _ in weights:
        pass


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft not installed: nothing can be a PEFT model
        return False
    return isinstance(unwrap_model(model), PeftModel)


def _peft_classes():
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:  # older peft
        TrainableTokensWrapper = ()  # noqa: N806 - isinstance(x, ()) is always False
    return LoraLayer, LoraLinear, ModulesToSaveWrapper, TrainableTokensWrapper


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@torch.no_grad()
def _merged_lora_linear(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(merged weight, merged bias or None if LoRA leaves the bias alone) of one LoRA Linear, computed aside."""
    base = module.get_base_layer()
    weight = _full(base.weight.detach())
    if module.disable_adapters:
        return weight, None
    adapters = [a for a in module.active_adapters if a in module.lora_A and a not in module.merged_adapters]
    for a in adapters:
        if a in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(a, False):
            raise NotImplementedError(f"{name}: LoRA variants such as DoRA are not supported for weight sync.")
    w = weight.detach().to(torch.float32, copy=True)
    bias = None
    for a in adapters:
        delta = _full(module.lora_B[a].weight.detach()).float() @ _full(module.lora_A[a].weight.detach()).float()
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        w.add_(delta.to(w.device), alpha=float(module.scaling[a]))
        if getattr(module, "lora_bias", {}).get(a, False):
            if bias is None:
                bias = _full(base.bias.detach()).to(torch.float32, copy=True)
            bias.add_(_full(module.lora_B[a].bias.detach()).float().to(bias.device), alpha=float(module.scaling[a]))
    return w.to(weight.dtype), (None if bias is None else bias.to(base.bias.dtype))


def _tied(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def iter_sync_weights(model: nn.Module, only_changed: bool = True,
                      complete_parents: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(base_name, tensor)` for the engine; see the module docstring. Lazy: one tensor materialised at a time.

    `complete_parents=True` (with only_changed): also yield every other parameter under the parent module of each
    LoRA layer (all of `self_attn` for a q_proj adapter: q, k, v, o weights and biases). vLLM's layerwise reload
    (the server's /start_weight_update ... /finish_weight_update) rebuilds a fused layer such as qkv_proj from
    fresh buffers and leaves shards it did not receive uninitialised, so a server update must carry whole layers;
    an in-process `load_weights` writes shards in place and needs only the changed ones.
    """
    model = unwrap_model(model)
    peft = is_peft_model(model)
    root = model.get_base_model() if peft else model  # the transformers model, LoRA layers injected in place
    tied = _tied(root)
    if not peft:
        only_changed = False  # a plain model has no notion of "changed": everything was trained
    lora_layer = lora_linear = to_save = tokens = ()
    if peft:
        lora_layer, lora_linear, to_save, tokens = _peft_classes()

    full_under: tuple[str, ...] = ()  # prefixes whose parameters are all sent (complete_parents)
    if peft and only_changed and complete_parents:
        full_under = tuple({p.rsplit(".", 1)[0] + "." for p, m in root.named_modules()
                            if isinstance(m, lora_layer) and "." in p})
    seen: set[int] = set()  # ids of parameters already yielded (tied weights appear under two modules)
    done: list[str] = []  # prefixes of subtrees already handled as a whole

    def emit(name: str, tensor: torch.Tensor, source: torch.Tensor | None = None):
        key = id(source if source is not None else tensor)
        if key in seen or (tied and name == "lm_head.weight"):
            return None
        seen.add(key)
        return name, tensor

    for prefix, module in root.named_modules():
        if any(prefix.startswith(d + ".") for d in done):
            continue
        everything = not only_changed or bool(full_under and (prefix + ".").startswith(full_under))
        if peft and isinstance(module, lora_layer):
            done.append(prefix)
            if not isinstance(module, lora_linear):
                kind = type(module).__name__
                raise NotImplementedError(f"{prefix}: only LoRA on Linear layers is supported ({kind}).")
            base = module.get_base_layer()
            weight, bias = _merged_lora_linear(module, prefix)
            item = emit(_join(prefix, "weight"), weight, base.weight)
            if item:
                yield item
            if bias is not None:
                item = emit(_join(prefix, "bias"), bias, base.bias)
                if item:
                    yield item
            elif everything:
                for pname, p in base.named_parameters():
                    if pname != "weight" and (item := emit(_join(prefix, pname), p.detach(), p)):
                        item = item[0], _full(item[1])
                        yield item
            continue
        if peft and tokens and isinstance(module, tokens):
            raise NotImplementedError(f"{prefix}: trainable_token_indices is not supported for weight sync.")
        if peft and isinstance(module, to_save):
            done.append(prefix)
            active = module.active_adapters
            off = module.disable_adapters or not active
            trained = module.original_module if off else module.modules_to_save[active[0]]
            for pname, p in trained.named_parameters():
                if item := emit(_join(prefix, pname), p.detach(), p):
                    yield item[0], _full(item[1])
            continue
        if everything:
            for pname, p in module.named_parameters(recurse=False):
                if item := emit(_join(prefix, pname), p.detach(), p):
                    yield item[0], _full(item[1])


def bucketed(
    weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive `(name, tensor)` pairs into lists of at most `bucket_bytes`, order kept.

    A tensor larger than the bucket travels alone. Bounds the extra memory of a push (e.g. a device copy per
    bucket) while keeping the number of engine calls small.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
