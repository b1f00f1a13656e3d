"""`fastgrpo demo`: watch GRPO make a model better at the recipe's task, on 2 CPU cores, offline, in ~3.5 minutes.

Same pipeline as the recipe (Qwen2 architecture, ChatML template, the recipe's `<think>`/`<answer>` system prompt,
format reward + math-verify accuracy reward, group-relative advantages, `GRPOConfig`/`GRPOTrainer`; full
fine-tuning, or LoRA with --lora), scaled down so that it fits 2 CPU cores:
- Task: two-number addition word problems (two-digit addends) generated locally; `solution` is `\\boxed{sum}`, so
  the built-in `accuracy_reward` grades it with math-verify. Test and dev problems use number pairs ({a, b},
  unordered) that never appear in training.
- Tokenizer: Qwen2's pre-tokenizer regex (digits one per token) over a word-level vocabulary of the ~90 pieces
  this task's world contains, Qwen2's special tokens, and `<think>`...`</answer>` as single tokens. The recipe's
  system prompt is one added token too, as a frequent phrase would be in a real vocabulary: character-level, it
  made every sequence ~450 tokens long and a GRPO step ~11 s on 2 cores; here prompt + completion is ~60 tokens.
  (Qwen's own 151,936-token vocabulary would make the output layer dominate on CPU.)
- Model: a 4-layer, 128-wide Qwen2 (1.0M parameters), float32.
- Starting point: no weights can be downloaded, so a supervised warm-up teaches the format and column addition
  (`<think>7+8=15;4+3+1=8</think><answer>\\boxed{85}</answer>`) from scratch, on deliberately imperfect targets,
  like a base model's habits: 20% carry a slip in the boxed sum, 15% break the format. It stops as soon as dev
  sampled accuracy reaches --target-accuracy (35%), so that every seed starts GRPO from a comparable,
  improvable point (after a fixed step count, the start varies widely between seeds).
- GRPO: 100 steps of 16 prompts x 8 completions, temperature 1, learning rate 1e-4 constant, no KL, the
  default "dapo" loss; one optimizer step per generation round (on-policy).
- Measurement: accuracy, format rate and completion length of one sampled completion (temperature 1, as in
  training) per held-out problem, before and after GRPO, scored by the same reward functions as training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)
NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kim", "Leo"]
ITEMS = ["apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles", "stickers", "plums"]
TEMPLATES = [
    "{n} has {a} {o} and gets {b} more. How many {o} does {n} have now?",
    "{n} had {a} {o} and found {b} more. How many {o} does {n} have?",
    "There are {a} {o} in a box and {b} {o} in a bag. How many {o} are there in all?",
    "{n} buys {a} {o} on Monday and {b} {o} on Tuesday. How many {o} did {n} buy?",
    "What is {a} plus {b}?",
]
LOW, HIGH = 10, 99            # both addends have two digits
N_TEST, N_DEV = 256, 128      # held-out pairs for the before/after table, and for the warm-up's stopping rule
MAX_COMPLETION = 32           # tokens; a clean completion is 23-25
# --quick (tests, ~1 minute): a warm-up that teaches the format (40% broken targets) but little addition, then a short
# GRPO phase whose reward still rises, mostly through the format rate.
QUICK = dict(steps=30, prompts=8, warmup_steps=120, target_accuracy=0.15, eval_problems=64, format_slip_rate=0.4,
             lr=2e-4)


# ------------------------------------------------------------------------------------------------------ task
def split_pairs(split_seed: int = 1234) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Unordered pairs {a, b} split into train / dev / test once (fixed seed, independent of --seed)."""
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(a, HIGH + 1)]
    random.Random(split_seed).shuffle(pairs)
    return pairs[N_TEST + N_DEV:], pairs[N_TEST:N_TEST + N_DEV], pairs[:N_TEST]


def make_row(a: int, b: int, rng: random.Random) -> dict:
    """One problem as a dataset row: conversational prompt (recipe's system prompt) + `solution` column."""
    if rng.random() < 0.5:
        a, b = b, a
    question = rng.choice(TEMPLATES).format(n=rng.choice(NAMES), o=rng.choice(ITEMS), a=a, b=b)
    return {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
            "solution": f"\\boxed{{{a + b}}}", "a": a, "b": b}


def target_completion(a: int, b: int, rng: random.Random, slip_rate: float, format_slip_rate: float) -> str:
    """The warm-up's target: column addition in `<think>`, the sum boxed in `<answer>`, e.g. for 47 + 38
    `<think>7+8=15;4+3+1=8</think><answer>\\boxed{85}</answer>`. Deliberate habits for RL to unlearn: with
    probability `slip_rate` the boxed sum is off by 1 or 10; with `format_slip_rate` the tags are broken."""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    s = 10 * tens + units % 10
    if rng.random() < slip_rate:
        s += rng.choice([-10, -1, 1, 10])
    think = f"<think>{a % 10}+{b % 10}={units};{a // 10}+{b // 10}+{units // 10}={tens}</think>"
    answer = f"<answer>\\boxed{{{s}}}</answer>"
    if rng.random() < format_slip_rate:
        return rng.choice([f"{think}\\boxed{{{s}}}", answer, f"{think}{answer}</think>"])
    return think + answer


def rows(pairs: list[tuple[int, int]], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(a, b, rng) for a, b in pairs]


# ------------------------------------------------------------------------------------------------- tokenizer
def build_demo_tokenizer():
    """Word-level tokenizer over the demo's closed world; see the module docstring for why."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastgrpo.testing import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, QWEN2_PRETOKENIZE_REGEX, REASONING_TOKENS

    import regex

    split = regex.compile(QWEN2_PRETOKENIZE_REGEX)
    corpus = ["system\n", "user\n", "assistant\n", "0123456789", "+=-.,;?!{}()\\boxed"]
    for t in TEMPLATES:
        for n in NAMES:
            for o in ITEMS:
                corpus.append(t.format(n=n, o=o, a=12, b=34) + "\n")
    pieces = {p for text in corpus for p in split.findall(text)} | set("0123456789+=-.,;?!{}()\\ \n") | {"\\boxed"}
    vocab = {p: i for i, p in enumerate(["<unk>"] + sorted(pieces))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated")
    backend.decoder = decoders.Fuse()  # pieces carry their own spaces: concatenate
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (ENDOFTEXT, IM_START, IM_END)])
    backend.add_tokens([AddedToken(t, normalized=False) for t in (*REASONING_TOKENS, SYSTEM_PROMPT)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=IM_END, pad_token=ENDOFTEXT,
                                   bos_token=None, chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=256, padding_side="left")


# ----------------------------------------------------------------------------------------- model and warm-up
def build_model(tokenizer, seed: int):
    from fastgrpo.testing import build_tiny_qwen2

    return build_tiny_qwen2(tokenizer, num_layers=4, hidden_size=128, intermediate_size=512, num_heads=4,
                            num_kv_heads=2, seed=seed)


def _encode_batch(tokenizer, batch: list[dict], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion+eos ids [B, T] and labels [B, T] (-100 on prompt and padding)."""
    ids, labels = [], []
    for row, completion in zip(batch, completions):
        p = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p_ids + c_ids)
        labels.append([-100] * len(p_ids) + c_ids)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return (torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            torch.tensor([y + [-100] * (width - len(y)) for y in labels]))


@dataclass(slots=True)
class WarmupResult:
    steps: int
    dev_accuracy: float
    seconds: float


def warm_up(model, tokenizer, train_pairs, dev_rows, args, log=print) -> WarmupResult:
    """Supervised warm-up on noisy targets; stops once dev sampled accuracy reaches `args.target_accuracy`."""
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.warmup_lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    start, acc, step = time.time(), 0.0, 0
    for step in range(1, args.warmup_steps + 1):
        model.train()
        batch = [make_row(*rng.choice(train_pairs), rng) for _ in range(args.warmup_batch)]
        targets = [target_completion(r["a"], r["b"], rng, args.slip_rate, args.format_slip_rate) for r in batch]
        ids, labels = _encode_batch(tokenizer, batch, targets)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % args.warmup_eval_every == 0 or step == args.warmup_steps:
            note = ""
            if step >= min(100, args.warmup_steps):  # earlier, sampled accuracy is ~0: sampling would waste time
                ev = evaluate(model, tokenizer, dev_rows, seed=args.seed + step)
                acc = ev.accuracy
                note = f"  dev accuracy {acc:.0%}  format {ev.format_rate:.0%}"
            log(f"warm-up step {step:4d}  loss {loss.item():.3f}{note}  ({time.time() - start:.0f}s)")
            if acc >= args.target_accuracy:
                break
    model.eval()
    return WarmupResult(step, acc, time.time() - start)


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass(slots=True)
class EvalResult:
    accuracy: float       # mean accuracy_reward
    format_rate: float    # mean format_reward
    mean_length: float    # completion tokens, eos included
    samples: list[str]


@torch.no_grad()
def evaluate(model, tokenizer, eval_rows: list[dict], seed: int, batch_size: int = 128) -> EvalResult:
    """One sampled completion per problem (temperature 1, no top-k/top-p: as GRPO samples), scored by the
    recipe's reward functions."""
    from fastgrpo.rewards import accuracy_reward, format_reward

    model.eval()
    texts, lengths = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(eval_rows), batch_size):
            chunk = eval_rows[i:i + batch_size]
            prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                       for r in chunk]
            enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=MAX_COMPLETION, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            for seq in out[:, enc["input_ids"].shape[1]:].tolist():
                n = seq.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in seq else len(seq)
                lengths.append(n)
                texts.append(tokenizer.decode(seq[:n], skip_special_tokens=True))
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    acc = accuracy_reward(completions, solution=[r["solution"] for r in eval_rows])
    fmt = format_reward(completions)
    n = len(eval_rows)
    return EvalResult(sum(acc) / n, sum(fmt) / n, sum(lengths) / n, texts)


# ------------------------------------------------------------------------------------------------ warm start
@dataclass(slots=True)
class WarmStart:
    """What the GRPO phase starts from: the task's data, the tokenizer, the warmed-up model and its held-out score."""

    tokenizer: Any
    model: torch.nn.Module
    train_pairs: list[tuple[int, int]]
    dev_rows: list[dict]
    test_rows: list[dict]        # held-out problems (the first args.eval_problems test pairs)
    grpo_rows: list[dict]        # GRPO's training prompts
    eval_seed: int               # sampling seed of every held-out evaluation: before and after see the same draws
    warm: WarmupResult | None = None
    before: EvalResult | None = None   # held-out score of `model` after the warm-up

    def held_out(self, model) -> EvalResult:
        """The before/after measurement: the same held-out problems, sampled with the same seed every time."""
        return evaluate(model, self.tokenizer, self.test_rows, seed=self.eval_seed)


def warm_start(args: argparse.Namespace, log=print) -> WarmStart:
    """Seeds, tokenizer, data, a fresh model, the supervised warm-up and the held-out evaluation before GRPO."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = build_demo_tokenizer()
    train_pairs, dev_pairs, test_pairs = split_pairs()
    dev_rows, test_rows = rows(dev_pairs, seed=1), rows(test_pairs[:args.eval_problems], seed=2)
    grpo_rows = rows(train_pairs, seed=args.seed + 3)
    model = build_model(tokenizer, args.seed)
    start = WarmStart(tokenizer, model, train_pairs, dev_rows, test_rows, grpo_rows, eval_seed=args.seed + 10_000)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"fastgrpo demo: Qwen2 {model.config.num_hidden_layers}x{model.config.hidden_size} ({n_params / 1e6:.1f}M "
        f"parameters, {len(tokenizer)}-token vocabulary), {args.threads} CPU threads, seed {args.seed}")

    log(f"1/3 supervised warm-up until dev accuracy >= {args.target_accuracy:.0%} (at most {args.warmup_steps} steps)")
    start.warm = warm_up(model, tokenizer, train_pairs, start.dev_rows, args, log=log)
    start.before = start.held_out(model)
    log(f"held-out before GRPO: accuracy {start.before.accuracy:.0%}, format {start.before.format_rate:.0%}")
    return start


# -------------------------------------------------------------------------------------------------- GRPO phase
def run_grpo(model, tokenizer, train_rows: list[dict], args, **overrides):
    """The RL phase through the public API, as the recipe runs it (format + accuracy rewards, group advantages).
    `overrides`: GRPOConfig fields that replace the demo's (e.g. async_generation=True, output_dir=...)."""
    from datasets import Dataset

    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.rewards import accuracy_reward, format_reward

    fields = dict(
        output_dir=args.output_dir, seed=args.seed, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=MAX_COMPLETION, max_prompt_length=None,
        temperature=1.0, top_k=0, beta=0.0, logging_steps=1, save_strategy="no", report_to="none",
        torch_threads=args.threads, bf16=False, disable_tqdm=args.quiet,
    )
    config = GRPOConfig(**{**fields, **overrides})
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[format_reward, accuracy_reward], args=config,
                          train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer,
                          peft_config=peft_config)
    trainer.train()
    return trainer


# ------------------------------------------------------------------------------------------------------ report
def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_rewards(metrics: list[dict], path: str, before: "EvalResult", after: "EvalResult") -> None:
    """Reward, accuracy and format rate per GRPO step (faint: raw, bold: moving average), with the held-out
    accuracy before and after as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    window = max(1, len(steps) // 10)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    series = [(left, "reward", "reward (format + accuracy)", "tab:purple"),
              (right, "rewards/accuracy_reward/mean", "accuracy (training samples)", "tab:green"),
              (right, "rewards/format_reward/mean", "format rate (training samples)", "tab:blue")]
    for ax, key, label, color in series:
        values = [m.get(key, math.nan) for m in metrics]
        ax.plot(steps, values, color=color, alpha=0.25, lw=1)
        ax.plot(steps, _smooth(values, window), color=color, lw=2.2, label=label)
    for value, style, label in ((before.accuracy, ":", "held-out accuracy before"),
                                (after.accuracy, "--", "held-out accuracy after")):
        right.axhline(value, color="black", ls=style, lw=1.2, label=f"{label}: {value:.0%}")
    left.set(title="GRPO reward per step", xlabel="GRPO step", ylim=(0, 2.05))
    right.set(title="Accuracy and format rate per step", xlabel="GRPO step", ylim=(0, 1.02))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"fastgrpo demo: held-out accuracy {before.accuracy:.0%} → {after.accuracy:.0%} "
                 f"in {len(steps)} GRPO steps on CPU")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(before: "EvalResult", after: "EvalResult", warm: WarmupResult, grpo_steps: int,
                 grpo_seconds: float) -> str:
    rows_ = [("held-out accuracy", f"{before.accuracy:.1%}", f"{after.accuracy:.1%}"),
             ("format rate", f"{before.format_rate:.1%}", f"{after.format_rate:.1%}"),
             ("mean completion length", f"{before.mean_length:.1f} tokens", f"{after.mean_length:.1f} tokens"),
             ("steps", f"{warm.steps} warm-up", f"{grpo_steps} GRPO"),
             ("wall time", f"{warm.seconds:.0f} s", f"{grpo_seconds:.0f} s")]
    head = ("", "before GRPO", "after GRPO")
    widths = [max(len(r[i]) for r in [head, *rows_]) for i in range(3)]
    line = lambda r: f"| {r[0]:<{widths[0]}} | {r[1]:>{widths[1]}} | {r[2]:>{widths[2]}} |"  # noqa: E731
    sep = f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 1)}:|{'-' * (widths[2] + 1)}:|"
    return "\n".join([line(head), sep, *map(line, rows_)])


# -------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastgrpo demo",
        description="Train a tiny Qwen2 with GRPO on locally generated addition word problems, on CPU, offline: a "
                    "short supervised warm-up, then GRPO with the recipe's format and accuracy rewards. Prints a "
                    "before/after table; writes rewards.png, metrics.jsonl and the checkpoint to --output-dir.")
    p.add_argument("--steps", type=int, default=100, help="GRPO steps (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, warm-up and GRPO (default: 0)")
    p.add_argument("--output-dir", default="demo-output", help="where outputs go (default: demo-output)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores available)")
    p.add_argument("--lr", type=float, default=1e-4, help="GRPO learning rate (default: 1e-4)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (r=16, all linear layers) instead of all "
                   "weights, as the recipe does; pair it with a larger --lr such as 1e-3")
    p.add_argument("--prompts", type=int, default=16, help="prompts per GRPO step (default: 16)")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt, the group (default: 8)")
    p.add_argument("--warmup-steps", type=int, default=500, help="most supervised warm-up steps (default: 500)")
    p.add_argument("--target-accuracy", type=float, default=0.35,
                   help="the warm-up stops once dev sampled accuracy reaches this (default: 0.35)")
    p.add_argument("--warmup-lr", type=float, default=3e-3, help=argparse.SUPPRESS)
    p.add_argument("--warmup-batch", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--warmup-eval-every", type=int, default=25, help=argparse.SUPPRESS)
    p.add_argument("--slip-rate", type=float, default=0.2, help=argparse.SUPPRESS)
    p.add_argument("--format-slip-rate", type=float, default=0.15, help=argparse.SUPPRESS)
    p.add_argument("--eval-problems", type=int, default=N_TEST, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a shortened run for tests (about a minute; the gain is small)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)  # explicit options still win
    args = p.parse_args(argv)
    for name, least in (("steps", 1), ("threads", 1), ("prompts", 1), ("generations", 2), ("warmup_steps", 0),
                        ("eval_problems", 1)):
        value = getattr(args, name)
        if value is not None and value < least:  # checked now, not after minutes of warm-up
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    problem = _output_dir_problem(args.output_dir)
    if problem:  # now, not after minutes of warm-up
        p.error(f"--output-dir {args.output_dir!r}: {problem}")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return args


def _output_dir_problem(path: str) -> str | None:
    """Why the outputs cannot be written under `path` (a file there or above it, a folder not writable), or None."""
    if not path:
        return "is empty. Fix: name a folder, e.g. --output-dir demo-output"
    here = os.path.abspath(path)
    while not os.path.exists(here):  # the nearest part of the path that exists: the folder is created under it
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        where = "is a file" if here == os.path.abspath(path) else f"is under {here}, which is a file"
        return f"{where}, not a folder. Fix: pass a folder's path (new or existing), e.g. --output-dir demo-output"
    if not os.access(here, os.W_OK | os.X_OK):
        return f"{here} is not writable. Fix: pass a folder you can write to, e.g. --output-dir /tmp/demo-output"
    return None


def main(argv=None) -> int:
    """`fastgrpo demo [options]`; returns the exit status (the numbers go to OUTPUT_DIR/summary.json)."""
    run_demo(parse_args(argv))
    return 0


def run_demo(args: argparse.Namespace) -> dict:
    """Warm-up, held-out evaluation, GRPO, evaluation again, then the table, plot and summary; returns the summary."""
    os.makedirs(args.output_dir, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.time()
    start = warm_start(args, log=log)
    warm, before = start.warm, start.before

    log(f"2/3 GRPO: {args.steps} steps of {args.prompts} prompts x {args.generations} completions, lr {args.lr:g}")
    t_grpo = time.time()
    trainer = run_grpo(start.model, start.tokenizer, start.grpo_rows, args)
    grpo_seconds = time.time() - t_grpo
    model = getattr(trainer, "model", start.model)

    log("3/3 held-out evaluation after GRPO")
    after = start.held_out(model)
    checkpoint = os.path.join(args.output_dir, "checkpoint-final")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a 4 MB file
    try:
        trainer.save_model(checkpoint)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    metrics = [m for m in read_metrics(metrics_path) if "reward" in m]
    plot_path = os.path.join(args.output_dir, "rewards.png")
    try:
        plot_rewards(metrics, plot_path, before, after)
    except ImportError:
        plot_path = "no plot (pip install matplotlib)"

    summary = {"seed": args.seed, "threads": args.threads, "before": _as_dict(before), "after": _as_dict(after),
               "warmup_steps": warm.steps, "warmup_seconds": warm.seconds, "grpo_steps": len(metrics),
               "grpo_seconds": grpo_seconds, "total_seconds": time.time() - t0}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log("\n" + format_table(before, after, warm, len(metrics), grpo_seconds))
    log(f"\nexamples after GRPO: {after.samples[0]!r}  {after.samples[1]!r}")
    log(f"total {summary['total_seconds']:.0f} s. Wrote {plot_path}, {metrics_path}, {checkpoint}/")
    return summary


def _as_dict(e: EvalResult) -> dict:
    return {"accuracy": e.accuracy, "format_rate": e.format_rate, "mean_length": e.mean_length}


if __name__ == "__main__":
    sys.exit(main())
