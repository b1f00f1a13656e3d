"""torchrun support: rank facts, the few collectives the loop needs (no-ops on one process), and FSDP2.

Each rank generates and scores whole prompt groups, so group-relative advantages need no communication; only
batch-wide statistics (token totals, batch std, logged metrics) are reduced. Parameters are held one of two ways:

- replicated (LoRA by default): every rank holds the whole model; gradients are averaged across ranks after each
  accumulation window (`average_gradients`, what DDP does).
- FSDP2 (full fine-tuning by default, `fsdp`): `torch.distributed.fsdp.fully_shard` on each decoder layer and on
  the transformers model (the root), so parameters, gradients and optimizer state are sharded over ranks (DTensors). A layer's parameters
  are all-gathered for its forward and backward, and its gradients reduce-scattered (averaged) at the end of the
  accumulation window. Every rank must therefore run the same number of forward passes, in the same order.
"""

from __future__ import annotations

import atexit
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .modeling import base_model


@dataclass(frozen=True, slots=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # gloo for the CPU-side statistics (rewards, token counts), NCCL for gradients on the GPU
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        atexit.register(_shutdown)  # we opened the group, so we close it: a live gloo/NCCL group aborts at exit
    return Dist(rank, local, world)


def _shutdown() -> None:
    if dist.is_initialized():
        _settle_gloo_workers()
        dist.destroy_process_group()


def _settle_gloo_workers(timeout: float = 2.0) -> None:
    """Wait (GIL released) until gloo's worker threads are idle, so that none is still dropping a finished work.

    A finished gloo work can keep an earlier one alive (a barrier holds the works in flight when it was queued, e.g.
    FSDP2's last all-gather), and whichever thread drops it last frees that work's tensors, which takes the GIL. If a
    worker thread does it while the interpreter finalizes, Python ends that thread inside a C++ destructor and the
    rank aborts ("terminate called without an active exception") after training finished. destroy_process_group
    does not stop the workers, and FSDP's modules keep the group alive until the very end, so the wait is here.
    Idle = every `pt_gloo_runloop` thread sleeping in three checks 10 ms apart (2 s at most)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():  # not Linux: a short sleep gives the workers the same chance
        time.sleep(0.05)
        return
    deadline, quiet = time.monotonic() + timeout, 0
    while quiet < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
        quiet = quiet + 1 if all(state == "S" for state in _thread_states(tasks, "pt_gloo_runloop")) else 0


def _thread_states(tasks: Path, name: str) -> list[str]:
    """Scheduler states (R, S, D, ...) of this process's threads called `name`."""
    states = []
    for task in tasks.iterdir():
        try:
            if (task / "comm").read_text().strip() == name:
                stat = (task / "stat").read_text()
                states.append(stat[stat.rindex(")") + 2])
        except (OSError, ValueError, IndexError):  # the thread exited meanwhile
            continue
    return states


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if not d.enabled:
        return t
    out = [torch.empty_like(t) for _ in range(d.world_size)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_gather_rows(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """[world_size, *t.shape]: every rank's `t`, in rank order (one collective; [1, *t.shape] on one process)."""
    return all_gather_cat(t.unsqueeze(0), d)


def all_reduce_max(value: int, d: Dist) -> int:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def average_gradients(params: list[torch.nn.Parameter], d: Dist, extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mean of each gradient over ranks, flattened into one buffer per dtype to keep the calls few. DTensor
    gradients (FSDP2) were already reduce-scattered and averaged during backward, and are left alone.

    extra: a small tensor of small integer counts (exact in any float dtype), summed (not averaged) over ranks in
    the same collective as a gradient buffer on its device (else in one of its own); returned reduced. The loop
    passes its non-finite-loss flag here, so that an optimizer step costs one all-reduce, not two."""
    if not d.enabled:
        return extra
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and not isinstance(p.grad, DTensor):
            by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    carrier = None
    if extra is not None:
        same_device = [k for k in by_dtype if k[1] == extra.device]
        carrier = (extra.dtype, extra.device) if (extra.dtype, extra.device) in same_device else \
            (same_device[0] if same_device else None)
    reduced = None
    for key, grads in by_dtype.items():
        tail = [extra.reshape(-1).to(key[0])] if key == carrier else []
        flat = torch.cat([g.reshape(-1) for g in grads] + tail)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        n = flat.numel() - sum(x.numel() for x in tail)
        if tail:
            reduced = flat[n:].to(extra.dtype).view_as(extra)
        flat = flat[:n]
        flat /= d.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    if extra is not None and reduced is None:  # no gradient buffer to ride along (FSDP2, or no gradients)
        reduced = extra.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


# ------------------------------------------------------------------------------------------------ FSDP2
def use_fsdp(mode: str, world_size: int, is_peft: bool) -> bool:
    """`mode` is GRPOConfig.fsdp_mode. Auto shards full fine-tuning only: with LoRA the trained state is small
    and replicating the frozen base costs no communication per step."""
    if world_size <= 1:
        return False
    return mode == "full_shard" or (mode == "auto" and not is_peft)


def shard_model(model: torch.nn.Module, device: torch.device, world_size: int, bf16: bool) -> None:
    """fully_shard each decoder layer (the model's `_no_split_modules` classes), then the transformers model, which
    takes the rest (embeddings, final norm, a tied lm_head: FSDP2 keeps a shared parameter shared). Shards land on
    `device`.

    bf16: parameters are all-gathered and computed in bf16, gradients reduced in fp32 (summing many ranks' bf16
    gradients loses precision) and kept in the parameters' own dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    base = base_model(model)  # the FSDP root: PeftModel.generate calls it directly, past the wrapper's forward
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"FSDP2: found no decoder layers in {type(base).__name__} (no _no_split_modules); use "
                         "fsdp='no_shard'.")
    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(base, mesh=mesh, mp_policy=mp)
    # The loss runs the backbone and the head's weight outside model.forward(); as a registered forward method the
    # root's parameters (embeddings, a tied head) are gathered around it, and its gradients reduced after backward.
    from torch.distributed.fsdp import register_fsdp_forward_method

    from .logprobs import FSDP_METHOD, head_logprobs

    setattr(base, FSDP_METHOD, functools.partial(head_logprobs, base))
    register_fsdp_forward_method(base, FSDP_METHOD)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(base_model(model), FSDPModule)


def set_gradient_sync(model: torch.nn.Module, on: bool) -> None:
    """FSDP2: reduce-scatter gradients in this backward (the last pass of an accumulation window) or only
    accumulate them locally. Replicated ranks average once per window anyway: no-op."""
    if is_sharded(model):
        base_model(model).set_requires_gradient_sync(on)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm (clipping to max_norm) as a plain tensor: with DTensor gradients torch computes it
    across ranks and returns a replicated DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
