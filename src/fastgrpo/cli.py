"""The `fastgrpo` command: train, eval, demo, bench, vllm-serve.

A run config is one YAML file. Four top-level keys describe what to train; every other key is a GRPOConfig field:

    model: Qwen/Qwen2-0.5B-Instruct        # hub id or local folder
    dataset: {path: AI-MO/NuminaMath-TIR, split: "train[:10%]", prompt_column: problem,
              system_prompt: "...", eval_split: "test[:10%]"}   # data_files: {train: a.jsonl} picks files
    rewards: [format, accuracy]             # built-in names, module:function, path/to/file.py:function, or
                                            # reward-model folders; modules and files are looked up in the current
                                            # folder, then in the config file's folder
    peft: {r: 8, lora_alpha: 32, target_modules: [q_proj, v_proj]}   # omit for full fine-tuning
    learning_rate: 1.0e-5                   # ...any GRPOConfig field

`--field value` on the command line overrides the file (`--dataset.split train[:1%]` for nested keys).
Errors in the file or the flags name the field, the allowed values and the closest valid name (or, for TRL's
script arguments such as model_name_or_path or lora_r, the fastgrpo key that replaces them), before any model is
loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shlex
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from . import trl_compat
from .config import FIELD_NAMES, FIELD_TYPES, ConfigError, GRPOConfig, closest_name

SPEC_KEYS = ("model", "dataset", "rewards", "peft")
DATASET_KEYS = ("path", "split", "name", "prompt_column", "system_prompt", "eval_split", "chat", "data_files")

log = logging.getLogger("fastgrpo")


@dataclass
class RunSpec:
    """What to train: the non-GRPOConfig part of a run config."""

    model: str
    dataset: dict = field(default_factory=dict)
    rewards: list = field(default_factory=lambda: ["format", "accuracy"])
    peft: dict | None = None
    config_dir: str | None = None   # the YAML's folder: rewards' module:function and file.py:function look there too


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


#: TRL's ScriptArguments / ModelConfig and open-r1's script arguments that are not GRPOConfig fields, and the key
#: that holds the same setting in a fastgrpo run config. Looked up before the closest-name guess, which for these
#: names points at unrelated fields (torch_dtype -> torch_threads, lora_r -> local_rank).
TRL_NAMES: dict[str, tuple[str, ...]] = {
    "model_name_or_path": ("model",), "reward_funcs": ("rewards",), "kl_coef": ("beta",), "lr": ("learning_rate",),
    "torch_dtype": ("model_init_kwargs", "dtype"),
    "attn_implementation": ("model_init_kwargs", "attn_implementation"),
    "dataset_name": ("dataset", "path"), "dataset_config": ("dataset", "name"),
    "dataset_train_split": ("dataset", "split"), "dataset_test_split": ("dataset", "eval_split"),
    "dataset_prompt_column": ("dataset", "prompt_column"), "system_prompt": ("dataset", "system_prompt"),
    "lora_r": ("peft", "r"), "lora_alpha": ("peft", "lora_alpha"), "lora_dropout": ("peft", "lora_dropout"),
    "lora_target_modules": ("peft", "target_modules"), "lora_modules_to_save": ("peft", "modules_to_save"),
    "use_rslora": ("peft", "use_rslora"), "use_dora": ("peft", "use_dora"),
}
#: TRL names with no key of their own here: what to do instead.
TRL_NOTES = {
    "use_peft": "use_peft: false: remove it (and the lora_* keys); a run config without a peft key trains the whole "
                "model",
    "lora_task_type": "lora_task_type: fastgrpo's LoRA is always CAUSAL_LM; remove it",
    "model_revision": "model_revision: the tokenizer is read from the default revision, so download the revision to "
                      "a folder (hf download ID --revision REV --local-dir DIR) and set model: DIR",
    "dataset_streaming": "dataset_streaming: fastgrpo needs a sized dataset; remove it and take a slice instead, "
                         "e.g. dataset: {split: 'train[:10000]'}",
}
_TRL_LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}


def _trl_names_error(trl_keys: dict[str, Any], where: str) -> ConfigError:
    """One error for every TRL-only key of the config, with the fastgrpo keys that replace them."""
    names = {k.replace("-", "_"): v for k, v in trl_keys.items()}
    use_peft = names.get("use_peft")
    suggested: dict[tuple[str, ...], Any] = {}
    for name, value in names.items():
        target = TRL_NAMES.get(name)
        if target and not (target[0] == "peft" and use_peft is False):  # TRL ignores lora_* when use_peft is false
            long_text = isinstance(value, str) and (len(value) > 200 or "\n" in value)  # a system prompt, say
            suggested[target] = "..." if long_text else value
    notes = [TRL_NOTES[n] for n in names if n in TRL_NOTES and not (n == "use_peft" and use_peft)]
    if use_peft or any(t[0] == "peft" for t in suggested):
        given = {t[1] for t in suggested if t[0] == "peft"}
        for key, default in _TRL_LORA_DEFAULTS.items():  # what TRL's LoRA would have used
            suggested.setdefault(("peft", key), default)
        defaulted = [k for k in _TRL_LORA_DEFAULTS if k not in given]
        if defaulted:
            notes.append(f"peft: {', '.join(defaulted)} at TRL's defaults")
        if use_peft is None:
            notes.append("TRL applies lora_* only with use_peft: true; without a peft key fastgrpo trains the whole "
                         "model")
    grouped: dict[str, Any] = {}
    for path, value in suggested.items():
        if len(path) == 1:
            grouped[path[0]] = value
        else:
            grouped.setdefault(path[0], {})[path[1]] = value
    msg = (f"{where}: {', '.join(repr(k) for k in trl_keys)}: names from TRL's script arguments (ScriptArguments, "
           f"ModelConfig, open-r1), not fastgrpo config fields.")
    if grouped:
        text = yaml.safe_dump(grouped, default_flow_style=None, sort_keys=False, width=10**6)
        flags = " ".join(f"--{'.'.join(p)} {shlex.quote(_flow(v))}" for p, v in suggested.items())
        msg += f" Write instead:\n{textwrap.indent(text, '  ')}(on the command line: {flags})"
    if notes:
        msg += "\n" + "\n".join(f"  {n}" for n in notes)
    return ConfigError(msg)


def _flow(value: Any) -> str:
    """A value as it is written after --field on the command line (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


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
    trl_keys = {k: v for k, v in values.items()
                if k not in FIELD_NAMES and (k.replace("-", "_") in TRL_NAMES or k.replace("-", "_") in TRL_NOTES)}
    if trl_keys:
        raise _trl_names_error(trl_keys, path or "command line")
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
    if not isinstance(ds, dict):
        raise ConfigError(f"dataset must be a path or a mapping such as {{path: data.jsonl, prompt_column: problem}}, "
                          f"got {ds!r}.")
    for key in ds:
        if key not in DATASET_KEYS:
            hint = closest_name(key, DATASET_KEYS)
            raise ConfigError(f"dataset: unknown key '{key}' (allowed: {', '.join(DATASET_KEYS)})."
                              + (f" Did you mean '{hint}'?" if hint else ""))
    _check_dataset_keys(ds)
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
        raise ConfigError(f"rewards must be a list of names (format, accuracy, module:function, file.py:function or "
                          f"a reward-model folder), got {rewards!r}; weights go in reward_weights.")
    _check_peft(spec_values.get("peft"))
    spec = RunSpec(model=str(spec_values["model"]), dataset=ds, rewards=list(rewards), peft=spec_values.get("peft"),
                   config_dir=os.path.dirname(os.path.abspath(path)) if path else None)
    return GRPOConfig(**values), spec


def _check_dataset_keys(ds: dict) -> None:
    chat = ds.get("chat", True)
    if not isinstance(chat, bool):
        raise ConfigError(f"dataset.chat must be true or false, got {chat!r}.")
    if not chat and ds.get("system_prompt"):
        raise ConfigError("dataset.system_prompt is set with dataset.chat: false, which hands the prompt column "
                          "over unchanged, so the system prompt would be dropped. Fix: remove dataset.chat (prompts "
                          "become chat messages, the system prompt first) or remove dataset.system_prompt.")
    files = ds.get("data_files")
    if files is None:
        return

    def is_names(x: Any) -> bool:
        return isinstance(x, str) or (isinstance(x, list) and bool(x) and all(isinstance(f, str) for f in x))
    if not (is_names(files) or (isinstance(files, dict) and files and all(is_names(v) for v in files.values()))):
        raise ConfigError(f"dataset.data_files must be a file, a list of files or a mapping of split names to files "
                          f"(e.g. {{train: train.jsonl, test: test.jsonl}}), got {files!r}.")
    path = ds.get("path")
    if isinstance(path, str) and os.path.isfile(path):
        raise ConfigError(f"dataset.data_files is set but dataset.path {path!r} is a file. Fix: set dataset.path to "
                          "the folder that holds the files, or to the builder (json, csv, parquet), and list the "
                          "files in data_files; or drop data_files.")
    saved = ("dataset_dict.json", "state.json")  # what save_to_disk writes
    if isinstance(path, str) and any(os.path.isfile(os.path.join(path, f)) for f in saved):
        raise ConfigError(f"dataset.data_files is set but dataset.path {path!r} is a dataset saved with save_to_disk, "
                          "which is read whole. Fix: drop data_files and pick the part with dataset.split.")


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
    from .data import DataError, is_conversational, load_dataset_spec

    ds_spec = spec.dataset
    if "path" not in ds_spec:
        raise ConfigError("dataset.path is missing (a local jsonl/json/csv/parquet file or folder, or a hub id).")
    split = ds_spec.get(split_key) or ("test" if split_key == "eval_split" else "train")
    extra = {"data_files": ds_spec["data_files"]} if ds_spec.get("data_files") is not None else {}
    ds = load_dataset_spec(ds_spec["path"], split, ds_spec.get("name"), **extra)
    if len(ds) == 0:
        raise DataError(f"dataset {ds_spec['path']!r}: the split {split!r} is empty (0 rows). Fix: set "
                        f"dataset.{split_key} to a split or slice that has rows, e.g. 'train[:100]'.")
    column = ds_spec.get("prompt_column", "prompt")
    if column not in ds.column_names:
        raise DataError(f"dataset {ds_spec['path']!r} has no column {column!r} (columns: {ds.column_names}); "
                        "set dataset.prompt_column.")
    system = ds_spec.get("system_prompt")
    chat = ds_spec.get("chat", True)
    if chat and isinstance(ds[0][column], str):
        def to_messages(x):
            msgs = [{"role": "system", "content": system}] if system else []
            return {"prompt": msgs + [{"role": "user", "content": x[column]}]}
        drop = [c for c in ("prompt", "messages") if c in ds.column_names and c != column]
        return ds.map(to_messages, remove_columns=drop)
    if chat and system and is_conversational(ds[0][column]):
        ds = _add_system_prompt(ds, column, system)
    if column != "prompt":
        ds = ds.rename_column(column, "prompt")
    return ds


def _add_system_prompt(ds, column: str, system: str):
    """dataset.system_prompt on prompts that are already conversations: put first where there is no system message
    (a row's own system message is kept, as a chat template takes one)."""
    has_own = sum(any(m.get("role") == "system" for m in msgs) for msgs in ds[column])
    if has_own:
        log.warning("dataset.system_prompt: %d of %d prompts already hold a system message and keep it; the others "
                    "get dataset.system_prompt.", has_own, len(ds))

    def prepend(x):
        msgs = x[column]
        if any(m.get("role") == "system" for m in msgs):
            return {column: msgs}
        # the other keys of the row's messages (tool_calls, ...) as None: one Arrow struct type for every message
        return {column: [{**{k: None for k in msgs[0]}, "role": "system", "content": system}, *msgs]}
    return ds.map(prepend)


def resolve_rewards(rewards: list, config_dir: str | None = None) -> list:
    """The run config's rewards with `module:function` and `file.py:function` imported; built-in names and
    reward-model folders are left to the trainer."""
    from .rewards import BUILTINS, import_reward

    folders = list(dict.fromkeys([os.getcwd()] + ([config_dir] if config_dir else [])))
    return [import_reward(r, folders) if isinstance(r, str) and ":" in r and r not in BUILTINS
            and not os.path.exists(r) else r for r in rewards]


def build_trainer(config: GRPOConfig, spec: RunSpec, eval_split: bool = False,
                  load_model: Callable[[], tuple[Any, Any]] | None = None):
    """`load_model`: (model, tokenizer or None) in place of spec.model; called after the rewards and datasets load."""
    from .trainer import GRPOTrainer

    peft_config = None
    if spec.peft:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **spec.peft)
    rewards = resolve_rewards(spec.rewards, spec.config_dir)
    train = build_dataset(spec, "eval_split" if eval_split else "split")
    evald = build_dataset(spec, "eval_split") if spec.dataset.get("eval_split") and not eval_split else None
    model, tokenizer = load_model() if load_model is not None else (spec.model, None)
    return GRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=train,
                       eval_dataset=evald if evald is not None else (train if eval_split else None),
                       peft_config=peft_config, processing_class=tokenizer)


def load_adapter_checkpoint(checkpoint: str, config: GRPOConfig, base_model: str):
    """(PeftModel, tokenizer or None): the config's model `base_model`, loaded as training loads it, with the LoRA
    adapter of `checkpoint` applied, and the checkpoint's tokenizer if it saved one. The base that
    adapter_config.json records is not used: it may have moved, or be a hub id while the config names a folder."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    from .loading import TOKENIZER_FILES, check_model_path, load_model, load_tokenizer, resolve_bf16

    def error(what: str, e: Exception | None, fix: str) -> ConfigError:
        cause = f" ({type(e).__name__}: {' '.join(str(e).split())[:300]})" if e is not None else ""
        return ConfigError(f"checkpoint {checkpoint!r}: {what}{cause}. Fix: {fix}.")
    damaged = "its files are damaged or incomplete (an interrupted copy?): copy it again, or evaluate another one"
    weights, saved = os.path.join(checkpoint, "adapter_model.safetensors"), set()
    try:
        with open(os.path.join(checkpoint, "adapter_config.json")) as f:
            recorded = json.load(f).get("base_model_name_or_path")
        if os.path.isfile(weights) or not os.path.isfile(os.path.join(checkpoint, "adapter_model.bin")):
            with safe_open(weights, framework="pt") as f:
                saved = set(f.keys())   # read now, before the base model loads
    except Exception as e:  # noqa: BLE001 - OSError, JSONDecodeError, SafetensorError
        raise error("its LoRA adapter (adapter_config.json, adapter_model.safetensors) cannot be read", e,
                    damaged) from None
    trained_on = f" (its adapter_config.json records {recorded!r})" if recorded and recorded != base_model else ""
    set_model = f"set model: in the config (or --model) to the base model the adapter was trained from{trained_on}"
    bf16 = resolve_bf16(config.bf16, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        check_model_path(base_model)
        base = load_model(base_model, config, bf16)
    except ConfigError as e:
        raise ConfigError(f"checkpoint {checkpoint!r} is a LoRA adapter, applied to the config's model (model: in "
                          f"the config, or --model), which failed{trained_on}: {e}") from None
    try:
        model = PeftModel.from_pretrained(base, checkpoint)
    except Exception as e:  # noqa: BLE001 - peft, safetensors, torch: a damaged file or another base model
        mismatch = any(m in str(e) for m in ("size mismatch", "not found in the base model", "Target module"))
        raise error(f"applying its LoRA adapter to the config's model {base_model!r} failed", e,
                    set_model if mismatch else f"{damaged}; or {set_model}") from None
    unplaced = sorted(saved - set(get_peft_model_state_dict(model)))
    if unplaced:  # peft drops, silently, adapter weights of layers that the model lacks
        raise error(f"{len(unplaced)} of {len(saved)} weights of its LoRA adapter have no place in the config's model "
                    f"{base_model!r} (e.g. {unplaced[0]}): it is not the adapter's base model", None, set_model)
    saved_tokenizer = any(os.path.isfile(os.path.join(checkpoint, f)) for f in TOKENIZER_FILES)
    return model, load_tokenizer(checkpoint) if saved_tokenizer else None  # else the trainer loads the base's


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
    spec.peft = None  # evaluate the model as given: no fresh adapters
    adapter, base = os.path.isfile(os.path.join(args.model, "adapter_config.json")), spec.model
    spec.model = base if adapter else args.model  # an adapter goes on the config's model (not the one it records)
    load = (lambda: load_adapter_checkpoint(args.model, config, base)) if adapter else None
    if args.split:
        spec.dataset["eval_split"] = args.split
    trainer = _set_up(lambda: build_trainer(config, spec, eval_split=True, load_model=load))
    metrics = trainer.evaluate()
    print(json.dumps(metrics, indent=1))
    return 0


def versions() -> str:
    """`fastgrpo --version`: fastgrpo's version and its libraries', one a line (from the installed packages' metadata:
    nothing is imported, so a broken vLLM install still prints)."""
    from importlib.metadata import distributions

    from . import __version__

    found = {(d.metadata["Name"] or "").lower(): d.version for d in distributions()}
    names = ("torch", "transformers", "peft", "vllm", "trl")
    return "\n".join([f"fastgrpo {__version__}", f"python {sys.version.split()[0]}",
                      *(f"{n} {found.get(n, 'not installed')}" for n in names)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": cmd_train, "eval": cmd_eval}
    if argv and argv[0] in ("--version", "-V", "version"):
        print(versions())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastgrpo {train,eval,demo,bench,vllm-serve} ...   (fastgrpo --version: the versions)\n\n"
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
        modules = {"demo": "demo", "bench": "bench", "vllm-serve": "serve"}  # imported when asked for
        if cmd in modules:
            return importlib.import_module(f".{modules[cmd]}", __package__).main(rest) or 0
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
