"""Write the recipe's script for TRL 1.16 (the benchmark peer) from examples/recipe.py:

    python tools/make_trl_recipe.py /tmp/trl_recipe.py

Edits, each checked to apply: `from fastgrpo import` -> `from trl import`; `max_prompt_length=512` dropped (TRL
1.16 removed the field); EXTRA_ARGS merged into the GRPOConfig(...) call (TRL's config cannot go through
dataclasses.replace: its __post_init__ fills derived fields that then conflict); under torchrun each rank loads
the model on its own GPU (device_map="auto" would spread every rank's copy over all visible GPUs).
"""
import sys
from pathlib import Path

src = (Path(__file__).resolve().parents[1] / "examples" / "recipe.py").read_text()
edits = [
    ("from fastgrpo import GRPOConfig", "from trl import GRPOConfig"),
    ("from fastgrpo import GRPOTrainer", "from trl import GRPOTrainer"),
    ("    max_prompt_length=512,\n", ""),
    ("training_args = GRPOConfig(\n", "training_args = GRPOConfig(**{**dict(\n"),
    ('    vllm_mode="colocate",\n)\n', '    vllm_mode="colocate",\n), **json.loads(os.environ.get("EXTRA_ARGS") or "{}")})\n'),
    ('if os.environ.get("EXTRA_ARGS"):', 'if False:  # EXTRA_ARGS went into GRPOConfig(...) above'),
    ('device_map="auto"', 'device_map="auto" if "LOCAL_RANK" not in os.environ else {"": int(os.environ["LOCAL_RANK"])}'),
]
for old, new in edits:
    if src.count(old) != 1:
        sys.exit(f"make_trl_recipe: {old!r} found {src.count(old)} times in examples/recipe.py")
    src = src.replace(old, new)
Path(sys.argv[1]).write_text(src)
