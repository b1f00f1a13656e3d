"""Checkpoints that are complete or absent, never half-written.

A checkpoint folder `checkpoint-N` holds the adapter (LoRA) or the model, the tokenizer, the optimizer and
scheduler states, every RNG state, the prompt-stream position, the trainer state (step, log history) and the
config. It is written to `.tmp-checkpoint-N` and renamed into place once every file is flushed, so a crash or a
full disk mid-save leaves the previous checkpoints intact; `trainer_state.json` inside marks completeness and
carries the model's identity so resuming another model's checkpoint fails clearly.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or belongs to another model."""


@dataclass
class TrainerState:
    """What user scripts read as `trainer.state` (TRL names), plus what resuming needs."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    log_history: list[dict] = field(default_factory=list)
    stream_epoch: int = 0
    stream_offset: int = 0
    skipped_updates: int = 0
    consecutive_nonfinite: int = 0
    total_tokens: int = 0
    loss_sum: float = 0.0
    model_signature: dict = field(default_factory=dict)
    best_metric: float | None = None


def model_signature(model: torch.nn.Module) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    return {"model_type": getattr(cfg, "model_type", None), "hidden_size": getattr(cfg, "hidden_size", None),
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None), "vocab_size": getattr(cfg, "vocab_size", None),
            "peft": hasattr(model, "peft_config")}


def rng_state() -> dict:
    import numpy as np

    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    import numpy as np

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fsync_dir(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())


def save_model_files(model, tokenizer, path: str) -> None:
    """The adapter (for a PEFT model) or the full model, plus the tokenizer, in Hugging Face format."""
    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_checkpoint(output_dir: str, state: TrainerState, model, tokenizer, optimizer, scheduler,
                    config_dict: dict, save_only_model: bool = False, total_limit: int | None = None) -> str:
    final = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{state.global_step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_model_files(model, tokenizer, tmp)
        if not save_only_model:
            # Through a Python file object so that a full disk surfaces as OSError(ENOSPC) in the exception chain
            # (torch.save to a path reports only "unexpected pos").
            with open(os.path.join(tmp, "training_state.pt"), "wb") as fh:
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "rng": rng_state()}, fh)
        with open(os.path.join(tmp, "config.fastgrpo.json"), "w") as f:
            json.dump(config_dict, f, indent=1, default=str)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(asdict(state), f, indent=1, default=_json_default)
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception's chain, or in its text (safetensors reports "os error 28")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _json_default(x: Any):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | bool | None, output_dir: str) -> str | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise CheckpointError(f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint-N folder.")
        return ckpts[-1]
    if not os.path.isdir(resume):
        raise CheckpointError(f"resume_from_checkpoint={resume!r} does not exist.")
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise CheckpointError(f"{resume} is incomplete (no {STATE_FILE}): it was probably interrupted while being "
                              f"written. Resume from an earlier checkpoint, or pass resume_from_checkpoint=True.")
    return resume


def load_checkpoint(path: str, model, optimizer, scheduler) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the saved trainer state."""
    with open(os.path.join(path, STATE_FILE)) as f:
        raw = json.load(f)
    state = TrainerState(**{k: v for k, v in raw.items() if k in TrainerState.__dataclass_fields__})
    sig = model_signature(model)
    if state.model_signature and state.model_signature != sig:
        raise CheckpointError(f"{path} was written for another model ({state.model_signature}); this run's model is "
                              f"{sig}. Resume with the same model, or start a new output_dir.")
    _load_weights(path, model)
    ts = os.path.join(path, "training_state.pt")
    if not os.path.isfile(ts):
        raise CheckpointError(f"{path} has no training_state.pt (saved with save_only_model=True): it cannot resume a run.")
    blob = torch.load(ts, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return state


def _load_weights(path: str, model) -> None:
    from safetensors.torch import load_file

    unwrapped = getattr(model, "module", model)
    if hasattr(unwrapped, "peft_config"):
        from peft import set_peft_model_state_dict

        f = os.path.join(path, "adapter_model.safetensors")
        if not os.path.isfile(f):
            raise CheckpointError(f"{path} holds no adapter_model.safetensors, but the model is a PEFT model.")
        set_peft_model_state_dict(unwrapped, load_file(f))
        return
    files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no model weights (*.safetensors).")
    sd = {}
    for x in files:
        sd.update(load_file(os.path.join(path, x)))
    missing, unexpected = unwrapped.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings are saved once
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
