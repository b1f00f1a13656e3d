"""Reward functions: TRL's calling convention, the recipe's two built-ins, and checked scoring.

A reward function is `f(prompts, completions, completion_ids, **columns) -> list[float | None]`, one value per
completion; `completions` are strings for plain-text prompts and `[{"role": "assistant", "content": ...}]`
for conversational ones; every dataset column arrives as a keyword list (plus `trainer_state`). None means
"not applicable" and is left out of that function's mean. `async def` functions run concurrently with each
other. Synchronous functions run on the main thread because math-verify's timeouts use signal.alarm, which
works only there. A model path instead of a callable loads a sequence-classification reward model.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import inspect
import math
import os
import re
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["format_reward", "accuracy_reward", "RewardFunction", "RewardError", "score", "BUILTINS", "resolve_reward"]


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it and the sample."""


# ---------------------------------------------------------------------------------------------- built-ins
def _contents(completions) -> list[str]:
    return [c[0]["content"] if isinstance(c, list) else c for c in completions]


_FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$")


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 if the completion is `<think>...</think>` then `<answer>...</answer>` and nothing else (the recipe's)."""
    return [1.0 if _FORMAT.match(c) else 0.0 for c in _contents(completions)]


#: Seconds math-verify may spend on one parse and on one verify: a pathological completion (deep nesting, 9^9^9^9)
#: costs at most 2x this, then scores 0. On the main thread these are math-verify's own signal.alarm timeouts; on
#: other threads (TRL's async rollout worker, a user's thread pool), where alarms cannot be used, `_within`.
MATH_VERIFY_TIMEOUT_S = 5


def accuracy_reward(completions, solution, **kwargs) -> list[float]:
    """math-verify equivalence of the completion with the `solution` column; 1.0 when the gold is unparsable."""
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    on_main = threading.current_thread() is threading.main_thread()
    t = MATH_VERIFY_TIMEOUT_S if on_main else None
    bounded = (lambda fn: fn()) if on_main else functools.partial(_within, MATH_VERIFY_TIMEOUT_S, TimeoutException)
    cfg = [LatexExtractionConfig()]
    rewards, golds = [], {}  # a group's G completions share one solution: parse each distinct one once
    for content, sol in zip(_contents(completions), solution):
        gold = golds.get(sol) if isinstance(sol, str) else None
        if gold is None:
            try:
                gold = bounded(lambda: parse(sol, extraction_mode="first_match", extraction_config=cfg,
                                             parsing_timeout=t))
            except TimeoutException:
                gold = []
            if isinstance(sol, str):
                golds[sol] = gold
        if len(gold) == 0:
            rewards.append(1.0)
            continue
        try:
            answer = bounded(lambda: parse(content, extraction_mode="first_match", extraction_config=cfg,
                                           parsing_timeout=t))
            rewards.append(float(bounded(lambda: verify(answer, gold, timeout_seconds=t))))
        except Exception:  # TimeoutException included
            rewards.append(0.0)
    return rewards


def _within(seconds: float, exc: type[BaseException], fn: Callable[[], Any]) -> Any:
    """fn() on this (non-main) thread, interrupted with `exc` after `seconds`: a timer thread raises it in this
    thread (PyThreadState_SetAsyncExc, checked between bytecodes like a signal handler, so a single long C call is
    not cut short, as with math-verify's own alarms). A raise not yet delivered when fn returns is withdrawn."""
    tid, lock, state = threading.get_ident(), threading.Lock(), {"done": False}
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc

    def fire() -> None:
        with lock:
            if not state["done"]:
                set_async_exc(ctypes.c_ulong(tid), ctypes.py_object(exc))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        with lock:
            state["done"] = True
        timer.cancel()
        set_async_exc(ctypes.c_ulong(tid), ctypes.c_void_p(0))  # NULL: clear a pending, undelivered raise


BUILTINS: dict[str, Callable] = {"format": format_reward, "format_reward": format_reward,
                                 "accuracy": accuracy_reward, "accuracy_reward": accuracy_reward}


# ------------------------------------------------------------------------------------------ reward models
class RewardModel:
    """A sequence-classification model scoring prompt + completion; its first logit is the reward."""

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.batch_size = batch_size
        self.__name__ = os.path.basename(os.path.normpath(path))

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = []
        for p, c in zip(prompts, completions):
            if isinstance(p, list):
                texts.append(self.tokenizer.apply_chat_template(p + c, tokenize=False)
                             if self.tokenizer.chat_template else "".join(m["content"] for m in p + c))
            else:
                texts.append(p + c)
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, add_special_tokens=False).to(self.device)
            out.extend(self.model(**enc).logits[:, 0].float().tolist())
        return out


# ------------------------------------------------------------------------------------------------ scoring
@dataclass(slots=True)
class RewardFunction:
    name: str
    fn: Callable
    is_async: bool


def resolve_reward(spec: Any, device: str | torch.device = "cpu") -> RewardFunction:
    """A callable, a built-in name, `module:function`, or a reward-model path."""
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return RewardFunction(name, spec, inspect.iscoroutinefunction(spec))
    if isinstance(spec, str):
        if spec in BUILTINS:
            return resolve_reward(BUILTINS[spec])
        if ":" in spec and not os.path.exists(spec):
            import importlib

            mod, _, attr = spec.partition(":")
            try:
                fn = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                raise RewardError(f"reward '{spec}': cannot import {attr} from {mod} ({e}).") from e
            return resolve_reward(fn)
        if os.path.isdir(spec):
            return resolve_reward(RewardModel(spec, device))
        import difflib

        hint = difflib.get_close_matches(spec, sorted(BUILTINS), n=1)
        raise RewardError(f"reward '{spec}' is not a built-in ({', '.join(sorted(set(BUILTINS)))}), "
                          "a module:function, nor an existing reward-model folder."
                          + (f" Did you mean '{hint[0]}'?" if hint else ""))
    raise RewardError(f"reward {spec!r} must be a callable, a built-in name, module:function or a model path.")


class _Timeout(BaseException):
    pass


class _TimedOut(TimeoutError):
    """A call that reward_timeout cut short (as opposed to a TimeoutError the function raised itself)."""


def _call_with_timeout(fn: Callable, timeout: float | None, kwargs: dict) -> Any:
    """Run fn on this (main) thread; a watchdog interrupts it after `timeout` seconds. SIGUSR1 is used, not
    SIGALRM, because math-verify inside reward functions owns SIGALRM for its own timeouts."""
    if not timeout or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        return fn(**kwargs)
    done = threading.Event()

    def _raise(signum, frame):
        if not done.is_set():
            raise _Timeout()

    def _watch():
        if not done.wait(timeout):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, _raise)
    watcher = threading.Thread(target=_watch, daemon=True)
    watcher.start()
    try:
        return fn(**kwargs)
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, old)


def _check_output(name: str, values: Any, n: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward function '{name}' returned {type(values).__name__}; it must return a list of "
                          f"{n} floats (None for 'not applicable').")
    if len(values) != n:
        raise RewardError(f"reward function '{name}' returned {len(values)} values for {n} completions; "
                          "it must return exactly one per completion.")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:
                v = float(v)  # numpy scalars, 0-d tensors
            except (TypeError, ValueError):
                raise RewardError(f"reward function '{name}' returned {v!r} for sample {i}; rewards must be numbers "
                                  "or None.") from None
        if not math.isfinite(v):
            raise RewardError(f"reward function '{name}' returned {v} for sample {i}; rewards must be finite "
                              "(use None for 'not applicable').")
        out.append(float(v))
    if out and all(math.isnan(v) for v in out):
        raise RewardError(f"reward function '{name}' returned None for every sample; at least one value must be a "
                          "number (None means 'not applicable').")
    return out


def _describe_sample(kwargs: dict, i: int | None) -> str:
    if i is None:
        return ""
    c = kwargs["completions"][i]
    text = c[0]["content"] if isinstance(c, list) else c
    return f" on sample {i} (completion {text[:80]!r}{'...' if len(text) > 80 else ''})"


def _locate_failure(func: RewardFunction, kwargs: dict, n: int) -> int | None:
    """Find the first sample on which a synchronous function raises, by calling it one sample at a time."""
    if func.is_async:
        return None
    for i in range(n):
        one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
        try:
            func.fn(**one)
        except Exception:
            return i
    return None


def score(funcs: list[RewardFunction], kwargs: dict, n: int, timeout: float | None = None,
          on_error: str = "raise") -> tuple[torch.Tensor, int]:
    """Call every reward function on the batch described by `kwargs`.

    returns: (rewards [n, F] float32 with NaN for None, number of failed calls scored 0)
    """
    out = torch.full((n, len(funcs)), math.nan)
    failures = 0
    results: dict[int, Any] = {}
    async_idx = [j for j, f in enumerate(funcs) if f.is_async]
    if async_idx:
        async def _all():
            coros = [asyncio.wait_for(funcs[j].fn(**kwargs), timeout) for j in async_idx]
            return await asyncio.gather(*coros, return_exceptions=True)
        for j, r in zip(async_idx, asyncio.run(_all())):
            results[j] = r
    for j, f in enumerate(funcs):
        if f.is_async:
            continue
        try:
            results[j] = _call_with_timeout(f.fn, timeout, kwargs)
        except _Timeout:
            results[j] = _TimedOut(f"took longer than reward_timeout={timeout}s")
        except Exception as e:  # noqa: BLE001 - reported with the function's name below
            results[j] = e
    for j, f in enumerate(funcs):
        r = results[j]
        if isinstance(r, Exception):  # timeouts included
            if on_error == "zero":
                out[:, j] = 0.0
                failures += 1
                continue
            if isinstance(r, _TimedOut) or (f.is_async and timeout and isinstance(r, asyncio.TimeoutError)):
                raise RewardError(f"reward function '{f.name}' took longer than reward_timeout={timeout}s on a batch "
                                  f"of {n} completions. Make it faster, raise reward_timeout, or set "
                                  "reward_error='zero' to score calls that time out 0.") from r
            where = _describe_sample(kwargs, _locate_failure(f, kwargs, n))
            raise RewardError(f"reward function '{f.name}' raised {type(r).__name__}: {r}{where}. "
                              "Fix the function, or set reward_error='zero' to score failures 0.") from r
        out[:, j] = torch.tensor(_check_output(f.name, r, n))
    return out, failures
