"""The Hugging Face Trainer calls that TRL training scripts make around train(), so that they run unchanged:
open-r1's grpo.py and TRL's examples end with

    metrics = trainer.train().metrics
    trainer.log_metrics("train", metrics); trainer.save_metrics("train", metrics); trainer.save_state()
    trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(...)

Each writes what transformers' Trainer writes (`{split}_results.json`, `all_results.json`, `trainer_state.json`,
a README.md model card), from the main process only, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from .distributed import Dist, barrier
from .modeling import base_model


@dataclasses.dataclass
class ProcessInfo:
    """`trainer.accelerator` as scripts read it: which process this is, and a barrier."""

    dist: Dist
    device: torch.device

    @property
    def is_main_process(self) -> bool:
        return self.dist.is_main

    @property
    def is_local_main_process(self) -> bool:
        return self.dist.local_rank == 0

    @property
    def process_index(self) -> int:
        return self.dist.rank

    @property
    def local_process_index(self) -> int:
        return self.dist.local_rank

    @property
    def num_processes(self) -> int:
        return self.dist.world_size

    def wait_for_everyone(self) -> None:
        barrier(self.dist)


def _write(path: str, text: str) -> None:
    """Write a file whole or not at all (a crash leaves the previous one)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _write_json(path: str, value: Any) -> None:
    _write(path, json.dumps(value, indent=4, sort_keys=True, default=str) + "\n")


class ScriptAPI:
    """Mixed into GRPOTrainer (which provides args, state, dist, device, model)."""

    @property
    def accelerator(self) -> ProcessInfo:
        return ProcessInfo(self.dist, self.device)

    def is_world_process_zero(self) -> bool:
        return self.dist.is_main

    def is_local_process_zero(self) -> bool:
        return self.dist.local_rank == 0

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print `metrics` under a `***** {split} metrics *****` header (main process)."""
        if not self.dist.is_main:
            return
        print(f"***** {split} metrics *****")
        width = max((len(str(k)) for k in metrics), default=0)
        for k in sorted(metrics):
            v = metrics[k]
            print(f"  {k:<{width}} = {round(v, 4) if isinstance(v, float) else v}")

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """output_dir/{split}_results.json, and merged into output_dir/all_results.json (main process)."""
        if not self.dist.is_main:
            return
        out = self.args.output_dir
        _write_json(os.path.join(out, f"{split}_results.json"), metrics)
        if combined:
            path = os.path.join(out, "all_results.json")
            every = {}
            if os.path.exists(path):
                with open(path) as f:
                    every = json.load(f)
            every.update(metrics)
            _write_json(path, every)

    def save_state(self) -> None:
        """output_dir/trainer_state.json: global_step, max_steps, epoch, log_history, best_metric (main process)."""
        if not self.dist.is_main:
            return
        s = self.state
        _write_json(os.path.join(self.args.output_dir, "trainer_state.json"),
                    {"global_step": s.global_step, "max_steps": s.max_steps, "epoch": s.epoch,
                     "log_history": s.log_history, "best_metric": s.best_metric,
                     "logging_steps": self.args.logging_steps, "save_steps": self.args.save_steps,
                     "train_batch_size": self.args.per_device_train_batch_size,
                     "num_input_tokens_seen": s.total_tokens})

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **unused: Any) -> None:
        """output_dir/README.md: a model card naming the base model, the dataset and GRPO (main process)."""
        if not self.dist.is_main:
            return
        base = base_model(self.model)
        base_name = getattr(getattr(base, "config", None), "_name_or_path", None) or "unknown"
        tag_list = ["fastgrpo", "grpo"] + ([tags] if isinstance(tags, str) else list(tags or []))
        lines = ["---", f"base_model: {base_name}", "library_name: " + ("peft" if hasattr(self.model, "peft_config")
                                                                          else "transformers")]
        if dataset_name:
            lines.append(f"datasets: [{dataset_name}]")
        lines += ["tags:"] + [f"- {t}" for t in dict.fromkeys(tag_list)] + ["---", "",
                  f"# {model_name or os.path.basename(os.path.abspath(self.args.output_dir))}", "",
                  f"Fine-tuned from `{base_name}` with GRPO (fastgrpo)"
                  + (f" on `{dataset_name}`." if dataset_name else "."), "",
                  f"Optimizer steps: {self.state.global_step}; {self.args.num_generations} completions per prompt, "
                  f"up to {self.args.max_completion_length} tokens; learning rate {self.args.learning_rate}.", ""]
        _write(os.path.join(self.args.output_dir, "README.md"), "\n".join(lines))
