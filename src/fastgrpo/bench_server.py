"""Server-mode cells of `fastgrpo bench` (issue 7): a vLLM server on its own GPUs, the trainer on others.

Modes `server` (synchronous: the trainer waits while the server generates) and `server-async` (generation of the
next batch overlaps training). For fastgrpo they are `vllm_mode="server"` without and with `async_generation`; for
TRL 1.16 they are `GRPOTrainer(vllm_mode="server")` and `trl.experimental.async_grpo.AsyncGRPOTrainer`, each
against the server its users would start:
* fastgrpo: `fastgrpo vllm-serve` (fastgrpo.serve);
* TRL: `trl vllm-serve` (trl/scripts/vllm_serve.py), which execs vLLM's own server with the same dev-mode
  endpoints, NCCL weight transfer and processed logprobs.
Both get the same `--gpu-memory-utilization` (bench's --server-gpu-memory-utilization, TRL's default 0.9) and
`--max-model-len` (max_prompt_length + L). The server is started, waited for (/health) and killed inside the
cell's worker process, so its start-up is not part of any step; each cell gets fresh free ports (HTTP and the NCCL
group), so cells on disjoint GPUs can run at once.

AsyncGRPOTrainer keeps TRL's defaults (max_staleness 4, bf16 autocast) except dtype="bfloat16" (the colocate
and server cells load bf16 weights too) and token_budget=0: TRL's fixed-count batcher then packs
per_device_train_batch_size samples per micro-batch, so an optimizer step covers the same 128 completions as
every other cell (with the default token budget of max_model_len it would cover ~16, and s/step would not compare).
Its rollout worker parses responses with a per-template parser that TRL 1.16 only knows for some templates: Qwen2's
ChatML template is not among them (Qwen2.5's and Qwen3's are), so the tokenizer gets TRL's Qwen3/ChatML parser less
its `reasoning_content` field (`chatml_response_template`). With that field the parser moved `<think>...</think>` out
of the message content, so the recipe's format_reward, which reads the content, scored 0 even for a perfectly
formatted completion: a reward no other cell computes. Qwen2's template has no reasoning section, and TRL's own
GRPOTrainer hands reward functions the whole decoded text, think tags included; the parse only feeds the rewards
(training rows are built from token ids).

Observability: TRL's async_grpo loggers (trainer, rollout worker, weight transfer) log at INFO, which no handler
shows by default, and the rollout worker runs in a spawned child that configures no logging at all. The cell gives
both processes a timestamped INFO handler on stderr (so into the cell's log.txt): the child through a subclass of
TRL's rollout loop (`_LoggedRolloutLoop`, set as the worker's `_loop_cls`) that installs it before TRL's own
initialisation. Per-group lines (two per scored group) and per-sample ones ("waited X s for sample", "dropping stale
sample") are thinned: each kind of line (its text with the numbers masked) passes 32 times, then once per 10 s with
the count held back. A watchdog line every 15 s gives the step, the rollout queue's size, the policy version and the
child's heartbeat age and liveness, since TRL logs the queue wait only once a sample has arrived.

Attention: AsyncGRPOTrainer trains on packed prompt trees through `flash_attn_varlen_func` of FlashAttention 3,
which it fetches from the Hugging Face Hub at the first forward (`kernels.get_kernel("kernels-community/
flash-attn3")`). Where that cannot load (the `kernels` package or the Hub unreachable, as on an offline GPU host),
the cell gives TRL `varlen_attention` instead: the same function (variable-length segments, causal mask aligned
to the bottom right as FlashAttention 2.1+ does when a segment has fewer queries than keys, grouped-query heads)
computed segment by segment with PyTorch's scaled_dot_product_attention. The table notes it; FA3 itself would be
faster, so that cell's s/step is an upper bound of TRL's.

Time to the first step: the worker dispatches max_inflight_tasks = max_staleness x 128 = 512 requests at once and
scores a group only when all its generations are back; with a random-weight model all run to max_completion_length
(near-uniform sampling draws EOS ~2 times in 151,936), so any group is complete only when the whole wave is, and the
first optimizer step waits for 4 steps' worth of generation (then 16 groups scored one at a time, then 16
micro-batches). Give the cell the time for that.

The server runs in its own process group (vLLM spawns engine processes); its group id is written to
`server.pgid` in the cell's folder so that the bench parent can kill it too when it kills a timed-out worker.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from itertools import pairwise
from pathlib import Path

import torch

SERVER_START_TIMEOUT = 420.0
log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(framework: str, model: str, port: int, util: float, max_model_len: int) -> list[str]:
    launcher = ["-m", "fastgrpo.cli", "vllm-serve"] if framework == "fastgrpo" else ["-m", "trl.scripts.vllm_serve"]
    return [sys.executable, *launcher, "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--gpu-memory-utilization", str(util), "--max-model-len", str(max_model_len)]


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


@contextlib.contextmanager
def serving(spec: dict, max_model_len: int):
    """Start the framework's vLLM server on spec["server_gpus"]; yields (port, group_port, seconds to healthy)."""
    port, log_path = free_port(), Path(spec["out_dir"], "server.log")
    cmd = server_command(spec["framework"], spec["model"], port, spec.get("server_gpu_memory_utilization", 0.9),
                         max_model_len)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": spec.get("server_gpus", "1"), "VLLM_SERVER_DEV_MODE": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    Path(spec["out_dir"], "server.pgid").write_text(str(proc.pid))
    try:
        while not _healthy(port):
            if proc.poll() is not None:
                tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])[-300:]
                raise RuntimeError(f"vLLM server exited with code {proc.returncode} before it was ready: {tail}")
            if time.perf_counter() - t0 > SERVER_START_TIMEOUT:
                raise RuntimeError(f"vLLM server not ready after {SERVER_START_TIMEOUT:.0f} s (log: {log_path})")
            time.sleep(1.0)
        yield port, free_port(), time.perf_counter() - t0
    finally:
        kill_server(spec["out_dir"])
        proc.wait()


def kill_server(out_dir: str) -> None:
    """Kill the process group of the server a cell started (no-op when it has none or it is gone)."""
    path = Path(out_dir, "server.pgid")
    if path.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(path.read_text()), signal.SIGKILL)
        path.unlink(missing_ok=True)


# ------------------------------------------------------- GPU memory of a cell, sampled by the bench parent
def gpu_used_mib(gpus: str | None = None) -> float | None:
    """Memory used on the GPUs `gpus` ("0,1"; default: all) according to nvidia-smi (MiB); None without one."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                            *([f"--id={gpus}"] if gpus else [])],
                           capture_output=True, text=True, timeout=10)
        return sum(float(x) for x in p.stdout.split()) if p.returncode == 0 and p.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def sample_peak(stop: threading.Event, peak: list, gpus: str | None) -> None:
    while not stop.wait(0.25):
        used = gpu_used_mib(gpus)
        if used is None:
            return
        peak[0] = max(peak[0] or 0.0, used)


# ---------------------------------------------------------------------------- TRL's AsyncGRPOTrainer
ASYNC_LOGGERS = ("trl.experimental.async_grpo", __name__)
LOG_FORMAT = "%(asctime)s %(processName)s %(name)s %(levelname)s: %(message)s"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class ThinningFilter(logging.Filter):
    """Passes each kind of INFO line (its text with the numbers masked) `burst` times, then once per `every_s`
    seconds, noting how many like it were held back. Warnings and errors always pass."""

    def __init__(self, burst: int = 32, every_s: float = 10.0) -> None:
        super().__init__()
        self.burst, self.every_s, self._lock, self._seen = burst, every_s, threading.Lock(), {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        msg = record.getMessage()
        key, now = _NUMBER.sub("#", msg)[:80], time.monotonic()
        with self._lock:
            n, last, held = self._seen.get(key, (0, -float("inf"), 0))
            if n < self.burst or now - last >= self.every_s:
                self._seen[key] = (n + 1, now, 0)
                if held:
                    record.msg, record.args = f"{msg} [{held} more like it held back]", None
                return True
            self._seen[key] = (n + 1, last, held + 1)
            return False


def log_async_grpo(stream=None) -> logging.Handler:
    """INFO of TRL's async_grpo loggers (and this module's) to `stream` (default stderr), thinned; once per process."""
    for name in ASYNC_LOGGERS:
        for h in logging.getLogger(name).handlers:
            if isinstance(h.filters[0] if h.filters else None, ThinningFilter):
                return h
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(ThinningFilter())
    for name in ASYNC_LOGGERS:
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False  # a root handler added later (basicConfig) would print each line twice
    return handler


def _logged_rollout_loop() -> type:
    """TRL's rollout loop, installing `log_async_grpo` in the spawned child before TRL initialises it.

    Made on first use (importing TRL here would slow every bench cell down) and published as this module's
    `_LoggedRolloutLoop`, which is the name the child's unpickler asks for (see `__getattr__`)."""
    cls = globals().get("_LoggedRolloutLoop")
    if cls is None:
        from trl.experimental.async_grpo.async_rollout_worker import _AsyncRolloutLoop

        def __init__(self, **kwargs):
            log_async_grpo()
            _AsyncRolloutLoop.__init__(self, **kwargs)

        cls = type("_LoggedRolloutLoop", (_AsyncRolloutLoop,), {"__init__": __init__, "__module__": __name__})
        globals()["_LoggedRolloutLoop"] = cls
    return cls


def __getattr__(name: str):
    if name == "_LoggedRolloutLoop":
        return _logged_rollout_loop()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def chatml_response_template() -> dict:
    """TRL's Qwen3/ChatML response template without `reasoning_content` (see the module docstring)."""
    from trl.chat_template_utils import qwen3_template

    fields = {k: v for k, v in qwen3_template["fields"].items() if k != "reasoning_content"}
    return {**qwen3_template, "fields": fields}


@contextlib.contextmanager
def watching(trainer, every_s: float = 15.0):
    """Log the async pipeline's state every `every_s` seconds while the block runs (see the module docstring)."""
    stop, t0 = threading.Event(), time.time()

    def state() -> str:
        worker, queue_ = getattr(trainer, "rollout_worker", None), getattr(trainer, "rollout_queue", None)
        parts = [f"t={time.time() - t0:.0f}s", f"step={trainer.state.global_step}",
                 f"policy_version={getattr(trainer, 'model_version', None)}"]
        with contextlib.suppress(Exception):  # NotImplementedError on macOS; a queue being torn down
            parts.append(f"rollout_queue={queue_.qsize()}")
        proc, beat = getattr(worker, "_process", None), getattr(worker, "_heartbeat_value", None)
        if proc is None:
            parts.append("rollout_child=not started")
        else:
            parts.append(f"rollout_child={'alive' if proc.is_alive() else f'exited {proc.exitcode}'}")
            if beat is not None and beat.value:
                parts.append(f"heartbeat_age={time.time() - beat.value:.1f}s")
        return " ".join(parts)

    def run() -> None:
        while not stop.wait(every_s):
            log.info(f"async pipeline: {state()}")

    thread = threading.Thread(target=run, name="bench-async-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        log.info(f"async pipeline at the end: {state()}")


_OFFSETS: list[tuple[torch.Tensor, list[int]]] = []  # the last segment offsets seen, on the host


def _host(offsets: torch.Tensor) -> list[int]:
    """offsets.tolist(), once per tensor: every layer of a micro-batch gets the same cu_seqlens tensors, and each
    copy to the host would wait for the GPU."""
    for t, values in _OFFSETS:
        if t is offsets:
            return values
    _OFFSETS.insert(0, (offsets, offsets.tolist()))
    del _OFFSETS[4:]
    return _OFFSETS[0][1]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **_):
    """FlashAttention's varlen function in PyTorch: q [total_q, H, D], k/v [total_k, Hkv, D], segment offsets
    cu_seqlens_q/k [n + 1] -> out [total_q, H, D]. Causal: query j of a segment with Lq queries and Lk keys sees
    keys 0 .. Lk - Lq + j (bottom-right alignment), given to SDPA as `causal_lower_right` so that its fused kernels
    apply."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    if softcap or tuple(window_size) != (-1, -1):
        raise NotImplementedError("varlen_attention: softcap and sliding windows are not supported")
    out = torch.empty_like(q)
    for (q0, q1), (k0, k1) in zip(pairwise(_host(cu_seqlens_q)), pairwise(_host(cu_seqlens_k))):
        if q1 == q0:
            continue
        qs, ks, vs = (x.transpose(0, 1)[None] for x in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [1, heads, len, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(q1 - q0, k1 - k0) if causal
                                           else None, scale=softmax_scale, enable_gqa=ks.shape[1] != qs.shape[1])
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def _flash_attention_or_stand_in() -> bool:
    """True when TRL's tree attention gets `varlen_attention` because FlashAttention 3 cannot be loaded."""
    from trl.experimental.async_grpo import packing

    try:
        packing._flash_attn()
        return False
    except Exception as e:  # ImportError (no `kernels`), or the Hub unreachable
        log.warning("AsyncGRPOTrainer's FlashAttention 3 kernel cannot load (%s: %s); its tree attention runs on "
                    "fastgrpo.bench_server.varlen_attention (PyTorch SDPA per segment)", type(e).__name__, e)
        packing._flash_attn = lambda: types.SimpleNamespace(flash_attn_varlen_func=varlen_attention)
        return True


def run_trl_async(spec: dict, clock, cuda: bool, values: dict, trainer_kwargs: dict) -> dict:
    """TRL 1.16's AsyncGRPOTrainer against the already started server (spec["server_port"])."""
    import dataclasses

    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    from .bench import _known

    log_async_grpo()  # before the trainer: its __init__ already logs (max_inflight_tasks, sync mode)
    stand_in = _flash_attention_or_stand_in()
    # vllm_* fields are left out: the server is given as vllm_server_base_url
    fields, dropped = _known(values, {f.name for f in dataclasses.fields(AsyncGRPOConfig)
                                      if not f.name.startswith("vllm_")})
    args = AsyncGRPOConfig(**fields, dtype="bfloat16" if cuda else "float32", token_budget=0,
                           vllm_server_base_url=f"http://127.0.0.1:{spec['server_port']}")
    cps, lengths = args.per_device_train_batch_size * args.gradient_accumulation_steps, {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_log(self, a, state, c, logs=None, **k):
            for key, v in (logs or {}).items():
                if key.endswith("mean_length") and "completion" in key:
                    lengths[state.global_step] = float(v)

        def on_step_end(self, a, state, c, **k):
            clock.mark(step=state.global_step)

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.response_template = chatml_response_template()  # ChatML responses (see the module docstring)
    trainer = AsyncGRPOTrainer(args=args, **trainer_kwargs, processing_class=tokenizer, callbacks=[Clock()])
    if trainer.rollout_worker is not None:  # start() (at train begin) spawns self._loop_cls
        trainer.rollout_worker._loop_cls = _logged_rollout_loop()
    with watching(trainer):
        trainer.train()
    for x in clock.extras:
        x.update(tokens=lengths.get(x["step"], 0.0) * cps)
    return {"split": None, "dropped_extra": dropped, "completions_per_step": cps,
            "config": {**fields, "trl_version": trl.__version__, "trainer": "AsyncGRPOTrainer",
                       "tree_attention": "fastgrpo varlen_attention (SDPA)" if stand_in else "FlashAttention 3",
                       **{k: getattr(args, k) for k in ("max_staleness", "token_budget", "dtype",
                                                        "gradient_checkpointing", "loss_type",
                                                        "max_inflight_tasks")
                          if hasattr(args, k)}}}
