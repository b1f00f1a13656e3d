"""`fastgrpo train CONFIG.yaml --field value` and `fastgrpo eval CHECKPOINT --config ...` on CPU, end to end."""

import json
import shlex
import sys

import pytest
import yaml

from fastgrpo import cli
from fastgrpo.config import ConfigError


def test_train_then_eval_checkpoint(tmp_path, capsys, numina_folder):
    model, data = numina_folder(24, 6)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": model, "dataset": {"path": str(data), "prompt_column": "problem", "system_prompt": "Think.",
                                    "eval_split": "test"},
        "rewards": ["format", "accuracy"], "peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
        "num_generations": 4, "max_completion_length": 8, "report_to": "none", "disable_tqdm": True}))
    assert cli.main(["train", str(config), "--max_steps", "2", "--save_steps", "2", "--eval_strategy", "steps",
                     "--eval_steps", "2", "--learning_rate", "1e-3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["global_step"] == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracy_reward/mean" in x for x in lines)        # eval_steps logged during training
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert cli.main(["eval", str(tmp_path / "out" / "checkpoint-2"), "--config", str(config), "--split", "test"]) == 0
    text = capsys.readouterr().out
    metrics = json.loads(text[text.index("{"):])
    assert metrics["eval_num_prompts"] == 6 and 0.0 <= metrics["eval_rewards/format_reward/mean"] <= 1.0


def test_bad_override_names_the_field(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: nowhere\nlearning_rate: 1.0e-5\n")
    assert cli.main(["train", str(config), "--num_generation", "4"]) == 2
    err = capsys.readouterr().err
    assert "num_generation" in err and "num_generations" in err


def _rows(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "solution": "1"}) + "\n" for p in prompts))
    return str(path)


def test_rewards_import_from_cwd_config_folder_and_file_path(tmp_path, capsys, monkeypatch, numina_folder):
    model, data = numina_folder(8, 2)
    monkeypatch.setattr(sys, "path", list(sys.path))   # the CLI puts the folders on sys.path, as `python x.py` does
    here, conf = tmp_path / "here", tmp_path / "conf"
    (conf / "sub").mkdir(parents=True)
    here.mkdir()
    (here / "cwd_rewards_t1.py").write_text("def cwd_reward(completions, **kw):\n"
                                            "    return [1.0] * len(completions)\n")
    (conf / "conf_rewards_t1.py").write_text("def conf_reward(completions, **kw):\n"
                                             "    return [0.5] * len(completions)\n")
    (conf / "sub" / "file_rewards_t1.py").write_text("def file_reward(completions, **kw):\n"
                                                     "    return [0.25] * len(completions)\n")
    config = conf / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": model, "dataset": {"path": str(data / "train.jsonl"), "prompt_column": "problem"},
        "rewards": ["cwd_rewards_t1:cwd_reward", "conf_rewards_t1:conf_reward", "sub/file_rewards_t1.py:file_reward"],
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "num_generations": 2,
        "max_completion_length": 4, "max_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}))
    monkeypatch.chdir(here)
    assert cli.main(["train", str(config)]) == 0
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert (row["rewards/cwd_reward/mean"], row["rewards/conf_reward/mean"], row["rewards/file_reward/mean"]) == \
        (1.0, 0.5, 0.25)
    # ./ paths too (importlib took them for relative imports), here found in the config file's folder
    assert callable(cli.resolve_rewards(["./sub/file_rewards_t1.py:file_reward"], str(conf))[0])
    capsys.readouterr()
    assert cli.main(["train", str(config), "--rewards", "[nowhere_t1:f]"]) == 2
    err = capsys.readouterr().err
    assert "nowhere_t1" in err and "PYTHONPATH" in err and "nowhere_t1.py:f" in err


def test_trl_script_names_get_fastgrpo_equivalents_that_load(tmp_path):
    data = _rows(tmp_path / "d.jsonl", ["1+0?", "0+1?"])
    trl = {"model_name_or_path": "some/model", "torch_dtype": "bfloat16", "attn_implementation": "eager",
           "dataset_name": data, "dataset_train_split": "train[:1]", "dataset_prompt_column": "prompt",
           "system_prompt": "Be brief.", "use_peft": True, "lora_r": 4, "lora_target_modules": ["q_proj"],
           "kl_coef": 0.04, "lr": 2.0e-5}
    config = tmp_path / "trl.yaml"
    config.write_text(yaml.safe_dump(trl))
    with pytest.raises(ConfigError) as e:
        cli.load_run_config(str(config))
    msg = str(e.value)
    for misleading in ("torch_threads", "cache_implementation", "use_cpu", "local_rank", "optim_target_modules"):
        assert misleading not in msg
    suggestion = yaml.safe_load(msg[msg.index("Write instead:") + len("Write instead:"):msg.index("(on the command")])
    config.write_text(yaml.safe_dump(suggestion))
    args, spec = cli.load_run_config(str(config))
    assert (spec.model, args.beta, args.learning_rate) == ("some/model", 0.04, 2.0e-5)
    assert args.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "eager"}
    assert spec.peft == {"r": 4, "target_modules": ["q_proj"], "lora_alpha": 32, "lora_dropout": 0.05}
    ds = cli.build_dataset(spec)
    assert ds["prompt"] == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+0?"}]]
    flags = msg[msg.index("(on the command line: ") + len("(on the command line: "):msg.index(")\n")]
    args2, spec2 = cli.load_run_config(None, shlex.split(flags))
    assert (args2.beta, args2.model_init_kwargs, spec2.peft, spec2.dataset) == \
        (args.beta, args.model_init_kwargs, spec.peft, spec.dataset)


def test_system_prompt_reaches_conversational_prompts_and_refuses_chat_false(tmp_path, caplog):
    data = _rows(tmp_path / "d.jsonl", [[{"role": "user", "content": "1+0?"}],
                                        [{"role": "system", "content": "Own."}, {"role": "user", "content": "0+1?"}]])
    spec = cli.RunSpec(model="m", dataset={"path": data, "system_prompt": "Be brief."})
    with caplog.at_level("WARNING", logger="fastgrpo"):
        prompts = cli.build_dataset(spec)["prompt"]
    assert [(m["role"], m["content"]) for m in prompts[0]] == [("system", "Be brief."), ("user", "1+0?")]
    assert [(m["role"], m["content"]) for m in prompts[1]] == [("system", "Own."), ("user", "0+1?")]
    assert "1 of 2 prompts already hold a system message" in caplog.text
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "dataset": {"path": data, "system_prompt": "Be brief.",
                                                                "chat": False}}))
    with pytest.raises(ConfigError, match=r"dataset\.system_prompt.*dataset\.chat: false"):
        cli.load_run_config(str(config))


def test_data_files_choose_the_files(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    _rows(folder / "a.jsonl", ["a1", "a2", "a3"])
    _rows(folder / "b.jsonl", ["b1", "b2", "b3", "b4", "b5"])
    _, spec = cli.load_run_config(None, ["--model", "m", "--dataset.path", str(folder),
                                         "--dataset.data_files", "{train: a.jsonl}"])
    assert cli.build_dataset(spec)["prompt"] == [[{"role": "user", "content": f"a{i}"}] for i in (1, 2, 3)]
    files = f"{{train: {folder / 'b.jsonl'}, test: {folder / 'a.jsonl'}}}"
    _, spec = cli.load_run_config(None, ["--model", "m", "--dataset.path", "json", "--dataset.data_files", files,
                                         "--dataset.eval_split", "test"])
    assert (len(cli.build_dataset(spec)), len(cli.build_dataset(spec, "eval_split"))) == (5, 3)


def test_empty_split_is_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "dataset": {"path": _rows(tmp_path / "d.jsonl", ["1+1?"])}}))
    assert cli.main(["train", str(config), "--dataset.split", "train[:0]"]) == 2
    err = capsys.readouterr().err
    assert "the split 'train[:0]' is empty" in err and "dataset.split" in err


def _adapter_checkpoint(model_dir, path, recorded_base):
    """A LoRA checkpoint (random, non-zero B) of the model in `model_dir`, whose adapter_config.json records
    `recorded_base` as its base (a folder since moved, say); returns the in-memory PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": recorded_base}))
    return peft_model.eval()


def test_eval_applies_a_lora_checkpoint_to_the_configs_model(tmp_path, capsys, numina_folder):
    import shutil

    import torch

    from fastgrpo.testing import save_tiny_model

    model, data = numina_folder(4, 3)
    ckpt = tmp_path / "checkpoint-2"
    trained = _adapter_checkpoint(model, ckpt, str(tmp_path / "moved-away"))   # the recorded base is gone
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": model, "dataset": {"path": str(data), "prompt_column": "problem"}, "rewards": ["format"],
        "output_dir": str(tmp_path / "out"), "max_completion_length": 4, "report_to": "none", "disable_tqdm": True}))
    assert cli.main(["eval", str(ckpt), "--config", str(config), "--split", "test"]) == 0
    text = capsys.readouterr().out
    assert json.loads(text[text.index("{"):])["eval_num_prompts"] == 3
    args, spec = cli.load_run_config(str(config))
    loaded, tokenizer = cli.load_adapter_checkpoint(str(ckpt), args, spec.model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(ids).logits, trained(ids).logits, atol=1e-6)
        with loaded.disable_adapter():   # the adapter changes the outputs: the comparison above means something
            assert not torch.allclose(loaded(ids).logits, trained(ids).logits, atol=1e-3)
    assert tokenizer is not None and tokenizer.pad_token == "<|endoftext|>"

    other = save_tiny_model(str(tmp_path / "one-layer"), num_layers=1)   # not the adapter's base
    assert cli.main(["eval", str(ckpt), "--config", str(config), "--model", other]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]   # after the base model's loading bar
    assert last.startswith("fastgrpo eval: error: checkpoint") and "have no place in the config's model" in last
    assert "moved-away" in last and "Traceback" not in err

    broken = tmp_path / "checkpoint-broken"
    shutil.copytree(ckpt, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])   # an interrupted copy
    assert cli.main(["eval", str(broken), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastgrpo eval: error: checkpoint {str(broken)!r}: its LoRA adapter")
    assert "cannot be read (SafetensorError" in err and "Fix:" in err and len(err.strip().splitlines()) == 1


def test_version_names_fastgrpo_and_its_libraries(capsys):
    from importlib.metadata import version

    import fastgrpo

    for flag in ("--version", "-V", "version"):
        assert cli.main([flag]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"fastgrpo {fastgrpo.__version__}"
        for name in ("torch", "transformers", "peft"):
            assert f"{name} {version(name)}" in lines
        assert any(x.startswith("vllm ") for x in lines) and any(x.startswith("trl ") for x in lines)
