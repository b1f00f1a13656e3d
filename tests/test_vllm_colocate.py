"""VLLMColocateGenerator: CPU tests of its pure helpers, and GPU tests (H100/H200, vLLM 0.26) of the engine.

Run the GPU part with `-s` to see the figures (mean |logprob diff|, weight sync time, memory freed by sleep):
    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=src pytest -s -q -m gpu tests/test_vllm_colocate.py
FASTGRPO_VLLM_EAGER=1 skips torch.compile/CUDA graphs (faster start; the default exercises the real path).
"""

from __future__ import annotations

import copy
import os
import types

import pytest
import torch
import transformers

from fastgrpo.config import GRPOConfig
from fastgrpo.rollout.base import SamplingParams
from fastgrpo.rollout.vllm_colocate import (
    _finish_reason,
    _sampled_logprobs,
    auto_kv_cache_bytes,
    engine_num_seqs,
    kv_bytes_per_token,
)

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


def make_generator(model_dir, tokenizer, dtype=None, **overrides):
    from fastgrpo.rollout.vllm_colocate import VLLMColocateGenerator

    fields = dict(per_device_train_batch_size=16, num_generations=4, max_prompt_length=64,
                  max_completion_length=32, use_vllm=True, seed=0)
    fields.update(overrides)
    return VLLMColocateGenerator(model_dir, GRPOConfig(**fields), tokenizer, local_rank=0, world_size=1,
                                 dtype=dtype, engine_kwargs=dict(EAGER))


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
