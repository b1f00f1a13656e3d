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
import concurrent.futures
import ctypes
import difflib
import functools
import inspect
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["format_reward", "accuracy_reward", "RewardFunction", "RewardError", "Scores", "score", "BUILTINS",
           "resolve_reward", "check_signature", "check_columns"]

log = logging.getLogger("fastgrpo")


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it and the sample."""

    resumable = True  # raised in a training round: the trainer saves a checkpoint before stopping


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

    def __init__(self, path: str | torch.nn.Module, device: str | torch.device = "cpu", batch_size: int = 32,
                 tokenizer=None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(path, torch.nn.Module):  # a loaded model, as TRL takes (with reward_processing_classes)
            source = getattr(path.config, "_name_or_path", "") or None
            if tokenizer is None and source is None:
                raise RewardError(f"reward model {type(path).__name__} was given without its tokenizer. Fix: pass "
                                  "reward_processing_classes=[tokenizer] (one per reward function), or its folder.")
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
            self.model = path.to(device).eval()
            self.__name__ = os.path.basename(os.path.normpath(source)) if source else type(path).__name__
        else:
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
            self.__name__ = os.path.basename(os.path.normpath(path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.batch_size = batch_size

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
    failures: int = 0   # calls scored 0 under reward_error="zero", for the warnings


def _name(fn: Callable) -> str:
    """TRL's metric name: the function's __name__ (through functools.partial), else the class name."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


#: What every reward call gets besides the dataset's columns.
PASSED = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")


def check_signature(func: RewardFunction, columns: list[str]) -> None:
    """Fail at construction, not at the first step, when a reward function needs an argument no call passes, or
    cannot take the dataset's columns (each arrives as a keyword argument, as in TRL)."""
    try:
        params = inspect.signature(func.fn).parameters.values()
    except (TypeError, ValueError):  # builtins and C callables without a signature: left to the call
        return
    passed = set(PASSED) | set(columns)
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if passed - named:
            raise RewardError(f"reward function '{func.name}' takes no **kwargs, but every call passes "
                              f"{', '.join(sorted(passed - named))}. Fix: def {func.name}(prompts, completions, "
                              "**kwargs).")
    for name in _required_columns(func):
        if name not in columns:
            raise RewardError(f"reward function '{func.name}' needs an argument '{name}', which no call passes: "
                              f"dataset columns are {columns}. Fix: add a '{name}' column to the dataset, or give "
                              "the argument a default.")


def _required_columns(func: RewardFunction) -> list[str]:
    """The parameters without a default that only a dataset column can fill."""
    try:
        params = inspect.signature(func.fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty and p.name not in PASSED
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_columns(funcs: list[RewardFunction], rows: list[dict] | None, what: str = "train_dataset",
                  prompt_column: str = "prompt") -> None:
    """Fail at construction when `rows` (one dataset's, as data.validate_dataset returns them; None: no dataset)
    lack a column that a reward function requires. Each dataset is checked on its own: a batch of eval prompts
    passes only the eval dataset's columns, so a column that only train_dataset has would otherwise surface as a
    TypeError at the first evaluation. The prompt column is not passed under its own name (it is `prompts`)."""
    if not rows:
        return
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c != prompt_column]
    for f in funcs:
        for name in _required_columns(f):
            lacking = [i for i, row in enumerate(rows) if name not in row or name == prompt_column]
            if len(lacking) == len(rows):
                raise RewardError(f"reward function '{f.name}' needs the column '{name}', which {what} does not have "
                                  f"(its columns: {columns}). Fix: add a '{name}' column to {what}, or give the "
                                  f"parameter '{name}' a default.")
            if lacking:
                raise RewardError(f"{what} row {lacking[0]} has no '{name}' ({len(lacking)} of {len(rows)} rows lack "
                                  f"it), which reward function '{f.name}' needs. Fix: give every row of {what} a "
                                  f"'{name}' (None where it does not apply, if '{f.name}' handles None), or drop "
                                  "those rows.")


def import_reward(spec: str, folders: list[str]) -> Callable:
    """`module:function` or `path/to/file.py:function`, found as `python script.py` users expect: in `folders` (the
    current folder; for the CLI also the config file's), a module name after the installed packages."""
    import importlib

    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        candidates = [target] if os.path.isabs(target) else [os.path.join(d, target) for d in folders]
        file = next((os.path.abspath(c) for c in candidates if os.path.isfile(c)), None)
        if file is None:
            raise RewardError(f"reward {spec!r}: no file {target!r} (looked in {', '.join(folders)}). Fix: give the "
                              "file's path, absolute or relative to one of those folders.")
        where = file
        module = _module_from_file(file, spec)
    else:
        for d in folders:
            if d not in sys.path:
                # last, unlike `python script.py`: a file in the data folder must not shadow an installed package
                sys.path.append(d)
        importlib.invalidate_caches()  # a module written since the last import from that folder is seen
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and target.split(".")[0] != e.name.split(".")[0]:  # the module's own import failed
                raise RewardError(f"reward {spec!r}: importing {target} failed: {e}. Fix: install {e.name!r} "
                                  "in this environment.") from e
            raise RewardError(f"reward {spec!r}: no module {target!r} in {', '.join(folders)} or on sys.path. Fix: "
                              f"put the folder that holds {target.replace('.', '/')}.py on PYTHONPATH (PYTHONPATH=DIR "
                              f"python ... / fastgrpo train ...), or give the file's path: path/to/{target.split('.')[-1]}.py:"
                              f"{attr}.") from e
        except Exception as e:
            raise RewardError(f"reward {spec!r}: importing {target} failed ({type(e).__name__}: {e}).") from e
        where = getattr(module, "__file__", None) or target  # the file found, in case another of that name was meant
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        hint = difflib.get_close_matches(attr, names, n=1)
        hint = hint[0] if hint else None
        raise RewardError(f"reward {spec!r}: {where} has no {attr!r}." + (f" Did you mean '{hint}'?" if hint else
                          f" Its functions: {', '.join(names) or 'none'}."))
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr} is a {type(fn).__name__}, not a function.")
    return fn


def _module_from_file(file: str, spec: str):
    import importlib.util

    name = os.path.splitext(os.path.basename(file))[0]
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == file:
        return loaded
    mod_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    folder = os.path.dirname(file)
    if folder not in sys.path:
        sys.path.append(folder)  # the file's own imports of its neighbours work, as under `python file.py`
    try:
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise RewardError(f"reward {spec!r}: running {file} failed ({type(e).__name__}: {e}).") from e
    if name not in sys.modules:  # registered (pickling finds its functions) unless that would shadow a module
        sys.modules[name] = module
    return module


def resolve_reward(spec: Any, device: str | torch.device = "cpu", tokenizer=None) -> RewardFunction:
    """A callable, a built-in name, `module:function`, a reward-model path, or a loaded sequence-classification
    model (`tokenizer`: its reward_processing_class)."""
    if isinstance(spec, torch.nn.Module) and hasattr(spec, "config"):
        if "SequenceClassification" not in type(spec).__name__:
            raise RewardError(f"reward model {type(spec).__name__} is not a sequence-classification model; load it "
                              "with AutoModelForSequenceClassification.")
        return resolve_reward(RewardModel(spec, device, tokenizer=tokenizer))
    if callable(spec):
        return RewardFunction(_name(spec), spec, _is_async(spec))
    if isinstance(spec, str):
        if spec in BUILTINS:
            return resolve_reward(BUILTINS[spec])
        if ":" in spec and not os.path.exists(spec):
            return resolve_reward(import_reward(spec, [os.getcwd()]))
        if os.path.isdir(spec):
            try:
                return resolve_reward(RewardModel(spec, device))
            except (OSError, ValueError) as e:
                raise RewardError(f"reward '{spec}': the folder does not hold a sequence-classification model and "
                                  f"its tokenizer ({type(e).__name__}: {str(e)[:200]}).") from e
        hint = difflib.get_close_matches(spec, sorted(BUILTINS), n=1)
        raise RewardError(f"reward '{spec}' is not a built-in ({', '.join(sorted(set(BUILTINS)))}), "
                          "a module:function, nor an existing reward-model folder (hub ids are not downloaded: "
                          "save the model to a folder first)."
                          + (f" Did you mean '{hint[0]}'?" if hint else ""))
    raise RewardError(f"reward {spec!r} must be a callable, a built-in name, module:function or a model path.")


class _Timeout(BaseException):
    pass


class _TimedOut(TimeoutError):
    """A call that reward_timeout cut short (as opposed to a TimeoutError the function raised itself)."""


def _call_with_timeout(fn: Callable, timeout: float | None, kwargs: dict) -> Any:
    """Run fn on this (main) thread; a watchdog interrupts it after `timeout` seconds. SIGUSR1 is used, not
    SIGALRM, because math-verify inside reward functions owns SIGALRM for its own timeouts."""
    if not timeout:
        return fn(**kwargs)
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        warnings.warn(f"reward_timeout={timeout}s is not enforced for synchronous reward functions when train() "
                      "runs off the main thread (signals reach the main thread only).", stacklevel=3)
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
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        if getattr(values, "ndim", 1) != 1:
            raise RewardError(f"reward function '{name}' returned a {type(values).__name__} of shape "
                              f"{list(values.shape)}; it must hold one value per completion ({n}), e.g. "
                              "values.reshape(-1).")
        values = values.tolist()
    elif not isinstance(values, (list, tuple, str, bytes, dict)) and hasattr(values, "__iter__"):
        values = list(values)  # a generator or another iterable, as TRL accepts
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
        try:
            v = float(v)  # ints, numpy scalars, 0-d tensors
        except OverflowError:
            raise RewardError(f"reward function '{name}' returned an integer too large for a float for sample {i}; "
                              "rewards must be finite numbers.") from None
        except (TypeError, ValueError):
            raise RewardError(f"reward function '{name}' returned {v!r:.80} for sample {i}; rewards must be "
                              "numbers or None.") from None
        if not math.isfinite(v):
            raise RewardError(f"reward function '{name}' returned {v} for sample {i}; rewards must be finite "
                              "(use None for 'not applicable').")
        out.append(v)
    return out  # all None is fine: a function that does not apply to any of this batch's samples (multi-task)


def _describe_sample(kwargs: dict, i: int | None) -> str:
    if i is None:
        return ""
    c = kwargs["completions"][i]
    text = c[0]["content"] if isinstance(c, list) else c
    return f" on sample {i} (completion {text[:80]!r}{'...' if len(text) > 80 else ''})"


def _locate_failure(func: RewardFunction, kwargs: dict, n: int, budget_s: float = 10.0) -> int | None:
    """Find the first sample on which a synchronous function raises, by calling it one sample at a time (at most
    `budget_s` seconds of such calls: each repeats the function's side effects, e.g. a paid API call)."""
    if func.is_async:
        return None
    start = time.perf_counter()
    for i in range(n):
        if time.perf_counter() - start > budget_s:
            return None
        one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
        try:
            func.fn(**one)
        except Exception:
            return i
    return None


_LOOP: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """One event loop for every async reward call of the process, in a daemon thread (as TRL's): clients made once
    (httpx.AsyncClient, AsyncOpenAI) stay bound to a live loop, and a caller's own running loop (Jupyter,
    asyncio.run(main())) is not in the way."""
    global _LOOP
    if _LOOP is None:  # (a loop not yet running takes submitted work all the same)
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, name="fastgrpo-async-rewards", daemon=True).start()
    return _LOOP


def _run_async(funcs: list[RewardFunction], kwargs: dict, timeout: float | None) -> list[Any]:
    """The async functions' results (or exceptions), run concurrently on the shared loop."""
    global _LOOP

    async def _all():
        coros = [asyncio.wait_for(f.fn(**kwargs), timeout) for f in funcs]
        return await asyncio.gather(*coros, return_exceptions=True)

    future = asyncio.run_coroutine_threadsafe(_all(), _event_loop())
    try:
        return future.result(None if timeout is None else timeout + 10.0)
    except concurrent.futures.TimeoutError:
        _LOOP = None  # that loop is blocked; the next call starts another
        raise RewardError(f"async reward functions ({', '.join(f.name for f in funcs)}) did not finish within "
                          f"reward_timeout={timeout}s + 10 s and do not yield to the event loop: one blocks it (e.g. "
                          "time.sleep or a blocking client inside async def). Use await asyncio.sleep / an async "
                          "client, or make the function synchronous.") from None


def _on_zero(f: RewardFunction, error: BaseException) -> None:
    """reward_error='zero': say so at the first failure of each function, then at 10, 100, 1000, ... failures."""
    f.failures += 1
    if f.failures == 1 or math.log10(f.failures).is_integer():
        log.warning("reward function '%s' failed (%s: %s) and was scored 0 (reward_error='zero'); %d failed "
                    "call(s) so far.", f.name, type(error).__name__, str(error)[:300], f.failures)


def _hint(error: BaseException, func: RewardFunction, kwargs: dict) -> str:
    if isinstance(error, TypeError) and "argument" in str(error):
        missing = [name for name in _required_columns(func) if name not in kwargs]
        if missing:  # the data, not the signature: the dataset scored here (e.g. evaluate()'s) lacks the column
            return (f" The batch has no '{missing[0]}': the dataset being scored has no such column (or the batch's "
                    f"first row lacks it). Fix: add a '{missing[0]}' column to it, or give the parameter a default.")
        return (" Its signature must take the dataset's columns as keyword arguments: def f(prompts, completions, "
                "**kwargs).")
    return ""


@dataclass(slots=True)
class Scores:
    rewards: torch.Tensor                            # [n, F] float32, NaN where a function returned None
    failures: int = 0                                # calls scored 0 under reward_error="zero"
    metrics: dict[str, float] = field(default_factory=dict)  # log_metric(name, value) calls, averaged per name


def score(funcs: list[RewardFunction], kwargs: dict, n: int, timeout: float | None = None,
          on_error: str = "raise") -> Scores:
    """Call every reward function on the batch described by `kwargs` (plus TRL's `log_metric(name, value)` and
    `log_extra(column, values)`; fastgrpo keeps no completions table, so log_extra's columns are not kept).

    on_error="zero" (reward_error): a call that raises, times out or returns an unusable result (not one finite
    number or None per completion) scores 0 for every completion of the batch, is counted in `failures` and warned
    of; "raise" stops with a RewardError naming the function (and the sample where it can)."""
    out = torch.full((n, len(funcs)), math.nan)
    failures = 0
    logged: dict[str, list[float]] = {}
    kwargs = {**kwargs, "log_metric": lambda name, value: logged.setdefault(str(name), []).append(float(value)),
              "log_extra": lambda column, values: None}
    results: dict[int, Any] = {}
    async_idx = [j for j, f in enumerate(funcs) if f.is_async]
    if async_idx:
        results.update(zip(async_idx, _run_async([funcs[j] for j in async_idx], kwargs, timeout)))
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
        if not isinstance(r, Exception):
            try:
                out[:, j] = torch.tensor(_check_output(f.name, r, n))
                continue
            except RewardError as e:
                if on_error != "zero":
                    raise
                r = e  # an unusable result (wrong length, NaN, not numbers) fails the call as a raise would
        if on_error == "zero":  # an exception, a timeout or an unusable result
            out[:, j] = 0.0
            failures += 1
            _on_zero(f, r)
            continue
        if isinstance(r, _TimedOut) or (f.is_async and timeout and isinstance(r, asyncio.TimeoutError)):
            raise RewardError(f"reward function '{f.name}' took longer than reward_timeout={timeout}s on a batch "
                              f"of {n} completions. Make it faster, raise reward_timeout, or set "
                              "reward_error='zero' to score calls that time out 0.") from r
        where = _describe_sample(kwargs, _locate_failure(f, kwargs, n, min(timeout or 10.0, 10.0)))
        raise RewardError(f"reward function '{f.name}' raised {type(r).__name__}: {r}{where}.{_hint(r, f, kwargs)} "
                          "Fix the function, or set reward_error='zero' to score failures 0.") from r
    unscored = int(torch.isnan(out).all(dim=1).sum())
    if unscored:
        warnings.warn("every reward function returned None for some completions; they get reward NaN (left out of "
                      "their group's statistics) and advantage 0. Make at least one function score each sample.",
                      stacklevel=2)
    return Scores(out, failures, {k: sum(v) / len(v) for k, v in logged.items() if v})
