"""TRL 1.16 GRPOConfig settings that fastgrpo has no field of its own for, so that a TRL script runs with its import
line changed only. They are keyword-only fields of a base class of GRPOConfig (TRLSettings), so Python, YAML and
argument parsers built from the dataclass (HfArgumentParser, TrlParser) all take them.

- IGNORED: the Hugging Face Trainer's machinery (dataloaders, DDP/DeepSpeed/Accelerate hooks, log levels, the Hub's
  push strategy, evaluation bookkeeping) and settings of losses or modes fastgrpo does
  not offer, which TRL itself ignores unless that loss or mode is chosen. fastgrpo's loop has no counterpart: any
  value is accepted and has no effect.
- AT_DEFAULT: settings that would change what is trained (an entropy bonus, reference-model syncing, NEFTune, ...):
  accepted at TRL's default, refused otherwise with a ConfigError that names the field and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

#: name -> TRL 1.16's default, for the settings accepted whatever their value.
IGNORED: dict[str, Any] = {
    "average_tokens_across_devices": True, "label_smoothing_factor": 0.0, "bf16_full_eval": False,
    "fp16_full_eval": False, "tf32": None, "use_cache": False,
    "auto_find_batch_size": False, "logging_strategy": "steps", "log_on_each_node": True,
    "logging_nan_inf_filter": True, "include_num_input_tokens_seen": "no", "log_level": "passive",
    "log_level_replica": "warning", "trackio_bucket_id": None, "trackio_static_space_id": None, "eval_delay": 0,
    "prediction_loss_only": False, "eval_do_concat_batches": True, "eval_use_gather_object": False,
    "eval_accumulation_steps": None, "include_for_metrics": [], "batch_eval_metrics": False,
    "save_on_each_node": False, "enable_jit_checkpoint": False, "hub_strategy": "every_save",
    "hub_always_push": False, "hub_revision": None, "metric_for_best_model": None, "greater_is_better": None,
    "ignore_data_skip": False, "restore_callback_states_from_checkpoint": False, "full_determinism": False,
    "data_seed": None, "accelerator_config": None, "parallelism_config": None, "dataloader_drop_last": False,
    "dataloader_pin_memory": True, "dataloader_persistent_workers": False, "dataloader_prefetch_factor": None,
    "dataloader_multiprocessing_context": None, "dataloader_in_order": True, "label_names": None,
    "train_sampling_strategy": "random", "length_column_name": "length", "ddp_find_unused_parameters": None,
    "ddp_bucket_cap_mb": None, "ddp_broadcast_buffers": None, "ddp_static_graph": None, "ddp_backend": None,
    "ddp_timeout": 1800, "fsdp_config": None, "debug": "", "skip_memory_metrics": True, "do_train": False,
    "do_eval": False, "do_predict": False, "local_rank": -1, "ds3_gather_for_generation": True,
    "pad_to_multiple_of": "auto", "cache_implementation": None, "sapo_temperature_neg": 1.05,
    "sapo_temperature_pos": 1.0, "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512, "entropy_coef_min": 0.0,
    "entropy_coef_max": 1.0, "entropy_coef_delta": 0.005, "entropy_target": 0.2, "max_tool_calling_iterations": None,
    "log_multimodal": True, "num_completions_to_print": None, "log_unique_prompts": False,
    "log_completions_hub_repo": None, "use_transformers_continuous_batching": False,
    "transformers_continuous_batching_config": None, "use_transformers_paged": False,
}

#: name -> (TRL 1.16's default, other values that mean the same for fastgrpo, the fix to print otherwise).
AT_DEFAULT: dict[str, tuple[Any, tuple, str]] = {
    "optim": ("adamw_torch_fused", ("adamw_torch", "adamw_hf"),
              "fastgrpo's optimizer is torch's AdamW (fused on GPU; adam_beta1, adam_beta2, adam_epsilon and "
              "weight_decay apply); remove `optim`"),
    "optim_args": (None, ("",), "remove it (AdamW takes adam_beta1, adam_beta2, adam_epsilon, weight_decay)"),
    "optim_target_modules": (None, (), "remove it"),
    "lr_scheduler_kwargs": (None, ({},), "remove it; the schedules (lr_scheduler_type) take no extra arguments"),
    "activation_checkpointing": (None, (False,), "use gradient_checkpointing=True"),
    "activation_checkpointing_kwargs": (None, ({},), "use gradient_checkpointing_kwargs"),
    "neftune_noise_alpha": (None, (), "remove it: fastgrpo does not add NEFTune noise"),
    "load_best_model_at_end": (False, (), "remove it: every checkpoint is kept in output_dir; load the one you "
                                          "want after training"),
    "use_cpu": (False, (), "hide the GPUs instead (CUDA_VISIBLE_DEVICES=)"),
    "deepspeed": (None, (), "remove it: under torchrun fastgrpo shards with FSDP2 (fsdp='full_shard')"),
    "router_aux_loss_coef": (None, (), "remove it: fastgrpo adds no router auxiliary loss"),
    "cast_lm_head_to_fp32": (False, (), "remove it: the log-softmax already runs in fp32 over the head's output"),
    "multi_objective_aggregation": ("sum_then_normalize", (),
                                    "remove it: rewards are summed (reward_weights), then normalised per group"),
    "sync_ref_model": (False, (), "remove it: the reference model stays fixed"),
    "entropy_coef": (0.0, (0,), "remove it: fastgrpo adds no entropy bonus"),
    "use_adaptive_entropy": (False, (), "remove it: fastgrpo adds no entropy bonus"),
    "off_policy_mask_threshold": (None, (), "remove it: off-policy sequence masking is not implemented"),
}

NAMES = frozenset(IGNORED) | frozenset(AT_DEFAULT)


def default(name: str) -> Any:
    if name in IGNORED:
        value = IGNORED[name]
        return list(value) if isinstance(value, list) else value
    return AT_DEFAULT[name][0]


#: TRL's settings whose default is None but whose values are mappings (given as JSON text on a command line).
_MAPPINGS = ("lr_scheduler_kwargs", "activation_checkpointing_kwargs", "accelerator_config", "fsdp_config",
             "transformers_continuous_batching_config", "parallelism_config")


def _annotation(name: str, value: Any):
    """A type that argument parsers built from dataclasses (HfArgumentParser, TrlParser) turn into an option."""
    if name in _MAPPINGS:
        return dict | str | None
    if isinstance(value, bool):
        return bool
    if isinstance(value, (int, float, str)):
        return type(value)
    if isinstance(value, list):
        return list[str]
    return str | None  # None: any text; these settings are ignored or checked by value


def _field(name: str) -> dataclasses.Field:
    value = default(name)
    help = ("TRL setting, accepted and ignored by fastgrpo." if name in IGNORED else
            f"TRL setting fastgrpo does not implement: only {AT_DEFAULT[name][0]!r} (TRL's default) is accepted.")
    if isinstance(value, list):
        return dataclasses.field(default_factory=list, metadata={"help": help})
    return dataclasses.field(default=value, metadata={"help": help})


#: A base of GRPOConfig holding TRL's settings as keyword-only fields, so that every way of building a config
#: (Python, YAML, HfArgumentParser / TrlParser options and --config files) takes them.
TRLSettings = dataclasses.make_dataclass(
    "TRLSettings", [(n, _annotation(n, default(n)), _field(n)) for n in sorted(NAMES)], kw_only=True)


def refusals(config) -> list[str]:
    """The messages of every TRL setting of `config` set to a value fastgrpo cannot honour."""
    return [why for name in AT_DEFAULT if (why := refusal(name, getattr(config, name))) is not None]


def refusal(name: str, value: Any) -> str | None:
    """Why `name=value` (a setting of AT_DEFAULT) cannot be honoured (the ConfigError's message), or None."""
    dflt, same, fix = AT_DEFAULT[name]
    if value == dflt or any(value == s and type(value) is type(s) for s in same):
        return None
    return f"{name}={value!r} is a TRL setting fastgrpo does not implement (TRL's default {dflt!r} is accepted). Fix: {fix}."


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
               "critical": logging.CRITICAL}


class TrainingArgumentsAPI:
    """The read-only helpers of transformers' TrainingArguments that TRL scripts call on their config (open-r1's
    grpo.py logs `args.device` and `args.n_gpu` and sets its log level from `args.get_process_log_level()`),
    computed from the torchrun environment as transformers computes them. Mixed into GRPOConfig."""

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", 0))

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", 1))

    @property
    def device(self):
        import torch

        return torch.device("cuda", self.local_process_index) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def n_gpu(self) -> int:
        import torch

        if not torch.cuda.is_available():
            return 0
        return 1 if self.world_size > 1 else torch.cuda.device_count()

    @property
    def should_log(self) -> bool:
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    @property
    def should_save(self) -> bool:
        return self.process_index == 0

    def get_process_log_level(self) -> int:
        """The `logging` level for this process: log_level on the main process, log_level_replica elsewhere;
        'passive' leaves transformers' own level (WARNING unless changed)."""
        name = self.log_level if self.should_log else self.log_level_replica
        if name == "passive":
            try:
                from transformers.utils import logging as hf_logging

                return hf_logging.get_verbosity()
            except ImportError:
                return logging.WARNING
        return _LOG_LEVELS.get(str(name).lower(), logging.WARNING)

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work"):
        """Run the block on the main process first, then on the others (e.g. a dataset map that caches)."""
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized() and self.world_size > 1
        main = (self.local_process_index if local else self.process_index) == 0
        if active and not main:
            dist.barrier()
        yield
        if active and main:
            dist.barrier()
