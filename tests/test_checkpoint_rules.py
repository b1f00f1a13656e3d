"""Which checkpoints a run writes and keeps: the final state under every save_strategy, rotation that never
deletes the checkpoint just written nor another run's, fractional save_steps, and a reward failure mid-run."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.checkpoint import list_checkpoints
from fastgrpo.loop import TrainingStopped
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2

DATA = [{"prompt": f"Q{i}: 1+{i}=", "solution": str(i + 1)} for i in range(8)]
SMALL = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=8, disable_tqdm=True,
             report_to="none", use_vllm=False)


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _trainer(out, reward=reward_len, data=DATA, **cfg):
    tok = build_char_tokenizer()
    return GRPOTrainer(build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward,
                       args=GRPOConfig(output_dir=str(out), **{**SMALL, **cfg}), train_dataset=data,
                       processing_class=tok)


def _names(out):
    return [os.path.basename(c) for c in list_checkpoints(str(out))]


def test_epoch_strategy_saves_the_final_step(tmp_path):
    """8 prompts, 2 prompts a step: an epoch is 4 steps; 6 steps end mid-epoch and must still be saved."""
    _trainer(tmp_path, max_steps=6, save_strategy="epoch", save_steps=2).train()
    assert _names(tmp_path) == ["checkpoint-4", "checkpoint-6"]


def test_rotation_keeps_the_new_checkpoint_and_leaves_another_runs_alone(tmp_path):
    _trainer(tmp_path / "other", max_steps=1, save_strategy="steps", save_steps=1).train()
    shutil.copytree(tmp_path / "other" / "checkpoint-1", tmp_path / "run" / "checkpoint-1000")
    _trainer(tmp_path / "run", max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1).train()
    assert _names(tmp_path / "run") == ["checkpoint-3", "checkpoint-1000"]


def test_fractional_save_steps_are_a_share_of_the_run(tmp_path):
    _trainer(tmp_path, max_steps=8, save_strategy="steps", save_steps=0.25).train()
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]


def _failing_from_call(n: int):
    """A reward function whose grader goes down at its n-th call (round n: n - 1 steps done)."""
    calls = []

    def grader(completions, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            raise ConnectionError("grader API down")
        return [1.0] * len(completions)
    return grader


def test_a_reward_that_raises_mid_run_leaves_a_checkpoint_of_the_last_step(tmp_path):
    grader = _failing_from_call(3)
    with pytest.raises(TrainingStopped, match=r"'grader' raised ConnectionError: grader API down.*A checkpoint was "
                                              r"saved to .*checkpoint-2; resume with resume_from_checkpoint=True"):
        _trainer(tmp_path, reward=grader, max_steps=6, save_strategy="steps", save_steps=100).train()
    assert _names(tmp_path) == ["checkpoint-2"]
    _trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=100).train(resume_from_checkpoint=True)
    assert _names(tmp_path)[-1] == "checkpoint-3"


def test_the_step_that_stops_a_run_for_non_finite_values_is_logged(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, max_consecutive_nonfinite=2, save_strategy="no")
    trainer.model.model.embed_tokens.weight.register_hook(lambda g: g * float("inf"))
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(TrainingStopped):
        trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "grad_norm" in r] == [1, 2]


def test_a_stop_under_save_only_model_leaves_a_checkpoint_that_resumes(tmp_path):
    grader = _failing_from_call(3)
    with pytest.raises(TrainingStopped, match="checkpoint-2"):
        _trainer(tmp_path, reward=grader, max_steps=6, save_strategy="steps", save_steps=2,
                 save_only_model=True).train()
    assert (tmp_path / "checkpoint-2" / "training_state.pt").is_file()
    out = _trainer(tmp_path, max_steps=3, save_strategy="no").train(resume_from_checkpoint=True)
    assert out.global_step == 3


def test_resuming_with_other_run_settings_says_which(tmp_path, caplog):
    import logging

    _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        _trainer(tmp_path, max_steps=3, save_strategy="no", learning_rate=5e-6,
                 num_generations=4).train(resume_from_checkpoint=True)
    assert "settings other than checkpoint-2" in caplog.text
    assert "num_generations 2 -> 4" in caplog.text and "learning_rate 1e-06 -> 5e-06" in caplog.text


def test_save_model_under_a_file_is_a_clear_error(tmp_path):
    from fastgrpo.config import ConfigError

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="save_model: .*file/model' cannot be created"):
        _trainer(tmp_path / "run", max_steps=1).save_model(str(tmp_path / "file" / "model"))


def test_a_new_run_in_a_used_output_dir_keeps_the_earlier_metrics(tmp_path):
    _trainer(tmp_path, max_steps=2, save_strategy="no").train()
    first = (tmp_path / "metrics.jsonl").read_text()
    _trainer(tmp_path, max_steps=1, save_strategy="no").train()
    assert (tmp_path / "metrics.1.jsonl").read_text() == first
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    _trainer(tmp_path, max_steps=1, save_strategy="no").train()
    assert (tmp_path / "metrics.1.jsonl").read_text() == first and (tmp_path / "metrics.2.jsonl").is_file()
