"""GRPOTrainer end to end on tiny CPU models: what changes, rewards, resuming, checkpoints, errors, metrics,
fallbacks without GPU/network, reproducibility.

Every run uses the character tokenizer and a 2-layer Qwen2 with hidden size 32, 2 prompts x 2 completions of
at most 8 tokens per step, so a step takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from conftest import content_reward, drop_timing
from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.checkpoint import STATE_FILE, list_checkpoints
from fastgrpo.config import ConfigError
from fastgrpo.data import DataError
from fastgrpo.loop import TrainingStopped
from fastgrpo.rewards import RewardError

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"])


# ----------------------------------------------------------------------------------- (a) what training changes
def test_lora_changes_adapters_and_leaves_base_weights_bit_identical(tiny_model_factory, char_tokenizer,
                                                                     conversational_dataset, tiny_config):
    trainer = GRPOTrainer(tiny_model_factory(), content_reward, args=tiny_config(max_steps=3),
                          train_dataset=conversational_dataset, processing_class=char_tokenizer,
                          peft_config=lora_config())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    for n in lora:
        assert not torch.equal(before[n], after[n]), f"{n} did not change"
    base = [n for n in before if "lora_" not in n]
    assert len(base) > len(lora)
    for n in base:
        assert torch.equal(before[n], after[n]), f"base weight {n} changed"
        assert not after[n].requires_grad


def test_full_fine_tuning_changes_every_weight(tiny_model_factory, char_tokenizer, conversational_dataset, tiny_config):
    model = tiny_model_factory()
    before = weights(model)
    trainer = GRPOTrainer(model, content_reward, args=tiny_config(max_steps=2), train_dataset=conversational_dataset,
                          processing_class=char_tokenizer)
    trainer.train()
    after = weights(trainer.model)
    for k in before:
        assert not torch.equal(before[k], after[k]), f"{k} did not change"


# ----------------------------------------------------------------------------------------------- (b) rewards
def test_plain_text_prompts_and_extra_columns_reach_rewards(tiny_model_factory, char_tokenizer, plain_text_dataset,
                                                            conversational_dataset, tiny_config, tmp_path):
    calls = []

    def check_plain(prompts, completions, completion_ids, solution, trainer_state, **kw):
        calls.append("plain")
        assert all(isinstance(p, str) and isinstance(c, str) for p, c in zip(prompts, completions))
        for p, c, ids, s in zip(prompts, completions, completion_ids, solution):
            assert s == str(2 * int(re.match(r"Q: (\d+) plus", p).group(1)))  # the row's own solution
            assert char_tokenizer.decode(ids, skip_special_tokens=True) == c
        assert trainer_state.global_step >= 0
        return content_reward(completions)

    t = GRPOTrainer(tiny_model_factory(), check_plain, args=tiny_config(max_steps=2),
                    train_dataset=plain_text_dataset, processing_class=char_tokenizer)
    t.train()
    assert calls == ["plain", "plain"]

    def check_chat(prompts, completions, solution, row_id, **kw):
        calls.append("chat")
        assert len(prompts) == len(completions) == len(solution) == len(row_id) == 4
        for p, c, s, i in zip(prompts, completions, solution, row_id):
            assert isinstance(p, list) and p[0]["role"] == "user"
            assert isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
            a, b = map(int, re.match(r"What is (\d+)\+(\d+)\?", p[0]["content"]).groups())
            assert s == str(a + b) and i == a - 3
        assert prompts[0] == prompts[1] and prompts[2] == prompts[3]  # num_generations=2, prompt-major
        return content_reward(completions)

    t = GRPOTrainer(tiny_model_factory(), check_chat, args=tiny_config(max_steps=1, output_dir=str(tmp_path / "c")),
                    train_dataset=conversational_dataset, processing_class=char_tokenizer)
    t.train()
    assert calls[-1] == "chat"


def test_async_rewards_run_concurrently(tiny_model_factory, char_tokenizer, conversational_dataset, tiny_config):
    spans = {}

    async def slow_a(completions, **kw):
        t0 = time.perf_counter()
        await asyncio.sleep(0.5)
        spans.setdefault("a", []).append((t0, time.perf_counter()))
        return [1.0] * len(completions)

    async def slow_b(completions, **kw):
        t0 = time.perf_counter()
        await asyncio.sleep(0.5)
        spans.setdefault("b", []).append((t0, time.perf_counter()))
        return content_reward(completions)

    t = GRPOTrainer(tiny_model_factory(), [slow_a, slow_b], args=tiny_config(max_steps=1),
                    train_dataset=conversational_dataset, processing_class=char_tokenizer)
    t.train()
    (a0, a1), (b0, b1) = spans["a"][0], spans["b"][0]
    assert a1 - a0 >= 0.5 and b1 - b0 >= 0.5
    assert max(a1, b1) - min(a0, b0) < 0.9, "async reward functions ran one after the other"
    m = read_metrics(t.args.output_dir)[0]
    assert m["rewards/slow_a/mean"] == 1.0


def test_none_rewards_excluded_and_weights_combine(tiny_model_factory, char_tokenizer, conversational_dataset,
                                                   tiny_config):
    seen = {"half": [], "full": []}

    def half(completions, **kw):  # "not applicable" on every other completion
        out = [None if i % 2 else v for i, v in enumerate(content_reward(completions))]
        seen["half"].append(out)
        return out

    def full(completions, **kw):
        out = [len(c[0]["content"]) / 8.0 for c in completions]
        seen["full"].append(out)
        return out

    w = [2.0, -0.5]
    t = GRPOTrainer(tiny_model_factory(), [half, full], args=tiny_config(max_steps=2, reward_weights=w),
                    train_dataset=conversational_dataset, processing_class=char_tokenizer)
    t.train()
    for step, m in enumerate(read_metrics(t.args.output_dir)):
        h, f = seen["half"][step], seen["full"][step]
        valid = [x for x in h if x is not None]
        assert abs(m["rewards/half/mean"] - sum(valid) / len(valid)) < 1e-6
        assert abs(m["rewards/full/mean"] - sum(f) / len(f)) < 1e-6
        total = [(w[0] * a if a is not None else 0.0) + w[1] * b for a, b in zip(h, f)]
        assert abs(m["reward"] - sum(total) / len(total)) < 1e-5


# --------------------------------------------------------------------------------------- (c) exact resuming
def _resume_trainer(model_factory, tok, dataset, cfg, lora, reward):
    return GRPOTrainer(model_factory(), reward, args=cfg, train_dataset=dataset, processing_class=tok,
                       peft_config=lora_config() if lora else None)


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SIGINT"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_interrupted_run_resumes_exactly(how, lora, tiny_model_factory, char_tokenizer, conversational_dataset,
                                         tiny_config, tmp_path):
    """Run A: 4 steps. Run B: the same config (max_steps=4, so the same LR schedule), interrupted during step 3,
    then resumed by a new trainer with resume_from_checkpoint=True. Same weights (bit for bit) and metrics."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-3)
    a = _resume_trainer(tiny_model_factory, char_tokenizer, conversational_dataset,
                        tiny_config(output_dir=str(tmp_path / "a"), **common), lora, content_reward)
    out_a = a.train()

    calls = []

    def interrupting(completions, **kw):
        calls.append(1)
        if len(calls) == 3:  # the reward call of step 3 (one round per optimizer step)
            if how == "KeyboardInterrupt":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler: finish the step, save, stop
        return content_reward(completions)

    interrupting.__name__ = "content_reward"  # same metric names as run A
    dir_b = str(tmp_path / "b")
    b = _resume_trainer(tiny_model_factory, char_tokenizer, conversational_dataset,
                        tiny_config(output_dir=dir_b, **common), lora, interrupting)
    if how == "KeyboardInterrupt":
        with pytest.raises(KeyboardInterrupt):
            b.train()
        assert [os.path.basename(p) for p in list_checkpoints(dir_b)] == ["checkpoint-2"]
        resumed_at = 2
    else:
        with pytest.raises(TrainingStopped) as info:
            b.train()
        assert "resume_from_checkpoint" in str(info.value)
        assert [os.path.basename(p) for p in list_checkpoints(dir_b)] == ["checkpoint-2", "checkpoint-3"]
        resumed_at = 3
    assert b.state.global_step == resumed_at

    b2 = _resume_trainer(tiny_model_factory, char_tokenizer, conversational_dataset,
                         tiny_config(output_dir=dir_b, resume_from_checkpoint=True, **common), lora, content_reward)
    out_b = b2.train()
    assert out_b.global_step == out_a.global_step == 4
    assert_same_weights(weights(a.model), weights(b2.model))

    metrics_a, metrics_b = read_metrics(a.args.output_dir), read_metrics(dir_b)
    assert [m["step"] for m in metrics_b] == [1, 2, 3, 4]
    assert [drop_timing(m) for m in metrics_a] == [drop_timing(m) for m in metrics_b]
    history = lambda t: [drop_timing(h) for h in t.state.log_history if "train_loss" not in h]  # noqa: E731
    assert history(a) == history(b2)
    assert b2.state.log_history[-1]["step"] == 4 and "train_loss" in b2.state.log_history[-1]
    assert out_b["train_loss"] == out_a["train_loss"]  # the mean over all 4 steps, across the resume


# ---------------------------------------------------------------------------------- (d) SIGKILL during a save
CHILD = textwrap.dedent('''
    """Builds the tiny run used by test_sigkill_during_checkpoint_save; run as a script it trains and, while
    writing checkpoint-HANG (after the model files, before the rest), announces it and waits to be killed."""
    import os, sys, time

    import datasets, torch

    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2


    def reward(completions, **kw):
        return [(sum(map(ord, c)) % 13) / 13.0 for c in completions]


    def build(output_dir, max_steps, resume=False):
        tok = build_char_tokenizer()
        model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64, seed=0)
        data = datasets.Dataset.from_list([{"prompt": f"Count {i}:"} for i in range(6)])
        cfg = GRPOConfig(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4,
                         num_generations=2, max_completion_length=8, learning_rate=1e-2, seed=1, save_steps=1,
                         disable_tqdm=True, torch_threads=1, resume_from_checkpoint=resume or None)
        return GRPOTrainer(model, reward, args=cfg, train_dataset=data, processing_class=tok)


    if __name__ == "__main__":
        out, steps, hang = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        import fastgrpo.checkpoint as ck

        real = ck.save_model_files

        def save_then_hang(model, tokenizer, path, *rest):
            real(model, tokenizer, path, *rest)
            if os.path.basename(path) == f".tmp-checkpoint-{hang}":
                open(os.path.join(out, "SAVING"), "w").close()
                time.sleep(600)

        ck.save_model_files = save_then_hang
        build(out, steps).train()
''')


def test_sigkill_during_checkpoint_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), "3", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (out / "SAVING").exists():
            assert proc.poll() is None, f"child ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "checkpoint-2 save never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # The save was cut in the middle: its temporary folder is partial, the previous checkpoint intact.
    assert (out / ".tmp-checkpoint-2").is_dir() and not (out / ".tmp-checkpoint-2" / STATE_FILE).exists()
    assert not (out / "checkpoint-2").exists()
    ck1 = out / "checkpoint-1"
    assert (ck1 / STATE_FILE).is_file() and (ck1 / "training_state.pt").is_file()
    assert (ck1 / "model.safetensors").is_file()
    assert list_checkpoints(str(out)) == [str(ck1)]
    assert json.loads((ck1 / STATE_FILE).read_text())["global_step"] == 1

    child = runpy.run_path(str(script))  # the same builder, in this process
    resumed = child["build"](str(out), 3, resume=True)
    resumed.train()
    assert resumed.state.global_step == 3
    assert [m["step"] for m in read_metrics(str(out))] == [1, 2, 3]
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    baseline = child["build"](str(tmp_path / "baseline"), 3)
    baseline.train()
    assert_same_weights(weights(baseline.model), weights(resumed.model))
    assert [drop_timing(m) for m in read_metrics(str(tmp_path / "baseline"))] == \
        [drop_timing(m) for m in read_metrics(str(out))]


# ------------------------------------------------------------------------------------------- (e) checkpoints
def test_save_steps_and_total_limit(tiny_model_factory, char_tokenizer, conversational_dataset, tiny_config, tmp_path):
    cfg = tiny_config(max_steps=3, save_strategy="steps", save_steps=1, output_dir=str(tmp_path / "all"))
    GRPOTrainer(tiny_model_factory(), content_reward, args=cfg, train_dataset=conversational_dataset,
                processing_class=char_tokenizer, peft_config=lora_config()).train()
    names = sorted(p for p in os.listdir(cfg.output_dir) if p.startswith("checkpoint-"))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for n in names:
        files = set(os.listdir(os.path.join(cfg.output_dir, n)))
        assert {STATE_FILE, "training_state.pt", "adapter_model.safetensors", "adapter_config.json",
                "tokenizer.json"} <= files
        assert json.loads(Path(cfg.output_dir, n, STATE_FILE).read_text())["global_step"] == int(n.split("-")[1])

    cfg = tiny_config(max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=2,
                      output_dir=str(tmp_path / "limited"))
    GRPOTrainer(tiny_model_factory(), content_reward, args=cfg, train_dataset=conversational_dataset,
                processing_class=char_tokenizer).train()
    assert sorted(p for p in os.listdir(cfg.output_dir) if "checkpoint" in p) == ["checkpoint-2", "checkpoint-3"]


# ----------------------------------------------------------------------------------------------- (f) errors
@pytest.mark.parametrize("kwargs,must_mention", [
    (dict(learning_rat=1e-5), ["learning_rat", "learning_rate"]),
    (dict(num_generation=4), ["num_generation", "num_generations"]),
    (dict(num_generations=1), ["num_generations"]),
    (dict(per_device_train_batch_size=3, num_generations=2), ["num_generations", "multiple", "3"]),
    (dict(generation_batch_size=12, per_device_train_batch_size=4, num_generations=8), ["num_generations=8", "12"]),
    (dict(max_completion_length=0), ["max_completion_length", "> 0"]),
    (dict(learning_rate=-1e-5), ["learning_rate", ">= 0"]),
    (dict(epsilon=0.0), ["epsilon", "> 0"]),
    (dict(epsilon=-0.2), ["epsilon"]),
    (dict(loss_type="dr-grpo"), ["loss_type", "'dr_grpo'"]),
    (dict(loss_type="grpoo"), ["loss_type", "Did you mean 'grpo'"]),
    (dict(vllm_mode="colocated"), ["vllm_mode", "Did you mean 'colocate'"]),
    (dict(loss_type="cispo"), ["epsilon_high"]),
])
def test_bad_config_names_field_and_fix(kwargs, must_mention):
    with pytest.raises(ConfigError) as info:
        GRPOConfig(**kwargs)
    for text in must_mention:
        assert text in str(info.value), (text, str(info.value))


def test_dataset_without_prompt_column(tiny_model_factory, char_tokenizer, tiny_config):
    import datasets

    data = datasets.Dataset.from_list([{"question": "1+1?", "solution": "2"}] * 4)
    with pytest.raises(DataError) as info:
        GRPOTrainer(tiny_model_factory(), content_reward, args=tiny_config(), train_dataset=data,
                    processing_class=char_tokenizer)
    msg = str(info.value)
    assert "'prompt'" in msg and "question" in msg and "dataset.map" in msg


def test_reward_of_wrong_length_names_function(tiny_model_factory, char_tokenizer, conversational_dataset, tiny_config):
    def too_short(completions, **kw):
        return [1.0] * (len(completions) - 1)

    t = GRPOTrainer(tiny_model_factory(), [content_reward, too_short], args=tiny_config(),
                    train_dataset=conversational_dataset, processing_class=char_tokenizer)
    with pytest.raises(RewardError) as info:
        t.train()
    assert "'too_short'" in str(info.value) and "3 values for 4" in str(info.value)


# --------------------------------------------------------------------------------------- (g) metrics/state
TRL_METRICS = ["reward", "reward_std", "rewards/content_reward/mean", "rewards/content_reward/std",
               "completions/mean_length", "completions/clipped_ratio", "completions/max_length", "entropy",
               "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "frac_reward_zero_std",
               "loss", "learning_rate", "grad_norm", "step_time", "generation_time", "tokens_per_second",
               "num_tokens", "epoch"]


def test_log_history_and_metrics_file(tiny_model_factory, char_tokenizer, conversational_dataset, tiny_config):
    t = GRPOTrainer(tiny_model_factory(), content_reward, args=tiny_config(max_steps=3, logging_steps=2),
                    train_dataset=conversational_dataset, processing_class=char_tokenizer)
    out = t.train()
    last = t.state.log_history[-1]
    assert "train_loss" in last and last["step"] == 3 and out.training_loss == out["train_loss"]
    assert out.global_step == 3
    logged_steps = [h["step"] for h in t.state.log_history[:-1]]
    assert logged_steps == [1, 2, 3]  # first step, every logging_steps, last step
    metrics = read_metrics(t.args.output_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]  # metrics.jsonl has every step
    for m in metrics:
        missing = [k for k in TRL_METRICS if k not in m]
        assert not missing, missing
        assert 0 <= m["completions/clipped_ratio"] <= 1 and m["completions/mean_length"] <= 8
        assert m["step_time"] > 0 and m["tokens_per_second"] > 0 and m["grad_norm"] >= 0
    lrs = [m["learning_rate"] for m in metrics]  # linear decay from the peak, as transformers computes it
    assert lrs == pytest.approx([1e-2 * (3 - s) / 3 for s in (1, 2, 3)])
    assert metrics[-1]["num_tokens"] == pytest.approx(sum(m["completions/mean_length"] * 4 for m in metrics))


# ------------------------------------------------------------------------------- (h)-(j) fallbacks offline
def test_use_vllm_without_gpu_warns_once_and_trains(tiny_model_factory, char_tokenizer, conversational_dataset,
                                                    tiny_config):
    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without a GPU")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = GRPOTrainer(tiny_model_factory(), content_reward, args=tiny_config(use_vllm=True, max_steps=2),
                        train_dataset=conversational_dataset, processing_class=char_tokenizer)
        t.train()
    vllm_warnings = [w for w in caught if "use_vllm" in str(w.message)]
    assert len(vllm_warnings) == 1, [str(w.message) for w in caught]
    assert "transformers" in str(vllm_warnings[0].message)
    assert t.state.global_step == 2
    assert type(t._get_generator()).__name__ == "HFGenerator"


def test_push_to_hub_without_network_keeps_model(tiny_model_factory, char_tokenizer, conversational_dataset,
                                                 tiny_config, monkeypatch, capfd):
    import huggingface_hub

    unreachable = "http://127.0.0.1:9"  # the discard port: connection refused at once
    monkeypatch.setenv("HF_ENDPOINT", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", unreachable)  # read at import; set for this process
    cfg = tiny_config(push_to_hub=True, hub_model_id="someone/tiny-grpo", hub_token="hf_not_a_real_token")
    t = GRPOTrainer(tiny_model_factory(), content_reward, args=cfg, train_dataset=conversational_dataset,
                    processing_class=char_tokenizer)
    start = time.perf_counter()
    out = t.train()
    assert out.global_step == 2 and time.perf_counter() - start < 60
    files = set(os.listdir(cfg.output_dir))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    msg = t.push_error
    assert "someone/tiny-grpo" in msg and "saved locally" in msg and os.path.abspath(cfg.output_dir) in msg
    assert msg in capfd.readouterr().err
    command = re.search(r"push it later with `([^`]+)`", msg).group(1)  # the suggested command exists on this machine
    exe = command.split()[0]
    assert shutil.which(exe) or shutil.which(exe, path=os.path.dirname(sys.executable)), command
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(cfg.output_dir)
    for k, v in t.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


TRACKIO_CHILD = textwrap.dedent('''
    import json, sys, warnings

    import datasets

    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2

    out = sys.argv[1]
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    data = datasets.Dataset.from_list([{"prompt": f"Say {i}:"} for i in range(4)])

    def reward(completions, **kw):
        return [(sum(map(ord, c)) % 13) / 13.0 for c in completions]

    cfg = GRPOConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, num_generations=2,
                     max_completion_length=8, save_strategy="no", disable_tqdm=True, torch_threads=1, logging_steps=1,
                     report_to="trackio", trackio_space_id="nobody/no-such-space", project="fastgrpo-test",
                     run_name="offline-run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = GRPOTrainer(model, reward, args=cfg, train_dataset=data, processing_class=tok).train()
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("fastgrpo-test", "offline-run")
    print("RESULT " + json.dumps({"global_step": result.global_step,
                                  "warnings": [str(w.message) for w in caught if "trackio" in str(w.message).lower()],
                                  "logs": [{"step": l["step"], "reward": l.get("reward")} for l in logs]}))
''')


def test_trackio_space_without_network_logs_locally(tmp_path):
    script = tmp_path / "trackio_child.py"
    script.write_text(TRACKIO_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRACKIO_DIR": str(tmp_path / "trackio"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token", "HF_HUB_DISABLE_TELEMETRY": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("TRACKIO_SPACE_ID", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["global_step"] == 2
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "nobody/no-such-space" in result["warnings"][0] and "locally" in result["warnings"][0]
    metrics = read_metrics(str(tmp_path / "run"))
    local = {l["step"]: l["reward"] for l in result["logs"] if l["reward"] is not None}
    assert sorted(local) == [1, 2]
    for m in metrics:
        assert local[m["step"]] == pytest.approx(m["reward"])
    assert any(p.endswith(".db") for p in os.listdir(tmp_path / "trackio"))


# ------------------------------------------------------------------------------------------ (k) reproducible
def test_seeded_run_is_reproducible(tiny_model_factory, char_tokenizer, conversational_dataset, tiny_config,
                                    tmp_path):
    def run(seed, name):
        t = GRPOTrainer(tiny_model_factory(), content_reward,
                        args=tiny_config(seed=seed, max_steps=3, output_dir=str(tmp_path / name)),
                        train_dataset=conversational_dataset, processing_class=char_tokenizer,
                        peft_config=lora_config())
        t.train()
        return weights(t.model), [drop_timing(m) for m in read_metrics(t.args.output_dir)]

    w1, m1 = run(0, "one")
    w2, m2 = run(0, "two")
    assert_same_weights(w1, w2)
    assert m1 == m2
    w3, m3 = run(1, "other-seed")
    assert m3 != m1 and any(not torch.equal(w1[k], w3[k]) for k in w1)


# ------------------------------------------------------------------------------------ packing in the trainer
def test_micro_batch_tokens_does_not_change_training(tiny_model_factory, char_tokenizer, conversational_dataset,
                                                     tiny_config, tmp_path):
    """Packing passes by a token budget leaves the first step's loss and gradient norm unchanged (later steps
    sample from slightly different fp32 weights, so only step 1 is compared); with a top-entropy mask, whose
    quantile is per micro-batch, the budget is not used and runs are bit-identical."""
    def run(name, **kw):
        t = GRPOTrainer(tiny_model_factory(), content_reward,
                        args=tiny_config(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                         gradient_accumulation_steps=2, max_completion_length=12, **kw),
                        train_dataset=conversational_dataset, processing_class=char_tokenizer)
        t.train()
        return weights(t.model), read_metrics(t.args.output_dir)

    _, plain = run("plain", max_steps=1)
    _, packed = run("packed", max_steps=1, micro_batch_tokens=200)
    for key in ("loss", "grad_norm", "entropy", "clip_ratio", "reward"):
        assert packed[0][key] == pytest.approx(plain[0][key], rel=1e-5, abs=1e-7), key

    w_plain, m_plain = run("entropy-plain", top_entropy_quantile=0.5)
    w_packed, m_packed = run("entropy-packed", top_entropy_quantile=0.5, micro_batch_tokens=200)
    assert_same_weights(w_plain, w_packed)
    assert [drop_timing(m) for m in m_plain] == [drop_timing(m) for m in m_packed]


def test_dispatch_hooks_are_removed_also_under_a_peft_wrapper():
    """device_map="auto" under torchrun leaves accelerate dispatch hooks on the model's modules; the trainer removes
    them. Through a PeftModel, whose attribute reads fall through to the wrapped model, this once failed on GPUs."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from peft import LoraConfig, get_peft_model

    from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2
    from fastgrpo.loading import gather_dispatched as _gather_dispatched

    model = build_tiny_qwen2(build_char_tokenizer())
    for module in (model, *model.model.layers):  # dispatch_model hooks the top-level model too
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu"))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[1, 2, 3]])
    before = peft(input_ids=ids).logits
    _gather_dispatched(peft, torch.device("cpu"))
    assert not [m for m in peft.modules() if "_hf_hook" in vars(m)]
    torch.testing.assert_close(peft(input_ids=ids).logits, before)


def test_accuracy_reward_works_outside_the_main_thread():
    """math-verify's alarm-based timeouts only exist in the main thread; TRL's async rollout worker (and users' thread
    pools) call reward functions from other threads, where they must still score (seen on 4x H200)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastgrpo.rewards import accuracy_reward

    completions = [[{"content": "<think>x</think><answer>$\\frac{1}{2}$</answer>"}], [{"content": "<answer>3</answer>"}]]
    solution = ["so $\\boxed{\\frac{1}{2}}$", "so $\\boxed{0.5}$"]
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(accuracy_reward, completions, solution).result() == [1.0, 0.0]
    assert accuracy_reward(completions, solution) == [1.0, 0.0]


def test_accuracy_reward_parses_each_distinct_solution_once(monkeypatch):
    """A group's G completions share one solution; scoring a batch equals scoring each completion alone."""
    import math_verify

    from fastgrpo.rewards import accuracy_reward

    answers = ["<answer>$\\frac{1}{2}$</answer>", "<answer>0.5</answer>", "<answer>$3$</answer>", "no answer"]
    solutions = ["so $\\boxed{\\frac{1}{2}}$", "so $\\boxed{3}$", "no math here"]  # the last is unparsable: 1.0
    completions = [[{"content": a}] for _ in solutions for a in answers]
    solution = [s for s in solutions for _ in answers]
    alone = [accuracy_reward([c], [s])[0] for c, s in zip(completions, solution)]
    real, parsed = math_verify.parse, []
    monkeypatch.setattr(math_verify, "parse", lambda text, **kw: parsed.append(text) or real(text, **kw))
    assert accuracy_reward(completions, solution) == alone
    assert alone[:4] == [1.0, 0.0, 0.0, 0.0] and alone[6] == 1.0  # 1/2 right (0.5 has no LaTeX), 3 right
    assert alone[8:] == [1.0] * 4  # an unparsable gold scores every completion 1.0
    assert sorted(t for t in parsed if t in solutions) == sorted(solutions)


def test_auto_token_budget_follows_free_memory_and_model_size():
    """micro_batch_tokens=None on a GPU: capped where larger passes stop paying, lower when memory is short, and
    lower for a larger model at the same free memory."""
    from transformers import Qwen2Config

    from fastgrpo.trainer import AUTO_GPU_TOKEN_BUDGET, MIN_GPU_TOKEN_BUDGET, activation_bytes_per_token, auto_token_budget

    small = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24)
    big = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28)
    per_token = activation_bytes_per_token(small)
    assert 24 * (8 * 896 + 4 * 4864) * 2 <= per_token <= 8 * 24 * (8 * 896 + 4 * 4864)  # a bf16 estimate, with margin
    gib = 1 << 30
    budgets = [auto_token_budget(small, f * gib) for f in (1, 8, 20, 40, 130)]
    assert budgets == sorted(budgets) and budgets[0] == MIN_GPU_TOKEN_BUDGET and budgets[-1] == AUTO_GPU_TOKEN_BUDGET
    assert all(b % 1024 == 0 for b in budgets)
    mid = auto_token_budget(small, 20 * gib)
    assert MIN_GPU_TOKEN_BUDGET < mid < AUTO_GPU_TOKEN_BUDGET and mid * per_token <= 10 * gib  # half the free memory
    assert auto_token_budget(big, 40 * gib) < auto_token_budget(small, 40 * gib)


def test_vllm_context_without_max_prompt_length_is_the_longest_prompt_plus_completions(
        tiny_model_factory, char_tokenizer, conversational_dataset, tiny_config):
    """max_prompt_length=None keeps every prompt; colocated vLLM then gets the longest prompt (training and eval
    data) + max_completion_length as its context instead of the model's whole context."""
    longest_eval = conversational_dataset.select([0]).map(
        lambda r: {"prompt": [{"role": "user", "content": r["prompt"][0]["content"] * 9}]})
    trainer = GRPOTrainer(tiny_model_factory(), content_reward, args=tiny_config(max_prompt_length=None),
                          train_dataset=conversational_dataset, eval_dataset=longest_eval,
                          processing_class=char_tokenizer)
    lengths = [len(p.ids) for p in [*trainer.train_prompts, *trainer.eval_prompts]]
    assert max(lengths) == len(trainer.eval_prompts[0].ids) > max(len(p.ids) for p in trainer.train_prompts)
    assert trainer._unbounded_context() == max(lengths) + trainer.args.max_completion_length
    for bounded in ({"max_prompt_length": 64}, {"max_prompt_length": None, "vllm_max_model_length": 300}):
        t = GRPOTrainer(tiny_model_factory(), content_reward, args=tiny_config(**bounded),
                        train_dataset=conversational_dataset, processing_class=char_tokenizer)
        assert t._unbounded_context() is None  # the config bounds it
