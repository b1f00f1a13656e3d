"""Faults survived, nothing lost (issue #8).

Subprocess tests run `tests/fault_script.py` (the real `fastgrpo train` CLI plus fault-injection points) and strike
it at known moments with real signals: SIGKILL during generation, during the optimizer step and during a checkpoint
write; SIGINT/SIGTERM mid-step; a full disk (a small tmpfs) during a save. The resumed runs must end with weights
`torch.equal` to an uninterrupted run's and the same metrics.jsonl (timings aside).

In-process tests cover what needs no process boundary: non-finite loss/gradient (skipped, counted, then a stop with
a checkpoint), a resumable generator error (the trainer side of server mode), reward_error='zero', and
math-verify's timeouts on pathological completions. Every model is tiny (char tokenizer, 2 layers, hidden 32).
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.checkpoint import STATE_FILE, list_checkpoints
from fastgrpo.loop import TrainingStopped
from fastgrpo.rollout.hf import HFGenerator
from fastgrpo.rollout.vllm_client import ServerError
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fault_script.py"
MARK = "FAULT-POINT"
TIMING = ("time", "per_second")  # metric names containing these differ between any two runs
MAX_STEPS = 4                    # one optimizer step per round; checkpoints at steps 2 and 4

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


# ----------------------------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("faults")
    save_tiny_model(str(ws / "model"), hidden_size=32, intermediate_size=64)
    with open(ws / "data.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Say {i} words:"}) + "\n")
    return ws


def write_config(ws: Path, output_dir: Path, config_dir: Path | None = None) -> Path:
    cfg = {"model": str(ws / "model"), "dataset": {"path": str(ws / "data.jsonl"), "chat": False},
           "rewards": ["fault_script:shape_reward"], "output_dir": str(output_dir), "max_steps": MAX_STEPS,
           "save_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8,
           "learning_rate": 0.01, "seed": 0, "torch_threads": 1, "disable_tqdm": True}
    path = (config_dir or output_dir.parent) / f"{output_dir.name}-run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Proc:
    """fault_script.py in a subprocess; stdout is read by a thread so the test can wait for a fault point."""

    def __init__(self, config: Path, fault: str | None = None, args: tuple[str, ...] = ()) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        env.pop("FASTGRPO_FAULT", None)
        if fault:
            env["FASTGRPO_FAULT"] = fault
        self.stderr_path = config.with_suffix(".stderr")
        self._stderr = open(self.stderr_path, "w")
        self.p = subprocess.Popen([sys.executable, str(SCRIPT), str(config), *args], stdout=subprocess.PIPE,
                                  stderr=self._stderr, text=True, env=env, cwd=str(ROOT))
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, prefix: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.p.kill()
                pytest.fail(f"no {prefix!r} within {timeout}s; stdout so far: {self.lines[-20:]}\n{self.stderr()}")
            if line is None:
                pytest.fail(f"process ended (rc {self.p.wait()}) before {prefix!r}; stdout: {self.lines[-20:]}\n"
                            f"{self.stderr()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 240) -> int:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            pytest.fail(f"process did not end within {timeout}s\n{self.stderr()}")
        self._t.join(10)
        while not self._q.empty():
            line = self._q.get()
            if line is not None:
                self.lines.append(line)
        self._stderr.close()
        return rc

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:]


def run_to_end(config: Path, *args: str) -> Proc:
    proc = Proc(config, args=args)
    rc = proc.finish()
    assert rc == 0, f"rc={rc}\n{proc.stderr()}"
    return proc


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def assert_same_result(out: Path, reference: Path) -> None:
    a, b = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    assert metrics(out) == metrics(reference)
    assert [r["step"] for r in metrics(out)] == list(range(1, MAX_STEPS + 1))


def complete_checkpoints(out: Path) -> list[str]:
    return [os.path.basename(p) for p in list_checkpoints(str(out))]


@pytest.fixture(scope="module")
def baseline(workspace) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    out = workspace / "baseline"
    run_to_end(write_config(workspace, out))
    initial = load_file(str(workspace / "model" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(initial[k], final[k]) for k in final), "training must move the weights"
    assert complete_checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    return out


# ------------------------------------------------------------------------------------------- SIGKILL
@pytest.mark.parametrize("phase, at", [("generate", 3), ("optimizer", 3), ("save", 4)],
                         ids=["during-generation", "during-optimizer-step", "during-checkpoint-write"])
def test_sigkill_then_resume_equals_uninterrupted_run(workspace, baseline, tmp_path, phase, at):
    out = tmp_path / "out"
    config = write_config(workspace, out)
    proc = Proc(config, fault=f"{phase}:{at}")
    proc.wait_for(MARK)
    proc.p.send_signal(signal.SIGKILL)
    assert proc.finish() == -signal.SIGKILL
    # Only the checkpoint finished before the kill counts; a half-written one is invisible to resuming.
    assert complete_checkpoints(out) == ["checkpoint-2"]
    if phase == "save":
        assert (out / ".tmp-checkpoint-4" / "model.safetensors").exists()
        assert not (out / ".tmp-checkpoint-4" / STATE_FILE).exists()
    run_to_end(config, "--resume_from_checkpoint", "true")
    assert_same_result(out, baseline)
    assert complete_checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ".tmp-checkpoint-4").exists()


# --------------------------------------------------------------------------------------- SIGINT/SIGTERM
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_exits_cleanly(workspace, baseline, tmp_path, signame):
    out = tmp_path / "out"
    config = write_config(workspace, out)
    proc = Proc(config, fault="signal:3")
    proc.wait_for(MARK)
    proc.p.send_signal(getattr(signal, signame))
    rc = proc.finish()
    err = proc.stderr()
    assert rc in (130, 128 + getattr(signal, signame)), f"rc={rc}\n{err}"   # resumable stop, not a crash
    assert "Traceback" not in err
    assert any(f"{signame} received" in line for line in proc.lines)
    assert f"stopped by {signame} at step 3" in err
    assert str(out / "checkpoint-3") in err and "--resume_from_checkpoint true" in err
    assert complete_checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    if signame == "SIGINT":  # and the stop loses nothing (SIGTERM takes the same code path)
        run_to_end(config, "--resume_from_checkpoint", "true")
        assert_same_result(out, baseline)


# ------------------------------------------------------------------------------------------- disk full
def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_during_save_keeps_previous_checkpoint(workspace, baseline, tmp_path):
    """A 512 KiB tmpfs holds checkpoint-2 (~330 KB) but not checkpoint-4 as well: writing it fails with ENOSPC.
    Without root (no mount), the same failure is injected at the same point by fault_script's enospc hook."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "512k")
    try:
        out = disk / "out"
        disk.mkdir(exist_ok=True)
        config = write_config(workspace, out, tmp_path)            # config and logs off the small disk
        proc = Proc(config, fault=None if mounted else "enospc:4")
        rc = proc.finish()
        err = proc.stderr()
        assert rc == 2, f"rc={rc}\n{err}"
        assert "Traceback" not in err
        assert "saving checkpoint-4" in err and "the disk is full (No space left on device)" in err
        assert f"the latest intact checkpoint is {out / 'checkpoint-2'}" in err
        assert "Free disk space" in err and "--resume_from_checkpoint true" in err
        assert complete_checkpoints(out) == ["checkpoint-2"]
        assert not (out / ".tmp-checkpoint-4").exists()          # the partial write was removed
        # Nothing lost: checkpoint-2, copied to a roomy disk, resumes to exactly the uninterrupted result.
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    assert (moved / "checkpoint-2" / STATE_FILE).exists()
    run_to_end(write_config(workspace, moved), "--resume_from_checkpoint", "true")
    assert_same_result(moved, baseline)


# ----------------------------------------------------------------------------------- in-process helpers
def tiny_trainer(out: Path, reward_funcs=None, **overrides) -> GRPOTrainer:
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    args = dict(output_dir=str(out), max_steps=MAX_STEPS, save_steps=2, per_device_train_batch_size=4,
                num_generations=2, max_completion_length=8, learning_rate=0.01, seed=0, disable_tqdm=True)
    args.update(overrides)
    data = [{"prompt": f"Say {i} words:"} for i in range(8)]
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from fault_script import shape_reward
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return GRPOTrainer(model, reward_funcs or shape_reward, args=GRPOConfig(**args), train_dataset=data,
                       processing_class=tok)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def count_optimizer_steps():
    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    yield calls
    handle.remove()


# ------------------------------------------------------------------------------------- non-finite updates
def test_nan_loss_is_skipped_and_counted(tmp_path, count_optimizer_steps):
    """NaN hidden states in the 2nd training forward (not in generation): that update is skipped, the run goes on."""
    trainer = tiny_trainer(tmp_path / "out")
    forwards = []

    def poison(module, inputs, output):
        if module.training:
            forwards.append(1)
            if len(forwards) == 2:
                return output * float("nan")
        return output

    trainer.model.model.norm.register_forward_hook(poison)
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss or gradient \(loss=nan.*update skipped"):
        out = trainer.train()
    assert out.global_step == MAX_STEPS
    assert trainer.state.skipped_updates == 1 and trainer.state.consecutive_nonfinite == 0
    assert len(count_optimizer_steps) == MAX_STEPS - 1              # the poisoned update never reached AdamW
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] is None and all(r["loss"] is not None for r in rows[:1] + rows[2:])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / STATE_FILE).read_text())
    assert saved["skipped_updates"] == 1


def test_repeated_inf_gradients_stop_with_checkpoint(tmp_path, count_optimizer_steps):
    trainer = tiny_trainer(tmp_path / "out", max_consecutive_nonfinite=2)
    before = weights(trainer.model)
    trainer.model.model.embed_tokens.weight.register_hook(lambda g: g * float("inf"))
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(TrainingStopped) as e:
        trainer.train()
    msg = str(e.value)
    assert "2 consecutive updates had a non-finite loss or gradient" in msg and "grad_norm=" in msg
    assert "Lower the learning rate" in msg and "resume_from_checkpoint=True" in msg
    assert e.value.reason == "nonfinite" and e.value.checkpoint == str(tmp_path / "out" / "checkpoint-2")
    assert complete_checkpoints(tmp_path / "out") == ["checkpoint-2"]
    assert not count_optimizer_steps
    saved = load_file(str(tmp_path / "out" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(saved[k], before[k]) for k in saved)     # no poisoned update reached the weights
    state = json.loads((tmp_path / "out" / "checkpoint-2" / STATE_FILE).read_text())
    assert state["skipped_updates"] == 2


# ------------------------------------------------------------------------ server mode, trainer side
class FlakyGenerator(HFGenerator):
    """Generates normally, except that call number `fail_at` raises `error` the way the server client does when
    the server stays down after its retries (before sampling: a remote failure consumes none of this process's
    randomness). A stand-in for the server, not a mock of the trainer under test."""

    def __init__(self, base: HFGenerator, fail_at: int, error: Exception) -> None:
        self.__dict__.update(base.__dict__)
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def generate(self, prompt_ids, params):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return super().generate(prompt_ids, params)


def test_resumable_generator_error_saves_checkpoint_and_resume_loses_nothing(tmp_path):
    reference = tiny_trainer(tmp_path / "reference")
    reference.train()

    out = tmp_path / "out"
    trainer = tiny_trainer(out, save_steps=10)                     # no scheduled checkpoint before the failure
    down = ServerError("vLLM server at http://127.0.0.1:8000 unreachable after 5 retries.")
    trainer._generator = FlakyGenerator(trainer._get_generator(), fail_at=3, error=down)
    with pytest.raises(TrainingStopped) as e:
        trainer.train()
    assert "unreachable after 5 retries" in str(e.value) and "resume_from_checkpoint=True" in str(e.value)
    assert e.value.reason == "ServerError" and e.value.__cause__ is down
    assert e.value.checkpoint == str(out / "checkpoint-2")
    assert complete_checkpoints(out) == ["checkpoint-2"]

    resumed = tiny_trainer(out, save_steps=10)
    assert resumed.train(resume_from_checkpoint=True).global_step == MAX_STEPS
    for (k, a), b in zip(resumed.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_non_resumable_generator_error_propagates_unchanged(tmp_path):
    """Only errors marked resumable become a checkpoint + TrainingStopped; a bug surfaces as itself."""
    trainer = tiny_trainer(tmp_path / "out", save_steps=10)
    bug = ValueError("prompt ids out of range")
    trainer._generator = FlakyGenerator(trainer._get_generator(), fail_at=2, error=bug)
    with pytest.raises(ValueError) as e:
        trainer.train()
    assert e.value is bug
    assert complete_checkpoints(tmp_path / "out") == []


# ------------------------------------------------------------------------------------- reward failures
def test_reward_error_zero_scores_zero_and_counts(tmp_path):
    def steady(completions, **kw):
        return [float(len(c)) for c in completions]

    def broken(completions, **kw):
        raise KeyError("solution")

    trainer = tiny_trainer(tmp_path / "out", reward_funcs=[steady, broken], reward_error="zero", max_steps=2,
                           save_strategy="no")
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["rewards/failures"] == 1.0                          # one failed call per round, counted
        assert r["rewards/broken/mean"] == 0.0 and r["rewards/broken/std"] == 0.0
        assert r["rewards/steady/mean"] > 0


# ------------------------------------------------------------------------- math-verify timeouts
PATHOLOGICAL = {
    "power tower": "$\\boxed{9^{9^{9^{9^{9^{9}}}}}}$",
    "huge factorial": "$\\boxed{(10^{100})!}$",
    "deep nesting": "$" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "$",
    "unbalanced braces": "$\\boxed{" + "{" * 5000 + "$",
}


@pytest.fixture
def quiet_math_verify():
    """math-verify logs the whole input at ERROR on a timeout; keep the test output short."""
    import logging

    lg = logging.getLogger("math_verify")
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    yield
    lg.setLevel(old)


@pytest.mark.parametrize("completion", list(PATHOLOGICAL.values()), ids=list(PATHOLOGICAL))
def test_math_verify_bounded_by_its_timeout(monkeypatch, quiet_math_verify, completion):
    from fastgrpo import rewards

    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT_S", 1)
    t = time.monotonic()
    result = rewards.accuracy_reward([completion], ["$\\boxed{2}$"])
    elapsed = time.monotonic() - t
    assert result == [0.0]
    # one parse + one verify at most, each cut at the timeout; the slack is for this shared 2-core machine's slow
    # spells (one run took over 3.5 s here)
    assert elapsed < 2 * rewards.MATH_VERIFY_TIMEOUT_S + 5, f"{elapsed:.1f}s"
    assert not math.isnan(result[0])


@pytest.mark.parametrize("name", ["unbalanced braces", "huge factorial", "deep nesting"])
def test_math_verify_bounded_off_the_main_thread(monkeypatch, quiet_math_verify, name):
    """TRL's async rollout worker and users' thread pools score off the main thread, where math-verify's alarms
    cannot run; fastgrpo.rewards._within bounds parse and verify there instead (before it, on this machine, these
    inputs took 2.5 s, 24 s and more than 30 s with no bound)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastgrpo import rewards

    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT_S", 1)
    with ThreadPoolExecutor(1) as pool:
        t = time.monotonic()
        result = pool.submit(rewards.accuracy_reward, [PATHOLOGICAL[name]], ["$\\boxed{2}$"]).result(timeout=60)
        elapsed = time.monotonic() - t
        assert result == [0.0]
        assert elapsed < 2 * rewards.MATH_VERIFY_TIMEOUT_S + 5, f"{elapsed:.1f}s"
        # the thread is still usable: an ordinary answer scores normally, with no interruption left pending
        assert pool.submit(rewards.accuracy_reward, ["$\\boxed{2}$"], ["$\\boxed{2}$"]).result(timeout=60) == [1.0]


def test_deadline_is_withdrawn_when_the_call_finishes_first():
    """_within's timer may fire while fn returns: the raise it schedules must never reach later code."""
    from concurrent.futures import ThreadPoolExecutor

    from fastgrpo.rewards import _within

    class Late(Exception):
        pass

    def many() -> int:
        interrupted = 0
        for i in range(300):  # deadlines around the call's own length: some calls are cut, some are not
            try:
                _within(1e-4 * (i % 7), Late, lambda: sum(range(2000)))
            except Late:
                interrupted += 1
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # plain code after the last call: a stray raise would surface here
            sum(range(100))
        return interrupted

    with ThreadPoolExecutor(1) as pool:
        pool.submit(many).result(timeout=60)

    def slow() -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            pass

    with ThreadPoolExecutor(1) as pool:
        t = time.monotonic()
        with pytest.raises(Late):
            pool.submit(_within, 0.2, Late, slow).result(timeout=60)
        assert time.monotonic() - t < 3
