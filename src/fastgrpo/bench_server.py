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
ChatML template is not among them (Qwen2.5's and Qwen3's are), so the tokenizer gets TRL's Qwen3/ChatML parser.

The server runs in its own process group (vLLM spawns engine processes); its group id is written to
`server.pgid` in the cell's folder so that the bench parent can kill it too when it kills a timed-out worker.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SERVER_START_TIMEOUT = 420.0


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
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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


def run_trl_async(spec: dict, clock, cuda: bool, values: dict, trainer_kwargs: dict) -> dict:
    """TRL 1.16's AsyncGRPOTrainer against the already started server (spec["server_port"])."""
    import dataclasses

    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from trl.chat_template_utils import qwen3_template
    from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    from .bench import _known

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
    tokenizer.response_template = qwen3_template  # ChatML responses (see the module docstring)
    trainer = AsyncGRPOTrainer(args=args, **trainer_kwargs, processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    for x in clock.extras:
        x.update(tokens=lengths.get(x["step"], 0.0) * cps)
    return {"split": None, "dropped_extra": dropped, "completions_per_step": cps,
            "config": {**fields, "trl_version": trl.__version__, "trainer": "AsyncGRPOTrainer",
                       **{k: getattr(args, k) for k in ("max_staleness", "token_budget", "dtype",
                                                        "gradient_checkpointing", "loss_type")
                          if hasattr(args, k)}}}
