"""`fastgrpo bench` (issue #6): seconds per GRPO step, fastgrpo vs TRL's GRPOTrainer, with and without vLLM.

Each cell (framework x mode x num_generations G x max_completion_length L) runs in its own process
(`python -m fastgrpo.bench --worker SPEC_JSON`, which prints one `BENCH_RESULT {json}` line), so GPU memory and
vLLM state never leak between cells. A failed or timed-out cell records its error and the steps it finished; the
grid goes on. After each cell, --out gets results.jsonl (merged per cell with what it held, so several commands
fill one table), table.md and chart.png. The command exits 1, naming them, when cells failed (timed-out cells that
kept steps are partial, not failed); flags and --model/--data are checked before anything is built.

The run is the recipe's, identical for both frameworks: random-weight Qwen2-0.5B shape + Qwen2 tokenizer (or
--model); NuminaMath-TIR-like prompts with the recipe's system prompt; LoRA r=8 alpha=32 dropout 0.1 on q_proj,
v_proj; learning_rate 1e-5; 128 completions per optimizer step for every G (per_device_train_batch_size 8 x
gradient_accumulation_steps 16); fastgrpo.rewards' format + accuracy rewards; bf16 on GPU; report_to none;
save_strategy no; logging_steps 1; max_prompt_length 512 for fastgrpo only (TRL 1.16 dropped it). Modes:
colocate (vLLM in the trainer process, vllm_gpu_memory_utilization 0.3), novllm (transformers generate), async
(fastgrpo only: colocate + async_generation, one-step off-policy), server and server-async (a vLLM server on
--server-gpus, the trainer on --trainer-gpus; TRL's server-async is its AsyncGRPOTrainer: fastgrpo.bench_server). Everything else is each framework's default,
recorded per cell (TRL's gradient_checkpointing=True is kept: it is what TRL users get). Random weights make
completions run to L tokens in both frameworks.

Measurements: a step ends when fastgrpo writes its metrics / when TRL's on_step_end callback fires. s/step =
median of steps 2..N (step 1 holds warm-up); it/s = 1/median; gen tok/s and completions/s = totals over steps
2..N. Time split (medians): gen = generation (TRL: `_generate`, which includes its weight push to vLLM); train =
forward/backward/optimizer (TRL: the step minus `_generate_and_score_completions`); other = the rest (rewards,
logprobs, fastgrpo's weight sync); ‖ = async generation, overlapped with training. Peak GPU GiB = peak
`nvidia-smi memory.used` sampled by the parent during the cell minus the value before it (counts vLLM and child
processes), next to the worker's torch.cuda.max_memory_reserved. vLLM alone (--vllm-alone): vllm.LLM in its own
process generates one step's tokens (128/G prompts x G x L, ignore_eos, same gpu_memory_utilization); median of
3 generate() calls after a warm-up call; named twice in --only (`--only vllm-alone,fastgrpo-async,vllm-alone`), it
runs before and after the other cells and the table gives the median over both runs' calls, with each run's own.

Command lines (`fastgrpo bench ...` is the same as `python -m fastgrpo.bench ...`):
  # issue-6 headline, one H100, three commands of < 10 min each filling one table (same --out):
  python -m fastgrpo.bench --only fastgrpo-colocate,fastgrpo-async,vllm-alone --num-generations 8 \\
      --max-completion-length 512 --steps 12 --budget 540 --out outputs/bench        # ~6-7 min
  python -m fastgrpo.bench --only trl-colocate,fastgrpo-novllm --num-generations 8 \\
      --max-completion-length 512 --steps 12 --budget 540 --out outputs/bench        # ~7-8 min
  python -m fastgrpo.bench --only trl-novllm --num-generations 8 \\
      --max-completion-length 512 --steps 12 --budget 540 --out outputs/bench        # ~5.5 min
  (--budget: a cell still running at 540 s is stopped and keeps the steps it finished, marked partial.)
  # whole grid (G 4,8,16 x L 256,512,1024; hours): python -m fastgrpo.bench --modes colocate,async,novllm --vllm-alone
  # CPU smoke: python -m fastgrpo.bench --tiny --frameworks fastgrpo --modes novllm --num-generations 2 \\
  #   --max-completion-length 8 --steps 2 --extra '{"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}'
  # settings side by side in one command (each CELL@NAME a row of its own):
  #   python -m fastgrpo.bench --only vllm-alone,fastgrpo-async,fastgrpo-async@off,vllm-alone \\
  #       --variant 'off={"async_yield": "off"}' --num-generations 8 --max-completion-length 512
  # table + chart from results files: python -m fastgrpo.bench --report a/results.jsonl b/results.jsonl --out merged
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from .bench_report import _f, _load, pooled, report, step_stats, write_outputs
from .bench_server import free_port, gpu_used_mib, kill_server, sample_peak

RESULT_MARK = "BENCH_RESULT "
FRAMEWORKS, MODES = ("fastgrpo", "trl"), ("colocate", "async", "novllm", "server", "server-async")
SERVER_MODES = ("server", "server-async")
CELL_KEYS = ("framework", "mode", "G", "L", "steps", "variant", "variant_fields")
MAX_PROMPT_LENGTH = 512
SYSTEM_PROMPT = (  # verbatim from examples/recipe.py
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)


# ------------------------------------------------------------------------------------------------- the grid
def _csv(text, cast=str) -> list:
    if isinstance(text, list):  # already parsed by its flag's type (_arg)
        return [cast(x) for x in text]
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def _arg(cast=int, low=1, high=None, many=False):
    """argparse type (argparse names the flag in its error): a `cast` >= low (> 0 where low is 0), <= high;
    many: a comma list of them."""
    kind = ("a comma list of integers" if many else "an integer") if cast is int else "a number"
    want = f"give {kind} {'> 0' if low == 0 else f'>= {low}'}" + ("" if high is None else f" and <= {high}")

    def parse(text: str):
        try:
            xs = [cast(x) for x in text.split(",")] if many else [cast(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {want}") from None
        if any(x < low or x == 0 == low or (high is not None and x > high) for x in xs):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {want}")
        return xs if many else xs[0]
    return parse


def _json_object(text: str) -> dict:
    """argparse type of --extra."""
    value = text
    with contextlib.suppress(json.JSONDecodeError):
        value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; give one, e.g. --extra '{{\"seed\": 1}}'")
    return value


def cell_key(c: dict) -> str:
    return f"{c['framework']}-{c['mode']}-G{c['G']}-L{c['L']}" + (f"@{c['variant']}" if c.get("variant") else "")


def parse_variants(specs: list[str] | None) -> dict[str, dict]:
    """--variant NAME=JSON (repeatable) -> {NAME: config fields}; a cell named CELL@NAME in --only runs with them
    on top of --extra, as a row of its own."""
    variants = {}
    for spec in specs or []:
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ValueError(f"--variant {spec!r}: write NAME=JSON, e.g. --variant 'layer={{\"async_yield\": \"layer\"}}'")
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--variant {name}: {text!r} is not JSON ({e.msg})") from None
        if not isinstance(fields, dict) or name in variants:
            raise ValueError(f"--variant {name}: " + ("named twice" if name in variants else "needs a JSON object"))
        variants[name] = fields
    return variants


def parse_grid(args) -> list[dict]:
    """The cells, in run order: for each (G, L), each framework x mode (TRL has no async), then vLLM alone;
    with --only, the named framework-mode cells of each (G, L), in the order named. A cell may be named more than
    once (vllm-alone before, between and after the cells it is the reference of): main() pools its runs, so that a
    host whose speed drifts between cells shows in each cell's spread instead of in one ratio."""
    variants = parse_variants(getattr(args, "variant", None))
    if getattr(args, "only", None):
        names = _csv(args.only)
        known = {f"{f}-{m}" for f in FRAMEWORKS for m in MODES} - {"trl-async"} | {"vllm-alone"}
        split = [n.partition("@") for n in names]
        if not names or {c for c, _, _ in split} - known:
            raise ValueError(f"--only {args.only!r}: name framework-mode cells from {', '.join(sorted(known))} "
                             "(one named again runs again, pooled with its earlier runs; CELL@NAME runs it with "
                             "--variant NAME)")
        for c, at, v in split:
            if at and v not in variants:
                raise ValueError(f"--only: {c}@{v} names no variant; define it with --variant '{v}={{...}}'"
                                 + (f" (defined: {', '.join(variants)})" if variants else ""))
        full = argparse.Namespace(**{**vars(args), "only": None, "variant": None, "frameworks": ",".join(FRAMEWORKS),
                                     "modes": ",".join(MODES), "vllm_alone": True})
        by_name: dict[tuple, dict] = {}
        for c in parse_grid(full):
            by_name[(c["G"], c["L"], f"{c['framework']}-{c['mode']}")] = c
        sizes = sorted({(g, length) for g, length, _ in by_name})
        cells = []
        for g, length in sizes:
            for c, _, v in split:
                cell = dict(by_name[(g, length, c)])
                if v:
                    cell.update(variant=v, variant_fields=variants[v], extra={**cell["extra"], **variants[v]})
                cells.append(cell)
        return cells
    if variants:
        raise ValueError("--variant is used through --only CELL@NAME; name the cells with --only")
    frameworks, modes = _csv(args.frameworks), _csv(args.modes)
    for name, got, allowed in (("--frameworks", frameworks, FRAMEWORKS), ("--modes", modes, MODES)):
        if not got or set(got) - set(allowed):
            raise ValueError(f"{name} {','.join(got)!r}: choose from {', '.join(allowed)}")
    cps, pdb = args.completions_per_step, args.per_device_batch
    extra = args.extra if isinstance(args.extra, dict) else _json_object(args.extra or "{}")
    if args.steps < 1 or cps < 1 or pdb < 1 or cps % pdb:
        raise ValueError(f"need --steps >= 1 ({args.steps}) and --completions-per-step ({cps}) a multiple of "
                         f"--per-device-batch ({pdb}), both >= 1")
    if min(lengths := _csv(args.max_completion_length, int), default=0) < 1:
        raise ValueError(f"--max-completion-length {args.max_completion_length}: give integers >= 1, e.g. 256,512")
    cells = []
    for g in _csv(args.num_generations, int):
        if g < 2 or cps % g:
            raise ValueError(f"--num-generations {g}: must be >= 2 and divide --completions-per-step {cps}")
        for length in lengths:
            base = dict(G=g, L=length, steps=args.steps, completions_per_step=cps, per_device_batch=pdb,
                        gpu_memory_utilization=args.gpu_memory_utilization, extra=extra,
                        variant=None, variant_fields=None)
            cells += [dict(base, framework=f, mode=m) for f in frameworks for m in modes if (f, m) != ("trl", "async")]
            if args.vllm_alone:
                cells.append(dict(base, framework="vllm", mode="alone"))
    if not cells:  # e.g. --frameworks trl --modes async
        raise ValueError(f"--frameworks {args.frameworks} --modes {args.modes} select no cell (TRL has no async "
                         "mode): add fastgrpo to --frameworks, another mode to --modes, or --vllm-alone")
    return cells


def recipe_config(spec: dict, framework: str, cuda: bool) -> dict:
    """The recipe's GRPOConfig fields for one cell (module docstring), then --extra."""
    c = dict(output_dir=spec.get("out_dir", "bench-cell"), learning_rate=1e-5,
             per_device_train_batch_size=spec["per_device_batch"],
             gradient_accumulation_steps=spec["completions_per_step"] // spec["per_device_batch"],
             max_completion_length=spec["L"], num_generations=spec["G"], use_vllm=spec["mode"] != "novllm",
             vllm_mode="server" if spec["mode"] in SERVER_MODES else "colocate",
             vllm_gpu_memory_utilization=spec["gpu_memory_utilization"], bf16=cuda,
             report_to="none", save_strategy="no", logging_steps=1, max_steps=spec["steps"])
    if spec.get("server_port"):
        c.update(vllm_server_host="127.0.0.1", vllm_server_port=spec["server_port"],
                 vllm_group_port=spec["group_port"])
    if framework == "fastgrpo":
        c.update(max_prompt_length=MAX_PROMPT_LENGTH, async_generation=spec["mode"] in ("async", "server-async"))
    return {**c, **(spec.get("extra") or {})}


# ---------------------------------------------------------------------------------------------- the worker
class StepClock:
    """Wall time between step ends (+ per-step extras), mirrored to progress.jsonl so a killed cell keeps its steps."""

    def __init__(self, out_dir: str) -> None:
        self.walls, self.extras, self.path = [], [], os.path.join(out_dir, "progress.jsonl")
        os.makedirs(out_dir, exist_ok=True)
        open(self.path, "w").close()
        self.start()

    def start(self) -> None:
        self.t_prev = time.perf_counter()

    def mark(self, **extra) -> None:
        now = time.perf_counter()
        self.walls.append(now - self.t_prev)
        self.extras.append(extra)
        self.t_prev = now
        with open(self.path, "a") as f:
            f.write(json.dumps({"wall": self.walls[-1], **extra}) + "\n")

    def split(self, overlapped: bool) -> dict:
        def med(xs):
            xs = [x for x in xs if x is not None]
            return statistics.median(xs) if xs else None
        e, w = self.extras[1:] or self.extras, self.walls[1:] or self.walls
        other = med([wi - (x.get("train") or 0) - (0 if overlapped else x.get("gen") or 0) for wi, x in zip(w, e)])
        return {"gen": med([x.get("gen") for x in e]), "train": med([x.get("train") for x in e]),
                "other": None if other is None else max(other, 0.0), "overlapped": overlapped,
                **{k: med([x.get(k) for x in e]) for k in ("logprob_time", "reward_time", "sync_time", "engine_step_time")
                   if any(x.get(k) is not None for x in e)}}


def _dataset(path: str):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=path, split="train")
    ds = ds.map(lambda x: {"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": x["problem"]}]})
    return ds.remove_columns(["messages", "problem"])


def _trainer_kwargs(spec: dict, **kw) -> dict:
    from peft import LoraConfig

    from fastgrpo.rewards import accuracy_reward, format_reward

    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    return dict(model=spec["model"], reward_funcs=[format_reward, accuracy_reward], train_dataset=_dataset(spec["data"]),
                peft_config=lora, **kw)


def _known(values: dict, names) -> tuple[dict, list[str]]:
    """The fields this framework's GRPOConfig has, and the names of the others (dropped, recorded)."""
    return {k: v for k, v in values.items() if k in names}, sorted(set(values) - set(names))


def _run_fastgrpo(spec: dict, clock: StepClock, cuda: bool) -> dict:
    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.config import FIELD_NAMES
    from fastgrpo.metrics import MetricsSink
    from fastgrpo.rollout import vllm_available

    values, dropped = _known(recipe_config(spec, "fastgrpo", cuda), FIELD_NAMES)
    args = GRPOConfig(**values)
    if args.use_vllm and cuda and not vllm_available():  # else fastgrpo warns and generates with transformers
        raise RuntimeError("use_vllm=True but vllm is not importable: this cell would not measure vLLM")
    cps, write = args.per_device_train_batch_size * args.gradient_accumulation_steps, MetricsSink.write

    def timed_write(self, step, m):  # the bench's clock: a step ends when its metrics are written
        clock.mark(gen=m.get("generation_time"), train=m.get("train_time"), engine_step_time=m.get("step_time"),
                   tokens=m.get("completions/mean_length", 0.0) * cps,
                   **{k: m.get(k) for k in ("logprob_time", "reward_time", "sync_time")})
        write(self, step, m)

    MetricsSink.write = timed_write
    trainer = GRPOTrainer(args=args, **_trainer_kwargs(spec))
    clock.start()
    trainer.train()
    return {"split": clock.split(args.async_generation), "dropped_extra": dropped, "completions_per_step": cps,
            "config": {**values, "generator": type(trainer._generator).__name__, "speedups": trainer.speedups,
                       "mps_share": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
                       **{k: getattr(args, k) for k in ("gradient_checkpointing", "loss_type", "beta",
                                                        "vllm_kv_cache_memory_bytes")}}}


def _run_trl(spec: dict, clock: StepClock, cuda: bool) -> dict:
    import dataclasses

    import trl
    from transformers import TrainerCallback

    values, dropped = _known(recipe_config(spec, "trl", cuda), {f.name for f in dataclasses.fields(trl.GRPOConfig)})
    args = trl.GRPOConfig(**values, **({} if cuda else {"use_cpu": True}))
    cps, acc, lengths = args.per_device_train_batch_size * args.gradient_accumulation_steps, {}, {}

    class Clock(TrainerCallback):  # TRL's own callback API tells the step ends
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_log(self, a, state, c, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths[state.global_step] = float(logs["completions/mean_length"])

        def on_step_end(self, a, state, c, **k):
            clock.mark(gen=acc.pop("gen", 0.0), prep=acc.pop("prep", 0.0), step=state.global_step)

    trainer = trl.GRPOTrainer(args=args, **_trainer_kwargs(spec, callbacks=[Clock()]))
    for name, key in (("_generate", "gen"), ("_generate_and_score_completions", "prep")):
        def timed(*a, _f=getattr(trainer, name), _k=key, **k):  # timer around the bound method, behaviour unchanged
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                acc[_k] = acc.get(_k, 0.0) + time.perf_counter() - t
        setattr(trainer, name, timed)
    trainer.train()
    for wall, x in zip(clock.walls, clock.extras):  # TRL logs after on_step_end: tokens and train time come now
        x.update(tokens=lengths.get(x["step"], 0.0) * cps, train=wall - x["prep"])  # other = prep - gen
    return {"split": clock.split(False), "dropped_extra": dropped, "completions_per_step": cps,
            "config": {**values, "trl_version": trl.__version__,
                       **{k: getattr(args, k) for k in ("gradient_checkpointing", "loss_type", "beta")}}}


def _run_vllm(spec: dict, clock: StepClock, cuda: bool) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    c = recipe_config(spec, "fastgrpo", cuda)  # the sizes a training cell of this grid would use, --extra included
    g, length, util = c["num_generations"], c["max_completion_length"], c["vllm_gpu_memory_utilization"]
    n_prompts = c["per_device_train_batch_size"] * c["gradient_accumulation_steps"] // g
    tok, rows = AutoTokenizer.from_pretrained(spec["model"]), _dataset(spec["data"])
    texts = [tok.apply_chat_template(rows[i]["prompt"], add_generation_prompt=True, tokenize=False)
             for i in range(n_prompts)]
    requests = [{"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"][-MAX_PROMPT_LENGTH:]} for t in texts]
    llm = LLM(model=spec["model"], gpu_memory_utilization=util, seed=0, max_model_len=MAX_PROMPT_LENGTH + length)
    params = SamplingParams(n=g, max_tokens=length, ignore_eos=True, temperature=1.0)
    llm.generate(requests, params, use_tqdm=False)  # warm-up
    for _ in range(4):  # step_stats drops the first, as it drops a first training step
        clock.start()
        outs = llm.generate(requests, params, use_tqdm=False)
        clock.mark(tokens=float(sum(len(o.token_ids) for r in outs for o in r.outputs)))
    return {"split": None, "completions_per_step": n_prompts * g,
            "config": {"prompts": n_prompts, "n": g, "max_tokens": length, "ignore_eos": True,
                       "gpu_memory_utilization": util, "max_model_len": MAX_PROMPT_LENGTH + length}}


def _run_with_server(spec: dict, clock: StepClock, cuda: bool) -> dict:
    from .bench_server import run_trl_async, serving

    with serving(spec, MAX_PROMPT_LENGTH + spec["L"]) as (port, group_port, ready_s):
        spec = dict(spec, server_port=port, group_port=group_port)
        if (spec["framework"], spec["mode"]) == ("trl", "server-async"):
            out = run_trl_async(spec, clock, cuda, recipe_config(spec, "trl", cuda), _trainer_kwargs(spec))
        else:
            out = {"fastgrpo": _run_fastgrpo, "trl": _run_trl}[spec["framework"]](spec, clock, cuda)
    out["server_ready_s"], out["server_gpus"] = ready_s, spec.get("server_gpus")
    return out


def worker(spec: dict) -> dict:
    """Run one cell in this process; returns its result, errors included (never raised)."""
    import torch

    cuda = torch.cuda.is_available()
    out = {**{k: spec.get(k) for k in CELL_KEYS}, "key": cell_key(spec), "error": None,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "completions_per_step": spec["completions_per_step"]}
    clock, t0 = StepClock(spec["out_dir"]), time.perf_counter()
    try:
        if spec["mode"] in SERVER_MODES:
            out.update(_run_with_server(spec, clock, cuda))
        else:
            out.update({"fastgrpo": _run_fastgrpo, "trl": _run_trl, "vllm": _run_vllm}[spec["framework"]](spec, clock, cuda))
    except BaseException as e:  # noqa: BLE001 - a failed cell reports; the grid goes on
        out["error"] = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]
        out["traceback"] = traceback.format_exc()[-3000:]
    out.update(step_stats(clock.walls, [x.get("tokens") or 0.0 for x in clock.extras], out["completions_per_step"]),
               per_step=[{"wall": w, **x} for w, x in zip(clock.walls, clock.extras)], worker_s=time.perf_counter() - t0,
               torch_peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None)
    return out


# ---------------------------------------------------------------------------------------------- the parent
def run_cell(spec: dict, timeout: float) -> dict:
    """One cell in a fresh `python -m fastgrpo.bench --worker` process; GPU memory is sampled from out here."""
    os.makedirs(spec["out_dir"], exist_ok=True)
    log_path = Path(spec["out_dir"], "log.txt")
    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    gpus = env.get("CUDA_VISIBLE_DEVICES")  # the cell's GPUs, so that cells on other GPUs do not count
    if spec["mode"] in SERVER_MODES:
        env["CUDA_VISIBLE_DEVICES"] = spec["trainer_gpus"]
        gpus = f"{spec['trainer_gpus']},{spec['server_gpus']}"
    if spec["framework"] == "trl" and spec["mode"] == "colocate":  # TRL's colocated vLLM expects a launcher's env
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
    base, peak, stop, error = gpu_used_mib(gpus), [None], threading.Event(), None
    sampler = threading.Thread(target=sample_peak, args=(stop, peak, gpus), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fastgrpo.bench", "--worker", json.dumps(spec)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc, error = None, f"timeout after {timeout:.0f} s"
        with contextlib.suppress(ProcessLookupError):  # the worker's session: vLLM engine processes go with it
            os.killpg(proc.pid, signal.SIGKILL)
        kill_server(spec["out_dir"])  # a server-mode cell's server has a session of its own
        rc = proc.wait() if rc is None else rc
    stop.set()
    sampler.join(5)
    for _ in range(40):  # let the driver take the memory back before the next cell's baseline
        now = gpu_used_mib(gpus)
        if now is None or base is None or now - base < 512:
            break
        time.sleep(0.5)
    text = log_path.read_text(errors="replace")
    found = [ln for ln in text.splitlines() if ln.startswith(RESULT_MARK)]
    if found:
        result = json.loads(found[-1][len(RESULT_MARK):])
    else:  # killed or crashed: keep the steps its progress file holds
        prog = Path(spec["out_dir"], "progress.jsonl")
        steps = [json.loads(ln) for ln in prog.read_text().splitlines() if ln] if prog.exists() else []
        tail = " | ".join(text.strip().splitlines()[-3:])[-300:]
        c = recipe_config(spec, spec["framework"], False)
        cps = c["per_device_train_batch_size"] * c["gradient_accumulation_steps"]
        result = {**{k: spec.get(k) for k in CELL_KEYS}, "key": cell_key(spec), "completions_per_step": cps,
                  "error": error or f"worker exited with code {rc}: {tail}",
                  **step_stats([s["wall"] for s in steps], [s.get("tokens") or 0.0 for s in steps], cps)}
    if result.get("error") and result.get("step_walls"):
        result["error"] += f" (after {len(result['step_walls'])} of {spec['steps']} steps)"
    elif error:  # cut before its first step: start-up (vLLM's first start compiles for about a minute) ate it
        result["error"] += " before its first step; give the cell more --budget"
    result.update(timed_out=error is not None,  # stopped at its time limit: with steps, a partial, not a failure
                  gpu_peak_used_gib=None if peak[0] is None or base is None else (peak[0] - base) / 1024,
                  gpu_baseline_gib=None if base is None else base / 1024, cell_wall_s=time.perf_counter() - t0,
                  log=str(log_path))
    return result


def check_inputs(args) -> None:
    """--model and --data, checked before anything is built or any cell starts (ValueError naming the flag)."""
    if args.data:
        lines = Path(args.data).read_text(errors="replace").splitlines() if Path(args.data).is_file() else None
        first = next((ln for ln in lines or [] if ln.strip()), "")
        with contextlib.suppress(json.JSONDecodeError):
            first = json.loads(first)
        if not isinstance(first, dict) or {"problem", "messages"} - set(first):
            raise ValueError(f"--data {args.data}: " + ("no such file" if lines is None else "its first line is not a "
                             "JSON object with the fields problem and messages") + "; give a NuminaMath-TIR-schema "
                             "JSONL, or leave --data out for 512 generated rows")
    model = args.model and Path(args.model).expanduser()
    if model and model.is_dir() and not (model / "config.json").is_file():
        raise ValueError(f"--model {args.model}: no config.json in that folder; give a folder written by "
                         "save_pretrained, or leave --model out for a random-weight Qwen2-0.5B")
    if model and not model.is_dir():  # a Hub name in the local cache (the cells run offline unless told otherwise)
        from huggingface_hub import try_to_load_from_cache

        offline = os.environ.get("HF_HUB_OFFLINE", "1").upper() in ("1", "ON", "YES", "TRUE")  # run_cell's default
        try:
            cached = isinstance(try_to_load_from_cache(args.model, "config.json"), str)
        except ValueError:  # not a Hub name either (HFValidationError), e.g. /nonexistent/model
            cached, offline = False, True
        if offline and not cached:
            raise ValueError(f"--model {args.model}: no such folder; give a model folder, leave --model out for a "
                             "random-weight Qwen2-0.5B, or (a Hub model not in the local cache) set HF_HUB_OFFLINE=0")


def ensure_inputs(args) -> tuple[str, str]:
    """--model and --data, or the random Qwen2-0.5B (--tiny: 2 layers) and NuminaMath-like data built in --workdir."""
    from . import testing

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or str(work / ("tiny-qwen2" if args.tiny else "qwen2-0.5b-random"))
    if not args.model and not Path(model, "config.json").exists():
        tmp = f"{model}.tmp{os.getpid()}"
        testing.save_tiny_model(tmp, "qwen", num_layers=2) if args.tiny else testing.build_random_qwen2_0_5b(tmp)
        os.replace(tmp, model)
    data = args.data or str(work / "numina-like-512.jsonl")
    if not args.data and not Path(data).exists():
        testing.make_numina_like_dataset(data, n=512)
    return model, data


# -------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgrpo bench", description=__doc__.split("\n\n")[0],
                                epilog="See `python -c 'import fastgrpo.bench as b; print(b.__doc__)'` for details.")
    a = p.add_argument
    a("--model", help="model folder (default: a random-weight Qwen2-0.5B + Qwen2 tokenizer built in --workdir)")
    a("--tiny", action="store_true", help="default model: a 2-layer tiny Qwen2 with the Qwen2 tokenizer (CPU)")
    a("--data", help="NuminaMath-TIR-schema JSONL (default: 512 generated rows in --workdir)")
    a("--workdir", default="outputs/bench-work", help="where the default model and data are built, and reused")
    a("--frameworks", default="fastgrpo,trl")
    a("--modes", default="colocate,novllm", help="colocate, novllm, async (fastgrpo only), server, server-async "
      "(2+ GPUs; TRL's server-async is AsyncGRPOTrainer)")
    a("--num-generations", type=_arg(low=2, many=True), default="4,8,16")
    a("--max-completion-length", type=_arg(many=True), default="256,512,1024")
    a("--steps", type=_arg(), default=12, help="optimizer steps per cell; the first is left out of the median")
    a("--completions-per-step", type=_arg(), default=128, help="per_device_batch x gradient_accumulation_steps")
    a("--per-device-batch", type=_arg(), default=8)
    a("--gpu-memory-utilization", type=_arg(float, 0, 1), default=0.3, help="colocate modes: the fraction vLLM may take")
    a("--server-gpus", default="1", help="server modes: CUDA_VISIBLE_DEVICES of the vLLM server")
    a("--trainer-gpus", default="0", help="server modes: CUDA_VISIBLE_DEVICES of the trainer")
    a("--server-gpu-memory-utilization", type=_arg(float, 0, 1), default=0.9, help="server modes (TRL's vllm-serve default)")
    a("--vllm-alone", action="store_true", help="also time vllm.LLM alone generating one step's tokens")
    a("--only", help="comma list of framework-mode cells to run, in this order (e.g. trl-colocate,fastgrpo-async,"
      "vllm-alone); overrides --frameworks/--modes/--vllm-alone")
    a("--timeout-per-cell", type=_arg(float, 0), default=1800.0, help="seconds; the cell is stopped and keeps the "
      "steps it finished (partial; none: failed)")
    a("--budget", type=_arg(float, 0), help="seconds for this whole command; a cell gets at most what is left")
    a("--extra", type=_json_object, default="{}", help="JSON object merged into every cell's config (fields a "
      "framework lacks are dropped)")
    a("--variant", action="append", metavar="NAME=JSON", help="config fields for cells named CELL@NAME in --only, "
      "on top of --extra, each a row of its own (repeatable): compare settings in one command, e.g. --only "
      "fastgrpo-async,fastgrpo-async@y --variant 'y={\"async_yield\": \"layer\"}'")
    a("--out", default="outputs/bench", help="results.jsonl, table.md, chart.png (merged with results already there)")
    a("--report", nargs="+", metavar="RESULTS_JSONL", help="only write table.md and chart.png from these files")
    a("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        sys.stderr.flush()
        os._exit(0)  # skip interpreter teardown: vLLM / process-group shutdown can hang after the result is out
    out = Path(args.out)
    if args.report:
        try:
            return report(args.report, out)
        except ValueError as e:
            parser.error(str(e))
    try:
        cells = parse_grid(args)
        check_inputs(args)
    except ValueError as e:
        parser.error(str(e))
    try:  # what --out holds, merged with this command's cells
        results = {r["key"]: r for r in _load([out / "results.jsonl"])}
    except ValueError as e:
        parser.error(f"--out {out}: {e}; give another --out, or move that file away")
    t_start = time.perf_counter()
    model, data = ensure_inputs(args)
    ran: set[str] = set()  # cells run by this command: a second run of one is pooled with the first
    failed: list[str] = []  # runs of this command that failed (a timed-out cell that kept steps is partial, not failed)
    for n, cell in enumerate(cells, 1):
        key, left = cell_key(cell), None if args.budget is None else args.budget - (time.perf_counter() - t_start)
        if left is not None and left < 30:
            results.setdefault(key, {**{k: cell.get(k) for k in CELL_KEYS}, "key": key, "error": "not run: --budget used up"})
            failed.append(f"{key} (not run: --budget used up)")
            continue
        print(f"[bench] {n}/{len(cells)} {key} ...", flush=True)
        spec = dict(cell, model=model, data=data, out_dir=str((out / "cells" / key).resolve()),
                    server_gpus=args.server_gpus, trainer_gpus=args.trainer_gpus,
                    server_gpu_memory_utilization=args.server_gpu_memory_utilization)
        r = run_cell(spec, args.timeout_per_cell if left is None else min(args.timeout_per_cell, left))
        if r.get("error") and not (r.get("timed_out") and r.get("s_per_step")):
            failed.append(f"{key} ({r['error'][:120]}; log: {r.get('log', 'none')})")
        r = results[key] = pooled(results[key], r) if key in ran else r
        ran.add(key)
        print(f"[bench] {key}: {_f(r.get('s_per_step'))} s/step ({r['cell_wall_s']:.0f} s)"
              + (f" ERROR {r['error']}" if r.get("error") else ""), flush=True)
        write_outputs(out, list(results.values()))
    write_outputs(out, list(results.values()))
    print((out / "table.md").read_text(), flush=True)
    if failed:  # the table keeps what ran; the exit status says not all of it did
        print(f"[bench] {len(failed)} of {len(cells)} cell runs failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
