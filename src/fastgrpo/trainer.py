"""GRPOTrainer: TRL's public surface over fastgrpo's own loop (`loop.train_loop`).

Construction validates everything that can be checked before a model is loaded (config, reward functions,
dataset columns and prompts), then loads the tokenizer and the model (`loading`), wraps it with LoRA when given a
peft_config, and picks a generation backend. `train()` builds the optimizer, scheduler and metrics sink, resumes
from a checkpoint when asked, and hands a `Run` to the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import logging
import math
import os
import sys
import warnings
from typing import Any

import torch

from . import checkpoint as ckpt
from . import kernels
from .config import ConfigError, GRPOConfig
from .config_mappings import LIGER_LOSSES
from .data import DataError, PromptStream, prepare_prompts, rounds_for_epochs, validate_dataset
from .distributed import barrier, init_distributed, shard_model, use_fsdp
from .loading import (check_model_path, check_policy, check_vocabulary, eos_ids, gather_dispatched, is_model_file,
                      load_model, load_tokenizer, resolve_bf16)
from .loop import Run, TrainingStopped, train_loop
from .loss import LossParams
from .metrics import MetricsSink
from .optim import make_optimizer, make_scheduler
from .rewards import RewardError, check_columns, check_signature, resolve_reward, score
from .rollout import SamplingParams, make_generator
from .sharing import async_yield_mode
from .script_api import ScriptAPI

log = logging.getLogger("fastgrpo")
# Tokens per forward pass on a GPU when micro_batch_tokens is unset: the loss does not depend on how sequences are
# grouped into passes, and larger passes use the GPU better than per_device_train_batch_size rows of padding. Past
# ~16k tokens a pass gains little (Qwen2-0.5B on H200, issue 6: 0.96 s per step at 11.4k tokens, 0.92 s at 22.8k, 1.59
# s at 5.7k) while activation memory keeps growing, so the budget is the smaller of that and what free memory holds.
AUTO_GPU_TOKEN_BUDGET = 16384
MIN_GPU_TOKEN_BUDGET = 2048


def activation_bytes_per_token(model_config) -> int:
    """Rough bf16 activation memory kept for backward per token (no gradient checkpointing): per layer about eight
    hidden-sized and four MLP-sized tensors, doubled as a margin for attention, LoRA and dropout buffers."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inner = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    return max(1, 2 * 2 * layers * (8 * hidden + 4 * inner))


def auto_token_budget(model_config, free_bytes: int) -> int:
    """micro_batch_tokens=None on a GPU: AUTO_GPU_TOKEN_BUDGET, or fewer when half the free memory (measured after the
    colocated engine took its share) cannot hold that many tokens' activations; never below MIN_GPU_TOKEN_BUDGET."""
    fits = int(0.5 * free_bytes) // activation_bytes_per_token(model_config)
    return max(MIN_GPU_TOKEN_BUDGET, min(AUTO_GPU_TOKEN_BUDGET, fits // 1024 * 1024))


#: GRPOTrainer arguments of TRL 1.16 beyond fastgrpo's: accepted when None (as TRL's defaults), refused otherwise.
_TRL_ONLY_ARGS = {"quantization_config": "quantized loading is not implemented",
                  "tools": "no tool calls during generation", "rollout_func": "the rollout is fastgrpo's own",
                  "environment_factory": "no environments during generation"}


class TrainOutput(dict):
    """TRL returns a TrainOutput(global_step, training_loss, metrics); this dict offers both styles."""

    @property
    def global_step(self) -> int:
        return self["global_step"]

    @property
    def training_loss(self) -> float:
        return self["train_loss"]

    @property
    def metrics(self) -> dict:
        return dict(self)


class GRPOTrainer(ScriptAPI):
    def __init__(self, model: Any, reward_funcs: Any, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), peft_config=None, **unused: Any) -> None:
        for name, what in _TRL_ONLY_ARGS.items():  # TRL 1.16 arguments fastgrpo accepts only as None
            if unused.pop(name, None) is not None:
                raise ConfigError(f"GRPOTrainer: {name}= is a TRL argument fastgrpo does not implement ({what}). "
                                  f"Fix: remove it.")
        if unused:
            raise ConfigError(f"GRPOTrainer got unexpected arguments {sorted(unused)}.")
        if args is None:
            args = GRPOConfig()
        if not isinstance(args, GRPOConfig):
            raise ConfigError(f"args must be a fastgrpo.GRPOConfig, got {type(args).__name__}. If you built a "
                              "trl.GRPOConfig, build fastgrpo.GRPOConfig with the same fields.")
        if callbacks:
            warnings.warn("callbacks are not supported by fastgrpo and are ignored; read trainer.state.log_history "
                          "or output_dir/metrics.jsonl instead.")
        self.args = args
        self.dist = init_distributed()
        self.plan = args.batch_plan(self.dist.world_size)
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        torch.manual_seed(args.seed)
        self.device = torch.device(f"cuda:{self.dist.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        self.bf16 = resolve_bf16(args.bf16, self.device)

        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise RewardError("reward_funcs is empty: give at least one reward function.")
        procs = reward_processing_classes
        if not isinstance(procs, (list, tuple)):
            procs = [procs] * len(funcs)  # None, or one processing class for every reward function
        if len(procs) != len(funcs):
            raise ConfigError(f"reward_processing_classes has {len(procs)} entries for {len(funcs)} reward functions. "
                              "Fix: one per reward function (None for plain functions), in the same order.")
        self.reward_funcs = [resolve_reward(f, self.device, tokenizer=p) for f, p in zip(funcs, procs)]
        names: set[str] = set()
        for f in self.reward_funcs:  # two lambdas, or one function twice: one metric each, not one for both
            base, k = f.name, 1
            while f.name in names:
                k += 1
                f.name = f"{base}_{k}"
            names.add(f.name)
        if not isinstance(optimizers, (list, tuple)) or len(optimizers) != 2:
            raise ConfigError(f"optimizers must be a pair (optimizer, lr_scheduler), either None; got {optimizers!r:.80}.")
        opt, sched = optimizers
        if opt is not None and not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(f"optimizers[0] must be a torch.optim.Optimizer, got {type(opt).__name__}.")
        self._user_optim = (opt, sched)
        weights = args.reward_weights or [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ConfigError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions. Fix: give "
                              "one weight per reward function, in the same order, or leave reward_weights unset (all 1).")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        if train_dataset is None:
            raise DataError("train_dataset is required.")
        train_rows = validate_dataset(train_dataset)  # dataset and model path fail before anything is loaded
        eval_rows = validate_dataset(eval_dataset, what="eval_dataset") if eval_dataset is not None else None
        columns = list(dict.fromkeys(k for row in train_rows + (eval_rows or []) for k in row))
        for f in self.reward_funcs:
            check_signature(f, [c for c in columns if c != "prompt"])
        for rows, what in ((train_rows, "train_dataset"), (eval_rows, "eval_dataset")):
            check_columns(self.reward_funcs, rows, what)  # each dataset's own: an eval batch has only its columns
        if eval_rows is None and args.eval_strategy not in ("no", None):
            raise ConfigError(f"eval_strategy={args.eval_strategy!r} needs an eval_dataset. Fix: pass "
                              "eval_dataset=... to GRPOTrainer, or set eval_strategy='no'.")
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        check_model_path(model)

        self.model_path = model if isinstance(model, str) else None
        self.processing_class = processing_class or load_tokenizer(model)
        tok = self.processing_class
        if not callable(getattr(tok, "batch_decode", None)):
            raise ConfigError(f"processing_class must be a tokenizer (e.g. AutoTokenizer.from_pretrained(path)), got "
                              f"{type(tok).__name__} {tok!r:.80}.")
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ConfigError("the tokenizer has neither a pad token nor an EOS token. Fix: set one, e.g. "
                                  "tokenizer.pad_token = tokenizer.eos_token = '<|endoftext|>' (a token of its "
                                  "vocabulary), and pass it as processing_class.")
            tok.pad_token = tok.eos_token
        self.train_prompts = prepare_prompts(train_rows, tok, args.max_prompt_length,
                                             chat_template_kwargs=args.chat_template_kwargs)
        self.eval_prompts = (prepare_prompts(eval_rows, tok, args.max_prompt_length, what="eval_dataset",
                                             chat_template_kwargs=args.chat_template_kwargs)
                             if eval_rows is not None else None)
        self.model = load_model(model, args, self.bf16)
        check_policy(self.model)
        if peft_config is not None:
            from peft import PeftConfig, get_peft_model

            if not isinstance(peft_config, PeftConfig):
                raise ConfigError(f"peft_config must be a peft config such as LoraConfig(r=8, lora_alpha=32, "
                                  f"target_modules=['q_proj', 'v_proj']), got {type(peft_config).__name__} "
                                  f"{peft_config!r:.80}.")

            if hasattr(self.model, "peft_config"):
                raise ConfigError("the model is already a PeftModel; pass peft_config=None.")
            self.model = get_peft_model(self.model, peft_config)
        if args.disable_dropout:
            for m in self.model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        gather_dispatched(self.model, self.device)
        self.is_peft = hasattr(self.model, "peft_config")
        self.fsdp = use_fsdp(args.fsdp_mode, self.dist.world_size, self.is_peft)
        if not self.fsdp:
            self.model.to(self.device)  # FSDP2 moves only this rank's shards there
        if args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(args.gradient_checkpointing_kwargs or {"use_reentrant": False})
            if hasattr(self.model, "enable_input_require_grads"):
                self.model.enable_input_require_grads()
        self.model.train()
        self.ref_model = None
        if args.beta != 0.0 and not self.is_peft:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.speedups = self._speed_up_layers()
        if self.fsdp:  # after the reference copy: copying a sharded model would copy its process-group state
            for m in (self.model, self.ref_model):
                if m is not None:
                    shard_model(m, self.device, self.dist.world_size, self.bf16)
        self.eos_ids = eos_ids(tok, self.model)
        check_vocabulary(self.model, tok, [*self.train_prompts, *(self.eval_prompts or [])], self.eos_ids)
        self.state = ckpt.TrainerState(model_signature=ckpt.model_signature(self.model))
        self._generator = None
        self._last_saved: int | None = None  # the step of the latest checkpoint this trainer wrote

    # ------------------------------------------------------------------------------------------- public API
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **unknown) -> TrainOutput:
        if unknown:  # a misspelt resume_from_checkpoint would otherwise start the run again from step 0
            _unknown_arguments("train", unknown, ["resume_from_checkpoint", "trial", "ignore_keys_for_eval"])
        args = self.args
        if self.dist.is_main:
            _check_output_dir(args.output_dir)
        resume = ckpt.resolve_resume(resume_from_checkpoint if resume_from_checkpoint is not None
                                     else args.resume_from_checkpoint, args.output_dir)
        total = args.max_steps if args.max_steps > 0 else (
            rounds_for_epochs(len(self.train_prompts), args.num_train_epochs, self.plan.prompts_per_round)
            * self.plan.optimizer_steps_per_round)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self._user_optim[0] or make_optimizer(trainable, args)
        scheduler = self._user_optim[1] or make_scheduler(optimizer, args, total)
        if self._user_optim[0] is not None:
            _check_user_optimizer(optimizer, trainable, self.fsdp)
        stream = PromptStream(self.train_prompts, args.seed, args.shuffle_dataset)
        if resume:
            self.state = ckpt.load_checkpoint(resume, self.model, optimizer, scheduler, sharded=self.fsdp)
            stream.state.epoch, stream.state.offset = self.state.stream_epoch, self.state.stream_offset
            log.info("resumed from %s at step %d", resume, self.state.global_step)
            changed = ckpt.config_changes(resume, args.to_dict())
            if changed:
                log.warning("resuming with settings other than %s was written with: %s. The run continues as "
                            "another run would; for an exact continuation use the checkpoint's settings "
                            "(config.fastgrpo.json).", os.path.basename(resume),
                            "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self.state.max_steps = total
        if self.state.global_step >= total:  # a second train(), or a resume past the end: say so, start nothing
            warnings.warn(f"nothing to train: the run is at step {self.state.global_step} and max_steps (or the epochs) "
                          f"end at step {total}. Fix: raise max_steps (or num_train_epochs) to go on.", stacklevel=2)
        generator = self._get_generator()
        if generator.owns_weights:
            generator.update_weights(self.model)
        yield_mode = async_yield_mode(args, generator, self.device)
        if yield_mode != "off":
            log.info("async_yield=%r: while the next batch is generated beside it, training waits for the GPU at "
                     "each %s (fastgrpo.sharing)", yield_mode,
                     "decoder layer" if yield_mode == "layer" else "attention and MLP block")
            self.speedups = [s for s in self.speedups if not s.startswith("async_yield")] + [f"async_yield={yield_mode}"]
        sink = MetricsSink(args.output_dir, args.reporters, args.project, args.run_name, args.trackio_space_id,
                           args.to_dict(), total, self.state.global_step, not args.disable_tqdm, self.dist.is_main)
        self._last_saved = self.state.global_step if resume else None
        _warn_of_later_checkpoints(args.output_dir, self.state.global_step)
        run = Run(config=_steps_from_fractions(args, total), plan=self.plan, model=self.model, ref_model=self.ref_model, tokenizer=self.processing_class,
                  optimizer=optimizer, scheduler=scheduler, generator=generator, stream=stream,
                  reward_funcs=self.reward_funcs, reward_weights=self.reward_weights, sampling=self._sampling(),
                  loss_params=LossParams(args.loss_type, args.importance_sampling_level, args.epsilon_low,
                                         args.clip_high, args.delta, args.beta,
                                         args.use_bias_correction_kl),
                  state=self.state, sink=sink, dist=self.dist, device=self.device, pad_id=self.processing_class.pad_token_id,
                  autocast=self._autocast, save=lambda: None,
                  token_budget=self._token_budget(),
                  evaluate=self.evaluate if self.eval_prompts is not None and args.eval_strategy != "no" else None,
                  lockstep_passes=self.fsdp, yield_mode=yield_mode)
        run.stream_mark = copy.copy(stream.state)
        run.epochs_done = int(self.state.epoch)
        if args.eval_on_start and run.evaluate is not None and self.state.global_step == 0:
            ev = run.evaluate()
            self.state.log_history.append({**ev, "step": 0})
            sink.write(0, ev)
        run.save = lambda full=False: self._save_checkpoint(run, full=full)
        try:
            out = train_loop(run)
        except (TrainingStopped, KeyboardInterrupt):
            raise
        except Exception as e:
            # Out of GPU memory in a generation or a training pass: the weights and the optimizer are still those of
            # the last finished step, and unwinding freed the pass's memory, so that state is kept like a reward error's
            oom = isinstance(e, torch.OutOfMemoryError) and not getattr(e, "partial_update", False)
            if oom and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if (getattr(e, "resumable", False) or oom) and self.state.global_step > 0:  # at step 0 nothing to keep
                # Other ranks may be elsewhere in the step (a generation error is per rank): save without collectives
                path = (os.path.join(args.output_dir, f"checkpoint-{self.state.global_step}")
                        if self._last_saved == self.state.global_step and not args.save_only_model
                        else self._save_checkpoint(run, collective=False, full=True))
                if path is None:
                    prev = ckpt.list_checkpoints(args.output_dir)
                    raise TrainingStopped(f"{e} Under FSDP2 a checkpoint needs every rank, so none was saved now; resume "
                                          f"from the latest, {prev[-1] if prev else 'none yet'}, with "
                                          "resume_from_checkpoint=True.", prev[-1] if prev else None,
                                          type(e).__name__) from e
                raise TrainingStopped(f"{e} A checkpoint was saved to {path}; resume with resume_from_checkpoint=True "
                                      "(CLI: --resume_from_checkpoint true).", path, type(e).__name__) from e
            raise
        finally:
            sink.close()
        if args.save_strategy != "no" and self._last_saved != self.state.global_step:
            self._save_checkpoint(run)  # the final state, whatever save_strategy's schedule was
        final = {k: round(v, 6) for k, v in out.items()}
        self.state.log_history.append({**final, "step": self.state.global_step, "epoch": self.state.epoch})
        if args.push_to_hub:
            self.push_to_hub()  # saves the model first
        return TrainOutput(global_step=self.state.global_step, **final)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **unknown) -> dict[str, float]:
        """Mean of every reward function on the eval prompts (num_generations_eval samples each)."""
        if unknown:
            _unknown_arguments("evaluate", unknown, ["eval_dataset", "ignore_keys", "metric_key_prefix"])
        prompts = (prepare_prompts(eval_dataset, self.processing_class, self.args.max_prompt_length, what="eval_dataset",
                                   chat_template_kwargs=self.args.chat_template_kwargs)
                   if eval_dataset is not None else self.eval_prompts)
        if prompts is None:
            raise DataError("evaluate() needs an eval_dataset (pass it to GRPOTrainer or to evaluate()).")
        return evaluate_prompts(self._get_generator(), prompts, self.processing_class, self.reward_funcs,
                                self._sampling(eval=True), self.args.per_device_eval_batch_size, self.args)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> str:
        """Write the model (full weights, or the LoRA adapter) and tokenizer as a Hugging Face folder, from rank 0.
        Call it on every rank (as TRL scripts do): under FSDP2 the weights are gathered collectively."""
        out = output_dir or self.args.output_dir
        state = ckpt.full_state(self.model)[0] if self.fsdp else None
        if self.dist.is_main:
            tmp = out.rstrip("/") + ".tmp-save"
            _make_dir(out, f"save_model: {out!r}")
            ckpt.save_model_files(self.model, self.processing_class, tmp, state)
            new = set(os.listdir(tmp))
            for name in os.listdir(out):  # an earlier save's weights of the other kind (adapter vs full) would load
                if name not in new and is_model_file(name):  # together with these as one wrong model
                    os.remove(os.path.join(out, name))
            for name in new:
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
            os.rmdir(tmp)
        # every rank returns once the files exist (the other ranks skip the write)
        barrier(self.dist)
        return out

    def push_to_hub(self, commit_message: str = "End of training", **kwargs) -> str | None:
        """Save the model to output_dir (as TRL's does), then upload the folder; a failed upload is reported plainly
        and never raised: the model stays saved locally. Call it on every rank, as save_model."""
        self.save_model(self.args.output_dir)
        if not self.dist.is_main:
            return None
        repo = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        try:
            from huggingface_hub import HfApi

            api = HfApi(token=self.args.hub_token)
            url = api.create_repo(repo, private=self.args.hub_private_repo, exist_ok=True)
            api.upload_folder(repo_id=url.repo_id, folder_path=self.args.output_dir, commit_message=commit_message,
                              ignore_patterns=["checkpoint-*", ".tmp-*"])
            return str(url)
        except Exception as e:  # noqa: BLE001 - a failed push never loses the run
            msg = (f"push_to_hub to '{repo}' failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}). The model is "
                   f"saved locally in {os.path.abspath(self.args.output_dir)}; push it later with "
                   f"`hf upload {repo} {self.args.output_dir}`.")
            print(f"[fastgrpo] {msg}", file=sys.stderr, flush=True)
            self.push_error = msg
            return None

    # ------------------------------------------------------------------------------------------- internals
    def _speed_up_layers(self) -> list[str]:
        """Liger's kernels (policy and reference model) or compiled decoder layers (policy): see kernels.py."""
        args, done = self.args, []
        if kernels.liger_wanted(args, self.device, self.fsdp):
            choice = args.liger_kernel_config
            if any((choice or {}).get(k) for k in LIGER_LOSSES):
                warnings.warn("liger_kernel_config: Liger's losses (cross_entropy, fused_linear_cross_entropy) are "
                              "not used; fastgrpo's fused log-softmax already computes the loss without [B, T, V] "
                              "logits. Only the layer kernels are applied.")
            if all(kernels.apply_liger(m, choice) for m in (self.model, self.ref_model) if m is not None):
                done.append("liger")
            elif args.use_liger_kernel:
                warnings.warn(f"use_liger_kernel=True: Liger has no kernels for model type "
                              f"{getattr(self.model.config, 'model_type', '?')!r} that liger_kernel_config leaves "
                              "on (or they failed their check on this GPU); training without them.")
        if args.compiles:
            n = kernels.compile_layers(self.model, args.torch_compile_backend, args.torch_compile_mode)
            done.append(f"torch_compile ({n} layers)" if n else "torch_compile (whole model)")
            if self.dist.rank == 0:  # the first training pass stalls while it compiles: say why beforehand
                what = f"the {n} decoder layers compile" if n else "the model compiles"
                print(f"[fastgrpo] torch_compile: {what} during the first training pass (about a minute on a GPU).",
                      file=sys.stderr, flush=True)
        return done

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sampling(self, eval: bool = False) -> SamplingParams:
        a = self.args
        n = (a.num_generations_eval or a.num_generations) if eval else a.num_generations
        return SamplingParams(n=n, max_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                              top_k=a.top_k or 0, min_p=a.min_p or 0.0, repetition_penalty=a.repetition_penalty,
                              seed=None, regex=a.structured_regex, extra=dict(a.generation_kwargs or {}))

    def _token_budget(self) -> int | None:
        """Tokens per forward pass (None: per_device_train_batch_size rows). Called after the generator exists, so
        a colocated engine's memory is already taken when the free memory is measured."""
        args = self.args
        if args.top_entropy_quantile < 1:
            return None  # the top-entropy threshold is a quantile over each micro-batch (as in TRL): no packing
        if args.micro_batch_tokens or self.device.type != "cuda":
            return args.micro_batch_tokens
        budget = auto_token_budget(self.model.config, torch.cuda.mem_get_info(self.device)[0])
        log.info("micro_batch_tokens: %d tokens per forward pass (set micro_batch_tokens to choose)", budget)
        return budget

    def _get_generator(self):
        if self._generator is None:
            path = self.model_path
            if self.args.use_vllm and self.args.vllm_mode == "colocate" and (path is None or not os.path.isdir(path)):
                path = self._materialize_base()
            self._generator = make_generator(self.model, path, self.processing_class, self.args, self.eos_ids,
                                             self.processing_class.pad_token_id, self.dist.local_rank,
                                             self.dist.world_size, torch.bfloat16 if self.bf16 else None,
                                             max_model_len=self._unbounded_context())
        return self._generator

    def _unbounded_context(self) -> int | None:
        """With max_prompt_length=None and no vllm_max_model_length, vLLM's context: the longest prompt of the
        datasets + max_completion_length. Without it vLLM would take the model's whole context (32k tokens for
        Qwen2), and an 'auto' KV cache sized for that many tokens per sequence would not fit beside training."""
        a = self.args
        if a.max_prompt_length is not None or a.vllm_max_model_length is not None:
            return None
        prompts = [*self.train_prompts, *(self.eval_prompts or [])]
        return max((len(p.ids) for p in prompts), default=0) + a.max_completion_length

    def _materialize_base(self) -> str | None:
        """vLLM loads weights from disk: write the current (merged) weights once when the model came in memory."""
        from .rollout import vllm_available

        if not vllm_available():
            return None
        path = os.path.join(self.args.output_dir, ".vllm-base-model")
        base = self.model.get_base_model() if self.is_peft else self.model
        from .rollout.weights import iter_sync_weights

        tensors = None
        if self.dist.is_main or self.fsdp:  # FSDP2: every rank takes part in each tensor's all-gather
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in iter_sync_weights(self.model, only_changed=False)}
        if self.dist.is_main:
            os.makedirs(path, exist_ok=True)
            from safetensors.torch import save_file

            save_file(tensors, os.path.join(path, "model.safetensors"))
            base.config.save_pretrained(path)
            self.processing_class.save_pretrained(path)

        barrier(self.dist)
        return path

    def _save_checkpoint(self, run: Run, collective: bool = True, full: bool = False) -> str | None:
        """Every rank calls it at the same point (`collective`): under FSDP2 the full weights and optimizer state
        are gathered, and every rank's RNG state is kept. Without `collective` only rank 0's RNG is kept, and under
        FSDP2 nothing can be saved (None). `full`: with the optimizer, scheduler and RNG state even under
        save_only_model (the checkpoint of a stop, which the stop's message says to resume from)."""
        weights_only = self.args.save_only_model and not full
        st = self.state
        mark = run.stream_mark or run.stream.state
        st.stream_epoch, st.stream_offset = mark.epoch, mark.offset
        model_state = optim_state = rng_ranks = None
        if self.fsdp:
            if not collective:
                return None
            model_state, optim_state = ckpt.full_state(self.model, None if weights_only else run.optimizer)
        if collective:
            rng_ranks = ckpt.rng_states_of_ranks()
        self._last_saved = st.global_step
        if not self.dist.is_main:
            return os.path.join(self.args.output_dir, f"checkpoint-{st.global_step}")
        try:
            return ckpt.save_checkpoint(self.args.output_dir, st, self.model, self.processing_class, run.optimizer,
                                        run.scheduler, self.args.to_dict(), weights_only,
                                        self.args.save_total_limit, model_state, optim_state, rng_ranks)
        except Exception as e:  # noqa: BLE001 - safetensors and torch.save wrap OSError in their own types
            prev = ckpt.list_checkpoints(self.args.output_dir)
            full = ckpt.is_disk_full(e)
            what = "the disk is full (No space left on device)" if full else f"{type(e).__name__}: {e}"
            fix = "Free disk space (or set save_total_limit)" if full else "Fix the cause"
            raise ckpt.CheckpointError(
                f"saving checkpoint-{st.global_step} in {self.args.output_dir} failed: {what}. Nothing partial was "
                f"left behind; the latest intact checkpoint is {prev[-1] if prev else 'none'}. {fix}, then resume "
                "with resume_from_checkpoint=True (CLI: --resume_from_checkpoint true).") from e


def _steps_from_fractions(args: GRPOConfig, total: int) -> GRPOConfig:
    """save_steps, logging_steps, eval_steps below 1 are fractions of the run's steps (as in transformers)."""
    frac = {k: max(1, math.ceil(v * total)) for k in ("save_steps", "logging_steps", "eval_steps")
            if isinstance(v := getattr(args, k), float) and 0 < v < 1}
    return dataclasses.replace(args, **frac) if frac else args


def _check_user_optimizer(optimizer, trainable: list, fsdp: bool) -> None:
    """optimizers=(opt, ...) from a script: it must update exactly the parameters that train."""
    if fsdp:
        raise ConfigError("optimizers=(...) with FSDP2: the model is sharded after the optimizer was built, so it "
                          "would update the unsharded tensors. Fix: leave optimizers unset (AdamW from learning_rate, "
                          "adam_beta1/2, adam_epsilon, weight_decay).")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if held != {id(p) for p in trainable}:
        raise ConfigError("optimizers[0] does not hold exactly the parameters that train (with peft_config, the "
                          "trainer adds the LoRA weights after your optimizer was built). Fix: build it from "
                          "trainer.model's trainable parameters, or leave optimizers unset.")


def _make_dir(path: str, named: str) -> None:
    """os.makedirs, where a failure is a ConfigError naming the setting (`named`) that asked for the folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{named} cannot be created ({e.strerror or e}). Fix: choose a folder you can write to.") from e


def _check_output_dir(path: str) -> None:
    """Fail before the first step, not at the first metric or checkpoint, when output_dir cannot hold them."""
    _make_dir(path, f"output_dir={path!r}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={path!r} is not writable. Fix: choose a folder you can write to.")


def _warn_of_later_checkpoints(output_dir: str, step: int) -> None:
    later = [c for c in ckpt.list_checkpoints(output_dir) if ckpt.checkpoint_step(c) > step]
    if later:
        log.warning("%s already holds %s, beyond this run's start (step %d): left by another run? They are kept out "
                    "of save_total_limit's rotation, but resume_from_checkpoint=True picks the highest-numbered "
                    "checkpoint. Use a fresh output_dir, or resume by path.", output_dir,
                    ", ".join(os.path.basename(c) for c in later), step)


def evaluate_prompts(generator, prompts, tokenizer, reward_funcs, sampling: SamplingParams, batch_prompts: int,
                     config) -> dict[str, float]:
    from .batch import _decode_kwargs

    sums = torch.zeros(len(reward_funcs))
    counts = torch.zeros(len(reward_funcs))
    lengths = []
    for s in range(0, len(prompts), max(batch_prompts, 1)):
        chunk = prompts[s:s + batch_prompts]
        generator.wake()
        gen = generator.generate([p.ids for p in chunk], sampling)
        kwargs, n = _decode_kwargs(chunk, gen, tokenizer, sampling.n)
        per_func = score(reward_funcs, kwargs, n, config.reward_timeout, config.reward_error).rewards
        valid = ~per_func.isnan()
        sums += torch.nan_to_num(per_func).sum(0)
        counts += valid.sum(0)
        lengths += [len(c) for c in gen.completion_ids]
    out = {f"eval_rewards/{f.name}/mean": (sums[j] / counts[j].clamp(min=1)).item() for j, f in enumerate(reward_funcs)}
    out["eval_completions/mean_length"] = sum(lengths) / max(len(lengths), 1)
    out["eval_num_prompts"] = len(prompts)
    return out


def _unknown_arguments(method: str, unknown: dict, known: list[str]) -> None:
    from .config import closest_name

    hints = [f"'{k}' (did you mean '{h}'?)" if (h := closest_name(k, known)) else f"'{k}'" for k in sorted(unknown)]
    raise TypeError(f"GRPOTrainer.{method}() got unexpected keyword arguments {', '.join(hints)}; it takes "
                    f"{', '.join(known)}.")
