"""Faster layers for the policy: Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE) and torch.compile of the
decoder layers. Both change how the model's own layers run, not what they compute (up to bf16 rounding: the GPU
tests in tests/test_kernels.py compare loss and gradients with the plain model on one batch).

The recipe's training half on one H200 (LoRA r8 q/v, 128 x 712 tokens, docs/benchmarks.md 11.1): 0.77 s per
optimizer step plain, 0.56 s with Liger's kernels, 0.46 s with compiled layers after a one-time compile of ~65 s.
The two do not combine (Liger's kernels do not trace under torch.compile here).

    liger_wanted(config, device, sharded) -> bool   the use_liger_kernel setting resolved for this run
    apply_liger(model, choice) -> bool              the model's norms, MLPs and rotary embedding on Liger's kernels
    compile_layers(model, backend, mode) -> int     torch.compile on each decoder layer; returns how many
    eager_layers(model)                             a context in which compiled layers run eagerly (generation)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import warnings

import torch

from .config import ConfigError
from .config_mappings import LIGER_LAYER_KERNELS, LIGER_LOSSES
from .modeling import base_model as _base


def _liger():
    """liger_kernel's per-model-type patch functions, or None when it does not import."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - not installed (CPU installs) or broken against this torch / triton
        return None
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def liger_wanted(config, device: torch.device, sharded: bool) -> bool:
    """None (the default) means: on CUDA when liger-kernel imports, unless torch_compile is on (they do not combine)
    or FSDP2 shards the model (not measured there). True insists: an error where it cannot be honoured at all."""
    setting = config.use_liger_kernel
    if setting is False:
        return False
    if config.compiles:
        if setting:
            warnings.warn("use_liger_kernel=True and torch_compile=True: Liger's kernels do not trace under "
                          "torch.compile, so the decoder layers are compiled and Liger is not used.", stacklevel=3)
        return False
    if device.type != "cuda":
        if setting:
            warnings.warn(f"use_liger_kernel=True has no effect on {device.type}: Liger's kernels are Triton (CUDA) "
                          "kernels.", stacklevel=3)
        return False
    if _liger() is None:
        if setting:
            raise ConfigError("use_liger_kernel=True but liger-kernel does not import here. Fix: pip install "
                              "liger-kernel, or set use_liger_kernel=False.")
        return False
    return bool(setting) or not sharded


def liger_kwargs(choice: dict | None, hidden_act: str, accepted) -> dict:
    """Keyword arguments for Liger's patch function (parameter names `accepted`): RoPE, RMSNorm and SwiGLU on, the
    other layer kernels at Liger's defaults, each unless `choice` (liger_kernel_config) says otherwise; its losses
    always off; SwiGLU only for SiLU MLPs, the only ones for which Liger's MLP (silu(gate) * up) computes what the
    model's does."""
    wanted = dict(rope=True, rms_norm=True, swiglu=True)
    wanted.update({k: bool(v) for k, v in (choice or {}).items() if k not in LIGER_LOSSES})
    wanted.update(dict.fromkeys(LIGER_LOSSES, False))
    if hidden_act not in ("silu", "swish"):
        wanted["swiglu"] = False
    return {k: v for k, v in wanted.items() if k in accepted}


def apply_liger(model: torch.nn.Module, choice: dict | None = None) -> bool:
    """Route this model instance's RMSNorms, SwiGLU MLPs and rotary embedding through Liger's kernels (Liger's own
    patch function for the model type, without its losses: fastgrpo keeps its fused log-softmax), or those of them
    that `choice` (liger_kernel_config) leaves on. False when Liger has nothing for the model type, `choice` turns
    off all it has, or its kernels fail a small check on this GPU.

    Liger's patch functions also swap classes and functions in the transformers modeling module, which would reach
    every model built later in the process, CPU ones included. The classes are put back (this instance's modules
    were patched one by one); a replaced function, such as apply_rotary_pos_emb, takes Liger's path only for CUDA
    tensors."""
    table = _liger()
    base = _base(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if table is None or model_type not in table:
        return False
    patch = table[model_type]
    accepted = inspect.signature(patch).parameters  # the functions differ by model type (geglu, layer_norm...)
    kwargs = liger_kwargs(choice, getattr(base.config, "hidden_act", "silu"), accepted)
    if all(kwargs.get(k) is False for k in accepted if k in LIGER_LAYER_KERNELS):  # all turned off
        return False
    if not _kernels_agree(next(base.parameters()).device):
        return False
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)  # optional backends it lacks
    module = sys.modules[type(base).__module__]
    before = dict(vars(module))
    try:
        patch(model=base, **kwargs)
    except Exception as e:  # noqa: BLE001 - a module patched before the failure computes what it did before
        warnings.warn(f"fastgrpo: Liger's patch for model type {model_type!r} failed ({type(e).__name__}: {e}); "
                      "training without it.")
        return False
    finally:
        confine(module, before)
    return True


def confine(module, before: dict) -> None:
    """After a patch of `module` whose globals were `before`: swapped classes are put back, and a swapped function
    becomes one that takes the new path for CUDA tensors and the old one otherwise."""
    for name, old in before.items():
        new = vars(module).get(name)
        if new is old:
            continue
        if isinstance(old, type):
            setattr(module, name, old)
        elif callable(old) and callable(new):
            setattr(module, name, _on_cuda(new, old))


def _on_cuda(fast, plain):
    @functools.wraps(plain)
    def dispatch(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)
        return fast(*args, **kwargs) if isinstance(first, torch.Tensor) and first.is_cuda else plain(*args, **kwargs)
    return dispatch


@functools.cache
def _kernels_agree(device: torch.device) -> bool:
    """Liger's RMSNorm and SiLU-times kernels against torch on a small bf16 problem, once per device: a Triton too
    old or too new for this GPU fails here, with a warning, rather than in the first training step."""
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(37, 96, device=device, dtype=torch.bfloat16, generator=g)
        b = torch.randn(37, 96, device=device, dtype=torch.bfloat16, generator=g)
        norm = LigerRMSNorm(96, eps=1e-6).to(device=device, dtype=torch.bfloat16)
        xf = x.float()
        ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        ok = torch.allclose(norm(x).float(), ref.float(), atol=2e-2, rtol=2e-2)
        ok &= torch.allclose(LigerSiLUMulFunction.apply(x, b).float(), (torch.nn.functional.silu(xf) * b.float()),
                             atol=5e-2, rtol=2e-2)
        if not ok:
            warnings.warn(f"fastgrpo: Liger's kernels disagreed with torch on {device}; training without them.")
        return bool(ok)
    except Exception as e:  # noqa: BLE001 - any failure means: train without them
        warnings.warn(f"fastgrpo: Liger's kernels do not run on {device} ({type(e).__name__}: {e}); training "
                      "without them.")
        return False


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers: its longest ModuleList of modules of one class."""
    stacks = [m for m in _base(model).modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1]
    return max(stacks, key=len, default=None)


def compile_layers(model: torch.nn.Module, backend: str | None, mode: str | None) -> int:
    """torch.compile each decoder layer in place (names and state_dict unchanged), with dynamic shapes: a training
    pass's rows and widths change from pass to pass. All layers share one compiled graph. Without a recognisable
    stack, the whole model is compiled; returns the number of layers compiled (0 then)."""
    options = {"backend": backend or "inductor", "mode": mode, "dynamic": True}
    layers = decoder_layers(model)
    if layers is None:
        model.compile(**options)
        return 0
    for layer in layers:
        layer.compile(**options)
    return len(layers)


@contextlib.contextmanager
def eager_layers(model: torch.nn.Module):
    """Compiled modules run their plain forward inside: generation's one-token decode steps with a KV cache (and
    their CUDA-graph capture) are not what the layers were compiled for. Reads torch's `_compiled_call_impl`, the
    attribute nn.Module.compile sets and __call__ consults."""
    compiled = [(m, m._compiled_call_impl) for m in _base(model).modules()
                if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl
