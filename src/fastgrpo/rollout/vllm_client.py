"""Generator backed by a `fastgrpo vllm-serve` server (vLLM 0.26): generation over HTTP, weights over NCCL.

Design choices
--------------
* Transport: the standard library's `http.client` only, so the trainer needs neither vllm nor requests to talk to
  a server. One connection per request (`Connection: close`): no stale keep-alive socket after a server restart,
  and thread safety for free. `rollout/http.py` is the whole HTTP layer (deadline, size cap, retry policy).
* Every wait is bounded: connect, headers and each read share one deadline per attempt; bodies over
  `max_response_bytes` (256 MB) are refused. Connection refused/reset, a dropped or truncated answer and HTTP 5xx
  are retried with exponential backoff a bounded number of times, then raise `ServerError` (which the trainer
  catches to write a checkpoint). A timeout is not retried (the server already had the whole budget). 4xx, bad
  JSON, oversized and wrong-schema answers raise at once (`ServerRequestError` / `ServerProtocolError`, both
  `ServerError`s): retrying a deterministic error only delays the message. The NCCL rendezvous and /update_weights
  are never retried (a broadcast is in flight).
* Generation: `POST /fastgrpo/v1/generate` when the server has it (`fastgrpo vllm-serve` installs it; found at
  start by a GET on that path): the body of vLLM's `/inference/v1/generate`, answered with flat lists instead of
  two pydantic objects per token (fastgrpo.serve explains the cost). Any other vLLM server: vLLM's
  `POST /inference/v1/generate` (token-in/token-out). One prompt per request with `n`
  samples, fanned out over a thread pool (vLLM batches concurrent requests itself). `logprobs=0` returns the
  sampled token's logprob, *processed* (after temperature/top-k/top-p) because the launcher passes
  `--logprobs-mode processed_logprobs`. vLLM seeds sample j of a request with `seed + j`, so prompt p gets
  `seed + p*n`: no two samples of one call share a seed. Answers are validated field by field.
* Weight sync, driven by rank 0 of the trainer's torch.distributed world (other ranks wait for its outcome, so no
  rank generates from stale weights and all ranks raise together): /pause (mode `keep` with async_generation:
  in-flight requests freeze and continue on the new weights, their per-token logprobs stay those of the weights
  that sampled them; else `wait`) -> /start_weight_update -> per chunk of ~`chunk_bytes`: POST /update_weights
  {names, dtype_names, shapes, packed} while a thread broadcasts the same tensors with vLLM's packed NCCL producer ->
  /finish_weight_update -> /reset_prefix_cache (cached KV belongs to the old weights) -> /resume. Chunking bounds
  the trainer's extra memory to one chunk when weights are produced on the fly (merged LoRA). If a sync fails after
  /pause, the server is left paused (its weights are half-updated) and the error says to restart it. The NCCL
  group's store listens on this machine's address towards the server (override: FASTGRPO_TRAINER_ADDRESS), port
  vllm_group_port; the server's GPUs must reach it.
* At start, GET /server_info (dev mode only) checks that the server has NCCL weight transfer and processed logprobs,
  so a misconfigured server fails before the first training step rather than after it.

vLLM 0.26 schemas used (paths under vllm/): entrypoints/scale_out/token_in_token_out/{protocol,serving}.py
(generate), entrypoints/serve/dev/rlhf/api_router.py (pause, resume, get_world_size, weight updates),
entrypoints/serve/dev/{cache,sleep}/api_router.py, distributed/weight_transfer/{nccl_engine,nccl_common}.py.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import torch

from ..serve import FAST_GENERATE_PATH
from .base import Generation, Generator, SamplingParams
from .http import (MAX_RESPONSE_BYTES, Http, ServerError, ServerProtocolError, ServerRequestError, WeightSyncError,
                   _Transient)

__all__ = ["VLLMServerGenerator", "ServerError", "ServerRequestError", "ServerProtocolError", "WeightSyncError",
           "server_url"]

logger = logging.getLogger(__name__)
GENERATE_PATH = "/inference/v1/generate"


def server_url(config) -> str:
    """Base URL from the config: vllm_server_base_url, else http://host:port (0.0.0.0 / :: mean this machine)."""
    if config.vllm_server_base_url:
        return config.vllm_server_base_url.rstrip("/")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.vllm_server_host, config.vllm_server_host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.vllm_server_port}"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_generation(resp: Any, n: int, max_tokens: int, where: str):
    """Validate one GenerateResponse; return [(token_ids, logprobs, finish_reason)] ordered by choice index."""

    def bad(msg: str):
        raise ServerProtocolError(f"{where} answered with an unexpected response ({msg}); expected vLLM 0.26's "
                                  "GenerateResponse. Is the server started with `fastgrpo vllm-serve`?")

    if not isinstance(resp, dict):
        bad(f"a JSON {type(resp).__name__}, not an object")
    choices = resp.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        bad(f"'choices' must be a list of n={n} entries, got {type(choices).__name__}"
            + (f" of {len(choices)}" if isinstance(choices, list) else ""))
    out: list = [None] * n
    for c in choices:
        if not isinstance(c, dict):
            bad("a choice is not an object")
        i, toks, fin, lp = c.get("index"), c.get("token_ids"), c.get("finish_reason"), c.get("logprobs")
        if not _is_int(i) or not 0 <= i < n or out[i] is not None:
            bad(f"choice index {i!r} is not a distinct integer in [0, {n})")
        if not isinstance(toks, list) or not all(_is_int(t) and t >= 0 for t in toks):
            bad("'token_ids' is not a list of non-negative integers")
        if len(toks) > max_tokens:
            bad(f"{len(toks)} tokens exceed max_tokens={max_tokens}")
        if fin == "abort":
            raise ServerError(f"{where}: the server aborted the request (someone paused it with mode=abort, or it is "
                              "shutting down).")
        if fin not in ("stop", "length"):
            bad(f"finish_reason {fin!r} is neither 'stop' nor 'length'")
        if isinstance(lp, list):  # FAST_GENERATE_PATH: one float per token
            if len(lp) != len(toks):
                bad("'logprobs' is not a list with one number per token")
            values = lp
        else:
            content = lp.get("content") if isinstance(lp, dict) else None
            if not isinstance(content, list) or len(content) != len(toks):
                bad("'logprobs.content' is not a list with one entry per token (was the server started with logprobs?)")
            values = []
            for tok, item in zip(toks, content):
                name = item.get("token") if isinstance(item, dict) else None
                if isinstance(name, str) and name.startswith("token_id:") and name != f"token_id:{tok}":
                    bad(f"logprob entry {name!r} does not match token {tok}")
                values.append(item.get("logprob") if isinstance(item, dict) else None)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"logprob {v!r} is not a finite number")
        out[i] = (toks, [float(v) for v in values], fin)
    return out


def _dist_rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_address_towards(host: str) -> str:
    """This machine's address on the route to `host`: where the server's workers reach the trainer's NCCL store."""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


class _VllmNcclSender:
    """Trainer side of vLLM 0.26's NCCL weight transfer (imported lazily: vllm exists only on the GPU host).
    The trainer is rank 0 of the group, on torch's current CUDA device."""

    def __init__(self) -> None:
        self.group = None

    @staticmethod
    def _engine():
        try:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
        except ImportError as e:
            raise WeightSyncError("Pushing weights to a vLLM server needs vllm (0.26) in the trainer's environment "
                                  f"too, for its NCCL weight-transfer engine: {e}") from e
        return NCCLWeightTransferEngine

    def open(self, init_info: dict) -> None:
        self.group = self._engine().trainer_init(dict(init_info))

    def send(self, pairs: list, buffer_bytes: int, num_buffers: int) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerSendWeightsArgs

        # The producer packs on side streams: the tensors must be final before, and sent before they are freed.
        torch.cuda.synchronize()
        args = NCCLTrainerSendWeightsArgs(group=self.group, packed=True, packed_buffer_size_bytes=buffer_bytes,
                                          packed_num_buffers=num_buffers,
                                          post_iter_func=lambda item: item[1] if item[1].is_cuda else item[1].cuda())
        self._engine().trainer_send_weights(iter(pairs), args)
        torch.cuda.synchronize()

    def close(self) -> None:
        self.group = None


def _in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, list]:
    """Run `fn` in a daemon thread (NCCL cannot be interrupted; the HTTP side stays on the caller's thread with its
    timeout, and an abandoned thread dies with the process), on the caller's CUDA device (the current device is
    per thread). Returns the thread and a list that gets its error."""
    errors: list = []
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)

    t = threading.Thread(target=run, daemon=True, name="fastgrpo-nccl")
    t.start()
    return t, errors


class VLLMServerGenerator(Generator):
    """Samples from a `fastgrpo vllm-serve` server and pushes the trainer's weights to it after each update."""

    owns_weights = True

    def __init__(self, config, *, max_retries: int = 4, backoff: float = 0.5, request_timeout: float = 1800.0,
                 control_timeout: float = 300.0, weight_timeout: float = 1800.0, max_concurrency: int = 64,
                 chunk_bytes: int = 1 << 30, packed_buffer_bytes: int = 1 << 30, packed_num_buffers: int = 2,
                 max_response_bytes: int = MAX_RESPONSE_BYTES, weight_sender=None,
                 iter_weights: Callable[..., Iterable] | None = None, trainer_address: str | None = None,
                 rank: int | None = None, world_size: int | None = None, wait_ready: bool = True) -> None:
        self.config = config
        self._rank, self._world = rank, world_size  # None: read torch.distributed at each sync
        self.url = server_url(config)
        hint = (f" The last checkpoint is in {config.output_dir} (the trainer writes one when it stops on this error); "
                "restart the server (`fastgrpo vllm-serve --model MODEL ...`) and resume with "
                "resume_from_checkpoint=True.")
        self._http = Http(self.url, config.vllm_server_api_key or os.environ.get("VLLM_API_KEY") or None,
                           max_retries=max_retries, backoff=backoff, max_response_bytes=max_response_bytes, hint=hint)
        self.request_timeout, self.control_timeout, self.weight_timeout = request_timeout, control_timeout, weight_timeout
        self.max_concurrency, self.chunk_bytes = max_concurrency, chunk_bytes
        self.packed_buffer_bytes, self.packed_num_buffers = packed_buffer_bytes, packed_num_buffers
        self.pause_mode = "keep" if config.async_generation else "wait"
        self._sender = weight_sender if weight_sender is not None else _VllmNcclSender()
        self._iter_weights = iter_weights
        self._trainer_address = trainer_address or os.environ.get("FASTGRPO_TRAINER_ADDRESS")
        self._transfer_ready = False
        self._asleep = False
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._stats: dict[str, float] = {}
        self.server_dtype: str | None = None  # read from /server_info; a different trainer dtype is warned about once
        self.generate_path = GENERATE_PATH  # FAST_GENERATE_PATH once the server shows it has that route
        if wait_ready:
            self.wait_until_ready()

    # -- readiness ---------------------------------------------------------------------------------------------
    def wait_until_ready(self) -> None:
        """Poll GET /health with backoff for up to vllm_server_timeout s, then check the API key on /v1/models."""
        budget = float(self.config.vllm_server_timeout)
        deadline, delay, last = time.monotonic() + budget, 0.1, "no answer"
        while True:
            try:
                self._http.attempt("GET", "/health", timeout=max(0.05, min(5.0, deadline - time.monotonic())))
                break
            except _Transient as e:
                last = str(e)
            if time.monotonic() + delay >= deadline:
                raise ServerError(f"vLLM server at {self.url} was not ready after {budget:g} s (GET /health: {last}). "
                                  "Start it with `fastgrpo vllm-serve --model MODEL` and wait for 'Application startup "
                                  "complete', or raise vllm_server_timeout.")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        models = self._http.request("GET", "/v1/models", timeout=self.control_timeout)  # behind the API key
        if not isinstance(models, dict) or not isinstance(models.get("data"), list):
            raise ServerProtocolError(f"vLLM server at {self.url} answered GET /v1/models without a 'data' list; "
                                      "is it a vLLM server?")
        self._check_server_config()
        self._find_generate_route()

    def _find_generate_route(self) -> None:
        """Use FAST_GENERATE_PATH when GET on it answers as fastgrpo.serve.FastGenerate does (404/405: vLLM's route)."""
        try:
            info = self._http.request("GET", FAST_GENERATE_PATH, timeout=self.control_timeout)
        except ServerRequestError as e:
            if e.status not in (404, 405):
                raise
            info = None
        if isinstance(info, dict) and info.get("fastgrpo_generate") == 1:
            self.generate_path = FAST_GENERATE_PATH
        else:
            logger.info("vLLM server at %s has no %s (it was not started with `fastgrpo vllm-serve`): generating "
                        "through %s, whose per-token logprob objects cost time on long completions.", self.url,
                        FAST_GENERATE_PATH, GENERATE_PATH)

    def _check_server_config(self) -> None:
        """Fail at start, not after the first training step, when the server lacks what `fastgrpo vllm-serve` sets.
        GET /server_info exists only with VLLM_SERVER_DEV_MODE=1 (a 404 says so); unknown layouts are let through."""
        try:
            info = self._http.request("GET", "/server_info", params={"config_format": "json"},
                                      timeout=self.control_timeout)
        except ServerRequestError:
            raise
        except ServerError as e:  # advisory beyond the 404: never stop a run because vLLM's env report failed
            logger.warning("Could not read the vLLM server's configuration: %s", e)
            return
        cfg = info.get("vllm_config") if isinstance(info, dict) else None
        model_cfg = cfg.get("model_config") if isinstance(cfg, dict) else None
        if not isinstance(model_cfg, dict):
            return
        self.server_dtype = str(model_cfg.get("dtype", "")).removeprefix("torch.") or None
        mode = model_cfg.get("logprobs_mode")
        if mode not in (None, "processed_logprobs"):
            logger.warning("vLLM server at %s returns %s, not processed_logprobs: its logprobs ignore temperature/top-k/"
                           "top-p and the importance-sampling correction compares unlike quantities. Start it with "
                           "`fastgrpo vllm-serve`.", self.url, mode)
        transfer = cfg.get("weight_transfer_config", {})
        if transfer is None or (isinstance(transfer, dict) and transfer.get("backend", "nccl") != "nccl"):
            raise ServerRequestError(f"vLLM server at {self.url} has no NCCL weight transfer (weight_transfer_config="
                                     f"{transfer}), so it cannot receive the trainer's weights. Start it with "
                                     "`fastgrpo vllm-serve --model MODEL`.")

    # -- generation --------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        if self._closed:
            raise RuntimeError("VLLMServerGenerator.generate after close()")
        for p, ids in enumerate(prompt_ids):
            if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"prompt {p} must be a non-empty list of non-negative token ids")
        if params.n < 1 or params.max_tokens < 1:
            raise ValueError(f"SamplingParams needs n >= 1 and max_tokens >= 1, got n={params.n}, "
                             f"max_tokens={params.max_tokens}")
        t0 = time.perf_counter()
        bodies = [self._request_body(p, ids, params) for p, ids in enumerate(prompt_ids)]
        if len(bodies) <= 1:
            results = [self._generate_one(b, params) for b in bodies]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="fastgrpo-vllm")
            futures = [self._pool.submit(self._generate_one, b, params) for b in bodies]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        flat = [choice for r in results for choice in r]
        self._stats["generate_time"] = time.perf_counter() - t0
        return Generation([c[0] for c in flat], [c[1] for c in flat], [c[2] for c in flat])

    def _request_body(self, p: int, ids, params: SamplingParams) -> dict:
        sp: dict[str, Any] = {
            "n": params.n, "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k or 0, "min_p": params.min_p or 0.0, "repetition_penalty": params.repetition_penalty,
            "logprobs": 0,  # the sampled token's logprob only
            "detokenize": False,  # token ids in, token ids out: text is never used
            # FINAL_ONLY: with n > 1 and the default (cumulative) kind, vLLM's last message holds only the samples
            # that finished in the last engine step (v1/engine/parallel_sampling.py, get_outputs); seen on 2x H200
            "output_kind": 2,
        }
        if params.seed is not None:
            sp["seed"] = params.seed + p * params.n
        if params.regex:
            sp["structured_outputs"] = {"regex": params.regex}
        sp.update(params.extra)
        return {"request_id": f"fastgrpo-{uuid.uuid4().hex}-{p}", "token_ids": list(ids), "sampling_params": sp}

    def _generate_one(self, body: dict, params: SamplingParams):
        path = self.generate_path
        resp = self._http.request("POST", path, body=body, timeout=self.request_timeout)
        return _parse_generation(resp, params.n, params.max_tokens, f"vLLM server at {self.url}: POST {path}")

    # -- weights -----------------------------------------------------------------------------------------------
    def update_weights(self, model) -> None:
        """Push `model`'s weights (LoRA: only the changed, merged ones). Call on every rank; rank 0 sends. Under
        FSDP2 every rank takes part in gathering each tensor (and the others discard theirs), also when rank 0 fails
        midway: it gathers the rest without sending, so no rank waits in an all-gather that never comes."""
        from .weights import drain, gathers_on_every_rank

        rank, world = _dist_rank_world() if self._rank is None or self._world is None else (self._rank, self._world)
        gathers = world > 1 and gathers_on_every_rank(model)
        weights = self._weights(model) if rank == 0 or gathers else None
        error: Exception | None = None
        if rank == 0:
            try:
                self._sync(weights)
            except Exception as e:  # noqa: BLE001 - told to the other ranks first, then re-raised
                error = e
        if gathers:
            try:
                drain(weights)
            except Exception as e:  # noqa: BLE001 - same error on every rank; reported through rank 0's outcome
                error = error or e
        if world > 1:
            outcome = [None if error is None else str(error)]
            torch.distributed.broadcast_object_list(outcome, src=0)
            if rank != 0 and outcome[0] is not None:
                raise WeightSyncError(f"rank 0 failed to push weights to the vLLM server: {outcome[0]}")
        if error is not None:
            raise error

    def _weights(self, model) -> Iterator[tuple[str, torch.Tensor]]:
        if self._iter_weights is None:
            from .weights import is_peft_model, iter_sync_weights

            return iter_sync_weights(model, only_changed=is_peft_model(model), complete_parents=True)  # sees through DDP
        is_lora = getattr(model, "peft_config", None) is not None
        return iter(self._iter_weights(model, only_changed=is_lora, complete_parents=True))

    def _post(self, path: str, timeout: float, retry: bool = True, **kw) -> Any:
        return self._http.request("POST", path, timeout=timeout, retry=retry, **kw)

    def _init_transfer(self) -> None:
        ws = self._http.request("GET", "/get_world_size", timeout=self.control_timeout)
        if not isinstance(ws, dict) or not _is_int(ws.get("world_size")) or ws["world_size"] < 1:
            raise ServerProtocolError(f"vLLM server at {self.url}: GET /get_world_size answered {str(ws)[:100]}.")
        try:
            address = self._trainer_address or _local_address_towards(self._http.host)
        except OSError as e:
            raise WeightSyncError(f"Could not find this machine's address towards {self._http.host} for the NCCL group "
                                  f"({e}); set FASTGRPO_TRAINER_ADDRESS to an address the server can reach.") from e
        init_info = {"master_address": address,
                     "master_port": int(self.config.vllm_group_port), "rank_offset": 1,
                     "world_size": ws["world_size"] + 1}
        thread, errors = _in_thread(lambda: self._sender.open(init_info))
        try:
            self._post("/init_weight_transfer_engine", self.weight_timeout, retry=False, body={"init_info": init_info})
        except ServerError as e:
            raise WeightSyncError(f"Could not set up the NCCL weight-transfer group with the vLLM server at {self.url} "
                                  f"(trainer at {init_info['master_address']}:{init_info['master_port']}, which the "
                                  f"server's GPUs must reach): {e}") from e
        thread.join(self.weight_timeout)
        if thread.is_alive() or errors:
            raise WeightSyncError(f"NCCL rendezvous with the vLLM server at {self.url} failed on the trainer side: "
                                  f"{errors[0] if errors else 'timed out'}") from (errors[0] if errors else None)
        self._transfer_ready = True

    def _send_chunk(self, pairs: list) -> None:
        info = {"names": [n for n, _ in pairs], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in pairs],
                "shapes": [list(t.shape) for _, t in pairs], "packed": True,
                "packed_buffer_size_bytes": self.packed_buffer_bytes, "packed_num_buffers": self.packed_num_buffers}
        thread, errors = _in_thread(lambda: self._sender.send(pairs, self.packed_buffer_bytes, self.packed_num_buffers))
        self._post("/update_weights", self.weight_timeout, retry=False, body={"update_info": info})
        thread.join(self.weight_timeout)
        if thread.is_alive() or errors:
            raise WeightSyncError(f"NCCL broadcast of {len(pairs)} tensors failed on the trainer side: "
                                  f"{errors[0] if errors else 'timed out'}") from (errors[0] if errors else None)

    def _sync(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        if self._asleep:
            self.wake()
        if not self._transfer_ready:
            self._init_transfer()
        self._post("/pause", self.weight_timeout, params={"mode": self.pause_mode})
        sent_bytes = sent = 0
        try:
            self._post("/start_weight_update", self.control_timeout)
            chunk, size = [], 0
            for name, tensor in weights:
                if self.server_dtype and str(tensor.dtype) != f"torch.{self.server_dtype}":
                    logger.warning("Sending %s weights (%s) to a vLLM server that holds %s: the precision gap biases "
                                   "the importance ratios; train in or serve with the same dtype.",
                                   tensor.dtype, name, self.server_dtype)
                    self.server_dtype = None  # once
                chunk.append((name, tensor.detach()))
                size += tensor.numel() * tensor.element_size()
                if size >= self.chunk_bytes:
                    self._send_chunk(chunk)
                    sent, sent_bytes, chunk, size = sent + len(chunk), sent_bytes + size, [], 0
            if chunk:
                self._send_chunk(chunk)
                sent, sent_bytes = sent + len(chunk), sent_bytes + size
            self._post("/finish_weight_update", self.weight_timeout, retry=False)
        except Exception as e:
            try:  # best effort, so that the server is not stuck mid-reload; it stays paused
                self._http.request("POST", "/finish_weight_update", timeout=min(60.0, self.weight_timeout), retry=False)
            except Exception:  # noqa: BLE001 - the original error matters
                pass
            raise WeightSyncError(f"Pushing weights to the vLLM server at {self.url} failed after {sent} tensors: {e} "
                                  "The server is left paused with partially updated weights: restart it and resume "
                                  "the run from its last checkpoint.") from e
        # With mode=keep the frozen requests still hold KV blocks: preempt them so they recompute with the new weights.
        reset = self._post("/reset_prefix_cache", self.control_timeout,
                           params={"reset_running_requests": "true"} if self.pause_mode == "keep" else None)
        if not (isinstance(reset, dict) and reset.get("success") is True):
            logger.warning("vLLM server at %s did not reset its prefix cache (%s); cached prompts keep KV from the old "
                           "weights until evicted", self.url, str(reset)[:100])
            self._stats["prefix_cache_reset_failures"] = self._stats.get("prefix_cache_reset_failures", 0.0) + 1
        self._post("/resume", self.control_timeout)
        self._stats.update(weight_sync_time=time.perf_counter() - t0, weight_sync_tensors=float(sent),
                           weight_sync_gb=sent_bytes / 1e9)

    # -- memory and lifecycle ----------------------------------------------------------------------------------
    def sleep(self) -> None:
        """POST /sleep?level=1 (weights to CPU, KV cache freed) if vllm_enable_sleep_mode; else a no-op.
        The server must then run with --enable-sleep-mode."""
        if self.config.vllm_enable_sleep_mode and not self._asleep:
            self._post("/sleep", self.control_timeout, params={"level": 1, "mode": "wait"})
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self._post("/wake_up", self.control_timeout)
            self._asleep = False

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        close = getattr(self._sender, "close", None)
        if close is not None:
            close()

    def stats(self) -> dict[str, float]:
        return {**self._stats, "server_retries": float(self._http.retries)}
