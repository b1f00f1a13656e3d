"""VLLMColocateGenerator: CPU tests of its pure helpers, and GPU tests (H100/H200, vLLM 0.26) of the engine.

Run the GPU part with `-s` to see the figures (mean |logprob diff|, weight sync time, memory freed by sleep):
    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=src pytest -s -q -m gpu tests/test_vllm_colocate.py
FASTGRPO_VLLM_EAGER=1 skips torch.compile/CUDA graphs (faster start; the default exercises the real path), except
in the timing comparison, which always runs the real path. `-k engine_process` selects the engine-process tests.
"""

from __future__ import annotations

import copy
import re
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import transformers

from fastgrpo.config import ConfigError, GRPOConfig
from fastgrpo.rollout.base import SamplingParams
from fastgrpo.rollout.vllm_colocate import (
    _finish_reason,
    _pin_main_stream,
    engine_process_wanted,
    _sampled_logprobs,
    auto_kv_cache_bytes,
    check_prompts_fit,
    engine_num_seqs,
    kv_bytes_per_token,
)
from fastgrpo.rollout.vllm_worker import (
    ALIGN,
    RECEIVE_METHOD,
    SAMPLER_LOGPROBS_METHOD,
    WORKER_EXTENSION,
    WeightReceiver,
    bytes_payload,
    cuda_ipc_payload,
    open_payload,
    pack_bucket,
    unpack_bucket,
)
from fastgrpo.rollout.weights import bucketed, iter_sync_weights

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

# ---------------------------------------------------------------------------------------------- CPU ---


def qwen2_05b_like() -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True,
    )


def test_kv_bytes_per_token_and_auto_size():
    cfg = qwen2_05b_like()
    assert kv_bytes_per_token(cfg, 2) == 2 * 24 * 2 * 64 * 2  # 12 KiB per token in bf16
    assert kv_bytes_per_token(cfg, 2, tp=2) == 2 * 24 * 1 * 64 * 2
    assert kv_bytes_per_token(cfg, 2, tp=4) == 2 * 24 * 1 * 64 * 2  # kv heads replicated beyond 2 ranks
    cfg.head_dim = 128
    assert kv_bytes_per_token(cfg, 4) == 2 * 24 * 2 * 128 * 4
    del cfg.head_dim
    got = auto_kv_cache_bytes(qwen2_05b_like(), num_seqs=64, max_model_len=1024, dtype_bytes=2)
    assert got == int(64 * 1024 * 12288 * 1.2 + 0.999)
    assert auto_kv_cache_bytes(qwen2_05b_like(), 1, 8, 2) == 64 * 1024**2  # floor for tiny engines


def test_a_prompt_that_fills_the_context_is_named_with_the_fix():
    check_prompts_fit([[1] * 5, [2] * 9], 10)
    check_prompts_fit([], 10)
    with pytest.raises(ValueError, match=r"prompt 1 has 10 tokens, and vLLM's context is 10 tokens.*max_prompt_length"):
        check_prompts_fit([[1] * 5, [2] * 10, [3] * 7], 10)


def test_engine_num_seqs_follows_the_batch_plan():
    cfg = GRPOConfig(per_device_train_batch_size=16, gradient_accumulation_steps=4, num_generations=8)
    assert engine_num_seqs(cfg, world_size=1) == 64
    cfg = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=8,
                     per_device_eval_batch_size=32, vllm_tensor_parallel_size=2)
    assert engine_num_seqs(cfg, world_size=2) == 32 * 2


def test_sampled_logprobs_from_both_vllm_formats():
    Logprob = types.SimpleNamespace
    as_dicts = [{5: Logprob(logprob=-0.5)}, {7: Logprob(logprob=-1.25), 3: Logprob(logprob=-0.1)}]
    assert _sampled_logprobs([5, 7], as_dicts) == [-0.5, -1.25]
    flat = types.SimpleNamespace(start_indices=[0, 1, 3], logprobs=[-0.5, -2.0, -0.3, -0.7], token_ids=[5, 7, 1, 9])
    assert _sampled_logprobs([5, 7, 9], flat) == [-0.5, -2.0, -0.7]
    with pytest.raises(RuntimeError):
        _sampled_logprobs([5, 7], flat)
    with pytest.raises(RuntimeError):
        _sampled_logprobs([5], None)


def test_finish_reasons():
    assert _finish_reason("length") == "length"
    assert _finish_reason("stop") == "stop"
    assert _finish_reason("repetition") == "stop"
    for bad in ("abort", "error", None):
        with pytest.raises(RuntimeError):
            _finish_reason(bad)


# ------------------------------------------------------------------------- CPU: engine-process push ---


def _plain(obj) -> bool:
    """Only what vLLM's msgpack encoder sends without VLLM_ALLOW_INSECURE_SERIALIZATION (no classes, dtypes)."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, bytes, int, float, bool))


def test_pin_main_stream_overrides_the_runners_cached_stream_only_where_it_has_one():
    import functools

    class Runner:  # the shape of vLLM 0.26's V2 model runner: main_stream is a cached property
        @functools.cached_property
        def main_stream(self):
            return "default stream"

    class OtherRunner:
        main_stream = "a plain attribute"

    worker = types.SimpleNamespace(model_runner=Runner())
    assert worker.model_runner.main_stream == "default stream"  # cached already, as after vLLM's warm-up
    assert _pin_main_stream(worker, "engine stream")
    assert worker.model_runner.main_stream == "engine stream"
    assert not _pin_main_stream(types.SimpleNamespace(model_runner=OtherRunner()), "engine stream")
    assert not _pin_main_stream(types.SimpleNamespace(), "engine stream")


def test_engine_process_follows_async_generation_unless_set():
    """None (default): an engine process exactly when generation runs beside training (async_generation); an
    explicit value wins; never under torchrun or with tensor parallelism."""
    def cfg(**kw):
        return GRPOConfig(output_dir="/tmp/x", use_vllm=True, per_device_train_batch_size=4, num_generations=4, **kw)
    assert engine_process_wanted(cfg(), 1, 0) is False
    assert engine_process_wanted(cfg(async_generation=True), 1, 0) is True
    assert engine_process_wanted(cfg(async_generation=True, vllm_engine_process=False), 1, 0) is False
    assert engine_process_wanted(cfg(vllm_engine_process=True), 1, 0) is True
    assert engine_process_wanted(cfg(async_generation=True), 2, 0) is False
    assert engine_process_wanted(cfg(vllm_engine_process=True), 1, 1) is False
    assert engine_process_wanted(cfg(async_generation=True, vllm_tensor_parallel_size=2), 1, 0) is False


def test_engine_process_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    bucket = [
        ("a.weight", torch.randn(7, 5, generator=g).to(torch.bfloat16)),  # 70 bytes: the next slot is padded
        ("b.bias", torch.randn(3, generator=g)),
        ("c.transposed", torch.randn(4, 6, generator=g).T),  # not contiguous
        ("d.scalar", torch.tensor(2.5, dtype=torch.float16)),
        ("e.empty", torch.empty(0, 4)),
        ("f.ids", torch.arange(11, dtype=torch.int64)),
        ("g.mask", torch.tensor([True, False, True])),
    ]
    packed = pack_bucket(bucket, "cpu")
    offsets = [entry[3] for entry in packed.entries]
    assert all(o % ALIGN == 0 for o in offsets) and offsets == sorted(offsets)
    assert packed.buffer.dtype == torch.uint8 and packed.buffer.numel() % ALIGN == 0
    assert packed.tensor_bytes == sum(t.numel() * t.element_size() for _, t in bucket)
    dtypes = ["bfloat16", "float32", "float32", "float16", "float32", "int64", "bool"]
    assert [entry[1] for entry in packed.entries] == dtypes
    assert _plain(packed.entries)
    out = unpack_bucket(packed.buffer, packed.entries)
    assert [name for name, _ in out] == [name for name, _ in bucket]
    for (_, want), (_, got) in zip(bucket, out):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    # views into the buffer, not copies: the engine loads straight out of the trainer's memory
    assert out[0][1].untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()


class _RecordingModel:
    def __init__(self) -> None:
        self.got: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        names = set()
        for name, t in weights:
            self.got[name] = t.clone()  # the receiver drops its views when it returns
            names.add(name)
        return names


class _FakeWorker:
    """What WeightReceiver uses of vLLM's GPU Worker: `device` and `get_model()`."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.model = _RecordingModel()

    def get_model(self):
        return self.model


def test_engine_process_payload_carries_merged_lora_weights_to_the_receiver(tiny_model_factory):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model_factory(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    want = list(iter_sync_weights(model, only_changed=True))
    worker, calls = _FakeWorker(), 0
    for bucket in bucketed(iter_sync_weights(model, only_changed=True), bucket_bytes=3000):  # q: 4 KiB, v: 2 KiB
        payload = bytes_payload(pack_bucket(bucket, "cpu"))
        assert _plain(payload)
        assert WeightReceiver.receive_ipc_weights(worker, payload) == len(bucket)
        calls += 1
    assert calls == 4 and list(worker.model.got) == [name for name, _ in want]  # q, v of 2 layers, in order
    for name, t in want:
        assert torch.equal(worker.model.got[name], t)


def test_engine_process_payload_checks():
    packed = pack_bucket([("w", torch.ones(3))], "cpu")
    cpu = torch.device("cpu")
    assert torch.equal(open_payload(bytes_payload(packed), cpu), packed.buffer)
    with pytest.raises(ValueError):
        open_payload({**bytes_payload(packed), "kind": "nope"}, cpu)
    with pytest.raises(RuntimeError):
        open_payload({**bytes_payload(packed), "nbytes": 1}, cpu)
    with pytest.raises(RuntimeError):  # a CUDA IPC handle only opens on a GPU
        open_payload({"kind": "cuda_ipc", "gpu": "GPU-x", "handle": b"", "nbytes": ALIGN, "entries": []}, cpu)
    with pytest.raises(ValueError):
        cuda_ipc_payload(packed)  # host buffer
    with pytest.raises(ValueError):
        unpack_bucket(packed.buffer, [["w", "Tensor", [3], 0]])  # not a dtype
    with pytest.raises(ValueError):
        unpack_bucket(packed.buffer, [["w", "float32", [3], 4]])  # misaligned
    with pytest.raises(ValueError):
        unpack_bucket(packed.buffer, [["w", "float32", [1000], 0]])  # past the end


def test_engine_process_worker_extension_is_one_method():
    # vLLM asserts that no extension attribute exists on its Worker; ours adds exactly the RPC target.
    assert [a for a in dir(WeightReceiver) if not a.startswith("__")] == sorted([RECEIVE_METHOD, SAMPLER_LOGPROBS_METHOD])
    assert WORKER_EXTENSION == f"{WeightReceiver.__module__}.{WeightReceiver.__qualname__}"


_HELPER = """
import signal


def report(conn):
    conn.send(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    conn.close()
"""

_UNGUARDED = """
import multiprocessing as mp
import signal
import sys

print("TOP-LEVEL CODE RAN", flush=True)  # an unguarded script, like examples/recipe.py
import helper
from fastgrpo.rollout.vllm_colocate import _sigint_blocked, _spawn_without_main
import contextlib

ctx = mp.get_context("spawn")  # what vLLM uses once CUDA is initialised
recv, send = ctx.Pipe(duplex=False)
launch = contextlib.ExitStack()
if sys.argv[1] == "launch":
    launch.enter_context(_spawn_without_main())
    launch.enter_context(_sigint_blocked())
with launch:
    p = ctx.Process(target=helper.report, args=(send,))
    p.start()
send.close()  # EOF on `recv` once the child is gone
try:
    mask = recv.recv() if recv.poll(60) else None
except EOFError:
    mask = None
p.join(60)
print("child mask has SIGINT:", mask is not None and int(signal.SIGINT) in mask)
print("parent mask has SIGINT:", signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
print("child exit code:", p.exitcode)
"""


def test_engine_process_launch_does_not_rerun_an_unguarded_script(tmp_path):
    """vLLM spawns its engine process; spawn re-runs the parent's main script unless told not to."""
    (tmp_path / "helper.py").write_text(_HELPER)
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}

    def run(mode: str) -> str:
        r = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=180, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = run("launch")
    assert out.count("TOP-LEVEL CODE RAN") == 1, out
    assert "child mask has SIGINT: True" in out and "parent mask has SIGINT: False" in out, out
    assert "child exit code: 0" in out, out
    plain = run("plain")  # the problem being avoided: the child runs the script again and fails in it
    assert plain.count("TOP-LEVEL CODE RAN") == 2 and "child exit code: 0" not in plain, plain


# ---------------------------------------------------------------------------------------------- GPU ---

TEXTS = ["Hello there, how are you?", "What is 2 + 3?", "<think> a b c", "The quick brown fox", "x" * 40]
EAGER = {"enforce_eager": True} if os.environ.get("FASTGRPO_VLLM_EAGER") == "1" else {}


def _gpu_ready():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    _gpu_ready()
    from fastgrpo.testing import save_tiny_model

    path = tmp_path_factory.mktemp("tiny-qwen2")
    # head_dim 64: supported by every attention backend; fp32 on disk, the engine picks its dtype.
    save_tiny_model(str(path), "char", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4,
                    num_kv_heads=2, dtype=torch.float32, seed=0)
    return str(path)


def make_generator(model_dir, tokenizer, dtype=None, engine_kwargs=None, **overrides):
    """In-process engine unless `vllm_engine_process=True` is passed (whatever the config's default)."""
    from fastgrpo.rollout.vllm_colocate import VLLMColocateGenerator

    fields = dict(per_device_train_batch_size=16, num_generations=4, max_prompt_length=64,
                  max_completion_length=32, use_vllm=True, seed=0, vllm_engine_process=False)
    fields.update(overrides)
    return VLLMColocateGenerator(model_dir, GRPOConfig(**fields), tokenizer, local_rank=0, world_size=1,
                                 dtype=dtype, engine_kwargs=dict(EAGER) if engine_kwargs is None else engine_kwargs)


def load_hf(model_dir, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()


def with_lora(model, b_std: float, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * b_std).to(p))
    return peft_model.eval()


@torch.no_grad()
def hf_greedy(model, prompt, steps, eos):
    """Greedy tokens and, per step, the gap between the two best logits (to recognise near ties)."""
    ids = torch.tensor([prompt], device="cuda")
    tokens, gaps = [], []
    for _ in range(steps):
        logits = model(input_ids=ids).logits[0, -1].float()
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        tok = int(logits.argmax())
        tokens.append(tok)
        ids = torch.cat([ids, ids.new_tensor([[tok]])], dim=1)
        if tok == eos:
            break
    return tokens, gaps


def assert_greedy_matches(model, prompts, completions, steps, eos, tie=1e-3) -> int:
    """Token-for-token equality with transformers, except after a near tie (|top1 - top2| < tie) in fp32."""
    matched = 0
    assert len(completions) == len(prompts)
    for prompt, got in zip(prompts, completions):
        want, gaps = hf_greedy(model, prompt, steps, eos)
        for i, (a, b) in enumerate(zip(got, want)):
            if a != b:
                assert gaps[i] < tie, f"vLLM {got} vs HF {want}: diverge at {i} with logit gap {gaps[i]:.2e}"
                break
            matched += 1
        else:
            assert len(got) == len(want), f"vLLM {got} vs HF {want}"
    return matched


@torch.no_grad()
def logprob_diffs(model, prompts, generation, n, temperature) -> torch.Tensor:
    """|engine logprob - trainer logprob| per completion token; trainer = log_softmax(logits / T) in fp32."""
    diffs = []
    for k, (ids, lps) in enumerate(zip(generation.completion_ids, generation.logprobs)):
        prompt = prompts[k // n]
        seq = torch.tensor([prompt + ids], device="cuda")
        logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float() / temperature
        ours = logits.log_softmax(-1).gather(-1, seq[0, len(prompt):, None]).squeeze(-1)
        diffs.append((ours - torch.tensor(lps, device="cuda")).abs())
    return torch.cat(diffs)


@pytest.mark.gpu
def test_greedy_equals_transformers_after_weight_pushes(model_dir):
    _gpu_ready()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = load_hf(model_dir, torch.float32)
    prompts = [tok(t).input_ids for t in TEXTS]
    steps, eos = 24, tok.eos_token_id
    greedy = SamplingParams(n=1, max_tokens=steps, temperature=0.0)
    gen = make_generator(model_dir, tok, dtype="float32", bf16=False)
    try:
        out0 = gen.generate(prompts, greedy)
        matched = assert_greedy_matches(base, prompts, out0.completion_ids, steps, eos)
        print(f"\nFIGURE greedy fp32 base: {matched} tokens equal")
        # n > 1 with temperature 0 goes through prompt copies; order must stay prompt-major (p * n + j).
        pairs = gen.generate(prompts, SamplingParams(n=2, max_tokens=steps, temperature=0.0)).completion_ids
        assert len(pairs) == 2 * len(prompts) and pairs[0::2] == pairs[1::2]
        assert_greedy_matches(base, prompts, pairs[0::2], steps, eos)

        lora = with_lora(base, b_std=0.05)
        gen.update_weights(lora)
        print(f"FIGURE LoRA push (fp32): {gen.stats()['weight_sync_time'] * 1e3:.2f} ms, "
              f"{int(gen.stats()['weight_sync_tensors'])} tensors")
        assert gen.stats()["weight_sync_tensors"] == 2 * 2  # q/v of 2 layers
        out1 = gen.generate(prompts, greedy)
        assert out1.completion_ids != out0.completion_ids, "the LoRA push changed nothing"
        print(f"FIGURE greedy fp32 LoRA: {assert_greedy_matches(lora, prompts, out1.completion_ids, steps, eos)} tokens equal")

        full = copy.deepcopy(base)
        with torch.no_grad():
            for p in full.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        gen.update_weights(full)
        print(f"FIGURE full push (fp32): {gen.stats()['weight_sync_time'] * 1e3:.2f} ms, "
              f"{int(gen.stats()['weight_sync_tensors'])} tensors")
        out2 = gen.generate(prompts, greedy)
        print(f"FIGURE greedy fp32 full: {assert_greedy_matches(full, prompts, out2.completion_ids, steps, eos)} tokens equal")
        assert all(r in ("stop", "length") for r in out2.finish_reasons)
    finally:
        gen.close()


@pytest.mark.gpu
def test_sampled_logprobs_match_trainer_logprobs_bf16(model_dir):
    _gpu_ready()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = load_hf(model_dir, torch.bfloat16)
    prompts = [tok(t).input_ids for t in TEXTS[:4]]
    n, temperature = 4, 0.9
    params = SamplingParams(n=n, max_tokens=32, temperature=temperature, seed=1234)
    gen = make_generator(model_dir, tok, bf16=True)
    try:
        out = gen.generate(prompts, params)
        assert len(out.completion_ids) == len(prompts) * n
        assert all(len(c) == len(lp) for c, lp in zip(out.completion_ids, out.logprobs))
        d = logprob_diffs(base, prompts, out, n, temperature)
        print(f"\nFIGURE bf16 base: mean |dlogp| = {d.mean():.5f}, max = {d.max():.4f}, tokens = {d.numel()}")
        assert d.mean() < 0.02

        lora = with_lora(base, b_std=0.02)
        gen.update_weights(lora)
        print(f"FIGURE LoRA push (bf16): {gen.stats()['weight_sync_time'] * 1e3:.2f} ms")
        out = gen.generate(prompts, params)
        d = logprob_diffs(lora, prompts, out, n, temperature)  # trainer: unmerged PEFT forward
        print(f"FIGURE bf16 LoRA: mean |dlogp| = {d.mean():.5f}, max = {d.max():.4f}, tokens = {d.numel()}")
        assert d.mean() < 0.02
    finally:
        gen.close()


@pytest.mark.gpu
@pytest.mark.parametrize("engine_process", [False, True], ids=["in_process", "engine_process"])
def test_sampler_logprobs_equal_vllms_own(model_dir, engine_process):
    """The sampler's record (vllm_logprobs) against vLLM's logprobs=0 for the very same samples (one call asks for
    both): sampling with n > 1, top-k, greedy copies, EOS stops, and more requests than engine slots."""
    from fastgrpo.rollout import vllm_logprobs

    _gpu_ready()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(t).input_ids for t in TEXTS]
    # 12 engine slots (the batch plan's, not a power of two) for up to 20 requests at once
    gen = make_generator(model_dir, tok, bf16=True, vllm_engine_process=engine_process,
                         per_device_train_batch_size=12, gradient_accumulation_steps=1)
    assert gen.engine_kwargs["max_num_seqs"] == 12
    try:
        assert gen.sampler_logprobs, "the sampler hook did not install (V2 model runner expected)"
        cases = [SamplingParams(n=4, max_tokens=32, temperature=0.9), SamplingParams(n=3, max_tokens=24, top_k=5),
                 SamplingParams(n=2, max_tokens=16, temperature=0.0)]
        for params in cases:
            per_request, copies = (1, params.n) if params.temperature == 0.0 else (params.n, 1)
            requests = [{"prompt_token_ids": p} for p in prompts for _ in range(copies)]
            sampling = gen._sampling_params(params, per_request, logprobs=True)
            gen._sampler_rpc("start")
            outputs = gen.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
            recorded = gen._sampler_rpc("take")[0]
            comps = [sorted(o.outputs, key=lambda c: c.index) for o in outputs]
            hooked = vllm_logprobs.per_completion(recorded, [o.request_id for o in outputs],
                                                  [len(r["prompt_token_ids"]) for r in requests], per_request,
                                                  [[c.token_ids for c in cs] for cs in comps])
            own = [[_sampled_logprobs(list(c.token_ids), c.logprobs) for c in cs] for cs in comps]
            lengths = [len(c.token_ids) for cs in comps for c in cs]
            diff = max(abs(a - b) for h, o in zip(hooked, own) for x, y in zip(h, o) for a, b in zip(x, y))
            print(f"\nFIGURE sampler record vs vLLM logprobs ({params}): max |diff| {diff:.2e}, "
                  f"{sum(lengths)} tokens, lengths {min(lengths)}-{max(lengths)}")
            assert diff <= 1e-5
        assert min(lengths) >= 1
        out = gen.generate(prompts, cases[0])  # the wiring: generate() takes its logprobs from the record
        assert [len(c) for c in out.completion_ids] == [len(lp) for lp in out.logprobs]
        assert all(np.isfinite(lp).all() and max(lp) <= 0.0 for lp in out.logprobs)
    finally:
        gen.close()


@pytest.mark.gpu
def test_sleep_wake_round_trip_keeps_generation(model_dir):
    _gpu_ready()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = load_hf(model_dir, torch.bfloat16)
    prompts = [tok(t).input_ids for t in TEXTS]
    greedy = SamplingParams(n=1, max_tokens=24, temperature=0.0)
    gen = make_generator(model_dir, tok, bf16=True, vllm_enable_sleep_mode=True)
    try:
        a = gen.generate(prompts, greedy).completion_ids
        free_awake = torch.cuda.mem_get_info()[0]
        gen.sleep()
        freed = torch.cuda.mem_get_info()[0] - free_awake
        print(f"\nFIGURE sleep(level=1) freed {freed / 2**20:.1f} MiB")
        assert freed > 0
        gen.wake()
        assert gen.generate(prompts, greedy).completion_ids == a

        lora = with_lora(base, b_std=0.05)
        gen.sleep()
        gen.update_weights(lora)  # pushed while asleep: wakes the weights first
        print(f"FIGURE LoRA push while asleep: {gen.stats()['weight_sync_time'] * 1e3:.2f} ms")
        gen.wake()
        c = gen.generate(prompts, greedy).completion_ids
        gen.update_weights(lora)  # the same weights pushed while awake
        d = gen.generate(prompts, greedy).completion_ids
        assert c == d and c != a
        gen.sleep()
        assert gen.generate(prompts, greedy).completion_ids == d  # generate wakes a sleeping engine itself
    finally:
        gen.close()


@pytest.mark.gpu
def test_engine_process_weight_push_greedy_and_sleep(model_dir):
    """vLLM's engine in its own process: LoRA and full pushes through CUDA IPC give transformers' greedy tokens."""
    _gpu_ready()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = load_hf(model_dir, torch.float32)
    prompts = [tok(t).input_ids for t in TEXTS]
    steps, eos = 24, tok.eos_token_id
    greedy = SamplingParams(n=1, max_tokens=steps, temperature=0.0)
    gen = make_generator(model_dir, tok, dtype="float32", bf16=False, vllm_engine_process=True,
                         vllm_enable_sleep_mode=True)
    try:
        client = gen.llm.llm_engine.engine_core
        assert gen.engine_process and type(client).__name__ == "SyncMPClient"  # the EngineCore is another process
        procs = client.resources.engine_manager.processes
        assert len(procs) == 1 and procs[0].is_alive() and procs[0].pid != os.getpid()
        out0 = gen.generate(prompts, greedy)
        print(f"\nFIGURE engine-process greedy fp32 base: "
              f"{assert_greedy_matches(base, prompts, out0.completion_ids, steps, eos)} tokens equal")

        lora = with_lora(base, b_std=0.05)
        times = []
        for _ in range(4):
            gen.update_weights(lora)
            times.append(gen.stats()["weight_sync_time"])
        assert gen.stats()["weight_sync_tensors"] == 2 * 2  # q/v of 2 layers
        print(f"FIGURE engine-process LoRA push: {statistics.median(times[1:]) * 1e3:.2f} ms (median of 3; first "
              f"push {times[0] * 1e3:.2f} ms), {int(gen.stats()['weight_sync_tensors'])} tensors, "
              f"{gen.stats()['weight_sync_bytes'] / 2**20:.2f} MiB")
        out1 = gen.generate(prompts, greedy)
        assert out1.completion_ids != out0.completion_ids, "the LoRA push changed nothing"
        print(f"FIGURE engine-process greedy fp32 LoRA: "
              f"{assert_greedy_matches(lora, prompts, out1.completion_ids, steps, eos)} tokens equal")

        free_awake = torch.cuda.mem_get_info()[0]  # device-wide: includes the engine process
        gen.sleep()
        freed = torch.cuda.mem_get_info()[0] - free_awake
        print(f"FIGURE engine-process sleep(level=1) freed {freed / 2**20:.1f} MiB")
        assert freed > 0
        gen.update_weights(lora)  # pushed while asleep: wakes the weights first
        print(f"FIGURE engine-process LoRA push while asleep: {gen.stats()['weight_sync_time'] * 1e3:.2f} ms")
        gen.wake()
        assert gen.generate(prompts, greedy).completion_ids == out1.completion_ids

        full = copy.deepcopy(base)
        with torch.no_grad():
            for p in full.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        gen.bucket_bytes = 256 * 1024  # several IPC buffers (the MLP weights travel alone)
        gen.update_weights(full)
        print(f"FIGURE engine-process full push (fp32, 256 KiB buckets): "
              f"{gen.stats()['weight_sync_time'] * 1e3:.2f} ms, {int(gen.stats()['weight_sync_tensors'])} tensors")
        out2 = gen.generate(prompts, greedy)
        print(f"FIGURE engine-process greedy fp32 full: "
              f"{assert_greedy_matches(full, prompts, out2.completion_ids, steps, eos)} tokens equal")
    finally:
        gen.close()
    procs[0].join(10)
    assert not procs[0].is_alive()  # close() ended the engine process (and so freed its GPU memory)


def _training_like_step():
    """A few fused-free layers forward/backward/AdamW: Python-dispatch heavy like a training step, ends in a sync."""
    g = torch.Generator(device="cpu").manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    x = torch.randn(256, 1024, generator=g).cuda()

    def step() -> None:
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return step


def _steps_per_second(step, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def _generate_beside_training(gen, prompts, params, step) -> tuple[float, float]:
    """Generation as the one-step-off-policy loop runs it (loop._generate_beside: background thread, own CUDA
    stream) while this thread trains; returns (generation seconds, training steps per second meanwhile)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastgrpo.loop import _generate_beside

    run = types.SimpleNamespace(device=torch.device("cuda", 0), generator=gen, sampling=params,
                                config=types.SimpleNamespace(async_generation=True))
    with ThreadPoolExecutor(1) as pool:
        n, t0 = 0, time.perf_counter()
        future = pool.submit(_generate_beside, run, [types.SimpleNamespace(ids=p) for p in prompts])
        while not future.done():
            step()
            n += 1
        rate = n / (time.perf_counter() - t0)
        out, seconds = future.result()
    assert len(out.completion_ids) == len(prompts) * params.n
    return seconds, rate


@pytest.mark.gpu
def test_generation_beside_training_returns_the_tokens_it_sampled(model_dir):
    """The one-step-off-policy layout, repeated: vLLM generating in a background thread while this thread trains.
    Each call checks that every returned token is the one the sampler drew (generate compares the sampler's record
    with the returned tokens and raises SamplerLogprobsError on any difference)."""
    _gpu_ready()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(t).input_ids for t in (TEXTS * 4)[:16]]
    params = SamplingParams(n=8, max_tokens=48, temperature=1.0)
    step = _training_like_step()
    gen = make_generator(model_dir, tok, bf16=True, engine_kwargs={}, per_device_train_batch_size=128,
                         num_generations=8, max_completion_length=48)
    try:
        assert gen.sampler_logprobs and gen._stream is not None
        for _ in range(8):
            _generate_beside_training(gen, prompts, params, step)
    finally:
        gen.close()


@pytest.mark.gpu
def test_engine_process_generation_timing_vs_in_process(model_dir):
    """Both modes with CUDA graphs, bf16: a LoRA push (time, effect, same greedy tokens in both modes), then
    recipe-shaped generation (128 completions x 512 tokens) alone, and in a background thread beside a
    training-like loop in this thread (the one-step-off-policy layout)."""
    _gpu_ready()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    lora = with_lora(load_hf(model_dir, torch.bfloat16), b_std=0.05)
    greedy_prompts = [tok(t).input_ids for t in TEXTS]
    greedy = SamplingParams(n=1, max_tokens=24, temperature=0.0)
    prompts = [tok(t).input_ids for t in (TEXTS * 4)[:16]]
    params = SamplingParams(n=8, max_tokens=512, temperature=1.0, extra={"ignore_eos": True})
    step = _training_like_step()
    step()
    solo_rate = _steps_per_second(step, 2.0)
    figures, greedy_after = {}, {}
    for engine_process in (False, True):
        gen = make_generator(model_dir, tok, bf16=True, engine_kwargs={}, vllm_engine_process=engine_process,
                             per_device_train_batch_size=128, num_generations=8, max_completion_length=512)
        try:
            assert gen.engine_process == engine_process
            assert gen.shares_gpu_by_time_slice == engine_process  # async_yield's default follows it
            before = gen.generate(greedy_prompts, greedy).completion_ids
            pushes = []
            for _ in range(3):
                gen.update_weights(lora)
                pushes.append(gen.stats()["weight_sync_time"])
            greedy_after[engine_process] = gen.generate(greedy_prompts, greedy).completion_ids
            assert greedy_after[engine_process] != before, "the LoRA push changed nothing"
            out = gen.generate(prompts, params)  # warm-up
            assert len(out.completion_ids) == 128
            tokens = sum(len(c) for c in out.completion_ids)
            alone = []
            for _ in range(3):
                gen.generate(prompts, params)
                alone.append(gen.stats()["generation_time"])
            beside, rate = _generate_beside_training(gen, prompts, params, step)
            figures[engine_process] = (statistics.median(pushes), statistics.median(alone), beside, rate)
        finally:
            gen.close()
    print(f"\nFIGURE training-like loop alone: {solo_rate:.1f} steps/s; generation batch: 128 completions, "
          f"{tokens} tokens")
    for engine_process, name in ((False, "in-process"), (True, "engine-process")):
        push, alone, beside, rate = figures[engine_process]
        print(f"FIGURE {name} LoRA push (bf16, CUDA graphs): {push * 1e3:.2f} ms (median of 3)")
        print(f"FIGURE generate 128x512 {name}: {alone:.3f} s alone (median of 3), {beside:.3f} s beside training; "
              f"training meanwhile at {rate:.1f} steps/s ({rate / solo_rate:.0%} of alone)")
    (_, a0, b0, r0), (_, a1, b1, r1) = figures[False], figures[True]
    print(f"FIGURE engine-process / in-process: generate alone {a1 / a0:.2f}x, beside training {b1 / b0:.2f}x, "
          f"training beside generation {r1 / r0:.2f}x")
    same = sum(x == y for a, b in zip(greedy_after[False], greedy_after[True]) for x, y in zip(a, b))
    total = sum(len(a) for a in greedy_after[False])
    print(f"FIGURE greedy after the same LoRA push, engine-process vs in-process (bf16): {same}/{total} tokens equal")


def test_engine_process_env_sets_vllms_layout_passes_the_rest_on_and_restores_it(monkeypatch):
    """The engine process (started inside, it inherits os.environ) gets vLLM's multiprocessing layout; the rest of
    the environment passes on unchanged (an MPS share set for the job binds the engine too); afterwards the
    trainer's values are back."""
    from fastgrpo.rollout.vllm_colocate import _engine_process_env

    share = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
    probe = ("import os; print(os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING'), "
             "os.environ.get('VLLM_WORKER_MULTIPROC_METHOD'), os.environ.get('%s'))" % share)
    monkeypatch.setenv(share, "50")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as an earlier in-process engine leaves it
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    with _engine_process_env():
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    assert child.split() == ["1", "spawn", "50"]
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and os.environ[share] == "50"
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in os.environ


def test_engine_env_reaches_the_engine_process_only_and_is_validated(monkeypatch):
    """vllm_engine_env (JSON text, as from a command line) overrides the inherited environment for the engine
    process alone: inside the launch a child sees it, and the trainer's values (or their absence) are back after."""
    from fastgrpo.rollout.vllm_colocate import _engine_process_env

    config = GRPOConfig(output_dir="/tmp/x", vllm_engine_env='{"CUDA_MPS_CLIENT_PRIORITY": 0, "FG_PROBE": "on"}')
    assert config.vllm_engine_env == {"CUDA_MPS_CLIENT_PRIORITY": "0", "FG_PROBE": "on"}
    monkeypatch.setenv("CUDA_MPS_CLIENT_PRIORITY", "1")  # the trainer's own, set for the job
    monkeypatch.delenv("FG_PROBE", raising=False)
    probe = "import os; print(os.environ.get('CUDA_MPS_CLIENT_PRIORITY'), os.environ.get('FG_PROBE'))"
    with _engine_process_env(config.vllm_engine_env):
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    assert child.split() == ["0", "on"]
    assert os.environ["CUDA_MPS_CLIENT_PRIORITY"] == "1" and "FG_PROBE" not in os.environ
    for bad, words in (('{"A": true}', "vllm_engine_env['A'] must be text or a number"),
                       ('{"A": [1]}', "must be text or a number"), ('{"": "1"}', "is not an environment variable"),
                       ('{"A=B": "1"}', "is not an environment variable"), ("[1]", "must be a mapping"),
                       ("{A: 1}", "is not JSON")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            GRPOConfig(output_dir="/tmp/x", vllm_engine_env=bad)
