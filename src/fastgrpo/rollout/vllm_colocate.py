"""vLLM on the trainer's GPU (one engine per rank, or per tensor-parallel group of ranks), for vLLM 0.26: inside the
trainer process (default), or in an engine process of its own (`vllm_engine_process`, single process only; below).

Choices, each checked against the vLLM 0.26 source:

- Executor (in-process): `distributed_executor_backend="external_launcher"` (as TRL's colocate mode). It runs the worker
  in this process (no engine subprocess, so `llm.apply_model` reaches the real model) and takes the rank and device
  from RANK / LOCAL_RANK / WORLD_SIZE. Under torchrun, torch.distributed must already be initialised; the engine's
  TP groups are carved out of the trainer's world (TP=1: every rank is an independent engine). In a single process
  without torchrun we set RANK=0, WORLD_SIZE=1 and a free MASTER_PORT, and vLLM creates a 1-rank process group
  (so `torch.distributed.is_initialized()` is True afterwards); `close()` then tears that group down again.
  VLLM_ENABLE_V1_MULTIPROCESSING=0 is required by this executor and is set before the engine is built.
- KV cache: `vllm_kv_cache_memory_bytes="auto"` reserves sequences x max_model_len x per-token KV bytes x 1.2,
  where sequences is one generation call on this rank (x TP size, since a TP group generates the group's prompts).
  vLLM still checks free memory >= gpu_memory_utilization x total at start even then, so that fraction is capped
  at 90% of what is actually free (engine process: less 1 GiB for the CUDA context it creates before it checks).
  `None` falls back to `vllm_gpu_memory_utilization` and vLLM's profiler.
- Sampling: prompts go in as token ids; `logprobs=0` returns the sampled token's logprob only, and
  `logprobs_mode="processed_logprobs"` makes it the logprob after temperature (and top-k/top-p/min-p masking), i.e.
  the distribution actually sampled from, which the trainer's temperature-scaled logprobs are compared against.
  `detokenize=False` (ids only) and `flat_logprobs=True` (no per-token dict objects) keep output handling cheap.
  Cheaper still (default, `vllm_sampler_logprobs`): no logprobs asked of vLLM; `vllm_logprobs` records the same
  values in the sampler on the GPU and returns them once per call (vLLM's per-token handling cost ~1 ms a step).
  vLLM rejects n > 1 with temperature 0, so greedy requests are expanded into n copies of each prompt.
- Weights: `update_weights` streams `iter_sync_weights` (LoRA: only the merged adapted weights) into the engine's
  model through `llm.apply_model(lambda m: m.load_weights(bucket))` -> `Worker.apply_model`, which unwraps the
  CUDA-graph wrapper; `load_weights` copies in place, so captured graphs stay valid. Buckets of 256 MB bound the
  extra memory of a full fine-tuning push. The prefix cache is reset afterwards (its KV was computed by old weights).
- Sleep: level 1 only (weights to CPU, KV cache dropped). Level 2 would discard the base weights, which a LoRA push
  (q/v only) cannot restore. A weight push while asleep first wakes the "weights" allocation, since writing into
  unmapped memory crashes; `wake()` brings back the rest and resets the prefix cache.
- vLLM reseeds Python/NumPy/torch global RNGs when it starts; the caller's RNG states are restored afterwards.

Engine process (`vllm_engine_process=True`, or left None with `async_generation`; one trainer process,
tensor_parallel_size 1; otherwise the in-process design above is used, since under torchrun the engine must join the
trainer's process group):

- vLLM's default layout: VLLM_ENABLE_V1_MULTIPROCESSING=1 and the `uni` executor, i.e. the EngineCore (scheduler,
  model runner, sampler) runs in its own process on the same GPU (device 0 of the inherited CUDA_VISIBLE_DEVICES)
  and only request/output handling stays here, so the engine's CPU work no longer competes with the training
  loop for this interpreter's GIL. vLLM reads the variable once, at construction (`LLMEngine.from_engine_args`);
  it is set around `LLM(...)` and restored afterwards (the engine process has inherited it by then). vLLM's
  environment cache is cleared first: an earlier in-process engine enables it (`EngineCore.__init__`), after which
  a changed variable would be ignored.
- Start method: `spawn` (forced by vLLM anyway once CUDA is initialised: `vllm/utils/system_utils.py`,
  `_maybe_force_spawn`). vLLM starts the EngineCore with `get_mp_context().Process(target=EngineCoreProc.
  run_engine_core)` (`vllm/v1/engine/utils.py`, `CoreEngineProcManager`), and a spawned child normally re-runs
  the parent's main script as `__mp_main__` (`multiprocessing/spawn.py`, `get_preparation_data` records
  `init_main_from_path`/`init_main_from_name`; `prepare` runs it). A script without an `if __name__ == "__main__"`
  guard (examples/recipe.py) would load its data and model again in the engine process and die there trying to
  start a second engine. During the construction the preparation data therefore leaves the main module out (as
  for an interactive session); the engine process needs nothing from it (the payload is vLLM's config and the
  worker extension, importable by name). Objects passed in `engine_kwargs` must then be importable, not defined
  in the script.
- SIGINT is blocked in the constructing thread while the engine process starts, so the engine process inherits a
  blocked SIGINT: a Ctrl-C in the terminal reaches the trainer only, which finishes its step, saves a checkpoint and
  then stops (the engine would otherwise shut itself down on the same signal and the step's weight push would
  fail). The engine still stops on SIGTERM, which is what `close()` and vLLM's exit handler send.
- Weights: pushed through CUDA IPC by `vllm_worker` (`collective_rpc` into the `WeightReceiver` worker
  extension), one IPC buffer per 256 MB bucket; the prefix cache is reset afterwards as in-process.
- Sleep, wake, generation and sampling parameters are the same calls (`LLM` forwards them to the engine process).
- Trade-off: kernels of two processes time-slice on one GPU (no MPS) where two streams of one process may overlap;
  what the one-step-off-policy mode gains from the separate interpreter is measured by
  tests/test_vllm_colocate.py::test_engine_process_generation_timing_vs_in_process (and the benchmark).
- CUDA MPS (the engine's and the trainer's kernels share SMs instead of time slices) was measured in
  benchmarks.md 11.4 and 12.1, including a trainer confined to half the SMs with the engine given all of them. It did
  not pay against vLLM without MPS, and one machine gave NaN losses, so fastgrpo does nothing MPS-specific: the
  engine process inherits the trainer's environment (a share set for the job binds the engine too), except for
  what `vllm_engine_env` sets for it alone. MPS client priorities through it (trainer 1, engine 0) were measured
  in benchmarks.md 13 and did not pay either.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import random
import signal
import socket
import time
import warnings

import torch

from ..config import GRPOConfig
from . import vllm_logprobs
from .base import Generation, Generator, SamplingParams
from .weights import DEFAULT_BUCKET_BYTES, bucketed, is_peft_model, iter_sync_weights

__all__ = ["VLLMColocateGenerator", "kv_bytes_per_token", "auto_kv_cache_bytes", "engine_num_seqs"]

KV_HEADROOM = 1.2
MIN_KV_BYTES = 64 * 1024**2
ENGINE_PROCESS_CONTEXT_BYTES = 1024**3  # the engine process's own CUDA context, not yet allocated when we measure
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "auto": 2}


def kv_bytes_per_token(hf_config, dtype_bytes: int, tp: int = 1) -> int:
    """K and V of every layer for one token on one rank: 2 x layers x kv_heads/tp x head_dim x dtype bytes."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_per_rank = max(1, math.ceil(kv_heads / tp))  # vLLM replicates KV heads when tp > kv_heads
    return 2 * text.num_hidden_layers * kv_per_rank * head_dim * dtype_bytes


def check_prompts_fit(prompts: list[list[int]], max_model_len: int) -> None:
    """vLLM refuses a prompt that fills its whole context; say which one and what to set instead of its error."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=None)
    if longest is not None and len(prompts[longest]) >= max_model_len:
        raise ValueError(f"prompt {longest} has {len(prompts[longest])} tokens, and vLLM's context is "
                         f"{max_model_len} tokens (max_prompt_length + max_completion_length, or vllm_max_model_length"
                         f", or the longest training prompt + max_completion_length when max_prompt_length is None). "
                         "Fix: set max_prompt_length to cut prompts from the left, or a larger vllm_max_model_length.")


def auto_kv_cache_bytes(hf_config, num_seqs: int, max_model_len: int, dtype_bytes: int, tp: int = 1) -> int:
    """KV bytes for `num_seqs` full-length sequences at once, with 20% headroom (block rounding, scheduling)."""
    need = num_seqs * max_model_len * kv_bytes_per_token(hf_config, dtype_bytes, tp) * KV_HEADROOM
    return max(MIN_KV_BYTES, int(math.ceil(need)))


def engine_num_seqs(config: GRPOConfig, world_size: int) -> int:
    """Sequences in one generate call of one engine: this rank's round (or eval batch) x the TP group size."""
    per_rank = max(config.batch_plan(world_size).completions_per_rank, config.per_device_eval_batch_size)
    return per_rank * config.vllm_tensor_parallel_size


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _preserved_process_state(device: torch.device):
    """vLLM's worker start reseeds random / numpy / torch and sets torch's float32 matmul precision (to
    VLLM_FLOAT32_MATMUL_PRECISION); restore the trainer's. Only `device`'s CUDA RNG is saved:
    get_rng_state_all() would create a context on every visible GPU."""
    matmul_precision = torch.get_float32_matmul_precision()
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:
        np, np_state = None, None
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


@contextlib.contextmanager
def _spawn_without_main():
    """Processes spawned inside do not re-run the parent's `__main__` module (see the module docstring)."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def preparation_data(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = preparation_data  # popen_spawn_posix looks it up at each start
    try:
        yield
    finally:
        spawn.get_preparation_data = original


@contextlib.contextmanager
def _sigint_blocked():
    """Block SIGINT in this thread; children started inside inherit the blocked mask (kept across exec)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker

    # The first spawn starts multiprocessing's resource tracker and then SIG_UNBLOCKs SIGINT in this thread
    # (resource_tracker.ensure_running): start it before blocking, so that our block survives until the spawn.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _engine_process_env(extra: dict[str, str] | None = None):
    """os.environ as the spawned engine process must inherit it (vLLM's layout, then `extra`: the config's
    vllm_engine_env); restored afterwards. Everything else passes on unchanged, CUDA MPS's
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE included: a share of the GPU set for the job (to share the GPU with others)
    binds the engine too unless vllm_engine_env says otherwise."""
    layout = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1",
              "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}  # fork after CUDA initialisation is unusable
    wanted = {**layout, **(extra or {})}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _engine_process_launch(extra: dict[str, str] | None = None):
    """Environment for building an `LLM` whose EngineCore runs in its own (spawned) process."""
    from vllm import envs

    envs.disable_envs_cache()  # an earlier in-process engine cached VLLM_ENABLE_V1_MULTIPROCESSING=0
    with _engine_process_env(extra), _spawn_without_main(), _sigint_blocked():
        yield


def engine_process_wanted(config, world_size: int, local_rank: int) -> bool:
    """Whether the engine core gets its own process: `vllm_engine_process`, or when it is None, `async_generation`
    (generation then runs beside training, and in-process its scheduler would share the trainer's GIL); only for
    one trainer process with tensor_parallel_size 1 (under torchrun the engine must join the trainer's group)."""
    wanted = config.async_generation if config.vllm_engine_process is None else config.vllm_engine_process
    return bool(wanted) and world_size == 1 and config.vllm_tensor_parallel_size == 1 and local_rank == 0


def _pin_main_stream(worker, stream) -> bool:
    """Worker side: make the V2 model runner's `main_stream` (a cached property) this stream; False elsewhere."""
    runner = getattr(worker, "model_runner", None)
    if not isinstance(getattr(type(runner), "main_stream", None), functools.cached_property):
        return False
    runner.__dict__["main_stream"] = stream
    return True


def _sampled_logprobs(token_ids: list[int], lps) -> list[float]:
    """Logprob of each sampled token, from FlatLogprobs (sampled token first per position) or list[dict]."""
    if lps is None:
        raise RuntimeError("vLLM returned no logprobs although logprobs=0 was requested")
    if hasattr(lps, "start_indices"):
        values = lps.logprobs
        out = [float(values[i]) for i in lps.start_indices]
    else:
        out = [float(pos[t].logprob) for t, pos in zip(token_ids, lps)]
    if len(out) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(out)} logprobs for {len(token_ids)} tokens")
    return out


def _finish_reason(reason: str | None) -> str:
    if reason == "length":
        return "length"
    if reason in (None, "abort", "error"):
        raise RuntimeError(f"vLLM request ended without finishing (finish_reason={reason!r})")
    return "stop"  # EOS, a stop token, or vLLM's repetition detection


class VLLMColocateGenerator(Generator):
    """A vLLM 0.26 engine on this rank's GPU (in this process, or in its own with `engine_process`), sampling from
    weights pushed by `update_weights`."""

    owns_weights = True

    def __init__(
        self,
        model_path: str,
        config: GRPOConfig,
        tokenizer=None,
        local_rank: int = 0,
        world_size: int = 1,
        max_model_len: int | None = None,
        *,
        dtype: str | None = None,
        engine_kwargs: dict | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.config = config
        self.tp = config.vllm_tensor_parallel_size
        self.bucket_bytes = bucket_bytes
        self._stats: dict[str, float] = {}
        self._sleeping: set[str] = set()
        if world_size % self.tp:
            raise ValueError(f"vllm_tensor_parallel_size={self.tp} must divide the number of processes ({world_size}).")
        # Engine in its own process only where it needs no process group shared with the trainer.
        self.engine_process = engine_process_wanted(config, world_size, local_rank)
        self.shares_gpu_by_time_slice = self.engine_process  # its own CUDA context on the trainer's GPU
        if self.engine_process:
            self.rank, self._owns_process_group = 0, False
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # as in-process (inherited by the engine)
        else:
            self.rank, self._owns_process_group = self._prepare_distributed_env(local_rank, world_size)
        self.device = torch.device("cuda", local_rank)

        from transformers import AutoConfig
        from vllm import LLM

        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        if max_model_len is None:
            max_model_len = config.vllm_max_model_length
        if max_model_len is None and config.max_prompt_length is not None:
            max_model_len = config.max_prompt_length + config.max_completion_length
        if max_model_len is None:
            max_model_len = int(text.max_position_embeddings)
        self.max_model_len = max_model_len
        dtype = dtype or ("auto" if config.bf16 is False else "bfloat16")
        num_seqs = engine_num_seqs(config, world_size)

        kwargs = dict(
            model=model_path,
            tensor_parallel_size=self.tp,
            dtype=dtype,
            seed=config.seed + self.rank // self.tp,  # one seed per TP group: its ranks must sample identically
            max_model_len=max_model_len,
            max_num_seqs=num_seqs,
            # vLLM needs >= max_num_seqs; a large default misleads its memory profiler (TRL uses 4096 too).
            max_num_batched_tokens=max(num_seqs, min(max(4096, max_model_len), num_seqs * max_model_len)),
            enable_prefix_caching=config.vllm_enable_prefix_caching,
            enable_sleep_mode=config.vllm_enable_sleep_mode,
            model_impl=config.vllm_model_impl,
            logprobs_mode="processed_logprobs",
            distributed_executor_backend="external_launcher",
            trust_remote_code=config.trust_remote_code,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        )
        if self.engine_process:
            from .vllm_worker import WORKER_EXTENSION

            kwargs.update(distributed_executor_backend="uni", worker_extension_cls=WORKER_EXTENSION)
        kv = config.vllm_kv_cache_memory_bytes
        if kv == "auto":
            kv = auto_kv_cache_bytes(hf_config, num_seqs, max_model_len, _DTYPE_BYTES.get(str(dtype), 2), self.tp)
        if kv is not None:
            free, total = torch.cuda.mem_get_info(self.device)
            # The engine process measures free memory after creating its own CUDA context: leave room for it.
            usable = 0.9 * free - (ENGINE_PROCESS_CONTEXT_BYTES if self.engine_process else 0)
            kwargs["kv_cache_memory_bytes"] = int(kv)
            kwargs["gpu_memory_utilization"] = max(0.01, min(config.vllm_gpu_memory_utilization, usable / total))
        kwargs.update(engine_kwargs or {})
        self.engine_kwargs = kwargs

        if config.vllm_engine_env and not self.engine_process:
            warnings.warn(f"vllm_engine_env ({', '.join(config.vllm_engine_env)}) is ignored: the engine runs in "
                          "the trainer's process (vllm_engine_process is off, or torchrun / TP > 1).", stacklevel=2)
        launch = _engine_process_launch(config.vllm_engine_env) if self.engine_process else contextlib.nullcontext()
        with _preserved_process_state(self.device), launch:
            self.llm = LLM(**kwargs)

        self._tp_group = None
        self._tp_rank = 0
        if self.tp > 1:
            from vllm.distributed.parallel_state import get_tp_group

            group = get_tp_group()  # consecutive blocks of `tp` ranks, built by vLLM from the trainer's world
            self._tp_group, self._tp_rank = group.cpu_group, group.rank_in_group
        # Stop on the trainer's EOS even if the saved tokenizer/generation config disagree with it.
        try:
            engine_eos = self.llm.get_tokenizer().eos_token_id
        except Exception:  # skip_tokenizer_init=True in engine_kwargs: the engine knows no EOS of its own
            engine_eos = None
        trainer_eos = getattr(tokenizer, "eos_token_id", None)
        self._extra_stop = [trainer_eos] if trainer_eos is not None and trainer_eos != engine_eos else []
        self.sampler_logprobs = bool(config.vllm_sampler_logprobs) and all(self._sampler_rpc("install"))
        # In-process: vLLM's V2 model runner caches the stream it was built on (the default stream) and, after each
        # step's output copy, makes that stream current again. Generation in a background thread (async mode) would
        # then share the training's stream, and a step launched on another stream would be copied out unordered.
        # So the engine gets a stream of its own, and every generate call runs on it.
        self._stream = None
        if not self.engine_process and self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)
            if all(self.llm.collective_rpc(_pin_main_stream, args=(stream,))):
                self._stream = stream

    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _prepare_distributed_env(local_rank: int, world_size: int) -> tuple[int, bool]:
        """Set the variables the external-launcher executor reads; return (global rank, we create the group)."""
        import torch.distributed as dist

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        if dist.is_available() and dist.is_initialized():
            rank, owns = dist.get_rank(), False
            if dist.get_world_size() != world_size:
                raise ValueError(f"world_size={world_size} but torch.distributed has {dist.get_world_size()} ranks.")
        else:
            if world_size > 1:
                raise RuntimeError(
                    "VLLMColocateGenerator with world_size > 1 needs torch.distributed initialised first "
                    "(torchrun + torch.distributed.init_process_group) so that vLLM joins the trainer's process group."
                )
            rank, owns = 0, True
            # A fresh port each time: a previous engine's store may still hold the old one.
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
        return rank, owns

    def _sampling_params(self, params: SamplingParams, n: int, logprobs: bool = True):
        from vllm.sampling_params import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        kwargs = dict(
            n=n,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or 0,  # 0 disables top-k in vLLM 0.26 (-1 is accepted too)
            min_p=params.min_p or 0.0,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,  # with n > 1, vLLM gives the j-th sample seed + j
            logprobs=0 if logprobs else None,
            detokenize=False,
            flat_logprobs=True,
        )
        if self._extra_stop:
            kwargs["stop_token_ids"] = list(self._extra_stop)
        if params.regex is not None:
            kwargs["structured_outputs"] = StructuredOutputsParams(regex=params.regex)
        kwargs.update(params.extra)  # raw vLLM SamplingParams fields (e.g. from generation_kwargs)
        if kwargs.get("stop") and "detokenize" not in params.extra:
            kwargs["detokenize"] = True  # vLLM matches stop strings on text only
        return VllmSamplingParams(**kwargs)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Generation:
        if self._sleeping:
            self.wake()
        prompts = [p.tolist() if hasattr(p, "tolist") else [int(t) for t in p] for p in prompt_ids]
        n = params.n
        greedy = params.temperature < 1e-5  # vLLM's _SAMPLING_EPS: greedy, which requires n == 1
        per_request, copies = (1, n) if greedy else (n, 1)

        offset, all_prompts = 0, prompts
        if self._tp_group is not None:  # every rank of a TP group must submit the same requests
            import torch.distributed as dist

            gathered: list = [None] * self.tp
            dist.all_gather_object(gathered, prompts, group=self._tp_group)
            offset = sum(len(g) for g in gathered[: self._tp_rank])
            all_prompts = [p for g in gathered for p in g]

        if not all_prompts:
            return Generation([], [], [])
        check_prompts_fit(all_prompts, self.max_model_len)
        requests = [{"prompt_token_ids": p} for p in all_prompts for _ in range(copies)]
        t0 = time.perf_counter()
        hook = self.sampler_logprobs
        sampling = self._sampling_params(params, per_request, logprobs=not hook)
        caller = torch.cuda.current_stream(self.device) if self._stream is not None else None
        with contextlib.nullcontext() if caller is None else torch.cuda.stream(self._stream):
            if caller is not None:
                self._stream.wait_stream(caller)  # weights pushed on the caller's stream are in place
            if hook:
                self._sampler_rpc("start")
            try:
                outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
            finally:
                recorded = self._sampler_rpc("take")[0] if hook else None
        if caller is not None:
            caller.wait_stream(self._stream)
        self._stats["generation_time"] = time.perf_counter() - t0

        completions = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]  # in submission order
        completion_ids = [list(c.token_ids) for cs in completions for c in cs]
        reasons = [_finish_reason(c.finish_reason) for cs in completions for c in cs]
        if hook:
            by_request = vllm_logprobs.per_completion(
                recorded, [out.request_id for out in outputs], [len(r["prompt_token_ids"]) for r in requests],
                per_request, [[c.token_ids for c in cs] for cs in completions])
            logprobs = [lp for lps in by_request for lp in lps]
        else:
            logprobs = [_sampled_logprobs(ids, c.logprobs)
                        for ids, c in zip(completion_ids, (c for cs in completions for c in cs))]
        mine = slice(offset * n, (offset + len(prompts)) * n)
        return Generation(completion_ids[mine], logprobs[mine], reasons[mine])

    def _sampler_rpc(self, action: str) -> list:
        if self.engine_process:  # vLLM sends no pickled functions to an engine process: the extension's method
            from .vllm_worker import SAMPLER_LOGPROBS_METHOD

            return self.llm.collective_rpc(SAMPLER_LOGPROBS_METHOD, args=(action,))
        return self.llm.collective_rpc(vllm_logprobs.rpc, args=(action,))

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        if "weights" in self._sleeping:  # load_weights into offloaded (unmapped) memory would crash
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._sleeping.discard("weights")
        weights = iter_sync_weights(model, only_changed=is_peft_model(model))
        push = self._push_ipc if self.engine_process else self._push_in_process
        count, nbytes = push(weights)
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        torch.cuda.synchronize(self.device)
        self._stats.update(weight_sync_time=time.perf_counter() - t0, weight_sync_tensors=float(count),
                           weight_sync_bytes=float(nbytes))

    def _push_in_process(self, weights) -> tuple[int, int]:
        """In-process engine: each bucket handed to the model's load_weights directly."""
        count = nbytes = 0
        for bucket in bucketed(weights, self.bucket_bytes):
            bucket = [(name, t.to(self.device, non_blocking=True)) for name, t in bucket]
            loaded = self.llm.apply_model(lambda m, b=bucket: m.load_weights(b))
            if not any(loaded):
                raise RuntimeError(f"vLLM loaded none of {[name for name, _ in bucket][:4]}...: names do not match.")
            count += len(bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket
        return count, nbytes

    def _push_ipc(self, weights) -> tuple[int, int]:
        """Engine process: each bucket packed into one buffer on our GPU, opened by the engine through CUDA IPC."""
        from .vllm_worker import RECEIVE_METHOD, cuda_ipc_payload, pack_bucket

        count = nbytes = 0
        for bucket in bucketed(weights, self.bucket_bytes):
            packed = pack_bucket(bucket, self.device)
            del bucket
            torch.cuda.current_stream(self.device).synchronize()  # the buffer is complete before the engine reads it
            loaded = self.llm.collective_rpc(RECEIVE_METHOD, args=(cuda_ipc_payload(packed),))
            if not any(loaded):
                names = [entry[0] for entry in packed.entries]
                raise RuntimeError(f"vLLM loaded none of {names[:4]}...: names do not match.")
            count += len(packed.entries)
            nbytes += packed.tensor_bytes
            del packed  # the engine has synchronised and dropped its mapping before answering
        torch.cuda.ipc_collect()  # free anything torch still holds back for a consumer
        return count, nbytes

    def sleep(self) -> None:
        if not self.config.vllm_enable_sleep_mode or self._sleeping or self.llm is None:
            return
        self.llm.sleep(level=1)
        self._sleeping = {"weights", "kv_cache"}

    def wake(self) -> None:
        if not self._sleeping:
            return
        torch.cuda.empty_cache()  # hand the trainer's cached blocks back before vLLM maps its memory again
        tags = None if self._sleeping == {"weights", "kv_cache"} else sorted(self._sleeping)
        self.llm.wake_up(tags=tags)
        self._sleeping.clear()
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        if getattr(self, "llm", None) is None:
            return
        engine = self.llm.llm_engine
        if self.engine_process or self._owns_process_group:
            # Engine process: MPClient.shutdown sends SIGTERM and joins (kills after 5 s), freeing its GPU memory.
            # In-process: EngineCore.shutdown, which also destroys the 1-rank group vLLM created.
            engine.engine_core.shutdown()
        else:
            # EngineCore.shutdown would destroy the trainer's process group: do its other steps only.
            from vllm import envs
            from vllm.distributed.parallel_state import destroy_model_parallel

            core = getattr(engine.engine_core, "engine_core", None)  # InprocClient -> EngineCore
            if core is not None:
                core.structured_output_manager.clear_backend()
                core.model_executor.shutdown()
                core.scheduler.shutdown()
            gc.unfreeze()  # vLLM gc.freeze()s after start-up; frozen objects would keep GPU memory alive
            envs.disable_envs_cache()
            destroy_model_parallel()
        self.llm = None
        del engine
        gc.collect()
        torch.cuda.empty_cache()

    def stats(self) -> dict[str, float]:
        return dict(self._stats)
