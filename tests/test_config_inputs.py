"""Config and command-line inputs as users type them: YAML's bare `no`, what argument parsers hand over for
--fsdp and --resume_from_checkpoint, ranges of optimizer and sampling settings, generation_kwargs that contradict
the trainer's own fields, and the CLI's set-up errors as one line each."""

from __future__ import annotations

import pytest
import yaml

from fastgrpo import GRPOConfig, cli
from fastgrpo.config import ConfigError
from fastgrpo.data import DataError, load_dataset_spec
from fastgrpo.testing import make_numina_like_dataset, save_tiny_model


def cfg(**kw):
    return GRPOConfig(output_dir="/tmp/fastgrpo-test-config", **kw)


def test_values_as_parsers_and_yaml_deliver_them():
    from transformers import HfArgumentParser

    (p,) = HfArgumentParser((GRPOConfig,)).parse_args_into_dataclasses([
        "--output_dir", "/tmp/o", "--fsdp", "full_shard auto_wrap", "--resume_from_checkpoint", "true",
        "--vllm_kv_cache_memory_bytes", "None"])
    assert p.fsdp_mode == "full_shard" and p.resume_from_checkpoint is True and p.vllm_kv_cache_memory_bytes is None
    y = yaml.safe_load("save_strategy: no\neval_strategy: no\n")
    assert y == {"save_strategy": False, "eval_strategy": False}
    c = cfg(**y)
    assert (c.save_strategy, c.eval_strategy) == ("no", "no")


@pytest.mark.parametrize("bad, words", [
    ({"adam_beta1": 1.5}, "adam_beta1 must be in [0, 1)"), ({"adam_beta2": -1.0}, "adam_beta2 must be in [0, 1)"),
    ({"adam_epsilon": 0.0}, "adam_epsilon must be > 0"), ({"min_p": 1.5}, "min_p must be in [0, 1]"),
    ({"seed": 2**63}, "seed must be in [0, 2**32)"), ({"vllm_model_impl": "foo"}, "vllm_model_impl='foo'"),
    ({"vllm_importance_sampling_clip_min": 5.0, "vllm_importance_sampling_clip_max": 2.0}, "is above"),
    ({"vllm_group_port": 70000}, "vllm_group_port must be in 1..65535"),
    ({"save_strategy": True}, "save_strategy=True: write one of"),
    ({"generation_kwargs": '{"max_new_tokens": 4}'}, "the trainer sets it from max_completion_length"),
    ({"generation_kwargs": {"temperature": 0.5}}, "the trainer sets it from temperature"),
    ({"generation_kwargs": {"min_tokens": 4}}, "Did you mean 'min_new_tokens'?"),
])
def test_out_of_range_and_contradicting_settings(bad, words):
    with pytest.raises(ConfigError, match=__import__("re").escape(words)):
        cfg(**bad)
    assert cfg(generation_kwargs={"min_new_tokens": 2}).generation_kwargs == {"min_new_tokens": 2}
    assert cfg(use_vllm=True, generation_kwargs={"min_tokens": 2}).generation_kwargs == {"min_tokens": 2}


def test_a_local_file_has_one_split(tmp_path):
    path = make_numina_like_dataset(str(tmp_path / "d.jsonl"), 20)
    assert len(load_dataset_spec(path, "train")) == 20 and len(load_dataset_spec(path, "train[:10%]")) == 2
    with pytest.raises(DataError, match="one split, 'train'.*split 'test' cannot be read"):
        load_dataset_spec(path, "test")


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(str(d / "tiny"))
    data = make_numina_like_dataset(str(d / "d.jsonl"), 16)
    path = d / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": model, "dataset": {"path": data, "prompt_column": "problem"}, "max_steps": 1,
        "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8, "report_to": "none",
        "disable_tqdm": True, "output_dir": str(d / "out")}) + "save_strategy: no\n")
    return path


@pytest.mark.parametrize("args, words", [
    (["--max_steps", "1", "{cfg}"], "put the config file first"),
    (["{cfg}", "--dataset.path", "/nonexistent/d.jsonl"], "setting up the run failed: FileNotFoundError"),
    (["{cfg}", "--peft", "true"], "peft must be a mapping of LoraConfig arguments"),
    (["{cfg}", "--peft", "{r: 8, lora_alfa: 16}"], "Did you mean 'lora_alpha'?"),
    (["{cfg}", "--rewards", "5"], "rewards must be a list of names"),
    (["{dir}"], "cannot be read as YAML text (IsADirectoryError"),
])
def test_cli_set_up_errors_are_one_line(run_yaml, capsys, args, words):
    args = [a.replace("{cfg}", str(run_yaml)).replace("{dir}", str(run_yaml.parent)) for a in args]
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_cli_trains_from_yaml_with_bare_no_and_without_a_config_file(run_yaml, capsys):
    assert cli.main(["train", str(run_yaml)]) == 0
    spec = yaml.safe_load(run_yaml.read_text())
    assert cli.main(["train", "--model", spec["model"], "--dataset", f"{{path: {spec['dataset']['path']}, "
                     "prompt_column: problem}", "--max_steps", "1", "--per_device_train_batch_size", "4",
                     "--num_generations", "2", "--max_completion_length", "8", "--save_strategy", "no",
                     "--report_to", "none", "--disable_tqdm", "true",
                     "--output_dir", str(run_yaml.parent / "out2")]) == 0
    assert '"global_step": 1' in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--generations", "1"], ["--threads", "0"], ["--steps", "0"], ["--lr", "0"]])
def test_demo_checks_its_options_before_the_warm_up(args, capsys):
    from fastgrpo import demo

    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--quick", *args])
    assert e.value.code == 2 and args[0] in capsys.readouterr().err


@pytest.mark.parametrize("bad, words", [
    ({"generation_batch_size": 16, "steps_per_generation": 4, "per_device_train_batch_size": 8}, "set one of them"),
    ({"reward_weights": []}, "reward_weights=[] gives no weight"), ({"save_steps": 1.5}, "must be whole"),
    ({"gradient_checkpointing_kwargs": '{"foo": 1}'}, "['foo'] not among torch.utils.checkpoint's arguments"),
])
def test_more_contradicting_settings(bad, words):
    with pytest.raises(ConfigError, match=__import__("re").escape(words)):
        cfg(**bad)


def test_cli_rewards_as_a_mapping_carry_their_weights(run_yaml):
    config, spec = cli.load_run_config(str(run_yaml), ["--rewards", "{format: 1.0, accuracy: 2.0}"])
    assert spec.rewards == ["format", "accuracy"] and config.reward_weights == [1.0, 2.0]
    with pytest.raises(ConfigError, match="give the weights once"):
        cli.load_run_config(str(run_yaml), ["--rewards", "{format: 1.0}", "--reward_weights", "[1.0]"])


def test_a_key_given_twice_in_the_yaml_is_an_error(run_yaml, tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text(run_yaml.read_text() + "max_steps: 5\n")
    with pytest.raises(ConfigError, match="'max_steps' is given twice"):
        cli.load_run_config(str(twice))
    with pytest.raises(ConfigError, match="'r' is given twice"):
        cli.load_run_config(str(run_yaml), ["--peft", "{r: 8, r: 4}"])
