"""TRL 1.16's GRPOConfig settings that fastgrpo has no field for (fastgrpo.trl_compat): a TRL script or YAML that
sets them runs unchanged where they cannot change what is trained, and stops with a ConfigError naming the field
and the fix where they would."""

from __future__ import annotations

import dataclasses

import pytest

from fastgrpo import GRPOConfig, cli, trl_compat
from fastgrpo.config import FIELD_NAMES, ConfigError


def cfg(**kw):
    return GRPOConfig(output_dir="/tmp/fastgrpo-trl-compat", **kw)


def test_every_trl_setting_is_accepted_at_trls_default_and_reads_back():
    plain = cfg()
    own = set(GRPOConfig.__annotations__)  # fastgrpo's fields; TRL's are inherited from trl_compat.TRLSettings
    assert trl_compat.NAMES <= FIELD_NAMES and not trl_compat.NAMES & own  # one definition per setting
    assert all(f.kw_only for f in dataclasses.fields(GRPOConfig) if f.name in trl_compat.NAMES)
    for name in sorted(trl_compat.NAMES):
        c = cfg(**{name: trl_compat.default(name)})
        assert c.to_dict() == plain.to_dict(), name
        assert getattr(c, name) == trl_compat.default(name) and getattr(plain, name) == trl_compat.default(name)
    # TRL's None ("decide later") for two fields fastgrpo gives a value: fastgrpo's default
    c = cfg(disable_tqdm=None, fsdp=None)
    assert (c.disable_tqdm, c.fsdp) == (plain.disable_tqdm, plain.fsdp)


def test_ignored_settings_take_any_value_and_change_nothing_trained():
    values = {"log_level": "debug", "tf32": True, "dataloader_pin_memory": False,
              "ddp_timeout": 60, "logging_strategy": "epoch", "data_seed": 7, "sapo_temperature_pos": 2.0}
    c = cfg(**values)
    mine = lambda d: {k: v for k, v in d.items() if k not in trl_compat.NAMES}  # noqa: E731
    assert mine(c.to_dict()) == mine(cfg().to_dict())  # nothing fastgrpo trains with moved
    assert {k: getattr(c, k) for k in values} == values


@pytest.mark.parametrize("name,value", [("optim", "sgd"), ("entropy_coef", 0.01), ("use_adaptive_entropy", True),
                                        ("deepspeed", "ds_config.json"), ("lr_scheduler_kwargs", {"num_cycles": 1}),
                                        ("sync_ref_model", True), ("neftune_noise_alpha", 5.0),
                                        ("load_best_model_at_end", True), ("off_policy_mask_threshold", 0.5)])
def test_settings_that_would_change_training_are_refused_naming_the_fix(name, value):
    with pytest.raises(ConfigError, match=rf"^{name}=.*does not implement.*Fix: "):
        cfg(**{name: value})


def test_values_that_mean_trls_default_are_accepted():
    for kw in ({"optim": "adamw_torch"}, {"optim": "adamw_hf"}, {"lr_scheduler_kwargs": {}}, {"entropy_coef": 0},
               {"activation_checkpointing": False}):
        cfg(**kw)
    with pytest.raises(ConfigError, match="entropy_coef"):
        cfg(entropy_coef=1e-3)


def test_unknown_names_still_refused_with_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"unknown field 'optimm'\. Did you mean 'optim'\?"):
        cfg(optimm="adamw_torch")
    with pytest.raises(ConfigError, match=r"unknown field 'lerning_rate'\. Did you mean 'learning_rate'\?"):
        cfg(lerning_rate=1e-5)


def test_yaml_run_config_with_trl_settings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: some/model\nlearning_rate: 2.0e-5\noptim: adamw_torch\nlog_level: info\n"
                    "dataloader_num_workers: 4\nreport_to: none\n")
    config, _ = cli.load_run_config(str(path), [])
    assert config.learning_rate == 2e-5 and config.optim == "adamw_torch" and config.log_level == "info"
    path.write_text("model: some/model\nentropy_coef: 0.1\n")
    with pytest.raises(ConfigError, match="entropy_coef=0.1"):
        cli.load_run_config(str(path), [])


def test_table_matches_trl_when_installed():
    """Where TRL is installed (it is an optional extra): every field of its GRPOConfig is either fastgrpo's own or
    in the table, with the table's default."""
    trl = pytest.importorskip("trl")
    for f in dataclasses.fields(trl.GRPOConfig):
        if f.name in FIELD_NAMES:
            continue
        assert f.name in trl_compat.NAMES, f"TRL {trl.__version__} field {f.name!r} is not covered"
        trl_default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert trl_compat.default(f.name) == trl_default, f.name


def test_trainer_accepts_trls_extra_arguments_as_none_only():
    """GRPOTrainer's TRL-only arguments (tools, rollout_func, environment_factory, quantization_config): None is
    TRL's default and accepted; a value is refused before anything is loaded, naming the argument."""
    from fastgrpo import GRPOTrainer

    def reward(completions, **kw):
        return [0.0] * len(completions)

    none = dict(tools=None, rollout_func=None, environment_factory=None, quantization_config=None)
    with pytest.raises(ConfigError, match=r"unexpected arguments \['foo'\]"):  # the None ones passed
        GRPOTrainer(model="/nonexistent/model", reward_funcs=reward, args=cfg(), foo=1, **none)
    with pytest.raises(ConfigError, match=r"tools= is a TRL argument fastgrpo does not implement .*Fix: remove it"):
        GRPOTrainer(model="/nonexistent/model", reward_funcs=reward, args=cfg(), tools=[reward])


def test_the_end_of_an_open_r1_style_script_runs(tiny_model_factory, char_tokenizer, conversational_dataset,
                                                 tiny_config, capsys):
    """The Trainer calls TRL scripts make after train() (open-r1's grpo.py): log_metrics, save_metrics (split files
    and the merged all_results.json), save_state, save_model, accelerator.is_main_process, create_model_card."""
    import json
    import os

    from conftest import content_reward

    from fastgrpo import GRPOTrainer

    trainer = GRPOTrainer(tiny_model_factory(), content_reward, args=tiny_config(max_steps=2),
                          train_dataset=conversational_dataset, processing_class=char_tokenizer)
    metrics = trainer.train().metrics
    metrics["train_samples"] = len(conversational_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_metrics("eval", {"eval_reward": 0.5})
    trainer.save_state()
    out = trainer.args.output_dir
    trainer.save_model(out)
    assert trainer.accelerator.is_main_process and trainer.accelerator.num_processes == 1
    assert trainer.is_world_process_zero()
    trainer.accelerator.wait_for_everyone()
    trainer.create_model_card(dataset_name="AI-MO/NuminaMath-TIR", tags=["open-r1"])

    printed = capsys.readouterr().out
    assert "***** train metrics *****" in printed and "train_samples" in printed
    with open(os.path.join(out, "train_results.json")) as f:
        assert json.load(f)["train_samples"] == 8
    with open(os.path.join(out, "all_results.json")) as f:
        merged = json.load(f)
    assert merged["eval_reward"] == 0.5 and merged["train_samples"] == 8 and "train_loss" in merged
    with open(os.path.join(out, "trainer_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 2 and state["log_history"][-1]["step"] == 2
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\n") and "AI-MO/NuminaMath-TIR" in card and "- open-r1" in card and "GRPO" in card
    assert os.path.exists(os.path.join(out, "config.json")) or os.path.exists(os.path.join(out, "model.safetensors"))


def test_the_head_of_an_open_r1_style_script_runs(monkeypatch):
    """TrainingArguments' helpers that scripts call on the config: the process's log level, device, n_gpu, ranks,
    main_process_first; under torchrun they follow RANK / LOCAL_RANK / WORLD_SIZE as in transformers."""
    import logging

    import torch

    args = cfg(log_level="info")
    assert args.get_process_log_level() == logging.INFO
    assert args.device == torch.device("cpu") and args.n_gpu == 0  # CPU machine (CI)
    assert (args.process_index, args.local_process_index, args.world_size, args.local_rank) == (0, 0, 1, -1)
    assert args.should_log and args.should_save
    with args.main_process_first(desc="tokenize"):
        pass
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    replica = cfg(log_level="info", log_level_replica="error")
    assert (replica.process_index, replica.local_process_index, replica.world_size) == (3, 1, 4)
    assert not replica.should_log and not replica.should_save
    assert replica.get_process_log_level() == logging.ERROR
    assert isinstance(cfg().get_process_log_level(), int)  # 'passive': transformers' own level


def test_argument_parsers_built_from_the_dataclass_work():
    """TRL's scripts parse their command line with TrlParser((ScriptArguments, GRPOConfig, ModelConfig)), an
    HfArgumentParser: every field of fastgrpo's GRPOConfig must turn into an option, an empty command line must give
    the defaults, and typed values must come through (and validation keep working after the parser has resolved the
    dataclass's field types)."""
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser((GRPOConfig,)).parse_args_into_dataclasses(["--output_dir", "/tmp/o"])
    assert parsed.to_dict() == GRPOConfig(output_dir="/tmp/o").to_dict()
    (parsed,) = HfArgumentParser((GRPOConfig,)).parse_args_into_dataclasses([
        "--output_dir", "/tmp/o", "--learning_rate", "2e-5", "--use_vllm", "--num_generations", "4",
        "--no_shuffle_dataset", "--report_to", "none", "--scale_rewards", "batch", "--vllm_kv_cache_memory_bytes",
        "2000000000", "--fsdp", "full_shard", "--beta", "0.04", "--resume_from_checkpoint", "/tmp/o/checkpoint-2",
        "--model_init_kwargs", '{"torch_dtype": "bfloat16"}', "--liger_kernel_config", '{"rope": false}',
        "--generation_kwargs", '{"min_tokens": 4}', "--chat_template_kwargs", '{"enable_thinking": false}',
        "--gradient_checkpointing_kwargs", '{"use_reentrant": true}'])
    assert (parsed.learning_rate, parsed.use_vllm, parsed.num_generations, parsed.shuffle_dataset) == (2e-5, True, 4,
                                                                                                       False)
    assert (parsed.scale_rewards, parsed.vllm_kv_cache_memory_bytes, parsed.beta) == ("batch", 2_000_000_000, 0.04)
    assert parsed.reporters == [] and parsed.fsdp_mode == "full_shard"
    assert parsed.resume_from_checkpoint == "/tmp/o/checkpoint-2"
    assert parsed.model_init_kwargs == {"dtype": "bfloat16"} and parsed.liger_kernel_config == {"rope": False}
    assert (parsed.generation_kwargs, parsed.chat_template_kwargs, parsed.gradient_checkpointing_kwargs) == (
        {"min_tokens": 4}, {"enable_thinking": False}, {"use_reentrant": True})
    with pytest.raises(ConfigError, match=r"model_init_kwargs='\{torch_dtype: 1\}' is not JSON"):
        cfg(model_init_kwargs="{torch_dtype: 1}")
    with pytest.raises(ConfigError, match="num_generations"):  # validation still names the field
        HfArgumentParser((GRPOConfig,)).parse_args_into_dataclasses(["--output_dir", "/tmp/o", "--num_generations", "1"])
    assert cfg(resume_from_checkpoint=True).resume_from_checkpoint is True  # Python callers may still pass True
    assert cfg(scale_rewards=False).scale_rewards == "none"


def test_trl_settings_are_parser_options_too():
    """TRL's settings are keyword-only fields, so parsers give them options: `--optim`, `--ddp_timeout`, ... on a
    command line, with the same check by value."""
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser((GRPOConfig,)).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/o", "--optim", "adamw_torch", "--log_level", "info", "--ddp_timeout", "60"])
    assert (parsed.optim, parsed.log_level, parsed.ddp_timeout) == ("adamw_torch", "info", 60)
    with pytest.raises(ConfigError, match="entropy_coef=0.1"):
        HfArgumentParser((GRPOConfig,)).parse_args_into_dataclasses(["--output_dir", "/tmp/o", "--entropy_coef", "0.1"])
    assert GRPOConfig("/tmp/positional").output_dir == "/tmp/positional"  # TRL's first positional argument


def test_trl_parser_when_installed(tmp_path):
    """TRL's own script layout: TrlParser over (ScriptArguments, GRPOConfig, ModelConfig) with a --config YAML that
    mixes TRL-only settings, fastgrpo's fields and ScriptArguments' keys, and command-line overrides."""
    trl = pytest.importorskip("trl")
    path = tmp_path / "grpo.yaml"
    path.write_text("output_dir: /tmp/o\nlearning_rate: 2.0e-5\nlog_level: info\nlogging_strategy: steps\n"
                    "optim: adamw_torch\ndo_eval: false\nuse_vllm: true\ndataset_name: AI-MO/NuminaMath-TIR\n")
    parser = trl.TrlParser((trl.ScriptArguments, GRPOConfig, trl.ModelConfig))
    script, args, model = parser.parse_args_and_config(["--config", str(path), "--vllm_mode", "colocate",
                                                        "--bf16", "false", "--ddp_timeout", "60"])
    assert isinstance(args, GRPOConfig) and script.dataset_name == "AI-MO/NuminaMath-TIR"
    assert (args.learning_rate, args.use_vllm, args.vllm_mode, args.bf16) == (2e-5, True, "colocate", False)
    assert (args.log_level, args.optim, args.ddp_timeout) == ("info", "adamw_torch", 60)
