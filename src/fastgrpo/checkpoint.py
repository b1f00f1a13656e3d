"""Checkpoints that are complete or absent, never half-written.

A checkpoint folder `checkpoint-N` holds the adapter (LoRA) or the model, the tokenizer, the optimizer and
scheduler states, every RNG state, the prompt-stream position, the trainer state (step, log history) and the
config. It is written to `.tmp-checkpoint-N` and renamed into place once every file is flushed, so a crash or a
full disk mid-save leaves the previous checkpoints intact; `trainer_state.json` inside marks completeness and
carries the model's identity so resuming another model's checkpoint fails clearly.

Under FSDP2 the same files hold the *full* model (a normal Hugging Face folder) and the full optimizer state,
gathered to rank 0's CPU (`full_state`, keyed by parameter name rather than position); resuming reads them on rank
0 and scatters each rank's shard (`broadcast_from_rank0`), so a checkpoint resumes at any world size. The RNG
state of every rank is kept (`rng_ranks`): ranks sample different completions, so restoring rank 0's state
everywhere would not continue the run exactly.
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

from .modeling import base_model

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
    """What a checkpoint must match to resume into this model: the base's shape and, with LoRA, the adapter's
    rank, scaling and target modules (a different alpha would load silently and train another function)."""
    base = base_model(model)
    cfg = base.config
    sig = {"model_type": getattr(cfg, "model_type", None), "hidden_size": getattr(cfg, "hidden_size", None),
           "num_hidden_layers": getattr(cfg, "num_hidden_layers", None), "vocab_size": getattr(cfg, "vocab_size", None),
           "peft": hasattr(model, "peft_config")}
    peft_cfg = getattr(model, "peft_config", {}).get("default") if sig["peft"] else None
    if peft_cfg is not None:
        names = lambda v: sorted(v) if isinstance(v, (set, list, tuple)) else v  # noqa: E731
        # each changes what the adapter computes or which weights it holds: resuming across a change would load
        # silently into another function (rslora's scaling) or fail half-way through the optimizer state
        sig["lora"] = {"r": getattr(peft_cfg, "r", None), "lora_alpha": getattr(peft_cfg, "lora_alpha", None),
                       "target_modules": names(getattr(peft_cfg, "target_modules", None)),
                       "use_rslora": bool(getattr(peft_cfg, "use_rslora", False)),
                       "use_dora": bool(getattr(peft_cfg, "use_dora", False)),
                       "bias": getattr(peft_cfg, "bias", "none"),
                       "modules_to_save": names(getattr(peft_cfg, "modules_to_save", None))}
    return sig


def _differs(saved: dict, current: dict) -> dict:
    """Signature entries that differ, over the keys both have (checkpoints of earlier versions lack 'lora', or some
    of its entries)."""
    out = {}
    for k in saved.keys() & current.keys():
        if isinstance(saved[k], dict) and isinstance(current[k], dict):
            out.update({f"{k}.{n}": d for n, d in _differs(saved[k], current[k]).items()})
        elif saved[k] != current[k]:
            out[k] = (saved[k], current[k])
    return out


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


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def full_state(model, optimizer=None) -> tuple[dict | None, dict | None]:
    """FSDP2: the whole model's state dict (and the optimizer's, keyed by parameter name) on rank 0's CPU; None on
    the other ranks. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    if _dist_rank_world()[0] != 0:
        return None, None
    first: dict[int, str] = {}  # a tied parameter is kept once, under its first name, as save_pretrained does
    for n, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), n) != n:
            msd.pop(n, None)
    return msd, osd


def rng_states_of_ranks() -> list[dict] | None:
    """Every rank's RNG state, on every rank (a collective under torchrun); None in one process."""
    import torch.distributed as dist

    _, world = _dist_rank_world()
    if world == 1:
        return None
    out: list = [None] * world
    dist.all_gather_object(out, rng_state())
    return out


def save_model_files(model, tokenizer, path: str, state_dict: dict | None = None) -> None:
    """The adapter (for a PEFT model) or the full model, plus the tokenizer, in Hugging Face format. `state_dict`:
    the full weights gathered by `full_state` when the model's own are shards."""
    unwrapped = getattr(model, "module", model)
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    unwrapped.save_pretrained(path, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_checkpoint(output_dir: str, state: TrainerState, model, tokenizer, optimizer, scheduler,
                    config_dict: dict, save_only_model: bool = False, total_limit: int | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None,
                    rng_ranks: list[dict] | None = None) -> str:
    """Write checkpoint-N (on rank 0). `model_state`/`optimizer_state`: from `full_state` under FSDP2."""
    final = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{state.global_step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_model_files(model, tokenizer, tmp, model_state)
        if not save_only_model:
            blob = {"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                    "scheduler": scheduler.state_dict(), "rng": rng_state()}
            if rng_ranks is not None:
                blob["rng_ranks"] = rng_ranks
            # Through a Python file object so that a full disk surfaces as OSError(ENOSPC) in the exception chain
            # (torch.save to a path reports only "unexpected pos").
            with open(os.path.join(tmp, "training_state.pt"), "wb") as fh:
                torch.save(blob, fh)
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
        # Only this run's line of checkpoints rotates: a higher-numbered one (left by another run in the same
        # output_dir) is neither counted nor deleted, and the one just written always stays.
        mine = [c for c in list_checkpoints(output_dir) if checkpoint_step(c) <= state.global_step]
        for old in mine[:-total_limit]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: str) -> int:
    m = _CKPT.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


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
        path = os.path.join(output_dir, name)
        if (step := checkpoint_step(name)) >= 0 and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((step, path))
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
        inner = list_checkpoints(resume)
        if inner:  # the output folder itself, not one of its checkpoints
            raise CheckpointError(f"resume_from_checkpoint={resume!r} is a folder of checkpoints "
                                  f"({', '.join(os.path.basename(c) for c in inner)}), not one checkpoint. Fix: pass "
                                  f"'{inner[-1]}', or True to take the latest in output_dir.")
        raise CheckpointError(f"{resume} is incomplete (no {STATE_FILE}): it was probably interrupted while being "
                              f"written. Resume from an earlier checkpoint, or pass resume_from_checkpoint=True.")
    return resume


#: Settings whose change on resume makes the run another one than the checkpoint's (warned, not refused: a
#: deliberate change, e.g. of the learning rate, is legitimate).
RUN_SHAPING = ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
               "generation_batch_size", "num_iterations", "max_completion_length", "max_prompt_length",
               "learning_rate", "lr_scheduler_type", "loss_type", "beta", "temperature", "seed", "scale_rewards")


def config_changes(path: str, config_dict: dict) -> dict:
    """Run-shaping settings of this run that differ from those the checkpoint at `path` was written with."""
    try:
        with open(os.path.join(path, "config.fastgrpo.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: (saved[k], config_dict[k]) for k in RUN_SHAPING
            if k in saved and k in config_dict and saved[k] != json.loads(json.dumps(config_dict[k], default=str))}


def _damaged(path: str, what: str, e: BaseException | None = None) -> CheckpointError:
    """The error for a checkpoint whose files cannot be read, naming an intact earlier one to resume from."""
    parent = os.path.dirname(os.path.normpath(path))
    earlier = [c for c in list_checkpoints(parent) if checkpoint_step(c) < checkpoint_step(path)]
    why = f" ({type(e).__name__}: {str(e)[:200]})" if e is not None else ""
    return CheckpointError(f"{path} is damaged: {what}{why}. Resume from an earlier checkpoint"
                           + (f", e.g. resume_from_checkpoint='{earlier[-1]}'" if earlier else " (none is left)")
                           + ", or delete this one.")


def load_checkpoint(path: str, model, optimizer, scheduler, sharded: bool = False) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the saved trainer state. `sharded`: the
    model is FSDP2-sharded; every rank calls this, rank 0 reads the tensors and scatters the shards."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise _damaged(path, f"{STATE_FILE} is not readable JSON", e) from e
    if not isinstance(raw, dict) or not isinstance(raw.get("global_step"), int):
        raise _damaged(path, f"{STATE_FILE} holds no global_step")
    state = TrainerState(**{k: v for k, v in raw.items() if k in TrainerState.__dataclass_fields__})
    sig = model_signature(model)
    differs = _differs(state.model_signature or {}, sig)
    if differs:
        detail = "; ".join(f"{k}: checkpoint {a}, this run {b}" for k, (a, b) in sorted(differs.items()))
        raise CheckpointError(f"{path} was written for another model or adapter ({detail}). Resume with the same "
                              "model and peft_config, or start a new output_dir.")
    ts = os.path.join(path, "training_state.pt")
    if not os.path.isfile(ts):
        raise CheckpointError(f"{path} has no training_state.pt (saved with save_only_model=True): it holds weights "
                              "only and cannot resume a run. Load it as a model, or resume from a checkpoint saved "
                              "without save_only_model.")
    try:
        if sharded:
            _load_sharded_weights(path, model)
        else:
            _load_weights(path, model)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError, torch's size mismatches, truncated files
        raise _damaged(path, "its weights cannot be loaded", e) from e
    rank, world = _dist_rank_world()
    # mmap: ranks other than 0 read only the scheduler and their RNG state, not the (large) optimizer tensors
    try:
        blob = torch.load(ts, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated or empty file
        raise _damaged(path, "training_state.pt cannot be read", e) from e
    osd = blob["optimizer"]
    by_name = any(isinstance(p, str) for g in osd.get("param_groups", []) for p in g.get("params", []))
    if sharded and not by_name:
        raise CheckpointError(f"{path} holds the optimizer state of replicated ranks (by position); FSDP2 resumes from "
                              "state saved by name. Resume with fsdp='no_shard', or start a new output_dir.")
    if by_name:  # written under FSDP2; loads into sharded and whole models alike
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
        set_optimizer_state_dict(model, optimizer, osd if rank == 0 or not sharded else {}, options=opts)
    else:
        optimizer.load_state_dict(osd)
    scheduler.load_state_dict(blob["scheduler"])
    ranks = blob.get("rng_ranks")
    set_rng_state(ranks[rank] if ranks is not None and len(ranks) == world else blob["rng"])
    return state


def _weight_files(path: str) -> list[str]:
    files = sorted(os.path.join(path, x) for x in os.listdir(path) if x.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no model weights (*.safetensors).")
    return files


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
    sd = {}
    for x in _weight_files(path):
        sd.update(load_file(x))
    missing, unexpected = unwrapped.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings are saved once
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")


def _load_sharded_weights(path: str, model) -> None:
    """FSDP2: map the saved names onto the model's (PEFT adapters are saved without the adapter name; a tied
    lm_head is saved once), check them on every rank from the files' headers, then load on rank 0 and scatter."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    peft = hasattr(model, "peft_config")
    if peft and not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        raise CheckpointError(f"{path} holds no adapter_model.safetensors, but the model is a PEFT model.")
    files = [os.path.join(path, "adapter_model.safetensors")] if peft else _weight_files(path)
    names = list(model.state_dict().keys())
    target = {n.replace(".default", ""): n for n in names} if peft else {n: n for n in names}
    saved: dict[str, str] = {}  # file key -> model name
    unexpected = []
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                if k in target:
                    saved[k] = target[k]
                else:
                    unexpected.append(k)
    aliases = {}  # a model name missing from the files -> a saved name of the same (tied) parameter
    if not peft:
        by_param: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(p), []).append(n)
        have = set(saved.values())
        for group in by_param.values():
            src = next((n for n in group if n in have), None)
            aliases.update({n: src for n in group if n not in have and src is not None})
    missing = [] if peft else [n for n in names if n not in set(saved.values()) and n not in aliases]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    sd: dict = {}
    if _dist_rank_world()[0] == 0:
        for f in files:
            with safe_open(f, "pt") as h:
                sd.update({saved[k]: h.get_tensor(k) for k in h.keys()})
        sd.update({n: sd[src] for n, src in aliases.items()})
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                             strict=False))
