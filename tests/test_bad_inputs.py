"""Every bad input explained (issue #8): each case raises an error that names the problem (field, function, row)
and the fix, and, where the input can be checked without a model, raises it before any model or tokenizer is
loaded. `no_loading` turns loading into a test failure, so "before any model load" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
import torch

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.checkpoint import STATE_FILE, CheckpointError
from fastgrpo.config import ConfigError
from fastgrpo.data import DataError
from fastgrpo.rewards import RewardError, resolve_reward, score
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2

MISSING_MODEL = "/nonexistent/models/tiny-qwen2"
DATA = [{"prompt": f"Q{i}: 1+{i}=", "solution": str(i + 1)} for i in range(4)]
SMALL = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_steps=1,
             disable_tqdm=True, save_strategy="no")


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture
def no_loading(monkeypatch):
    """Any tokenizer or model load fails the test: the error under test must come first."""
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError(f"a model or tokenizer was loaded before the bad input was reported: {args[:1]}")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", forbidden)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture
def tiny(tok):
    return build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, field, hint", [
    ({"lerning_rate": 1e-5}, "lerning_rate", "learning_rate"),
    ({"num_generation": 4}, "num_generation", "num_generations"),
    ({"max_completion_lenght": 64}, "max_completion_lenght", "max_completion_length"),
])
def test_unknown_config_field_suggests_closest(kwargs, field, hint):
    with pytest.raises(ConfigError, match=rf"unknown field '{field}'\. Did you mean '{hint}'\?"):
        GRPOConfig(**kwargs)
    with pytest.raises(ConfigError, match=rf"unknown field '{field}'\. Did you mean '{hint}'\?"):
        GRPOConfig.from_dict(kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": "1e-5"}, r"learning_rate must be a number, got '1e-5' \(str\)\. Fix: write it as a number"),
    ({"num_generations": "eight"}, r"num_generations must be an integer, got 'eight' \(str\)"),
    ({"per_device_train_batch_size": True}, r"per_device_train_batch_size must be an integer, got True"),
    ({"max_steps": 2.5}, r"max_steps must be an integer, got 2\.5"),
    ({"learning_rate": float("nan")}, r"learning_rate must be finite, got nan"),
    ({"reward_weights": [1.0, "x"]}, r"reward_weights must be a list of numbers|reward_weights must be a list of finite"),
])
def test_wrong_type_names_field_and_expected_type(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_generations": 1}, r"num_generations must be >= 2 \(group-relative advantages need a group\), got 1"),
    ({"num_generations": 3, "per_device_train_batch_size": 4},
     r"4 completions per round, which is not a multiple of num_generations=3.*Fix: make per_device_train_batch_size "
     r"\* gradient_accumulation_steps a multiple of 3"),
    ({"num_generations": 8, "per_device_train_batch_size": 4, "generation_batch_size": 12},
     r"12 completions per round, which is not a multiple of num_generations=8.*Fix: make generation_batch_size"),
    ({"max_completion_length": 0}, r"max_completion_length must be > 0, got 0"),
    ({"max_completion_length": -5}, r"max_completion_length must be > 0, got -5"),
    ({"learning_rate": -1e-5}, r"learning_rate must be >= 0, got -1e-05"),
    ({"epsilon": 0.0}, r"epsilon must be > 0, got 0"),
    ({"epsilon": -0.2}, r"epsilon must be > 0, got -0.2"),
    ({"loss_type": "grpoo"}, r"loss_type='grpoo' is not one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo'\. "
                             r"Did you mean 'grpo'\?"),
    ({"vllm_mode": "sever"}, r"vllm_mode='sever' is not one of 'colocate', 'server'\. Did you mean 'server'\?"),
    ({"reward_error": "ignore"}, r"reward_error='ignore' is not one of 'raise', 'zero'"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0"),
    ({"loss_type": "cispo"}, r"loss_type='cispo' caps the ratio at epsilon_high, which is unset\. Fix: set epsilon_high"),
])
def test_out_of_range_names_field_and_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(**{"per_device_train_batch_size": 8, **kwargs})


def test_config_errors_come_before_any_model_load(no_loading):
    # A bad setting together with a model path that does not exist: the setting is reported, nothing is loaded.
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        GRPOTrainer(MISSING_MODEL, reward_len, args=GRPOConfig(num_generations=1), train_dataset=DATA)
    # The trainer's own cross-checks (config against reward functions) also precede every load.
    with pytest.raises(ConfigError, match=r"reward_weights has 2 values for 1 reward functions\. Fix: give one"):
        GRPOTrainer(MISSING_MODEL, reward_len, args=GRPOConfig(reward_weights=[1.0, 2.0], **SMALL),
                    train_dataset=DATA)
    with pytest.raises(RewardError, match=r"reward 'acuracy' is not a built-in.*Did you mean 'accuracy'\?"):
        GRPOTrainer(MISSING_MODEL, "acuracy", args=GRPOConfig(**SMALL), train_dataset=DATA)


# --------------------------------------------------------------------------------------- CLI / YAML
try:
    from fastgrpo import cli
except ImportError:  # the `fastgrpo` command is written in parallel; its tests wait for it
    cli = None
pytestmark_cli = pytest.mark.skipif(not hasattr(cli, "load_run_config"),
                                    reason="fastgrpo.cli.load_run_config(path, overrides) is not there yet")


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


@pytestmark_cli
@pytest.mark.parametrize("text, line", [
    ("model: x\nlearning_rate: 1.0e-5\n  num_generations: 4\n", 3),    # indentation
    ("model: x\nrewards: [format\nlearning_rate: 1.0\n", 3),           # unclosed list
    ("model: x\n\tseed: 1\n", 2),                                      # a tab
])
def test_malformed_yaml_names_file_and_line(tmp_path, no_loading, text, line):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{path}: line {line}, column \d+: malformed YAML"):
        cli.load_run_config(path, [])


@pytestmark_cli
def test_yaml_unknown_field_before_model_load(tmp_path, no_loading):
    path = _yaml(tmp_path, f"model: {MISSING_MODEL}\nlerning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"unknown field 'lerning_rate'\. Did you mean 'learning_rate'\?"):
        cli.load_run_config(path, [])
    path = _yaml(tmp_path, "modle: x\n")
    with pytest.raises(ConfigError, match=r"unknown field 'modle'\. Did you mean 'model'\?"):
        cli.load_run_config(path, [])
    path = _yaml(tmp_path, "model: x\ndataset: {path: d.jsonl, splt: train}\n")
    with pytest.raises(ConfigError, match=r"dataset: unknown key 'splt'.*Did you mean 'split'\?"):
        cli.load_run_config(path, [])


@pytestmark_cli
def test_yaml_wrong_type_and_range(tmp_path, no_loading):
    path = _yaml(tmp_path, f"model: {MISSING_MODEL}\nlearning_rate: 1e-5\n")   # YAML 1.1 reads 1e-5 as text...
    assert cli.load_run_config(path, [])[0].learning_rate == 1e-5            # ...which is taken as the number
    path = _yaml(tmp_path, f"model: {MISSING_MODEL}\nlearning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"learning_rate must be a number, got 'fast'"):
        cli.load_run_config(path, [])
    path = _yaml(tmp_path, f"model: {MISSING_MODEL}\nnum_generations: 1\n")
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        cli.load_run_config(path, [])


@pytestmark_cli
def test_command_line_overrides_checked(tmp_path, no_loading):
    path = _yaml(tmp_path, "model: x\n")
    with pytest.raises(ConfigError, match=r"unknown field 'num_generation'\. Did you mean 'num_generations'\?"):
        cli.load_run_config(path, ["--num_generation", "4"])
    with pytest.raises(ConfigError, match=r"--seed needs a value"):
        cli.load_run_config(path, ["--seed"])
    with pytest.raises(ConfigError, match=r"epsilon must be > 0, got -1"):
        cli.load_run_config(path, ["--epsilon", "-1"])
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml' does not exist"):
        cli.load_run_config(str(tmp_path / "missing.yaml"), [])


@pytestmark_cli
def test_cli_reports_config_error_and_exits_2(tmp_path, no_loading, capsys):
    path = _yaml(tmp_path, f"model: {MISSING_MODEL}\nloss_type: grpoo\n")
    assert cli.main(["train", path]) == 2
    err = capsys.readouterr().err
    assert "loss_type='grpoo' is not one of" in err and "Did you mean 'grpo'?" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- dataset
def test_dataset_without_prompt_column_before_any_load(no_loading):
    with pytest.raises(DataError, match=r"train_dataset has no 'prompt' column \(columns: \['question', 'answer'\]\)"
                                        r".*add it, e\.g\. dataset\.map"):
        GRPOTrainer(MISSING_MODEL, reward_len, args=GRPOConfig(**SMALL),
                    train_dataset=[{"question": "1+1?", "answer": "2"}])
    with pytest.raises(DataError, match=r"eval_dataset has no 'prompt' column"):
        GRPOTrainer(MISSING_MODEL, reward_len, args=GRPOConfig(**SMALL), train_dataset=DATA,
                    eval_dataset=[{"question": "1+1?"}])


@pytest.mark.parametrize("prompt, message", [
    ("", r"train_dataset row 2: the prompt is empty\. Fix: drop the row"),
    ("   \n", r"train_dataset row 2: the prompt is empty"),
    ([], r"train_dataset row 2: the prompt is an empty list of messages\. Fix:"),
    (None, r"train_dataset row 2: prompt must be a string or a list of \{'role', 'content'\} messages, got NoneType"),
    (42, r"train_dataset row 2: prompt must be a string .* got int 42"),
])
def test_empty_or_invalid_prompt_names_row(no_loading, prompt, message):
    data = [{"prompt": "ok"}, {"prompt": "fine"}, {"prompt": prompt}, {"prompt": "ok"}]
    with pytest.raises(DataError, match=message):
        GRPOTrainer(MISSING_MODEL, reward_len, args=GRPOConfig(**SMALL), train_dataset=data)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "usr", "content": "hi"}], r"row 1: message 0 has unknown role 'usr'; expected one of .*Did you mean 'user'\?"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": ["a", "b"]}],
     r"row 1: message 1 \(user\) content must be a string, got list \['a', 'b'\]\. Fix: join text parts"),
    ([{"role": "user", "content": None}], r"row 1: message 0 \(user\) content must be a string, got NoneType"),
    ([{"role": "user"}], r"row 1: message 0 must be a dict with 'role' and 'content', got \{'role': 'user'\}"),
    ([{"role": "user", "content": "hi"}, "and then?"], r"row 1: message 1 must be a dict with 'role' and 'content'"),
])
def test_malformed_messages_name_row_and_message(no_loading, messages, message):
    data = [{"prompt": [{"role": "user", "content": "fine"}]}, {"prompt": messages}]
    with pytest.raises(DataError, match=message):
        GRPOTrainer(MISSING_MODEL, reward_len, args=GRPOConfig(**SMALL), train_dataset=data)


def test_empty_dataset():
    with pytest.raises(DataError, match="train_dataset is empty"):
        GRPOTrainer(MISSING_MODEL, reward_len, args=GRPOConfig(**SMALL), train_dataset=[])


def test_conversational_data_with_tokenizer_without_chat_template(tiny):
    tok = build_char_tokenizer()
    tok.chat_template = None
    data = [{"prompt": [{"role": "user", "content": "1+1?"}]}] * 2
    with pytest.raises(DataError, match=r"conversational prompts but the tokenizer has no chat template\. Fix: set "
                                        r"tokenizer\.chat_template, or give plain-text prompts"):
        GRPOTrainer(tiny, reward_len, args=GRPOConfig(**SMALL), train_dataset=data, processing_class=tok)


# ------------------------------------------------------------------------------------------ model path
@pytest.mark.parametrize("path", [MISSING_MODEL, "./models/not-here", "~/not-here/model"])
def test_missing_model_path_before_any_load(no_loading, path):
    with pytest.raises(ConfigError, match=rf"model path '{re.escape(path)}' does not exist\. Fix: check the path"):
        GRPOTrainer(path, reward_len, args=GRPOConfig(**SMALL), train_dataset=DATA)


def test_folder_that_is_not_a_model(no_loading, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"holds no config\.json: it is not a saved model\. Fix: pass the folder"):
        GRPOTrainer(str(tmp_path), reward_len, args=GRPOConfig(**SMALL), train_dataset=DATA)
    with pytest.raises(ConfigError, match=r"is a file; pass the folder that holds it"):
        GRPOTrainer(str(tmp_path / "notes.txt"), reward_len, args=GRPOConfig(**SMALL), train_dataset=DATA)


# ------------------------------------------------------------------------------------- reward functions
def _batch(n: int = 4):
    completions = [f"answer {'x' * i}" for i in range(n)]
    return {"prompts": ["q"] * n, "completions": completions, "completion_ids": [[1]] * n,
            "solution": ["1"] * n, "trainer_state": None}


def named(fn, name):
    fn.__name__ = name
    return fn


@pytest.mark.parametrize("fn, message", [
    (named(lambda completions, **kw: [1.0] * 3, "too_short"),
     r"reward function 'too_short' returned 3 values for 4 completions; it must return exactly one per completion"),
    (named(lambda completions, **kw: [1.0, 0.0, float("nan"), 1.0], "nan_reward"),
     r"reward function 'nan_reward' returned nan for sample 2; rewards must be finite \(use None for 'not applicable'\)"),
    (named(lambda completions, **kw: [1.0, float("inf"), 0.0, 1.0], "inf_reward"),
     r"reward function 'inf_reward' returned inf for sample 1; rewards must be finite"),
    (named(lambda completions, **kw: ["high", 1.0, 0.0, 1.0], "text_reward"),
     r"reward function 'text_reward' returned 'high' for sample 0; rewards must be numbers or None"),
    (named(lambda completions, **kw: "1.0", "not_a_list"),
     r"reward function 'not_a_list' returned str; it must return a list of 4 floats"),
    (named(lambda completions, **kw: None, "returns_nothing"),
     r"reward function 'returns_nothing' returned NoneType; it must return a list of 4 floats"),
    (named(lambda completions, **kw: torch.ones(4, 1), "column"),
     r"reward function 'column' returned a Tensor of shape \[4, 1\]; it must hold one value per completion \(4\)"),
    (named(lambda completions, **kw: [10**400] * 4, "huge"),
     r"reward function 'huge' returned an integer too large for a float for sample 0"),
])
def test_bad_reward_output_names_function_and_sample(fn, message):
    with pytest.raises(RewardError, match=message):
        score([resolve_reward(fn)], _batch(), 4)


def picky(completions, solution, **kwargs):
    out = []
    for c in completions:
        if c.endswith("xx"):
            raise ValueError(f"cannot parse {c!r}")
        out.append(1.0)
    return out


def test_reward_exception_names_function_sample_and_error():
    with pytest.raises(RewardError) as e:
        score([resolve_reward(reward_len), resolve_reward(picky)], _batch(), 4)
    msg = str(e.value)
    assert "reward function 'picky' raised ValueError: cannot parse 'answer xx'" in msg
    assert "on sample 2 (completion 'answer xx')" in msg
    assert "set reward_error='zero' to score failures 0" in msg
    assert isinstance(e.value.__cause__, ValueError)


def test_reward_exception_scored_zero_on_request():
    out = score([resolve_reward(reward_len), resolve_reward(picky)], _batch(), 4, on_error="zero")
    rewards, failures = out.rewards, out.failures
    assert failures == 1
    assert rewards[:, 1].tolist() == [0.0] * 4 and rewards[:, 0].tolist() == [7.0, 8.0, 9.0, 10.0]


def hangs(completions, **kwargs):
    time.sleep(60)
    return [0.0] * len(completions)


async def hangs_async(completions, **kwargs):
    await asyncio.sleep(60)
    return [0.0] * len(completions)


@pytest.mark.parametrize("fn", [hangs, hangs_async], ids=["sync", "async"])
def test_hanging_reward_stopped_by_timeout(fn):
    t = time.monotonic()
    with pytest.raises(RewardError, match=rf"reward function '{fn.__name__}' took longer than reward_timeout=0\.5s "
                                          r"on a batch of 4 completions\. Make it faster, raise reward_timeout"):
        score([resolve_reward(reward_len), resolve_reward(fn)], _batch(), 4, timeout=0.5)
    assert time.monotonic() - t < 10
    out = score([resolve_reward(fn)], _batch(), 4, timeout=0.5, on_error="zero")
    assert out.failures == 1 and out.rewards.tolist() == [[0.0]] * 4


def test_reward_own_timeout_error_is_not_blamed_on_reward_timeout():
    def flaky_api(completions, **kwargs):
        raise TimeoutError("grader service did not answer")

    with pytest.raises(RewardError, match=r"'flaky_api' raised TimeoutError: grader service did not answer on sample 0"):
        score([resolve_reward(flaky_api)], _batch(), 4, timeout=30)


def test_bad_reward_surfaces_from_training(tiny, tok, tmp_path):
    """Through the whole trainer: the first round's scoring stops the run with the function's name and the fix."""
    trainer = GRPOTrainer(tiny, [reward_len, hangs], args=GRPOConfig(output_dir=str(tmp_path), reward_timeout=0.5,
                                                                     **SMALL),
                          train_dataset=DATA, processing_class=tok)
    t = time.monotonic()
    with pytest.raises(RewardError, match=r"reward function 'hangs' took longer than reward_timeout=0\.5s"):
        trainer.train()
    assert time.monotonic() - t < 30
    trainer = GRPOTrainer(tiny, named(lambda completions, **kw: [1.0], "one_value"),
                          args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=DATA, processing_class=tok)
    with pytest.raises(RewardError, match=r"'one_value' returned 1 values for 4 completions"):
        trainer.train()


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint-1 from one training step of the tiny model."""
    out = tmp_path_factory.mktemp("ckpt")
    tok = build_char_tokenizer()
    trainer = GRPOTrainer(build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward_len,
                          args=GRPOConfig(output_dir=str(out), **{**SMALL, "save_strategy": "steps", "save_steps": 1}),
                          train_dataset=DATA, processing_class=tok)
    trainer.train()
    return out / "checkpoint-1"


def _resume(tmp_path, resume, hidden: int = 32, output_dir=None):
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, hidden_size=hidden, intermediate_size=2 * hidden)
    trainer = GRPOTrainer(model, reward_len, args=GRPOConfig(output_dir=str(output_dir or tmp_path / "out"),
                                                             **{**SMALL, "max_steps": 2}),
                          train_dataset=DATA, processing_class=tok)
    trainer.train(resume_from_checkpoint=resume)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_incomplete_checkpoint(checkpoint, tmp_path):
    partial = _copy(checkpoint, tmp_path / "checkpoint-1")
    (partial / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{partial} is incomplete \(no {STATE_FILE}\): it was probably "
                                              r"interrupted while being written\. Resume from an earlier checkpoint"):
        _resume(tmp_path, str(partial))


def test_checkpoint_without_weights(checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "checkpoint-1")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no model weights \(\*\.safetensors\)"):
        _resume(tmp_path, str(broken))


def test_checkpoint_saved_without_training_state(checkpoint, tmp_path):
    light = _copy(checkpoint, tmp_path / "checkpoint-1")
    (light / "training_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"has no training_state\.pt \(saved with save_only_model=True\): it "
                                              r"holds weights only and cannot resume a run"):
        _resume(tmp_path, str(light))


def test_checkpoint_from_another_model(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"was written for another model or adapter \(hidden_size: checkpoint "
                                              r"32, this run 64\)\. Resume with the same model and peft_config, or "
                                              r"start a new output_dir"):
        _resume(tmp_path, str(checkpoint), hidden=64)


def test_missing_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"resume_from_checkpoint='/nonexistent/checkpoint-7' does not exist"):
        _resume(tmp_path, "/nonexistent/checkpoint-7")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".tmp-checkpoint-3").mkdir()      # an interrupted write is not a checkpoint
    with pytest.raises(CheckpointError, match=r"resume_from_checkpoint=True but .*empty holds no complete "
                                              r"checkpoint-N folder"):
        _resume(tmp_path, True, output_dir=tmp_path / "empty")


def test_vllm_temperature_limit():
    with pytest.raises(ConfigError, match=r"temperature=2.5: vLLM samples with temperature <= 2.0"):
        GRPOConfig(use_vllm=True, temperature=2.5)
    assert GRPOConfig(use_vllm=False, temperature=2.5).temperature == 2.5


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
     "its weights cannot be loaded"),
    (lambda d: (d / "training_state.pt").write_bytes(b""), "training_state.pt cannot be read"),
    (lambda d: (d / STATE_FILE).write_text("{not json"), f"{STATE_FILE} is not readable JSON"),
    (lambda d: (d / STATE_FILE).write_text("{}"), f"{STATE_FILE} holds no global_step"),
    (lambda d: (d / STATE_FILE).write_text("[1, 2]"), f"{STATE_FILE} holds no global_step"),
], ids=["weights", "training-state", "json", "empty-state", "list-state"])
def test_damaged_checkpoint_names_itself_and_an_earlier_one(checkpoint, tmp_path, damage, words):
    _copy(checkpoint, tmp_path / "checkpoint-1")
    broken = _copy(checkpoint, tmp_path / "checkpoint-2")
    damage(broken)
    with pytest.raises(CheckpointError, match=rf"checkpoint-2 is damaged: {re.escape(words)}.*Resume from an earlier "
                                              rf"checkpoint, e\.g\. resume_from_checkpoint='.*checkpoint-1'"):
        _resume(tmp_path, str(broken))


def test_checkpoint_of_another_lora_config(tmp_path):
    from peft import LoraConfig

    tok = build_char_tokenizer()

    def run(out, lora, resume=None, steps=1):
        t = GRPOTrainer(build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward_len,
                        args=GRPOConfig(output_dir=str(out), **{**SMALL, "max_steps": steps, "save_strategy": "steps",
                                                                "save_steps": 1}),
                        train_dataset=DATA, processing_class=tok, peft_config=lora)
        t.train(resume_from_checkpoint=resume)

    base = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    run(tmp_path / "a", LoraConfig(**base))
    for change, words in (({"lora_alpha": 64}, "lora.lora_alpha: checkpoint 8, this run 64"),
                          ({"r": 8}, "lora.r: checkpoint 4, this run 8"),
                          ({"target_modules": ["q_proj"]}, "lora.target_modules: .*this run \\['q_proj'\\]"),
                          ({"use_rslora": True}, "lora.use_rslora: checkpoint False, this run True"),
                          ({"use_dora": True}, "lora.use_dora: checkpoint False, this run True"),
                          ({"bias": "all"}, "lora.bias: checkpoint none, this run all"),
                          ({"modules_to_save": ["lm_head"]}, "lora.modules_to_save: checkpoint None, this run \\['lm_head'\\]")):
        with pytest.raises(CheckpointError, match=f"written for another model or adapter \\({words}"):
            run(tmp_path / "b", LoraConfig(**{**base, **change}), resume=str(tmp_path / "a" / "checkpoint-1"), steps=2)


def test_unwritable_output_dir_is_a_config_error(tmp_path, tok, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    trainer = GRPOTrainer(tiny, reward_len, args=GRPOConfig(output_dir=str(blocker / "run"), **SMALL),
                          train_dataset=DATA, processing_class=tok)
    with pytest.raises(ConfigError, match="output_dir=.*file/run' cannot be created"):
        trainer.train()


@pytest.mark.parametrize("fn, words", [
    (named(lambda completions, **kw: [1.0] * 3, "too_short_z"), "returned 3 values for 4 completions"),
    (named(lambda completions, **kw: [1.0, float("nan"), None, 1.0], "nan_z"), "returned nan for sample 1"),
    (named(lambda completions, **kw: [float("inf")] * 4, "inf_z"), "returned inf for sample 0"),
    (named(lambda completions, **kw: None, "nothing_z"), "returned NoneType"),
    (named(lambda completions, **kw: ["high"] * 4, "text_z"), "returned 'high' for sample 0"),
])
def test_unusable_reward_output_scored_zero_on_request(fn, words, caplog):
    """reward_error='zero' covers an unusable result as it covers a raise: that function scores 0 for the whole
    batch, the call is counted and warned of, and the other functions' scores stand."""
    f = resolve_reward(fn)
    with caplog.at_level("WARNING", logger="fastgrpo"):
        out = score([resolve_reward(reward_len), f], _batch(), 4, on_error="zero")
    assert out.failures == 1 and f.failures == 1
    assert out.rewards[:, 1].tolist() == [0.0] * 4 and out.rewards[:, 0].tolist() == [7.0, 8.0, 9.0, 10.0]
    assert f"reward function '{fn.__name__}' failed" in caplog.text and words in caplog.text
    assert "scored 0 (reward_error='zero')" in caplog.text


def test_unusable_reward_output_does_not_stop_a_zero_mode_run(tiny, tok, tmp_path):
    trainer = GRPOTrainer(tiny, [reward_len, named(lambda completions, **kw: [1.0], "one_value_z")],
                          args=GRPOConfig(output_dir=str(tmp_path), reward_error="zero", **SMALL), train_dataset=DATA,
                          processing_class=tok)
    assert trainer.train().global_step == 1
    logged = [h for h in trainer.state.log_history if "rewards/failures" in h]
    assert logged and logged[0]["rewards/failures"] == 1.0 and logged[0]["rewards/one_value_z/mean"] == 0.0
