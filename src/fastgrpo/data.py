"""Prompts: validated, chat-templated and tokenized once, then served in deterministic rounds.

- A prompt is either plain text or a conversation (a list of {"role", "content"} messages); conversations get
  the tokenizer's chat template with the generation prompt, once, at start, whatever the last message's role, as
  TRL 1.16's GRPOTrainer renders them (a final assistant or system message is closed, not continued; warned once).
- Every other column (e.g. `solution`) travels with the prompt and reaches the reward functions as a keyword list.
- Prompts longer than `max_prompt_length` tokens are cut from the left (the question's end and the generation
  prompt survive); one warning counts them.
- Order: a permutation per epoch drawn from (seed, epoch); the position (epoch, offset) is all the state a
  checkpoint needs to resume the exact stream.
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .rewards import PASSED

log = logging.getLogger("fastgrpo")

ROLES = ("system", "user", "assistant", "tool", "developer")
#: Final roles after which the generation prompt opens the reply the prompt asks for; after others it is warned of.
GENERATION_ROLES = ("user", "tool")


class DataError(ValueError):
    """The dataset or one of its prompts cannot be used; the message names the row and the fix."""


@dataclass(slots=True)
class Prompt:
    index: int                 # row in the dataset
    prompt: Any                # original prompt: str or list of messages (what reward functions receive)
    ids: list[int]             # tokenized prompt, chat template applied, left-truncated
    columns: dict[str, Any]    # every other column of the row


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict)


def _check_messages(messages: list, row: int, what: str = "train_dataset") -> None:
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{what} row {row}: message {j} must be a dict with 'role' and 'content', got {m!r}.")
        if m["role"] not in ROLES:
            hint = difflib.get_close_matches(str(m["role"]), ROLES, n=1)
            raise DataError(f"{what} row {row}: message {j} has unknown role {m['role']!r}; expected one of {ROLES}."
                            + (f" Did you mean {hint[0]!r}?" if hint else ""))
        if not isinstance(m["content"], str):
            raise DataError(f"{what} row {row}: message {j} ({m['role']}) content must be a string, got "
                            f"{type(m['content']).__name__} {m['content']!r:.80}. Fix: join text parts into one string "
                            "(multimodal content lists are not supported).")


def render_conversation(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None) -> str:
    """The prompt text of a conversation as TRL 1.16's GRPOTrainer renders it: the chat template with the generation
    prompt, whatever the last role. A final assistant message (a prefill such as '<think>') is therefore closed and a
    second assistant turn opened; trl.data_utils would continue it instead, but scripts move here from GRPOTrainer,
    and the same prompts must give the same training."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))


def _parse_serialized_messages(text: str) -> tuple[str, list] | None:
    """('json' or 'python', the messages) when `text` is a whole list of chat messages written out as a string: JSON,
    or Python's repr, which is what a CSV round trip (Dataset.to_csv, DataFrame.to_csv) leaves of a list column."""
    s = text.strip()
    if not (s.startswith("[") and s.endswith("]") and "role" in s):
        return None
    for kind, parse in (("json", json.loads), ("python", ast.literal_eval)):
        try:
            value = parse(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            return kind, value
    return None


def _split_of(splits: dict, split: str, where: str):
    """`split` ('test', 'train[:10%]', 'train[10:20]', ...) of `splits` (name -> Dataset), as datasets reads it."""
    from datasets.arrow_reader import ReadInstruction

    try:
        parts = ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in splits.items()})
    except (ValueError, AssertionError, KeyError) as e:
        raise DataError(f"{where}: split {split!r} cannot be read here ({e}); its splits are {sorted(splits)} "
                        "(slices such as 'train[:10%]' work).") from None
    if len(parts) != 1:
        raise DataError(f"{where}: split {split!r} combines several splits; give one.")
    p = parts[0]
    return splits[p.splitname].select(range(p.from_, p.to))


def load_dataset_spec(path: str, split: str = "train", name: str | None = None, **kw):
    """A dataset from a local file/folder (json, jsonl, csv, parquet) or a hub id, through `datasets`. A local file
    or a saved Dataset has one split, 'train'; slices of it ('train[:90%]') work, other split names are an error
    (a file never silently serves as its own test split)."""
    import os

    import datasets

    if os.path.exists(path):
        if os.path.isdir(path):
            try:
                saved = datasets.load_from_disk(path)
            except FileNotFoundError:
                return datasets.load_dataset(path, name, split=split, **kw)
            splits = dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
            return _split_of(splits, split, f"dataset folder {path!r}")
        ext = path.rsplit(".", 1)[-1].lower()
        kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "arrow": "arrow"}.get(ext)
        if kind is None:
            raise DataError(f"dataset file {path!r}: unsupported extension .{ext}; use jsonl, json, csv or parquet.")
        return _split_of({"train": datasets.load_dataset(kind, data_files=path, split="train")}, split,
                         f"dataset file {path!r} (one split, 'train'; for a test split give another file)")
    return datasets.load_dataset(path, name, split=split, **kw)


#: Keyword arguments a reward call gets from the trainer (rewards.PASSED): a dataset column of the same name cannot
#: reach the reward functions. A 'prompts' or 'completions' column makes TRL fail at the first reward call (an
#: error here); the others (and 'completion') TRL drops or overrides (dropped here, with a warning).
RESERVED_COLUMNS = {name: "error" if name in ("prompts", "completions") else "drop" for name in (*PASSED, "completion")}


def _check_container(dataset, what: str) -> None:
    """A map-style dataset (datasets.Dataset, or a list of dicts); anything else gets the conversion to use."""
    kind = type(dataset).__name__
    fixes = {"IterableDataset": "materialise it: datasets.Dataset.from_list(list(ds.take(N))) (fastgrpo shuffles "
                                "and resumes by row index, so it needs a sized dataset)",
             "IterableDatasetDict": "pick a split and materialise it, e.g. Dataset.from_list(list(ds['train'].take(N)))",
             "DatasetDict": "pass one split, e.g. dataset['train']",
             "DataFrame": "convert it: datasets.Dataset.from_pandas(df)"}
    if kind in fixes:
        raise DataError(f"{what} is a {kind}; fastgrpo needs a datasets.Dataset or a list of dicts. Fix: {fixes[kind]}.")
    if isinstance(dataset, dict):
        raise DataError(f"{what} is a dict; fastgrpo needs a datasets.Dataset or a list of dicts (one dataset: several "
                        "eval datasets are not supported). Fix: datasets.Dataset.from_dict(columns) for a dict of "
                        "columns, or pass one of the datasets.")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or isinstance(dataset, (str, bytes)):
        raise DataError(f"{what} is a {kind}; fastgrpo needs a datasets.Dataset or a list of dicts.")
    if not hasattr(dataset, "column_names"):
        bad = next((i for i, row in enumerate(dataset) if not isinstance(row, dict)), None)
        if bad is not None:
            raise DataError(f"{what} row {bad} is a {type(dataset[bad]).__name__}, not a dict; each row must be a "
                            f"mapping with a 'prompt', e.g. {{'prompt': 'What is 2+2?'}}.")


def validate_dataset(dataset, prompt_column: str = "prompt", what: str = "train_dataset") -> list[dict]:
    """Check what needs no tokenizer (the container, the prompt column, reserved column names, empty or malformed
    prompts); returns the rows, without the columns that reward calls reserve.

    The trainer calls this before loading the tokenizer or the model, so a bad dataset fails in seconds."""
    _check_container(dataset, what)
    if len(dataset) == 0:
        raise DataError(f"{what} is empty.")
    columns = list(dataset.column_names) if hasattr(dataset, "column_names") else \
        list(dict.fromkeys(k for row in dataset for k in row))
    if prompt_column not in columns:
        where = "dataset.prompt_column in the YAML" if prompt_column != "prompt" else "it"
        raise DataError(
            f"{what} has no '{prompt_column}' column (columns: {columns}). GRPO needs one prompt per row: add {where}, "
            f"e.g. dataset.map(lambda x: {{'prompt': [{{'role': 'user', 'content': x['problem']}}]}})."
        )
    clash = [c for c in columns if RESERVED_COLUMNS.get(c) == "error"]
    if clash:
        raise DataError(f"{what} has a column named {clash[0]!r}, the name under which reward functions receive the "
                        f"{'prompts' if clash[0] == 'prompts' else 'generated completions'}. Fix: rename it, e.g. "
                        f"dataset.rename_column({clash[0]!r}, 'reference_{clash[0]}').")
    dropped = [c for c in columns if RESERVED_COLUMNS.get(c) == "drop"]
    if dropped:
        log.warning("%s: column(s) %s not passed to reward functions: the trainer passes its own values under those "
                    "names (as TRL does). Rename them to reach the reward functions.", what, ", ".join(dropped))
    rows = dataset.to_list() if hasattr(dataset, "to_list") else [dict(r) for r in dataset]
    for row in rows:
        for c in dropped:
            row.pop(c, None)
    serialized: list[tuple[int, str]] = []  # (row, 'json' or 'python')
    not_user: list[int] = []
    for i, row in enumerate(rows):
        p = row.get(prompt_column)
        if isinstance(p, str) and (found := _parse_serialized_messages(p)) is not None:
            serialized.append((i, found[0]))
        if is_conversational(p):
            _check_messages(p, i, what)
            if p[-1]["role"] not in GENERATION_ROLES:
                not_user.append(i)
        elif isinstance(p, list) and not p:
            raise DataError(f"{what} row {i}: the prompt is an empty list of messages. Fix: drop the row or add a "
                            "user message.")
        elif not isinstance(p, str):
            raise DataError(f"{what} row {i}: prompt must be a string or a list of {{'role', 'content'}} messages, "
                            f"got {type(p).__name__} {p!r:.80}.")
        elif not p.strip():
            raise DataError(f"{what} row {i}: the prompt is empty. Fix: drop the row (dataset.filter(lambda x: "
                            f"x['{prompt_column}'].strip() != '')).")
    if serialized:
        _warn_serialized(rows, serialized, prompt_column, what)
    if not_user:
        first = rows[not_user[0]][prompt_column][-1]["role"]
        log.warning("%s: %d of %d conversations end with a message that is not the user's (first: row %d, %r). As in "
                    "TRL's GRPOTrainer, the chat template closes it and opens a new assistant turn: a final assistant "
                    "message is not continued as a prefill. Fix, if a prefill was meant: give plain-text prompts "
                    "rendered with tokenizer.apply_chat_template(messages, tokenize=False, "
                    "continue_final_message=True).", what, len(not_user), len(rows), not_user[0], first)
    return rows


def _warn_serialized(rows: list[dict], found: list[tuple[int, str]], column: str, what: str) -> None:
    """One warning per dataset, not a conversion: a string that happens to look like messages may be meant as text."""
    (row, kind), first = found[0], rows[found[0][0]][column]
    parse = "json.loads" if kind == "json" else "ast.literal_eval"
    log.warning("%s column %r: %d of %d prompts (first: row %d, %.60r) are chat messages written as a %s string, as a "
                "CSV round trip leaves a list column; they are used as plain text, without the chat template. "
                "Fix: parse the column, e.g. dataset = dataset.map(lambda x: {%r: %s(x[%r])}) (import %s), or %s "
                "it before building the dataset.", what, column, len(found), len(rows), row, first,
                "JSON" if kind == "json" else "Python-repr", column, parse, column, parse.split(".")[0], parse)


def prepare_prompts(dataset, tokenizer, max_prompt_length: int | None, prompt_column: str = "prompt",
                    chat_template_kwargs: dict | None = None, what: str = "train_dataset") -> list[Prompt]:
    """Validate and tokenize every prompt of `dataset` (a `datasets.Dataset` or a list of dicts)."""
    rows = validate_dataset(dataset, prompt_column, what)
    texts: list[str] = []
    originals = []
    for i, row in enumerate(rows):
        p = row[prompt_column]
        if is_conversational(p):
            if getattr(tokenizer, "chat_template", None) is None:
                raise DataError(
                    f"{what} holds conversational prompts but the tokenizer has no chat template. Fix: set "
                    "tokenizer.chat_template, or give plain-text prompts."
                )
            try:
                text = render_conversation(tokenizer, p, chat_template_kwargs)
            except Exception as e:  # jinja's TemplateError (raise_exception in the template) and kin
                raise DataError(f"{what} row {i}: the tokenizer's chat template rejected this conversation "
                                f"({type(e).__name__}: {e}). Fix the row (e.g. a role the template does not "
                                "accept) or the template.") from e
        else:
            text = p
        texts.append(text)
        originals.append(p)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = 0
    prompts = []
    for i, (row, p, t) in enumerate(zip(rows, originals, ids)):
        if not t:
            raise DataError(f"{what} row {i}: the prompt tokenizes to nothing.")
        if max_prompt_length is not None and len(t) > max_prompt_length:
            t = t[-max_prompt_length:]
            cut += 1
        prompts.append(Prompt(i, p, list(t), {k: v for k, v in row.items() if k != prompt_column}))
    if cut:
        log.warning("%d of %d prompts in %s are longer than max_prompt_length=%d tokens and were cut from the left.",
                    cut, len(prompts), what, max_prompt_length)
    return prompts


@dataclass(slots=True)
class StreamState:
    epoch: int = 0
    offset: int = 0     # prompts already served in this epoch


class PromptStream:
    """Endless, deterministic stream of prompt rounds; `state` resumes it exactly."""

    def __init__(self, prompts: Sequence[Prompt], seed: int, shuffle: bool = True) -> None:
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.state = StreamState()

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_round(self, count: int) -> list[Prompt]:
        """The next `count` prompts (crossing into the next epoch when this one runs out)."""
        out: list[Prompt] = []
        while len(out) < count:
            order = self._order(self.state.epoch)
            take = order[self.state.offset:self.state.offset + count - len(out)]
            out.extend(self.prompts[i] for i in take)
            self.state.offset += len(take)
            if self.state.offset >= len(order):
                self.state = StreamState(self.state.epoch + 1, 0)
        return out

    @property
    def epoch_float(self) -> float:
        return self.state.epoch + self.state.offset / max(len(self.prompts), 1)


def rounds_for_epochs(num_prompts: int, epochs: float, prompts_per_round: int) -> int:
    return max(1, math.ceil(num_prompts * epochs / prompts_per_round))
