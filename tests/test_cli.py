"""`fastgrpo train CONFIG.yaml --field value` and `fastgrpo eval CHECKPOINT --config ...` on CPU, end to end."""

import json

import yaml

from fastgrpo import cli


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
