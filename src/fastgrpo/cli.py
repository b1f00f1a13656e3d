"""The `fastgrpo` command: train, eval, demo, bench, vllm-serve.

A run config is one YAML file. Four top-level keys describe what to train; every other key is a GRPOConfig field:

    model: Qwen/Qwen2-0.5B-Instruct        # hub id or local folder
    dataset: {path: AI-MO/NuminaMath-TIR, split: "train[:10%]", prompt_column: problem,
              system_prompt: "...", eval_split: "test[:10%]"}
    rewards: [format, accuracy]             # built-in names, module:function, or reward-model folders
    peft: {r: 8, lora_alpha: 32, target_modules: [q_proj, v_proj]}   # omit for full fine-tuning
    learning_rate: 1.0e-5                   # ...any GRPOConfig field

`--field value` on the command line overrides the file (`--dataset.split train[:1%]` for nested keys).
Errors in the file or the flags name the field, the allowed values and the closest valid name, before any model
is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from . import trl_compat
from .config import FIELD_NAMES, FIELD_TYPES, ConfigError, GRPOConfig, closest_name

SPEC_KEYS = ("model", "dataset", "rewards", "peft")
DATASET_KEYS = ("path", "split", "name", "prompt_column", "system_prompt", "eval_split", "chat", "data_files")


@dataclass
class RunSpec:
    """What to train: the non-GRPOConfig part of a run config."""

    model: str
    dataset: dict = field(default_factory=dict)
    rewards: list = field(default_factory=lambda: ["format", "accuracy"])
    peft: dict | None = None


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (not the last one winning)."""


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"'{key}' is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.load(raw, Loader=_UniqueKeys)
    except yaml.constructor.ConstructorError as e:  # a key given twice
        raise ConfigError(f"{raw!r}: {e.problem}.") from None
    except yaml.YAMLError:  # not YAML: the text itself
        return raw


def _apply_overrides(values: dict, overrides: list[str]) -> dict:
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            if arg.endswith((".yaml", ".yml")):
                raise ConfigError(f"unexpected argument {arg!r}: put the config file first, "
                                  f"fastgrpo train {arg} --field value ...")
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --field value.")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides) or overrides[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value.")
            val = overrides[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_") if key.replace("-", "_") in FIELD_NAMES else key
        target = values
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--{key}: '{p}' is not a mapping in the config.")
        target[leaf] = _parse_value(val)
    return values


_NUMERIC = {name for name, kinds in FIELD_TYPES.items() if "int" in kinds or "float" in kinds}


def _coerce_numbers(values: dict) -> None:
    """YAML 1.1 reads `1e-5` (no dot) as a string; for numeric fields, a string that is a number becomes one."""
    for key, value in values.items():
        if key in _NUMERIC and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue
            values[key] = int(number) if number.is_integer() and "e" not in value.lower() and "." not in value else number


def load_run_config(path: str | None, overrides: list[str] | None = None) -> tuple[GRPOConfig, RunSpec]:
    """Read a YAML run config (and command-line overrides) into (GRPOConfig, RunSpec)."""
    values: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                values = yaml.load(f, Loader=_UniqueKeys) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path!r} cannot be read as YAML text ({type(e).__name__}: {e}).") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{where}: malformed YAML ({getattr(e, 'problem', e)}).") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(values).__name__}.")
    values = _apply_overrides(dict(values), overrides or [])
    spec_values = {k: values.pop(k) for k in SPEC_KEYS if k in values}
    for key in values:
        if key not in FIELD_NAMES:
            hint = closest_name(key, list(FIELD_NAMES) + list(SPEC_KEYS))
            raise ConfigError(f"{path or 'command line'}: unknown field '{key}'."
                              + (f" Did you mean '{hint}'?" if hint else " Run `fastgrpo train --help-fields`."))
    _coerce_numbers(values)
    if "model" not in spec_values:
        raise ConfigError(f"{path or 'command line'}: 'model' is missing (a hub id or a local folder).")
    ds = spec_values.get("dataset") or {}
    if isinstance(ds, str):
        ds = {"path": ds}
    for key in ds:
        if key not in DATASET_KEYS:
            hint = closest_name(key, DATASET_KEYS)
            raise ConfigError(f"dataset: unknown key '{key}' (allowed: {', '.join(DATASET_KEYS)})."
                              + (f" Did you mean '{hint}'?" if hint else ""))
    if not isinstance(ds, dict):
        raise ConfigError(f"dataset must be a path or a mapping such as {{path: data.jsonl, prompt_column: problem}}, "
                          f"got {ds!r}.")
    rewards = spec_values.get("rewards", ["format", "accuracy"])
    if isinstance(rewards, str):
        rewards = [rewards]
    if isinstance(rewards, dict):  # {format: 1.0, accuracy: 2.0}: names with their weights
        if "reward_weights" in values:
            raise ConfigError("rewards is a mapping of names to weights and reward_weights is set too; give the "
                              "weights once.")
        values["reward_weights"] = list(rewards.values())
        rewards = list(rewards)
    if not isinstance(rewards, list) or not all(isinstance(r, str) for r in rewards):
        raise ConfigError(f"rewards must be a list of names (format, accuracy, module:function or a reward-model "
                          f"folder), got {rewards!r}; weights go in reward_weights.")
    _check_peft(spec_values.get("peft"))
    spec = RunSpec(model=str(spec_values["model"]), dataset=ds, rewards=list(rewards), peft=spec_values.get("peft"))
    return GRPOConfig(**values), spec


def _check_peft(peft: Any) -> None:
    """peft: a mapping of LoraConfig's arguments (task_type is set by fastgrpo)."""
    if peft is None or peft is False:
        return
    if not isinstance(peft, dict):
        raise ConfigError(f"peft must be a mapping of LoraConfig arguments, e.g. {{r: 8, lora_alpha: 32, "
                          f"target_modules: [q_proj, v_proj]}}, got {peft!r}.")
    from peft import LoraConfig

    known = [f.name for f in dataclasses.fields(LoraConfig) if f.name != "task_type"]
    for key in peft:
        if key not in known:
            hint = closest_name(str(key), known)
            raise ConfigError(f"peft: unknown LoraConfig argument '{key}'." + (f" Did you mean '{hint}'?" if hint else "")
                              + (" (task_type is always CAUSAL_LM)" if key == "task_type" else ""))


def build_dataset(spec: RunSpec, split_key: str = "split"):
    """The dataset named by the spec, with the prompt column turned into chat messages when asked."""
    from .data import DataError, load_dataset_spec

    ds_spec = spec.dataset
    if "path" not in ds_spec:
        raise ConfigError("dataset.path is missing (a local jsonl/json/csv/parquet file or folder, or a hub id).")
    split = ds_spec.get(split_key) or ("test" if split_key == "eval_split" else "train")
    ds = load_dataset_spec(ds_spec["path"], split, ds_spec.get("name"))
    column = ds_spec.get("prompt_column", "prompt")
    if column not in ds.column_names:
        raise DataError(f"dataset {ds_spec['path']!r} has no column {column!r} (columns: {ds.column_names}); "
                        "set dataset.prompt_column.")
    system = ds_spec.get("system_prompt")
    if ds_spec.get("chat", True) and isinstance(ds[0][column], str):
        def to_messages(x):
            msgs = [{"role": "system", "content": system}] if system else []
            return {"prompt": msgs + [{"role": "user", "content": x[column]}]}
        drop = [c for c in ("prompt", "messages") if c in ds.column_names and c != column]
        ds = ds.map(to_messages, remove_columns=drop)
    elif column != "prompt":
        ds = ds.rename_column(column, "prompt")
    return ds


def build_trainer(config: GRPOConfig, spec: RunSpec, eval_split: bool = False):
    from .trainer import GRPOTrainer

    peft_config = None
    if spec.peft:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **spec.peft)
    train = build_dataset(spec, "eval_split" if eval_split else "split")
    evald = build_dataset(spec, "eval_split") if spec.dataset.get("eval_split") and not eval_split else None
    return GRPOTrainer(model=spec.model, reward_funcs=spec.rewards, args=config, train_dataset=train,
                       eval_dataset=evald if evald is not None else (train if eval_split else None),
                       peft_config=peft_config)


def _fields_help() -> str:
    lines = []
    for f in dataclasses.fields(GRPOConfig):
        if f.name in trl_compat.NAMES:
            continue
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices else ""
        lines.append(f"  {f.name} ({' | '.join(FIELD_TYPES[f.name])}, default {f.default if f.default is not dataclasses.MISSING else '...'})"
                     f"{extra}\n      {f.metadata.get('help', '')}")
    lines.append(f"  ...and TRL 1.16's other GRPOConfig settings ({len(trl_compat.NAMES)}: optim, log_level, ...), "
                 "accepted for compatibility: ignored, or only at TRL's default (fastgrpo/trl_compat.py).")
    return "\n".join(lines)


def _set_up(build: Callable[[], Any]) -> Any:
    """Run the set-up (config, dataset, model, rewards): an error from a library underneath (datasets, peft, a
    missing file) becomes a one-line ConfigError with its type, not a traceback."""
    try:
        return build()
    except Exception as e:
        if type(e).__module__.startswith("fastgrpo"):
            raise
        raise ConfigError(f"setting up the run failed: {type(e).__name__}: {str(e)[:500]}") from e


def cmd_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastgrpo train", description="Train with GRPO from a YAML run config.",
                                usage="fastgrpo train [CONFIG.yaml] [--field value ...]",
                                epilog="Any GRPOConfig field can follow as --field value (also model, dataset, rewards, "
                                       "peft without a config file). --help-fields lists them.")
    p.add_argument("--help-fields", action="store_true", help="list every GRPOConfig field and exit")
    args, rest = p.parse_known_args(argv)
    if args.help_fields:
        print(_fields_help())
        return 0
    # The config file, if any, comes first; everything else is --field value pairs.
    path = rest.pop(0) if rest and not rest[0].startswith("-") else None
    config, spec = _set_up(lambda: load_run_config(path, rest))
    trainer = _set_up(lambda: build_trainer(config, spec))
    out = trainer.train()
    trainer.save_model(config.output_dir)
    print(json.dumps(out))
    return 0


def cmd_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastgrpo eval", description="Mean of each reward function on a dataset split.")
    p.add_argument("model", help="model id/folder or a checkpoint-N folder (LoRA adapters are applied to the config's model)")
    p.add_argument("--config", required=True, help="the run config that names the dataset and rewards")
    p.add_argument("--split", default=None, help="dataset split to evaluate (default: the config's eval_split or 'test')")
    args, rest = p.parse_known_args(argv)
    config, spec = _set_up(lambda: load_run_config(args.config, rest))
    import os

    if os.path.isfile(os.path.join(args.model, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        spec.model = AutoPeftModelForCausalLM.from_pretrained(args.model)  # type: ignore[assignment]
        spec.peft = None
    else:
        spec.model = args.model
    if args.split:
        spec.dataset["eval_split"] = args.split
    trainer = _set_up(lambda: build_trainer(config, spec, eval_split=True))
    metrics = trainer.evaluate()
    print(json.dumps(metrics, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": cmd_train, "eval": cmd_eval}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastgrpo {train,eval,demo,bench,vllm-serve} ...\n\n"
              "  train CONFIG.yaml [--field value ...]   GRPO training (examples/recipe.yaml)\n"
              "  eval MODEL --config CONFIG.yaml         reward means on a test split\n"
              "  demo                                    a CPU run that visibly learns (a few minutes)\n"
              "  bench                                   the configuration table (fastgrpo vs TRL, vLLM or not)\n"
              "  vllm-serve --model M                    vLLM's server with weight-sync endpoints")
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd in commands:
            return commands[cmd](rest)
        if cmd == "demo":
            from .demo import main as demo_main
            return demo_main(rest) or 0
        if cmd == "bench":
            from .bench import main as bench_main
            return bench_main(rest) or 0
        if cmd == "vllm-serve":
            from .serve import main as serve_main
            return serve_main(rest) or 0
    except (ConfigError, ValueError, RuntimeError) as e:
        from .loop import TrainingStopped

        if isinstance(e, TrainingStopped):
            print(f"fastgrpo: {e}", file=sys.stderr)
            return 130
        if type(e).__module__.startswith("fastgrpo"):
            print(f"fastgrpo {cmd}: error: {e}", file=sys.stderr)
            return 2
        raise
    hint = closest_name(cmd, list(commands) + ["demo", "bench", "vllm-serve"])
    print(f"fastgrpo: unknown command {cmd!r}." + (f" Did you mean '{hint}'?" if hint else ""), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
