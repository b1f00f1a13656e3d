"""The GRPO training loop, top to bottom.

Each round: take P prompts, sample G completions each, score them, turn rewards into group-relative advantages,
then take `optimizer_steps_per_round` AdamW steps over the round's P*G completions (num_iterations passes
over it), pushing the new weights to the generator after every step.

Algorithm choices (TRL-compatible defaults): loss_type "dapo" (token-level mean over the generation batch),
no KL (beta 0), ratio clipping with epsilon 0.2, truncated importance sampling between trainer and vLLM.
With `async_generation`, round k+1 is generated (by weights one step old) while round k trains; the importance
ratio against the generator's logprobs corrects for that staleness, which never exceeds one round.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import signal
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import batch as B
from .checkpoint import TrainerState
from .distributed import Dist, all_gather_rows, all_reduce_max, average_gradients, clip_grad_norm, set_gradient_sync
from .loss import LossParams
from .metrics import MetricsSink, Timer
from .rollout import Generation, Generator, SamplingParams
from .sharing import yield_points


class TrainingStopped(RuntimeError):
    """The run stopped early (signal, repeated non-finite updates, dead server) after saving a checkpoint.

    `checkpoint`: the folder to resume from; `reason`: "SIGINT", "SIGTERM", "nonfinite" or the error's type."""

    def __init__(self, message: str, checkpoint: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.reason = reason


@dataclass
class Run:
    """Everything the loop touches, built by GRPOTrainer; nothing global."""

    config: Any
    plan: Any
    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: Generator
    stream: Any
    reward_funcs: list
    reward_weights: torch.Tensor
    sampling: SamplingParams
    loss_params: LossParams
    state: TrainerState
    sink: MetricsSink
    dist: Dist
    device: torch.device
    pad_id: int
    autocast: Callable
    save: Callable[..., str]  # save(full=False); full: with the training state even under save_only_model
    evaluate: Callable[[], dict] | None = None
    token_budget: int | None = None
    epochs_done: int = 0
    stop_signal: list = field(default_factory=list)
    stream_mark: Any = None
    lockstep_passes: bool = False  # FSDP2: every rank runs as many forward passes as the others (each all-gathers)
    yield_mode: str = "off"  # async_yield as resolved for this run (fastgrpo.sharing.async_yield_mode)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def _generate(run: Run, prompts) -> tuple[Generation, float]:
    t = time.perf_counter()
    run.generator.wake()
    gen = run.generator.generate([p.ids for p in prompts], run.sampling)
    if not run.config.async_generation:
        run.generator.sleep()
    return gen, time.perf_counter() - t


def _generate_beside(run: Run, prompts) -> tuple[Generation, float]:
    """Generation in the background thread: on a GPU, on its own CUDA stream so that its kernels can run while
    the main thread's training kernels occupy the default stream."""
    if run.device.type != "cuda":
        return _generate(run, prompts)
    stream = torch.cuda.Stream(run.device)
    stream.wait_stream(torch.cuda.current_stream(run.device))  # weights pushed before this round are visible
    with torch.cuda.stream(stream):
        out = _generate(run, prompts)
    stream.synchronize()
    return out


def _reference_context(run: Run):
    if run.ref_model is not None:
        return run.ref_model, contextlib.nullcontext()
    return run.model, run.model.disable_adapter()


def _prepare(run: Run, prompts, gen: Generation, timer: Timer) -> B.Rollout:
    cfg, plan = run.config, run.plan
    with timer("reward_time"):
        r = B.build_rollout(prompts, gen, run.tokenizer, run.reward_funcs, run.reward_weights, cfg, plan, run.dist,
                            run.state, timer)
    if cfg.log_completions and run.dist.is_main and run.state.global_step % max(1, int(cfg.logging_steps)) == 0:
        run.sink.write_completions(run.state.global_step + 1, _completion_rows(run, r))
    all_idx = list(range(len(r)))
    lengths = [len(p) + len(c) for p, c in zip(r.prompt_ids, r.completion_ids)]  # row widths
    passes = _plan_passes(run, all_idx, lengths)
    with timer("logprob_time"):
        if plan.steps_per_generation * plan.num_iterations > plan.grad_accum:
            r.old_logprobs = B.precompute_logprobs(run.model, r, passes, cfg, run.pad_id, run.device, run.autocast)
        if cfg.beta != 0.0:
            target, ctx = _reference_context(run)
            with ctx:
                r.ref_logprobs = B.precompute_logprobs(target, r, passes, cfg, run.pad_id, run.device, run.autocast)
    return r


def _completion_rows(run: Run, r: B.Rollout) -> list[dict]:
    """This rank's completions of the round as log_completions writes them (rank 0's: a sample under torchrun)."""
    G = run.config.num_generations
    texts = run.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
    names = [f.name for f in run.reward_funcs]
    return [{"prompt": r.prompts[i // G].prompt, "completion": text, "truncated": bool(r.truncated[i]),
             "rewards": {n: v if math.isfinite(v) else None for n, v in zip(names, r.rewards_per_func[i].tolist())},
             "reward": r.rewards[i].item(),
             "advantage": r.advantages[i].item()} for i, text in enumerate(texts)]


def _plan_passes(run: Run, order: list[int], lengths: list[int]) -> list[list[int]]:
    passes = B.plan_passes(order, run.plan.micro_batch, run.token_budget, lengths)
    if run.lockstep_passes and run.token_budget is not None:  # packing: the count depends on this rank's lengths
        passes = B.split_passes(passes, all_reduce_max(len(passes), run.dist))
    return passes


def _optimizer_step(run: Run, sums: dict[str, torch.Tensor]) -> tuple[float, bool]:
    """Average gradients over ranks (replicated ranks; FSDP2 did it in backward), clip, step; skip the update if
    anything is non-finite on any rank.

    One collective: the count of ranks whose loss is non-finite rides in the gradient all-reduce. The gradient norm
    needs none of its own: it is computed from the averaged gradients (replicated) or across ranks (FSDP2), so every
    rank sees the same norm, and with it the same decision."""
    bad_loss = (~torch.isfinite(sums["loss"].detach())).float().reshape(1)
    bad_loss = average_gradients(run.trainable, run.dist, extra=bad_loss)
    max_norm = run.config.max_grad_norm or math.inf
    norm = clip_grad_norm(run.trainable, max_norm)
    norm_value, bad = torch.cat([norm.detach().float().reshape(1).cpu(), bad_loss.cpu()]).tolist()
    ok = math.isfinite(norm_value) and bad == 0
    if ok:
        try:
            run.optimizer.step()
        except torch.OutOfMemoryError as e:
            e.partial_update = True  # some parameters may be updated and others not: no checkpoint of this state
            raise
        run.scheduler.step()
    else:  # a skipped update still takes its place in the schedule; torch's "scheduler before optimizer" note is moot
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm_value, ok


#: Timers whose slowest rank is logged as `dist/<name>_max` under torchrun (rank 0 writes the metrics, so its own
#: times are the plain keys; the gap to the max is what rank 0 waited for the others at the next collective).
RANK_TIMERS = ("generation_time", "reward_time", "round_sync_time", "logprob_time", "train_time", "sync_time")


def _step_metrics(run: Run, sums: dict[str, torch.Tensor], grad_norm: float,
                  times: dict[str, float] | None = None) -> dict[str, float]:
    """The step's loss statistics over all ranks, from one all-gather of every rank's sums (and timers): sums add
    up, `_min` / `_max` statistics take the min / max over ranks."""
    keys = sorted(sums)
    times = times or {}
    local = torch.stack([sums[k].detach().double() for k in keys]).cpu()  # one device sync, not one per key
    if run.dist.enabled:
        local = torch.cat([local, torch.tensor([float(times.get(k, 0.0)) for k in RANK_TIMERS], dtype=torch.float64)])
    rows = all_gather_rows(local, run.dist)                            # [world, keys (+ timers)]
    tot = reduce_rows(keys, rows[:, :len(keys)])
    tokens = max(tot["tokens"], 1.0)
    m = {"loss": tot["loss"] / run.dist.world_size, "grad_norm": grad_norm,
         "learning_rate": run.scheduler.get_last_lr()[0], "entropy": tot["entropy"] / tokens,
         "clip_ratio/low_mean": tot["clip_low"] / tokens, "clip_ratio/high_mean": tot["clip_high"] / tokens,
         "clip_ratio/region_mean": tot["clip_region"] / tokens}
    m["clip_ratio"] = m["clip_ratio/region_mean"]
    if "kl" in tot:
        m["kl"] = tot["kl"] / tokens
    if "is_count" in tot:
        c = max(tot["is_count"], 1.0)
        m.update({"sampling/importance_sampling_ratio/mean": tot["is_sum"] / c,
                  "sampling/importance_sampling_ratio/min": tot["is_min"],
                  "sampling/importance_sampling_ratio/max": tot["is_max"],
                  "sampling/sampling_logp_difference/mean": tot["logp_diff_sum"] / c,
                  "sampling/sampling_logp_difference/max": tot["logp_diff_max"]})
    if run.dist.enabled:
        slowest = rows[:, len(keys):].max(0).values.tolist()
        m.update({f"dist/{k}_max": v for k, v in zip(RANK_TIMERS, slowest) if k in times})
    return m


def _combine(key: str):
    """How statistic `key` merges over micro-batches and ranks: min / max for keys ending in `_min` / `_max`, else
    the sum."""
    return torch.minimum if key.endswith("_min") else torch.maximum if key.endswith("_max") else torch.add


def reduce_rows(keys: list[str], rows: torch.Tensor) -> dict[str, float]:
    """rows: [ranks, len(keys)] per-rank statistics -> one value per key, merged over ranks by `_combine`."""
    return {k: float(functools.reduce(_combine(k), rows[:, j].unbind())) for j, k in enumerate(keys)}


def _accumulate(sums: dict, s: dict) -> None:
    for k, v in s.items():
        sums[k] = _combine(k)(sums[k], v) if k in sums else v


def train_loop(run: Run) -> dict[str, float]:
    cfg, plan, state = run.config, run.plan, run.state
    n_completions = plan.completions_per_rank
    step_group = plan.micro_batch * plan.grad_accum           # completions per optimizer step on this rank
    pool = ThreadPoolExecutor(1, thread_name_prefix="fastgrpo-gen") if cfg.async_generation else None
    pending: Future | None = None
    yield_mode = run.yield_mode  # "off" unless async_generation (sharing.async_yield_mode)

    def generating() -> bool:  # the next round is still being generated beside this one's training
        return pending is not None and not pending.done()

    steps_done, t_start = 0, time.perf_counter()
    _install_signal_handlers(run)
    t_prev = time.perf_counter()  # step_time runs from one step's end to the next: waits and syncs included
    try:
        while state.global_step < state.max_steps:  # a signal is acted on at the end of a round
            timer = Timer()
            t_round = time.perf_counter()
            if pending is None:                               # synchronous, or the very first async round
                prompts = _next_prompts(run)
                gen, gen_time = _generate(run, prompts)
            else:
                prompts, (gen, gen_time) = pending.result()   # sampled while the previous round trained
            run.stream_mark = copy.copy(run.stream.state)     # a checkpoint resumes from here
            if pool is not None and state.global_step + plan.optimizer_steps_per_round < state.max_steps:
                nxt = _next_prompts(run)                      # round k+1, sampled with round k's weights
                pending = pool.submit(lambda p=nxt: (p, _generate_beside(run, p)))
            else:
                pending = None
            with yield_points(run.model, yield_mode, generating):  # old/reference logprob passes, if any
                r = _prepare(run, prompts, gen, timer)
            round_metrics, round_tokens = r.metrics, r.round_tokens  # gathered with the round's token total
            state.total_tokens += round_tokens
            lengths = [len(p) + len(c) for p, c in zip(r.prompt_ids, r.completion_ids)]  # row widths
            save_due = False
            for _ in range(plan.num_iterations):
                for start in range(0, n_completions, step_group):
                    if state.global_step >= state.max_steps:
                        break
                    sums: dict[str, torch.Tensor] = {}
                    order = list(range(start, min(start + step_group, n_completions)))
                    with timer("train_time"), yield_points(run.model, yield_mode, generating):
                        passes = _plan_passes(run, order, lengths)
                        for k, idx in enumerate(passes):
                            set_gradient_sync(run.model, k == len(passes) - 1)  # FSDP2: reduce once per window
                            _accumulate(sums, B.train_pass(run.model, r, idx, cfg, run.loss_params, run.pad_id,
                                                           run.device, run.autocast))
                        grad_norm, ok = _optimizer_step(run, sums)
                    state.global_step += 1
                    state.epoch = run.stream.epoch_float
                    if run.generator.owns_weights and pool is None:
                        with timer("sync_time"):
                            run.generator.update_weights(run.model)
                    now = time.perf_counter()
                    times = {**timer.pop(), "generation_time": gen_time}
                    m = {**round_metrics, **_step_metrics(run, sums, grad_norm, times), **times,
                         "epoch": state.epoch, "num_tokens": state.total_tokens,
                         **run.generator.stats(), "step_time": now - t_prev,
                         "tokens_per_second": round_tokens / max(now - t_round, 1e-9)}
                    t_prev, gen_time = now, 0.0
                    state.loss_sum += m["loss"]  # in the checkpoint: train_loss spans resumes too
                    steps_done += 1
                    save_due |= _log(run, m)
                    _check_finite(run, ok, sums, grad_norm)  # after _log: the step that stops the run is logged
            if pending is not None:                           # wait for round k+1, then give it the new weights
                pending = _done_future(pending.result())
                run.generator.update_weights(run.model)
            _agree_on_stop(run)
            if save_due or run.stop_signal:
                path = run.save(full=bool(run.stop_signal))  # a stop's checkpoint must be able to resume
            if run.stop_signal:
                raise TrainingStopped(f"stopped by {run.stop_signal[0]} at step {state.global_step}; checkpoint saved "
                                      f"to {path}. Resume with resume_from_checkpoint=True (CLI: --resume_from_checkpoint true).",
                                      path, run.stop_signal[0])
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        _restore_signal_handlers(run)
    runtime = time.perf_counter() - t_start
    return {"train_runtime": runtime, "train_loss": state.loss_sum / max(state.global_step, 1),
            "train_steps_per_second": steps_done / max(runtime, 1e-9), "total_flos": 0.0}


def _agree_on_stop(run: Run) -> None:
    """A signal reaches ranks at different moments; all of them stop after the same round, where they save
    together (the save is a collective: FSDP2 gathers the weights, every rank's RNG state is kept)."""
    if not run.dist.enabled:
        return
    mine = signal.Signals[run.stop_signal[0]].value if run.stop_signal else 0
    agreed = all_reduce_max(mine, run.dist)
    if agreed and not run.stop_signal:
        run.stop_signal.append(signal.Signals(agreed).name)


def _next_prompts(run: Run):
    prompts = run.stream.next_round(run.plan.prompts_per_round)
    r, k = run.dist.rank, run.plan.prompts_per_rank
    return prompts[r * k:(r + 1) * k]


def _done_future(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _check_finite(run: Run, ok: bool, sums: dict, grad_norm: float) -> None:
    st = run.state
    if ok:
        st.consecutive_nonfinite = 0
        return
    st.skipped_updates += 1
    st.consecutive_nonfinite += 1
    what = f"loss={float(sums['loss']):.4g}, grad_norm={grad_norm:.4g}"
    warnings.warn(f"step {st.global_step}: non-finite loss or gradient ({what}); update skipped "
                  f"({st.consecutive_nonfinite} in a row, {st.skipped_updates} in this run).")
    if st.consecutive_nonfinite >= run.config.max_consecutive_nonfinite:
        path = run.save(full=True)
        raise TrainingStopped(f"{st.consecutive_nonfinite} consecutive updates had a non-finite loss or gradient "
                              f"(last: {what}; {st.skipped_updates} skipped in this run, weights untouched by them). "
                              f"Checkpoint saved to {path}. Lower the learning rate, check reward functions for extreme "
                              "values, or train in float32 (bf16=False); then resume with resume_from_checkpoint=True.",
                              path, "nonfinite")


def _log(run: Run, m: dict) -> bool:
    """Write the step's metrics; returns whether a checkpoint is due (saved at the end of the round, where
    resuming is exact)."""
    cfg, st = run.config, run.state
    step = st.global_step
    run.sink.write(step, m)
    if (cfg.logging_first_step and step == 1) or step % max(int(cfg.logging_steps), 1) == 0 or step == st.max_steps:
        entry = {**{k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()}, "step": step}
        st.log_history.append(entry)
        run.sink.report(step, m)
    run.sink.advance()  # after report: the bar redraws with this step's metrics
    new_epoch = int(st.epoch) > run.epochs_done
    run.epochs_done = int(st.epoch)
    eval_due = (cfg.eval_strategy == "steps" and step % int(cfg.eval_steps or cfg.logging_steps) == 0) or \
        (cfg.eval_strategy == "epoch" and new_epoch)
    if run.evaluate is not None and eval_due:
        ev = run.evaluate()
        st.log_history.append({**ev, "step": step})
        run.sink.write(step, ev)
        run.sink.report(step, ev)
    return (cfg.save_strategy == "steps" and step % int(cfg.save_steps) == 0) or (cfg.save_strategy == "epoch" and new_epoch)


def _install_signal_handlers(run: Run) -> None:
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop. A second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    run._old_handlers = {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if run.stop_signal:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        run.stop_signal.append(name)
        print(f"\n[fastgrpo] {name} received: finishing this step, then saving a checkpoint (send again to abort).",
              flush=True)

    for s in (signal.SIGINT, signal.SIGTERM):
        run._old_handlers[s] = signal.signal(s, handler)


def _restore_signal_handlers(run: Run) -> None:
    for s, h in getattr(run, "_old_handlers", {}).items():
        signal.signal(s, h)
