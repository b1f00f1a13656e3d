"""Training beside generation on one GPU: yield points (`async_yield`).

With `async_generation` and vLLM's engine in its own process (the default for async), the engine's decode steps and
the trainer's kernels come from two CUDA contexts, and the GPU runs one context at a time: when both have work it
switches between them by time slice, and when the running one runs out of work. The trainer queues its kernels far
ahead of the GPU, so it never runs out: a decode step that arrives while training runs waits for the rest of
training's time slice. Decoding is short GPU work between long CPU work (scheduling), so most of its steps that
overlap training pay that wait (sections 11.2 and 13 of docs/benchmarks.md: training's 0.56 s of GPU work cost
generation about 0.4 s).

A yield point makes training wait until the GPU has finished what it has queued. The trainer's context then has
no work, the GPU switches to a waiting decode step at once, and a decode step waits at most for the stretch of
training since the last yield point instead of a time slice.

- Where: after each decoder layer's forward ("layer"), or after each of its large parts, attention and MLP
  ("block"); at the same places in the backward pass (a gradient hook on each output); and in the policy's
  logprob passes of a round (old logprobs with num_iterations > 1, reference logprobs of the PEFT model with
  beta > 0).
- When: only while the generation beside training is still running; training that outlasts it runs without them.
- Cost: a host round trip per point (tens of microseconds). On the recipe, training beside generation took 1.2 s
  instead of 1.0 s, inside a generation of 2.5-3 s (docs/benchmarks.md 14).
- Compiled layers (torch_compile) get no points: a synchronisation would break the compiled graph.
- Not measured: under CUDA MPS the two processes' kernels run at once instead of by time slice, so the points may
  buy nothing there (set async_yield="off"); with "block" and gradient checkpointing, the recomputation in the
  backward pass passes the block points again (more waits, same results).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .kernels import decoder_layers


def async_yield_mode(config, generator, device: torch.device) -> str:
    """The yield mode of a run: config.async_yield, or where it is None, "layer" when the generator shares the
    trainer's GPU by time slice; "off" without async_generation or off a GPU (nothing to yield to)."""
    if not config.async_generation or device.type != "cuda":
        return "off"
    if config.async_yield is not None:
        return config.async_yield
    return "layer" if generator.shares_gpu_by_time_slice else "off"


def yield_targets(model: torch.nn.Module, mode: str) -> list[torch.nn.Module]:
    """The modules after whose forward (and before whose backward) training yields the GPU.

    "layer": each decoder layer. "block": each child of a decoder layer holding at least a tenth of its parameters
    (attention and MLP, not the norms). Empty for "off", for a model without a recognisable layer stack, and for
    compiled layers."""
    if mode == "off":
        return []
    layers = decoder_layers(model)
    if layers is None or any(getattr(m, "_compiled_call_impl", None) is not None for m in layers):
        return []
    if mode == "layer":
        return list(layers)
    targets = []
    for layer in layers:
        total = sum(p.numel() for p in layer.parameters())
        targets += [c for c in layer.children() if 10 * sum(p.numel() for p in c.parameters()) >= total > 0]
    return targets


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


@contextlib.contextmanager
def yield_points(model: torch.nn.Module, mode: str, active: Callable[[], bool],
                 wait: Callable[[], None] | None = None):
    """Within the block, training waits for the GPU (`wait`, default: the current CUDA stream's synchronize) after
    each target's forward and before each target's backward, whenever `active()` is true. Hooks are removed on
    exit; gradient hooks already registered check `active()` again when they run."""
    targets = yield_targets(model, mode)
    if not targets:
        yield 0
        return
    if wait is None:
        def wait() -> None:
            torch.cuda.current_stream().synchronize()

    def on_grad(grad):
        if active():
            wait()
        return None

    def after_forward(module, args, output):
        if not active():
            return None
        wait()
        out = _first_tensor(output)
        if out is not None and out.requires_grad and torch.is_grad_enabled():
            out.register_hook(on_grad)  # runs once the gradient of this output is ready: before this target's backward
        return None

    handles = [t.register_forward_hook(after_forward) for t in targets]
    try:
        yield len(targets)
    finally:
        for h in handles:
            h.remove()
