"""torchrun support: rank facts and the few collectives the loop needs (no-ops on one process).

Data parallelism is explicit: each rank generates and scores whole prompt groups, so group-relative advantages
need no communication; gradients are averaged across ranks after each accumulation window (what DDP does),
and only batch-wide statistics (token totals, batch std, logged metrics) are reduced.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        dist.destroy_process_group()


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


def average_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Mean of each gradient over ranks, flattened into one buffer per dtype to keep the calls few."""
    if not d.enabled:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= d.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
