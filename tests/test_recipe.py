"""The recipe's script (examples/recipe.py: the notebook's code with only the import changed) at its own settings
(8 generations, 512 tokens, gradient accumulation 16, use_vllm=True, trackio, push_to_hub) on CPU, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_recipe_script_runs_unchanged_on_cpu(tmp_path, numina_folder):
    model, data = numina_folder(160, 20)  # the recipe takes 10%: 16 prompts, one step's worth
    out = tmp_path / "run"
    env = dict(os.environ, MODEL_ID=model, DATASET_ID=str(data), OUTPUT_DIR=str(out), HF_HUB_OFFLINE="1",
               TRACKIO_DIR=str(tmp_path / "trackio"), HF_HOME=str(tmp_path / "hf"),
               EXTRA_ARGS=json.dumps({"max_steps": 1, "save_steps": 1}), PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "recipe.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "use_vllm=True but" in p.stderr                      # one clear fallback warning on CPU
    assert "push_to_hub" in p.stderr and "saved locally" in p.stderr
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()       # trainer.save_model(output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["completions/max_length"] <= 512
    assert rows[0]["num_tokens"] > 0 and "rewards/accuracy_reward/mean" in rows[0]
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
