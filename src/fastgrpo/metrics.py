"""Where metrics go: output_dir/metrics.jsonl (always), trackio (optional), and the progress bar.

A dashboard must never end a run: trackio failures (no network for a Space, a missing package) are reported
once and logging continues locally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings

log = logging.getLogger("fastgrpo")

BAR_KEYS = (("reward", "reward"), ("rewards/accuracy_reward/mean", "acc"), ("rewards/format_reward/mean", "fmt"),
            ("completions/mean_length", "len"), ("step_time", "s/step"))


class MetricsSink:
    def __init__(self, output_dir: str, reporters: list[str], project: str, run_name: str | None,
                 space_id: str | None, config: dict, total_steps: int, start_step: int = 0,
                 show_progress: bool = True, is_main: bool = True) -> None:
        self.is_main = is_main
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.completions_path = os.path.join(output_dir, "completions.jsonl")  # log_completions
        self.trackio = None
        self.bar = None
        if not is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        for path in (self.path, self.completions_path):
            _truncate_after(path, start_step)
        if "trackio" in reporters:
            self.trackio = _start_trackio(project, run_name or os.path.basename(os.path.abspath(output_dir)),
                                          space_id, config, resume=start_step > 0)
        if show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="GRPO", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        """Every step's metrics to JSONL (the plot and the resume check read these)."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **_clean(metrics)}) + "\n")

    def report(self, step: int, metrics: dict) -> None:
        """A logging step: trackio and the progress bar's postfix."""
        if not self.is_main:
            return
        if self.trackio is not None:
            try:
                self.trackio.log(_clean(metrics), step=step)
            except Exception as e:  # noqa: BLE001 - a dashboard never ends a run
                warnings.warn(f"trackio logging failed ({e}); metrics continue in {self.path}.")
                self.trackio = None
        if self.bar is not None:
            self.bar.set_postfix({short: f"{metrics[k]:.3g}" for k, short in BAR_KEYS if k in metrics}, refresh=False)

    def write_completions(self, step: int, rows: list[dict]) -> None:
        """log_completions: one JSON line per completion (prompt, completion, rewards, advantage) to
        output_dir/completions.jsonl, appended like metrics.jsonl."""
        if not self.is_main or not rows:
            return
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps({"step": step, **_clean(r)}, default=str) + "\n" for r in rows)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trackio is not None:
            try:
                self.trackio.finish()
            except Exception:  # noqa: BLE001
                pass


def _clean(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _truncate_after(path: str, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the file equals an uninterrupted run's. A run from
    step 0 into a folder that already holds metrics keeps them under a numbered name instead of overwriting them."""
    if not os.path.exists(path):
        return
    if step == 0:
        if os.path.getsize(path) > 0:
            root, ext = os.path.splitext(path)
            k = 1
            while os.path.exists(kept := f"{root}.{k}{ext}"):
                k += 1
            os.replace(path, kept)
            log.warning("%s held an earlier run's metrics: kept as %s; this run writes a new %s.", path,
                        os.path.basename(kept), os.path.basename(path))
        return
    with open(path) as f:
        keep = []
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a crash: it and anything after it are dropped
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _start_trackio(project: str, name: str, space_id: str | None, config: dict, resume: bool):
    try:
        import trackio
    except ImportError:
        warnings.warn("report_to='trackio' but trackio is not installed (pip install trackio); logging to metrics.jsonl only.")
        return None
    try:
        trackio.init(project=project, name=name, space_id=space_id, config=_clean(config),
                     resume="allow" if resume else "never")
        return trackio
    except Exception as e:  # noqa: BLE001
        if space_id is None:
            warnings.warn(f"trackio could not start ({e}); logging to metrics.jsonl only.")
            return None
        warnings.warn(f"trackio could not reach the Space {space_id!r} ({type(e).__name__}: {e}); logging locally "
                      "instead. Run `trackio show` to see the dashboard.")
    try:
        trackio.init(project=project, name=name, config=_clean(config), resume="allow" if resume else "never")
        return trackio
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"trackio could not start locally either ({e}); logging to metrics.jsonl only.")
        return None


class Timer:
    def __init__(self) -> None:
        self.t = {}

    def __call__(self, key: str):
        timer = self

        class _Ctx:
            def __enter__(self_):
                self_.start = time.perf_counter()

            def __exit__(self_, *exc):
                timer.t[key] = timer.t.get(key, 0.0) + time.perf_counter() - self_.start

        return _Ctx()

    def pop(self) -> dict:
        out, self.t = self.t, {}
        return out
