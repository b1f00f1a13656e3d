"""A real `fastgrpo train` run with fault-injection points, for tests/test_faults.py.

    python tests/fault_script.py CONFIG.yaml [--field value ...]

runs `fastgrpo.cli.main(["train", CONFIG.yaml, ...])` in this process, exactly as the `fastgrpo` command does.
When the environment variable FASTGRPO_FAULT is set to "PHASE:N", this process first instruments itself so the
test can strike at a known moment; each point prints a line `FAULT-POINT PHASE N` to stdout, then waits:

  generate:N   inside the N-th generation call (after sampling, before it returns)   -> waits to be killed
  optimizer:N  inside the N-th AdamW.step (after the parameters changed in memory)    -> waits to be killed
  save:N       inside the write of checkpoint-N (model files written, the rest not)  -> waits to be killed
  signal:N     inside the N-th generation call                                        -> waits until the trainer's
               SIGINT/SIGTERM handler has run, then carries on (so the signal lands mid-step, deterministically)
  enospc:N     the write of checkpoint-N fails with OSError(ENOSPC) (fallback where a small tmpfs cannot be
               mounted; no marker, no wait)

The instrumentation only wraps functions of this process; the trainer code under test is unchanged.
`shape_reward` (used as `rewards: [fault_script:shape_reward]`) is a cheap deterministic reward with spread, so
that updates are non-zero and a wrong resume would show in the weights.
"""

from __future__ import annotations

import errno
import os
import sys
import time

MARK = "FAULT-POINT"


def shape_reward(completions, **kwargs) -> list[float]:
    """Fraction of vowels in the completion: varies across samples, so advantages (and updates) are non-zero."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiouAEIOU" for ch in t) / max(len(t), 1) for t in texts]


def _point(phase: str, n: int) -> None:
    print(f"{MARK} {phase} {n}", flush=True)


def _wait_forever() -> None:
    time.sleep(600)  # the test kills us long before; if it does not, its own timeout fails the test


def _instrument(phase: str, at: int) -> None:
    import torch

    import fastgrpo.checkpoint as ckpt
    import fastgrpo.loop as loop
    from fastgrpo.rollout.hf import HFGenerator

    runs: list = []
    calls = {"generate": 0, "optimizer": 0}

    install = loop._install_signal_handlers

    def capture_run(run):  # lets signal:N see when the trainer's handler has fired
        runs.append(run)
        return install(run)

    loop._install_signal_handlers = capture_run

    generate = HFGenerator.generate

    def generate_hook(self, prompt_ids, params):
        out = generate(self, prompt_ids, params)
        calls["generate"] += 1
        if calls["generate"] == at and phase == "generate":
            _point(phase, at)
            _wait_forever()
        if calls["generate"] == at and phase == "signal":
            _point(phase, at)
            deadline = time.monotonic() + 120
            while not (runs and runs[-1].stop_signal) and time.monotonic() < deadline:
                time.sleep(0.02)
        return out

    HFGenerator.generate = generate_hook

    step = torch.optim.AdamW.step

    def step_hook(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls["optimizer"] += 1
        if calls["optimizer"] == at and phase == "optimizer":
            _point(phase, at)
            _wait_forever()
        return out

    torch.optim.AdamW.step = step_hook

    save_files = ckpt.save_model_files

    def save_hook(model, tokenizer, path, *rest):
        save_files(model, tokenizer, path, *rest)
        if os.path.basename(path) != f".tmp-checkpoint-{at}":
            return
        if phase == "save":
            _point(phase, at)
            _wait_forever()
        if phase == "enospc":  # stand-in for a full disk where no small filesystem can be mounted
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "training_state.pt"))

    ckpt.save_model_files = save_hook


def main(argv: list[str]) -> int:
    fault = os.environ.get("FASTGRPO_FAULT")
    if fault:
        phase, _, n = fault.partition(":")
        if phase not in ("generate", "optimizer", "save", "signal", "enospc"):
            raise SystemExit(f"FASTGRPO_FAULT={fault!r}: unknown phase {phase!r}")
        _instrument(phase, int(n))
    from fastgrpo.cli import main as cli_main

    print("fault_script: starting", flush=True)
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
