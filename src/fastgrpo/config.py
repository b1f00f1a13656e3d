"""GRPOConfig: every training setting in one dataclass, validated once.

Field names and defaults follow TRL's `GRPOConfig` so that a TRL script runs with only its import changed.
Fields TRL dropped but recipes still set (`max_prompt_length`, `vllm_guided_decoding_regex`,
`vllm_importance_sampling_cap`) are accepted. Fields that only make sense inside a Hugging Face `Trainer`
(`dataloader_num_workers`, `logging_dir`, ...) are accepted and ignored, so a script never fails on them.

Batch vocabulary (as in TRL):
  micro-batch      = `per_device_train_batch_size` completions, one forward/backward
  optimizer step   = `gradient_accumulation_steps` micro-batches
  generation batch = `per_device_train_batch_size * world_size * steps_per_generation` completions
                     = (generation batch / num_generations) prompts, each sampled `num_generations` times
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from . import trl_compat

__all__ = ["GRPOConfig", "ConfigError", "closest_name"]


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range. The message names the field and the fix."""


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
VLLM_MODES = ("colocate", "server")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("no", "steps", "epoch")
REPORTERS = ("trackio", "none", "jsonl")
REWARD_ERRORS = ("raise", "zero")
YIELD_MODES = ("off", "layer", "block")
# transformers' TrainingArguments.fsdp vocabulary, the subset that means something here: "auto_wrap" is accepted
# (decoder layers are always wrapped), "no_shard" forces replicated data parallelism.
FSDP_OPTIONS = ("full_shard", "auto_wrap", "no_shard")


@dataclass
class GRPOConfig(trl_compat.TRLSettings, trl_compat.TrainingArgumentsAPI):
    """Settings of a GRPO run. See the module docstring for the batch vocabulary."""

    # --- output and run ---
    output_dir: str = _f("fastgrpo-output", "Folder for checkpoints, metrics.jsonl and the final model.")
    overwrite_output_dir: bool = _f(False, "Accepted for TRL compatibility; checkpoints are never deleted except by save_total_limit.")
    run_name: str | None = _f(None, "Name of the run in trackio; defaults to the output folder's name.")
    seed: int = _f(42, "Seed for data order, sampling and initialisation; a CPU run with the same seed is reproducible.")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 derives it from num_train_epochs and the dataset size.")
    num_train_epochs: float = _f(3.0, "Passes over the training prompts when max_steps is -1.")

    # --- optimisation ---
    learning_rate: float = _f(1e-6, "Peak AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule after warmup.", SCHEDULERS)
    warmup_ratio: float = _f(0.0, "Fraction of max_steps spent warming the learning rate up from 0.")
    warmup_steps: int = _f(0, "Warmup steps; overrides warmup_ratio when > 0.")
    per_device_train_batch_size: int = _f(8, "Completions per micro-batch on each device.")
    per_device_eval_batch_size: int = _f(8, "Completions per generation call during evaluation.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, ~30% slower.")
    gradient_checkpointing_kwargs: dict | str | None = _f(None, "Passed to the model's gradient_checkpointing_enable().")
    bf16: bool | None = _f(None, "Train in bfloat16; None means yes on a GPU that supports it and no on CPU.")
    fp16: bool = _f(False, "Not supported (GRPO's ratios are fragile in fp16); use bf16.")
    model_init_kwargs: dict | str | None = _f(None, "Keyword arguments for from_pretrained when the model is given by name (JSON text on a command line).")
    trust_remote_code: bool = _f(False, "Allow model code shipped with a checkpoint.")
    disable_dropout: bool = _f(False, "Set every dropout probability to 0 (LoRA dropout stays as configured).")
    torch_empty_cache_steps: int | None = _f(None, "Accepted for TRL compatibility; ignored.")
    fsdp: str | list[str] = _f("", "Data parallelism under torchrun: '' picks FSDP2 (parameters, gradients and optimizer state sharded over ranks) for full fine-tuning and replicated ranks for LoRA; 'full_shard' (or a list/space-separated string such as 'full_shard auto_wrap', as in transformers) forces FSDP2; 'no_shard' forces replication. One process: no effect.")

    # --- data ---
    max_prompt_length: int | None = _f(512, "Prompts longer than this many tokens are cut from the left; None keeps all (colocated vLLM's context is then the longest prompt of the datasets + max_completion_length, unless vllm_max_model_length is set).")
    shuffle_dataset: bool = _f(True, "Shuffle the prompts each epoch (deterministically from the seed).")
    remove_unused_columns: bool = _f(False, "Accepted for TRL compatibility: every column always reaches the rewards.")
    chat_template_kwargs: dict | str | None = _f(None, "Extra arguments for apply_chat_template (e.g. enable_thinking).")
    dataloader_num_workers: int = _f(0, "Accepted for TRL compatibility; ignored (prompts are tokenized once).")

    # --- generation ---
    num_generations: int = _f(8, "Completions sampled per prompt (the group size); at least 2.")
    num_generations_eval: int | None = _f(None, "Completions per prompt during evaluation; defaults to num_generations.")
    max_completion_length: int = _f(512, "Maximum tokens generated per completion.")
    generation_batch_size: int | None = _f(None, "Completions per generation round (all devices); defaults to per_device_train_batch_size * world_size * steps_per_generation.")
    steps_per_generation: int | None = _f(None, "Micro-batches trained per generation round; defaults to gradient_accumulation_steps.")
    temperature: float = _f(1.0, "Sampling temperature; also divides the trainer's logits.")
    top_p: float = _f(1.0, "Nucleus sampling probability mass, in (0, 1].")
    top_k: int | None = _f(0, "Sample among the k most likely tokens; 0 or None disables.")
    min_p: float | None = _f(None, "Minimum token probability relative to the most likely one.")
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages repeated tokens.")
    generation_kwargs: dict | str | None = _f(None, "Extra sampling arguments for the generation backend.")

    # --- algorithm ---
    beta: float = _f(0.0, "Weight of the k3 KL penalty to the reference policy; 0 loads no reference.")
    use_bias_correction_kl: bool = _f(True, "Multiply the KL term by the importance ratio (differentiable, so it changes the gradient even on-policy): the unbiased reverse-KL gradient of DeepSeek-V3.2, TRL 1.16's default. Only matters when beta != 0.")
    num_iterations: int = _f(1, "Policy updates per generation batch (mu in the GRPO paper).")
    epsilon: float = _f(0.2, "Lower clipping range of the probability ratio.")
    epsilon_high: float | None = _f(None, "Upper clipping range (clip-higher); defaults to epsilon. For cispo, the ratio cap itself.")
    delta: float | None = _f(None, "Two-sided clipping: cap of the unclipped ratio (None: off).")
    importance_sampling_level: str = _f("token", "Ratio per token (GRPO) or per sequence (GSPO).", IS_LEVELS)
    loss_type: str = _f("dapo", "Loss normalisation; see fastgrpo.loss.", LOSS_TYPES)
    scale_rewards: str = _f("group", "Divide advantages by the std of the group, of the batch, or not at all.", SCALE_REWARDS)
    reward_weights: list[float] | None = _f(None, "One weight per reward function; defaults to all 1.")
    mask_truncated_completions: bool = _f(False, "Exclude completions that hit max_completion_length from the loss.")
    top_entropy_quantile: float = _f(1.0, "Train only on tokens whose entropy is in this top fraction (1.0: all).")
    async_generation: bool = _f(False, "One-step off-policy: generate batch k+1 while training on batch k, corrected by importance sampling.")
    async_yield: str | None = _f(None, "With async_generation on a GPU, while the next batch is generated beside training: training waits for the GPU after each decoder layer ('layer') or each attention and MLP block ('block'), forward and backward, so that the engine's decode steps get the GPU at once instead of after training's time slice (fastgrpo.sharing; docs/benchmarks.md 14: with 'layer' the async step was 8-19% shorter in three of four pairs, and 0.97-1.02x vLLM alone). 'off': no waits. None: 'layer' where generation runs in another process on the trainer's GPU (vLLM's engine process, the default for async colocate), 'off' otherwise.", YIELD_MODES)

    # --- rewards (fastgrpo additions) ---
    reward_timeout: float | None = _f(None, "Seconds a reward function may take per call before the run stops with its name.")
    reward_error: str = _f("raise", "When a reward function raises, times out or returns an unusable result (wrong length, NaN/inf, not numbers): 'raise' stops with its name and sample; 'zero' scores that function 0 for the whole batch, counts it (rewards/failures) and warns at the 1st, 10th, 100th... failure.", REWARD_ERRORS)

    # --- vLLM ---
    use_vllm: bool = _f(False, "Generate with vLLM; without vLLM or a GPU, warn once and use transformers.")
    vllm_mode: str = _f("colocate", "'colocate': vLLM inside the trainer process; 'server': a `fastgrpo vllm-serve` server.", VLLM_MODES)
    vllm_model_impl: str = _f("vllm", "vLLM's model implementation: 'vllm' or 'transformers'.", ("vllm", "transformers", "auto"))
    vllm_enable_sleep_mode: bool = _f(False, "Release vLLM's memory during the training phase and wake it before generating.")
    vllm_guided_decoding_regex: str | None = _f(None, "Constrain completions to this regular expression.")
    vllm_structured_outputs_regex: str | None = _f(None, "TRL's newer name for vllm_guided_decoding_regex.")
    vllm_server_base_url: str | None = _f(None, "Server URL (overrides host and port), e.g. http://10.0.0.2:8000.")
    vllm_server_host: str = _f("0.0.0.0", "Server host when vllm_server_base_url is not set (0.0.0.0 means this machine).")
    vllm_server_port: int = _f(8000, "Server port when vllm_server_base_url is not set.")
    vllm_server_timeout: float = _f(240.0, "Seconds to wait for the server to become ready.")
    vllm_server_api_key: str | None = _f(None, "API key sent to the server; defaults to the VLLM_API_KEY environment variable.")
    vllm_group_port: int = _f(51216, "Port of the NCCL group that carries weights to the server.")
    vllm_gpu_memory_utilization: float = _f(0.3, "Fraction of GPU memory vLLM may use (ignored when vllm_kv_cache_memory_bytes is set).")
    vllm_kv_cache_memory_bytes: int | str | None = _f("auto", "KV-cache size for colocated vLLM: bytes, 'auto' (sized from the batch) or None (use vllm_gpu_memory_utilization).")
    vllm_max_model_length: int | None = _f(None, "vLLM context length; defaults to max_prompt_length + max_completion_length.")
    vllm_tensor_parallel_size: int = _f(1, "Tensor-parallel size of the colocated vLLM engine.")
    vllm_engine_process: bool | None = _f(None, "Colocate mode, one process, TP 1: run vLLM's engine core in its own process on the same GPU (weights pushed through CUDA IPC), so its CPU work does not contend with training for the GIL. None: on with async_generation (where generation and training run at once), off otherwise. With several processes (torchrun) or TP > 1 the engine stays in-process.")
    vllm_engine_env: dict | str | None = _f(None, "Environment variables for vLLM's engine process only (vllm_engine_process), not the trainer, as a mapping of names to text (JSON on a command line), e.g. '{\"CUDA_MPS_CLIENT_PRIORITY\": \"0\"}' under CUDA MPS with the trainer started at priority 1. The engine inherits the trainer's environment otherwise. Ignored, with a warning, where the engine runs in the trainer's process.")
    vllm_sampler_logprobs: bool = _f(True, "Colocate mode: read the sampled tokens' logprobs (for the importance-sampling correction) from vLLM's sampler on the GPU, once per generation, instead of through vLLM's per-token output objects. Same values, ~0.5 s less per recipe step; False asks vLLM for logprobs=0.")
    vllm_enable_prefix_caching: bool = _f(True, "Share the KV cache of a prompt across its num_generations completions.")
    vllm_importance_sampling_correction: bool = _f(True, "Reweight the loss by trainer/generator probability ratios (truncated IS).")
    vllm_importance_sampling_mode: str = _f("token_truncate", "Per token or per sequence; clip (truncate) or drop (mask) large ratios.", IS_MODES)
    vllm_importance_sampling_cap: float | None = _f(None, "Older name of vllm_importance_sampling_clip_max.")
    vllm_importance_sampling_clip_max: float | None = _f(2.0, "Upper bound of the importance-sampling ratio.")
    vllm_importance_sampling_clip_min: float | None = _f(None, "Lower bound of the importance-sampling ratio (None: none).")

    # --- logging ---
    logging_steps: float = _f(10, "Log metrics every this many optimizer steps (and at the first and last).")
    logging_first_step: bool = _f(True, "Log the first step too.")
    logging_dir: str | None = _f(None, "Accepted for TRL compatibility; metrics go to output_dir/metrics.jsonl.")
    report_to: str | list[str] = _f("none", "'trackio', 'none' or a list; metrics.jsonl is always written.")
    project: str = _f("fastgrpo", "trackio project name.")
    trackio_space_id: str | None = _f(None, "Hugging Face Space for a trackio dashboard; without network, logging stays local.")
    log_completions: bool = _f(False, "Write each logged round's prompts, completions, rewards and advantages (rank 0's) to output_dir/completions.jsonl, one JSON line per completion; a round is logged when it starts at a multiple of logging_steps.")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")

    # --- checkpoints and hub ---
    save_strategy: str = _f("steps", "When to write checkpoints.", STRATEGIES)
    save_steps: float = _f(500, "Checkpoint every this many optimizer steps (save_strategy='steps'), at the end of the generation round that reaches the step: with several optimizer steps per round (steps_per_generation, num_iterations), checkpoints fall on round boundaries, where resuming is exact.")
    save_total_limit: int | None = _f(None, "Keep at most this many checkpoints (oldest deleted first).")
    save_only_model: bool = _f(False, "Leave optimizer, scheduler and RNG state out of scheduled checkpoints: they hold weights only and cannot resume a run. The checkpoint written when a run stops (SIGINT/SIGTERM, non-finite updates, a failed reward or server) keeps them, so that it can.")
    resume_from_checkpoint: str | None = _f(None, "Checkpoint to resume from; True takes the newest in output_dir.")
    push_to_hub: bool = _f(False, "Push the final model to the Hub after training; a failed push never fails the run.")
    hub_model_id: str | None = _f(None, "Repository for push_to_hub; defaults to the output folder's name.")
    hub_token: str | None = _f(None, "Token for push_to_hub; defaults to the cached login.")
    hub_private_repo: bool | None = _f(None, "Create the Hub repository as private.")

    # --- evaluation ---
    eval_strategy: str = _f("no", "When to evaluate on eval_dataset.", STRATEGIES)
    eval_steps: float | None = _f(None, "Evaluate every this many steps; defaults to logging_steps.")
    eval_on_start: bool = _f(False, "Evaluate before the first step.")

    # --- speed (fastgrpo additions) ---
    logprob_chunk_size: int = _f(2048, "Tokens per chunk of the log-softmax over the vocabulary; bounds logits memory.")
    micro_batch_tokens: int | None = _f(None, "Token budget of one forward pass (sequences x longest); None: on a GPU up to 16384, fewer when free memory is short (trainer.auto_token_budget), on CPU per_device_train_batch_size rows. The loss does not depend on it.")
    max_consecutive_nonfinite: int = _f(3, "Skip updates with NaN/inf loss or gradient; stop (with a checkpoint) after this many in a row.")
    torch_threads: int | None = _f(None, "CPU threads for torch; None keeps torch's default.")
    use_liger_kernel: bool | None = _f(None, "Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE) in the policy's layers, on CUDA: the training half ~27% faster on the recipe (docs/benchmarks.md 11.1), same math. None: on when liger-kernel imports, unless torch_compile is on or FSDP2 shards the model; True: on (an error if liger-kernel is missing); False: off. Liger's losses are not used: fastgrpo's fused log-softmax computes the loss.")
    liger_kernel_config: dict | str | None = _f(None, "Which of Liger's layer kernels use_liger_kernel applies, as in transformers: a mapping of 'rope', 'rms_norm', 'swiglu', 'geglu', 'layer_norm', 'relu_squared' to true/false (JSON text on a command line); a kernel not named is on (swiglu only for SiLU MLPs, where it computes the same). 'cross_entropy' and 'fused_linear_cross_entropy' are accepted and change nothing: fastgrpo's fused log-softmax computes the loss.")
    torch_compile: bool = _f(False, "torch.compile each decoder layer of the policy (dynamic shapes): on the recipe the training half ~40% faster than plain, ~20% faster than with Liger, after a one-time compile of about a minute at the first step. Replaces Liger's kernels. Setting torch_compile_backend or torch_compile_mode turns it on, as in transformers.")
    torch_compile_backend: str | None = _f(None, "torch.compile backend; None: 'inductor'.")
    torch_compile_mode: str | None = _f(None, "torch.compile mode ('default', 'reduce-overhead', 'max-autotune', ...); None: torch's default.")

    def __post_init__(self) -> None:
        _validate(self)

    # -- conveniences ----------------------------------------------------------------------------------
    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def structured_regex(self) -> str | None:
        return self.vllm_guided_decoding_regex or self.vllm_structured_outputs_regex

    @property
    def is_clip_max(self) -> float | None:
        return self.vllm_importance_sampling_cap if self.vllm_importance_sampling_cap is not None else self.vllm_importance_sampling_clip_max

    @property
    def compiles(self) -> bool:
        """Whether the decoder layers are compiled (transformers' rule: a backend or mode implies torch_compile)."""
        return bool(self.torch_compile or self.torch_compile_backend or self.torch_compile_mode)

    @property
    def fsdp_mode(self) -> str:
        """'auto', 'full_shard' or 'no_shard' (the value was validated in __post_init__)."""
        options = _fsdp_options(self.fsdp)
        return "no_shard" if "no_shard" in options else ("full_shard" if options else "auto")

    @property
    def reporters(self) -> list[str]:
        r = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [x for x in r if x not in ("none", "jsonl")]

    def batch_plan(self, world_size: int = 1) -> "BatchPlan":
        return BatchPlan.from_config(self, world_size)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "GRPOConfig":
        check_names(values, source)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Sizes derived from the config for one rank. All counts are completions unless named prompts."""

    world_size: int
    micro_batch: int            # completions per micro-batch
    grad_accum: int             # micro-batches per optimizer step
    steps_per_generation: int   # micro-batches per generation round
    num_generations: int
    num_iterations: int

    @property
    def completions_per_rank(self) -> int:
        return self.micro_batch * self.steps_per_generation

    @property
    def prompts_per_rank(self) -> int:
        return self.completions_per_rank // self.num_generations

    @property
    def prompts_per_round(self) -> int:
        return self.prompts_per_rank * self.world_size

    @property
    def optimizer_steps_per_round(self) -> int:
        return self.steps_per_generation * self.num_iterations // self.grad_accum

    @classmethod
    def from_config(cls, c: GRPOConfig, world_size: int = 1) -> "BatchPlan":
        per_rank = c.per_device_train_batch_size
        spg = c.steps_per_generation or c.gradient_accumulation_steps
        if c.generation_batch_size is not None and c.steps_per_generation is not None:
            raise ConfigError(f"generation_batch_size={c.generation_batch_size} and steps_per_generation="
                              f"{c.steps_per_generation} both size the generation round; set one of them (as TRL "
                              "requires).")
        if c.generation_batch_size is not None:
            if c.generation_batch_size % (per_rank * world_size):
                raise ConfigError(
                    f"generation_batch_size={c.generation_batch_size} must be a multiple of "
                    f"per_device_train_batch_size * world_size = {per_rank * world_size}."
                )
            spg = c.generation_batch_size // (per_rank * world_size)
        plan = cls(world_size, per_rank, c.gradient_accumulation_steps, spg, c.num_generations, c.num_iterations)
        if plan.completions_per_rank % c.num_generations:
            raise ConfigError(
                f"Each device generates per_device_train_batch_size * steps_per_generation = "
                f"{per_rank} * {spg} = {plan.completions_per_rank} completions per round, which is not a multiple of "
                f"num_generations={c.num_generations}: a prompt's group must stay on one device. "
                f"Fix: make {_round_knob(c)} a multiple of {c.num_generations}, or pick a num_generations "
                f"that divides {plan.completions_per_rank}."
            )
        if (spg * c.num_iterations) % c.gradient_accumulation_steps:
            raise ConfigError(
                f"steps_per_generation * num_iterations = {spg * c.num_iterations} must be a multiple of "
                f"gradient_accumulation_steps={c.gradient_accumulation_steps} so that each optimizer step sees whole micro-batches."
            )
        return plan


def _round_knob(c: GRPOConfig) -> str:
    """The setting that sizes a device's generation round, as the user wrote it."""
    if c.generation_batch_size is not None:
        return "generation_batch_size / world_size"
    return f"per_device_train_batch_size * {'steps_per_generation' if c.steps_per_generation else 'gradient_accumulation_steps'}"


# ------------------------------------------------------------------------------------------------------
FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(GRPOConfig))


def _type_names(annotation: Any) -> list[str]:
    """'int | None' -> ['int', 'None']; fastgrpo's annotations are text, trl_compat's generated ones are types."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return [k.strip() for k in text.split("|")]


#: Each field's annotation as its type names, read once here: argument parsers built from dataclasses
#: (HfArgumentParser) later replace the fields' `type` strings with the resolved types.
FIELD_TYPES = {f.name: _type_names(f.type) for f in dataclasses.fields(GRPOConfig)}


def closest_name(name: str, names) -> str | None:
    match = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
    return match[0] if match else None


def check_names(values: dict[str, Any], source: str = "GRPOConfig") -> None:
    for name in values:
        if name not in FIELD_NAMES:
            hint = closest_name(name, FIELD_NAMES)
            tip = f" Did you mean '{hint}'?" if hint else " See `fastgrpo train --help-fields` for the list."
            raise ConfigError(f"{source}: unknown field '{name}'.{tip}")


#: Fields where TRL's default is None ("decide later") and fastgrpo's is a value: None means fastgrpo's default.
_NONE_MEANS_DEFAULT = ("disable_tqdm", "fsdp", "report_to")


def _checked_init(init):
    """GRPOConfig(learning_rat=...) raises ConfigError naming the closest field, not a bare TypeError."""
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_names(kwargs)
        for name in _NONE_MEANS_DEFAULT:
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        init(self, *args, **kwargs)
    return __init__


GRPOConfig.__init__ = _checked_init(GRPOConfig.__init__)  # type: ignore[method-assign]


def _choice(c: GRPOConfig, name: str, allowed: tuple) -> None:
    value = getattr(c, name)
    if value not in allowed:
        hint = closest_name(str(value), allowed) if isinstance(value, str) else None
        tip = f" Did you mean '{hint}'?" if hint else ""
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.{tip}")


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
          "dict": (dict,), "list[float]": (list, tuple), "list[str]": (list, tuple)}


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


#: Types a field takes beyond its annotation. The annotations stay in the one-type-or-None forms that argument
#: parsers built from dataclasses (transformers' HfArgumentParser, TRL's TrlParser) can turn into options.
_ALSO_ACCEPTS = {"resume_from_checkpoint": ["bool"], "scale_rewards": ["bool"],
                 "save_strategy": ["bool"], "eval_strategy": ["bool"],  # YAML's bare `no` is False
                 "async_yield": ["bool"]}  # and its bare `off` / `on` are False / True


def _check_types(c: GRPOConfig) -> None:
    """Reject values of the wrong type (from YAML, the CLI or Python) naming the field and what it takes."""
    for f in dataclasses.fields(c):
        if f.name in trl_compat.NAMES:  # TRL's settings: ignored, or checked by value (_validate)
            continue
        value = getattr(c, f.name)
        kinds = FIELD_TYPES[f.name] + _ALSO_ACCEPTS.get(f.name, [])
        # pathlib paths and numpy scalars are what scripts hold; the config keeps plain values (it is saved as JSON)
        if "str" in kinds and isinstance(value, os.PathLike):
            value = os.fspath(value)
            setattr(c, f.name, value)
        elif isinstance(value, numbers.Number) and type(value).__module__ == "numpy":
            value = value.item()
            setattr(c, f.name, value)
        if "float" in kinds and isinstance(value, int) and not isinstance(value, bool):
            continue
        if "int" in kinds and "float" not in kinds and isinstance(value, float) and value.is_integer():
            setattr(c, f.name, int(value))
            continue
        ok = any(isinstance(value, _TYPES[k]) and not (isinstance(value, bool) and k in ("int", "float"))
                 for k in kinds if k in _TYPES)
        if not ok:
            want = " or ".join({"None": "null", "list[float]": "a list of numbers", "list[str]": "a list of strings",
                                "int": "an integer", "float": "a number", "bool": "true/false",
                                "str": "a string", "dict": "a mapping"}.get(k, k) for k in kinds)
            tip = ""
            if isinstance(value, str) and ("int" in kinds or "float" in kinds) and _is_number(value):
                tip = (" Fix: write it as a number, not text (YAML reads 1e-5 as a string; write 1.0e-5, and leave "
                       "numbers unquoted).")
            raise ConfigError(f"{f.name} must be {want}, got {value!r} ({type(value).__name__}).{tip}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be finite, got {value!r}.")


def _fsdp_options(value: str | list[str]) -> list[str]:
    """Options from 'full_shard auto_wrap' or a list, whose items may hold several (argument parsers give
    ['full_shard auto_wrap'] for --fsdp "full_shard auto_wrap")."""
    items = [value] if isinstance(value, str) else list(value)
    return [o for item in items for o in (item.split() if isinstance(item, str) else [item])]


def _check_fsdp(c: GRPOConfig) -> None:
    options = _fsdp_options(c.fsdp)
    allowed = ", ".join(map(repr, FSDP_OPTIONS))
    for o in options:
        if o not in FSDP_OPTIONS:
            hint = closest_name(o, FSDP_OPTIONS) if isinstance(o, str) else None
            tip = f" Did you mean '{hint}'?" if hint else ""
            raise ConfigError(f"fsdp={c.fsdp!r}: {o!r} is not supported; use '' (auto), or a string or list of "
                              f"{allowed}.{tip}")
    if "no_shard" in options and len(set(options)) > 1:
        raise ConfigError(f"fsdp={c.fsdp!r}: 'no_shard' (replicated ranks) contradicts the other options; give "
                          "either 'no_shard' or 'full_shard'.")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_compile(c: GRPOConfig) -> None:
    """torch.compile's mode and backend, checked here rather than when the trainer compiles the layers."""
    if c.torch_compile_mode is not None:
        _choice(c, "torch_compile_mode", COMPILE_MODES)
    if c.torch_compile_backend is not None:
        import torch._dynamo  # imported only for this check: it takes about a second

        if c.torch_compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"torch_compile_backend={c.torch_compile_backend!r} is not a torch.compile backend "
                              f"here; use one of {torch._dynamo.list_backends()} (or None: 'inductor').")


def _validate(c: GRPOConfig) -> None:
    for why in trl_compat.refusals(c):
        raise ConfigError(why)
    _check_types(c)
    _check_fsdp(c)
    if c.scale_rewards is True:
        c.scale_rewards = "group"
    elif c.scale_rewards is False:
        c.scale_rewards = "none"
    for name in ("save_strategy", "eval_strategy"):  # YAML reads a bare `no` as False
        if getattr(c, name) is False:
            setattr(c, name, "no")
        elif getattr(c, name) is True:
            raise ConfigError(f"{name}=True: write one of {STRATEGIES} (quoted in YAML: '{name}: \"steps\"').")
    if isinstance(c.async_yield, bool):
        c.async_yield = "layer" if c.async_yield else "off"
    elif isinstance(c.async_yield, str) and c.async_yield.strip().lower() == "none":
        c.async_yield = None  # from argument parsers: the default
    if isinstance(c.resume_from_checkpoint, str) and c.resume_from_checkpoint.strip().lower() in ("true", "false"):
        c.resume_from_checkpoint = c.resume_from_checkpoint.strip().lower() == "true"  # from argument parsers
    if isinstance(c.vllm_kv_cache_memory_bytes, str) and c.vllm_kv_cache_memory_bytes.strip().lower() == "none":
        c.vllm_kv_cache_memory_bytes = None
    for f in dataclasses.fields(c):  # every field declared with choices; None where None is its default
        allowed = f.metadata.get("choices")
        if allowed and not (getattr(c, f.name) is None and f.default is None):
            _choice(c, f.name, allowed)
    for r in c.reporters:
        if r not in REPORTERS:
            raise ConfigError(f"report_to={c.report_to!r}: '{r}' is not supported; use 'trackio' or 'none'.")

    def positive(name: str, strict: bool = True) -> None:
        v = getattr(c, name)
        if v is not None and (v <= 0 if strict else v < 0):
            raise ConfigError(f"{name} must be {'> 0' if strict else '>= 0'}, got {v}.")

    if c.num_generations < 2:
        raise ConfigError(f"num_generations must be >= 2 (group-relative advantages need a group), got {c.num_generations}.")
    if c.num_generations_eval is not None and c.num_generations_eval < 1:
        raise ConfigError(f"num_generations_eval must be >= 1, got {c.num_generations_eval}.")
    for name in ("max_completion_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "num_iterations", "epsilon", "temperature", "logprob_chunk_size",
                 "vllm_server_timeout", "vllm_tensor_parallel_size", "max_consecutive_nonfinite"):
        positive(name)
    for name in ("learning_rate", "weight_decay", "beta", "max_grad_norm", "warmup_steps", "num_train_epochs",
                 "adam_epsilon", "repetition_penalty"):
        positive(name, strict=False)
    for name in ("max_prompt_length", "steps_per_generation", "generation_batch_size", "epsilon_high", "delta",
                 "reward_timeout", "save_total_limit", "micro_batch_tokens", "torch_threads", "min_p",
                 "vllm_importance_sampling_cap", "vllm_importance_sampling_clip_max"):
        positive(name)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(c, name)}.")
    if c.adam_epsilon <= 0:
        raise ConfigError(f"adam_epsilon must be > 0, got {c.adam_epsilon}.")
    if c.min_p is not None and not 0 <= c.min_p <= 1:
        raise ConfigError(f"min_p must be in [0, 1] (a share of the most likely token's probability), got {c.min_p}.")
    if isinstance(c.seed, int) and not 0 <= c.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {c.seed}.")
    lo, hi = c.vllm_importance_sampling_clip_min, c.vllm_importance_sampling_clip_max
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"vllm_importance_sampling_clip_min={lo} is above vllm_importance_sampling_clip_max={hi}.")
    if not 0 < c.vllm_group_port < 65536:
        raise ConfigError(f"vllm_group_port must be in 1..65535, got {c.vllm_group_port}.")
    if c.vllm_max_model_length is not None and c.vllm_max_model_length <= 0:
        raise ConfigError(f"vllm_max_model_length must be > 0, got {c.vllm_max_model_length}.")
    for name in ("save_steps", "logging_steps", "eval_steps"):
        v = getattr(c, name)
        if isinstance(v, float) and v > 1 and not v.is_integer():
            raise ConfigError(f"{name}={v}: above 1 it counts steps and must be whole (below 1 it is a share of the "
                              "run's steps, as in transformers).")
    if c.repetition_penalty == 0:
        raise ConfigError("repetition_penalty must be > 0 (1.0 disables it).")
    _check_compile(c)
    from .config_mappings import check_mappings  # here, not at the top: that module imports this one

    check_mappings(c)
    if c.use_vllm and c.temperature > 2.0:
        raise ConfigError(f"temperature={c.temperature}: vLLM samples with temperature <= 2.0. Fix: lower it, or set "
                          "use_vllm=False to sample with transformers.")
    if not 0 < c.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {c.top_p}.")
    if c.top_k is not None and c.top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 disables it), got {c.top_k}.")
    if not 0 < c.top_entropy_quantile <= 1:
        raise ConfigError(f"top_entropy_quantile must be in (0, 1], got {c.top_entropy_quantile}.")
    if not 0 <= c.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {c.warmup_ratio}.")
    if not 0 < c.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1], got {c.vllm_gpu_memory_utilization}.")
    if isinstance(c.vllm_kv_cache_memory_bytes, str) and c.vllm_kv_cache_memory_bytes.strip().isdigit():
        c.vllm_kv_cache_memory_bytes = int(c.vllm_kv_cache_memory_bytes)  # from a command line, as text
    if not (isinstance(c.vllm_kv_cache_memory_bytes, int) and c.vllm_kv_cache_memory_bytes > 0) and c.vllm_kv_cache_memory_bytes not in (None, "auto"):
        raise ConfigError(f"vllm_kv_cache_memory_bytes must be a positive integer, 'auto' or None, got {c.vllm_kv_cache_memory_bytes!r}.")
    if c.max_steps == 0 or c.max_steps < -1:
        raise ConfigError(f"max_steps must be -1 (derive from num_train_epochs) or > 0, got {c.max_steps}.")
    if c.max_steps == -1 and c.num_train_epochs <= 0:
        raise ConfigError("num_train_epochs must be > 0 when max_steps is -1.")
    if c.save_strategy == "steps" and c.save_steps <= 0:
        raise ConfigError(f"save_steps must be > 0 with save_strategy='steps', got {c.save_steps}.")
    if c.logging_steps <= 0:
        raise ConfigError(f"logging_steps must be > 0, got {c.logging_steps}.")
    if c.eval_steps is not None and c.eval_steps <= 0:
        raise ConfigError(f"eval_steps must be > 0, got {c.eval_steps}.")
    if c.fp16:
        raise ConfigError("fp16=True is not supported: GRPO's probability ratios lose precision in fp16. Use bf16=True.")
    if c.reward_weights is not None:
        if isinstance(c.reward_weights, (list, tuple)) and not c.reward_weights:
            raise ConfigError("reward_weights=[] gives no weight; leave it unset (None) for weight 1 on every reward.")
        if not isinstance(c.reward_weights, (list, tuple)) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in c.reward_weights
        ):
            raise ConfigError(f"reward_weights must be a list of finite numbers, got {c.reward_weights!r}.")
        c.reward_weights = [float(w) for w in c.reward_weights]
    if c.loss_type == "cispo" and c.epsilon_high is None:
        raise ConfigError("loss_type='cispo' caps the ratio at epsilon_high, which is unset. Fix: set epsilon_high (e.g. 5.0).")
    if c.vllm_server_port is not None and not 0 < c.vllm_server_port < 65536:
        raise ConfigError(f"vllm_server_port must be in 1..65535, got {c.vllm_server_port}.")
    BatchPlan.from_config(c)  # divisibility checks for one rank; ranks are checked again at start
