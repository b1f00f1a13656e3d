"""The weight push into a vLLM 0.26 engine that runs in its own process on the trainer's GPU.

Used by `VLLMColocateGenerator` when `vllm_engine_process` is on (one process, tensor_parallel_size 1). Both sides
live here: the trainer packs, the engine process (vLLM's EngineCore with its in-process `UniProcExecutor` worker)
unpacks. Choices, checked against the vLLM 0.26 and torch sources:

- One buffer per bucket: the trainer copies a bucket's tensors into one contiguous uint8 GPU buffer, each at a
  256-byte aligned offset (so `view(dtype)` is legal for every dtype), and shares that buffer once through CUDA
  IPC (`torch.multiprocessing.reductions.reduce_tensor`). One IPC handle per bucket instead of one per tensor:
  opening a handle is the expensive part on the receiving side. The engine rebuilds the buffer
  (`rebuild_cuda_tensor`, with its own device index: the handle carries the trainer's) and passes views of it to
  `model.load_weights`, which copies them into its parameters in place (captured CUDA graphs stay valid).
- Transport: `LLM.collective_rpc("receive_ipc_weights", args=(payload,))`. In 0.26 the client msgpack-encodes
  utility calls (`vllm/v1/serial_utils.py`, `MsgpackEncoder.enc_hook`); anything that is not a msgpack type
  (classes, dtypes) raises unless VLLM_ALLOW_INSECURE_SERIALIZATION=1. So the payload holds plain types only: the
  handle's `rebuild_cuda_tensor` arguments are pickled into `bytes` by us, and dtypes travel as names. No
  insecure-serialization switch is needed; the pickle comes from the trainer that started the engine.
- Synchronisation: the trainer synchronises its stream before sending (the copies into the buffer are done;
  torch's IPC event does the same), the engine synchronises after `load_weights` and drops every view before the
  call returns, so the trainer may free (or reuse) the buffer as soon as `collective_rpc` returns.
- `WeightReceiver` is vLLM's `worker_extension_cls`: vLLM appends it to the GPU Worker's bases
  (`vllm/v1/worker/worker_base.py`, `WorkerWrapperBase.init_worker`), after asserting that none of its
  attributes exists on the Worker, so it defines exactly one method. `self.device` and `self.get_model()` are the
  Worker's (`get_model` unwraps the CUDA-graph wrapper, as `LLM.apply_model` does in the in-process mode).
- A "bytes" payload carries the buffer by value instead of by handle: the same unpacking and loading on any
  device, which the CPU tests use (and a slow fallback for engines that cannot open CUDA IPC handles).

This module imports only torch: the engine process imports it by name when it builds its worker.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "WeightReceiver", "PackedBucket", "pack_bucket", "unpack_bucket", "cuda_ipc_payload", "bytes_payload",
    "open_payload", "RECEIVE_METHOD", "SAMPLER_LOGPROBS_METHOD", "WORKER_EXTENSION", "ALIGN",
]

ALIGN = 256  # byte alignment of every tensor in a packed buffer (cudaMalloc's own alignment)
SAMPLER_LOGPROBS_METHOD = "fastgrpo_sampler_logprobs"
RECEIVE_METHOD = "receive_ipc_weights"
WORKER_EXTENSION = "fastgrpo.rollout.vllm_worker.WeightReceiver"  # vLLM resolves it by qualified name
_STORAGE_DEVICE = 6  # index of `storage_device` in rebuild_cuda_tensor's arguments


@dataclass
class PackedBucket:
    """A bucket of named tensors copied into one buffer.

    buffer:  (nbytes,) uint8, every tensor's bytes at its offset (offsets are multiples of ALIGN)
    entries: per tensor `[name, dtype name, shape, byte offset]`, in the bucket's order (plain types: msgpack-safe)
    """

    buffer: torch.Tensor
    entries: list[list]

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the tensors themselves (without alignment padding)."""
        return sum(math.prod(shape) * _dtype(dtype).itemsize for _, dtype, shape, _ in self.entries)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a weight payload")
    return dtype


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def _view(buffer: torch.Tensor, dtype: torch.dtype, shape: Sequence[int], offset: int) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    if offset % ALIGN or offset + nbytes > buffer.numel():
        raise ValueError(f"tensor at byte {offset} (+{nbytes}) is not an aligned slot of a {buffer.numel()}-byte "
                         "buffer")
    return buffer[offset:offset + nbytes].view(dtype).view(tuple(shape))


@torch.no_grad()
def pack_bucket(bucket: Sequence[tuple[str, torch.Tensor]], device: torch.device | str) -> PackedBucket:
    """Copy `(name, tensor)` pairs (any device, any strides) into one new buffer on `device`."""
    entries, offset = [], 0
    for name, t in bucket:
        entries.append([name, _dtype_name(t.dtype), [int(s) for s in t.shape], offset])
        offset += _aligned(t.numel() * t.element_size())
    buffer = torch.empty(max(offset, ALIGN), dtype=torch.uint8, device=device)  # never empty: IPC needs a storage
    for (_, t), (_, _, shape, off) in zip(bucket, entries):
        _view(buffer, t.dtype, shape, off).copy_(t.detach())
    return PackedBucket(buffer, entries)


def unpack_bucket(buffer: torch.Tensor, entries: Sequence[Sequence]) -> list[tuple[str, torch.Tensor]]:
    """`(name, view)` pairs into `buffer`, as described by `entries` (no copies)."""
    return [(str(name), _view(buffer, _dtype(dtype), shape, int(off))) for name, dtype, shape, off in entries]


def _gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def cuda_ipc_payload(packed: PackedBucket) -> dict:
    """The message for `receive_ipc_weights`: a CUDA IPC handle of the buffer. `packed` must stay alive (and
    unmodified) until the engine has answered."""
    from torch.multiprocessing.reductions import reduce_tensor

    buffer = packed.buffer
    if buffer.device.type != "cuda":
        raise ValueError("a CUDA IPC payload needs a CUDA buffer; use bytes_payload for host tensors")
    _, args = reduce_tensor(buffer)
    return {"kind": "cuda_ipc", "gpu": _gpu_uuid(buffer.device), "handle": pickle.dumps(args),
            "nbytes": int(buffer.numel()), "entries": packed.entries}


def bytes_payload(packed: PackedBucket) -> dict:
    """The same message with the buffer's bytes inline (tests; engines without CUDA IPC)."""
    data = packed.buffer.detach().to("cpu").contiguous().numpy().tobytes()
    return {"kind": "bytes", "data": data, "nbytes": len(data), "entries": packed.entries}


def open_payload(payload: dict, device: torch.device) -> torch.Tensor:
    """The payload's buffer as a (nbytes,) uint8 tensor on `device` (for CUDA IPC: the trainer's memory itself)."""
    kind = payload.get("kind")
    if kind == "cuda_ipc":
        if device.type != "cuda":
            raise RuntimeError(f"a CUDA IPC weight payload cannot be opened on {device}")
        mine = _gpu_uuid(device)
        if payload["gpu"] != mine:
            raise RuntimeError(f"the trainer's buffer is on GPU {payload['gpu']} but this engine runs on GPU {mine}: "
                               "CUDA IPC weight pushes need both processes on the same GPU")
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(pickle.loads(payload["handle"]))
        args[_STORAGE_DEVICE] = device.index if device.index is not None else torch.cuda.current_device()
        buffer = rebuild_cuda_tensor(*args)
    elif kind == "bytes":
        buffer = torch.frombuffer(bytearray(payload["data"]), dtype=torch.uint8).to(device)
    else:
        raise ValueError(f"unknown weight payload kind {kind!r}")
    if buffer.numel() != payload["nbytes"]:
        raise RuntimeError(f"weight payload buffer has {buffer.numel()} bytes, expected {payload['nbytes']}")
    return buffer


class WeightReceiver:
    """vLLM `worker_extension_cls`: mixed into the engine process's GPU Worker. Two methods only, the RPC targets
    (vLLM refuses extension attributes that the Worker already has): weights through CUDA IPC, and the sampler's
    logprob record (`vllm_logprobs`), which cannot travel as a pickled function to the engine process."""

    def fastgrpo_sampler_logprobs(self, action: str):
        from .vllm_logprobs import rpc

        out = rpc(self, action)
        if isinstance(out, dict):  # vLLM's RPC answer carries lists, not NumPy arrays
            out = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in out.items()}
        return out

    def receive_ipc_weights(self, payload: dict) -> int:
        """Load one packed bucket into the model; returns how many parameters `load_weights` reports loaded."""
        device = self.device
        buffer = open_payload(payload, device)
        weights = unpack_bucket(buffer, payload["entries"])
        with torch.no_grad():
            loaded = self.get_model().load_weights(weights)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # every read of the trainer's buffer is done before we answer
        del weights, buffer  # release the IPC mapping now: the trainer frees the buffer when we return
        return len(loaded) if loaded else 0
