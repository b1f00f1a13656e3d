"""Optimized path == plain path (issue #6).

1. `fastgrpo.logprobs`: the chunked output-layer + log-softmax autograd function against the model's own full
   logits (plain path), on a tiny fp32 Qwen2 with and without LoRA: log-probabilities, entropies and the gradients
   of every trainable parameter, for several chunk sizes and temperatures, on ragged prompts and completions.
2. `Rows.build`: every completion token's log-probability equals an unpadded single-sequence forward pass.
3. `fastgrpo.batch.train_pass`: packing with `micro_batch_tokens` gives the same loss and gradients as
   `per_device_train_batch_size` passes on a fixed Rollout.
"""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fastgrpo import batch as B
from fastgrpo import loss as L
from fastgrpo.config import GRPOConfig
from fastgrpo.data import Prompt
from fastgrpo.logprobs import Rows, chunked_logprobs, completion_logprobs, plain_logprobs

VOCAB_USED = 95  # printable ASCII ids of the char tokenizer


def ragged(seed: int, prompt_lens, completion_lens):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB_USED, (n,), generator=g).tolist() for n in prompt_lens]
    completions = [torch.randint(0, VOCAB_USED, (n,), generator=g).tolist() for n in completion_lens]
    return prompts, completions


def with_lora(model, target_modules, seed: int = 1):
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B is zero at init: make the adapters matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


MODELS = ["full-tied", "full-untied", "lora-qv", "lora-all-linear+lm_head"]


@pytest.fixture
def model_kind_factory(tiny_model_factory):
    def make(kind: str):
        if kind == "full-tied":
            return tiny_model_factory(seed=3).train()
        if kind == "full-untied":
            return tiny_model_factory(seed=3, tie=False).train()
        if kind == "lora-qv":
            return with_lora(tiny_model_factory(seed=3), ["q_proj", "v_proj"]).train()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
        return with_lora(tiny_model_factory(seed=3, tie=False), targets).train()
    return make


def run_path(model, rows, temperature, chunk, plain, coeff):
    model.zero_grad(set_to_none=True)
    lp, ent = completion_logprobs(model, rows, temperature, chunk, want_entropy=True, plain=plain)
    (lp * coeff).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return lp.detach(), ent, grads


@pytest.mark.parametrize("kind", MODELS)
def test_chunked_equals_plain(kind, model_kind_factory, char_tokenizer):
    model = model_kind_factory(kind)
    prompts, completions = ragged(0, [3, 9, 5, 1], [6, 2, 11, 4])
    rows = Rows.build(prompts, completions, char_tokenizer.pad_token_id)
    M = sum(map(len, completions))
    coeff = torch.linspace(-1.0, 1.5, M)  # an arbitrary downstream loss, different weight per token
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for temperature in (1.0, 0.7, 1.6):
        ref_lp, ref_ent, ref_grads = run_path(model, rows, temperature, 4096, True, coeff)
        assert all(g is not None for g in ref_grads.values())
        for chunk in (1, 3, 7, 4096):
            lp, ent, grads = run_path(model, rows, temperature, chunk, False, coeff)
            assert lp.dtype == torch.float32 and lp.shape == (M,)
            torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
            torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5)
            assert not ent.requires_grad
            assert grads.keys() == ref_grads.keys()
            for name in trainable:
                assert grads[name] is not None, f"{name}: no gradient through the chunked path"
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    if kind.startswith("lora"):  # base weights get no gradient at all
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("chunk,block", [(3, 7), (5, 16), (64, 49), (4, 50), (64, 1000), (13, None)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_vocabulary_tiles_equal_full_log_softmax(chunk, block, with_bias):
    """Tiles over rows and vocabulary (online log-sum-exp, the CPU layout) against a full log_softmax: values,
    entropies and gradients of hidden, weight and bias, with uneven last tiles and targets at both ends."""
    g = torch.Generator().manual_seed(0)
    M, H, V = 23, 8, 50
    hidden = (torch.randn(M, H, generator=g) * 2).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_() if with_bias else None
    targets = torch.randint(0, V, (M,), generator=g)
    targets[:3] = torch.tensor([0, V - 1, V - 1])
    coeff = torch.linspace(-2.0, 1.0, M)
    for temperature in (1.0, 0.6):
        params = [hidden, weight] + ([bias] if with_bias else [])
        lp, ent = chunked_logprobs(hidden, weight, bias, targets, temperature, chunk, True, block)
        got = torch.autograd.grad((lp * coeff).sum(), params)
        logits = hidden @ weight.t() + (bias if with_bias else 0.0)
        ref_lp, ref_ent = plain_logprobs(logits, targets, temperature)
        want = torch.autograd.grad((ref_lp * coeff).sum(), params)
        torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, ref_ent.detach(), rtol=0, atol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_row_passes_equal_the_torch_path_on_gpu(with_bias):
    """The fused Triton passes (fastgrpo.triton_logprobs) against the torch path of the same chunked function and
    a full fp32 log_softmax: bf16 inputs as in training, a vocabulary that is no multiple of the kernel's block,
    targets at both ends, two temperatures; values, entropies and the gradients of hidden, weight and bias."""
    from fastgrpo import triton_logprobs

    assert triton_logprobs.usable(torch.device("cuda")), "the kernels' self-check failed: training would fall back"
    g = torch.Generator(device="cuda").manual_seed(0)
    M, H, V = 300, 64, 5003
    hidden = (torch.randn(M, H, device="cuda", generator=g) * 2).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.3).bfloat16().requires_grad_()
    bias = (torch.randn(V, device="cuda", generator=g) * 0.3).bfloat16().requires_grad_() if with_bias else None
    targets = torch.randint(0, V, (M,), device="cuda", generator=g)
    targets[:3] = torch.tensor([0, V - 1, V - 1])
    coeff = torch.linspace(-2.0, 1.0, M, device="cuda")
    params = [hidden, weight] + ([bias] if with_bias else [])
    for temperature in (1.0, 0.7):
        out = {}
        for fused in (True, False):
            lp, ent = chunked_logprobs(hidden, weight, bias, targets, temperature, 64, True, None, fused)
            out[fused] = (lp, ent, torch.autograd.grad((lp * coeff).sum(), params))
        logits = (hidden.float() @ weight.float().t() + (bias.float() if with_bias else 0.0)).bfloat16().float()
        ref_lp, ref_ent = plain_logprobs(logits, targets, temperature)
        (lp, ent, grads), (lp0, ent0, grads0) = out[True], out[False]
        torch.testing.assert_close(lp, lp0, rtol=0, atol=1e-4)
        torch.testing.assert_close(ent, ent0, rtol=0, atol=1e-4)
        torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-2)  # bf16 logits vs their fp32 product
        torch.testing.assert_close(ent, ref_ent.detach(), rtol=0, atol=2e-2)
        for a, b in zip(grads, grads0):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
            assert (a.float() - b.float()).abs().mean() < 1e-3 * b.float().abs().mean() + 1e-6


def test_fused_kernels_fall_back_to_torch_with_a_warning_where_they_cannot_run(monkeypatch):
    """Off CUDA the fused path is never chosen; where a kernel fails (here: made to raise, as a Triton that cannot
    compile for the device would), the self-check warns and answers False, and the chunked function then gives the
    torch path's values and gradients."""
    from fastgrpo import triton_logprobs

    assert not triton_logprobs.usable(torch.device("cpu"))

    def broken(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(triton_logprobs, "row_stats", broken)
    with pytest.warns(UserWarning, match="does not run on cpu .*RuntimeError.*torch path"):
        assert triton_logprobs.self_check(torch.device("cpu")) is False
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g)
    targets = torch.randint(0, 40, (9,), generator=g)
    lp, _ = chunked_logprobs(hidden, weight, None, targets, 0.8, 4, False, 40, True)
    (grad,) = torch.autograd.grad(lp.sum(), [hidden])
    ref, _ = plain_logprobs(hidden @ weight.t(), targets, 0.8)
    (want,) = torch.autograd.grad(ref.sum(), [hidden])
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


def test_rows_match_unpadded_single_sequences(tiny_model_factory, char_tokenizer):
    """Right padding, position ids and the completion-token gather are right for every ragged row."""
    model = tiny_model_factory(seed=5).eval()
    prompts, completions = ragged(1, [4, 1, 8, 2, 6], [3, 9, 1, 5, 2])
    rows = Rows.build(prompts, completions, char_tokenizer.pad_token_id)
    assert rows.T == 9 and rows.input_ids.shape == (5, 10)  # widest row: 1 + 9
    with torch.no_grad():
        lp, ent = completion_logprobs(model, rows, 0.9, 5, want_entropy=True)
        k = 0
        for p, c in zip(prompts, completions):
            logits = model(input_ids=torch.tensor([p + c])).logits[0].double() / 0.9
            logp = torch.log_softmax(logits, -1)
            for t, tok in enumerate(c):
                pos = len(p) - 1 + t  # the position that predicts completion token t
                assert abs(float(lp[k]) - float(logp[pos, tok])) < 1e-5
                expected_entropy = -(logp[pos].exp() * logp[pos]).sum()
                assert abs(float(ent[k]) - float(expected_entropy)) < 1e-5
                k += 1
    grid = rows.to_grid(lp, fill=float("nan"))
    for i, c in enumerate(completions):
        assert not grid[i, :len(c)].isnan().any() and grid[i, len(c):].isnan().all()


# ------------------------------------------------------------------------------------ train_pass packing
def fixed_rollout(config: GRPOConfig, seed: int, old_shift: float):
    """A hand-made round: ragged prompts/completions, random advantages, one masked truncated completion, old and
    reference logprobs (and generator logprobs) offset from the current ones so that clipping, KL and IS act."""
    plan = config.batch_plan()
    N = plan.completions_per_rank
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(1, 7, (N,), generator=g).tolist()
    clens = torch.randint(1, config.max_completion_length + 1, (N,), generator=g).tolist()
    prompt_ids, completion_ids = ragged(seed, plens, clens)
    truncated = torch.tensor([c == config.max_completion_length for c in clens])
    truncated[2] = True
    lengths = torch.tensor(clens, dtype=torch.float64)
    loss_lengths = lengths * (~truncated).double() if config.mask_truncated_completions else lengths
    weights = L.sequence_weights(loss_lengths, config.loss_type, plan.micro_batch, plan.grad_accum,
                                 plan.steps_per_generation, config.max_completion_length)
    adv = torch.randn(N, generator=g)

    def noise():  # per-sequence offset + per-token noise: token and sequence (GSPO) ratios both spread
        return [(torch.rand(1, generator=g) - 0.5) * 2 * old_shift + (torch.rand(n, generator=g) - 0.5) * old_shift
                for n in clens]

    r = B.Rollout(
        prompts=[Prompt(i, "p", prompt_ids[i], {}) for i in range(N)], prompt_ids=prompt_ids,
        completion_ids=completion_ids, gen_logprobs=None, truncated=truncated,
        rewards_per_func=adv[:, None].clone(), rewards=adv.clone(), advantages=adv, group_std=torch.ones(N),
        loss_lengths=loss_lengths, weights=weights)
    return r, noise


def current_logprobs(model, r: B.Rollout, config, pad_id):
    rows = Rows.build(r.prompt_ids, r.completion_ids, pad_id)
    with torch.no_grad():
        lp, _ = completion_logprobs(model, rows, config.temperature, config.logprob_chunk_size)
    return list(torch.split(lp, [len(c) for c in r.completion_ids]))


CASES = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, mask_truncated_completions=True),
    dict(loss_type="bnpo", epsilon_high=0.28, delta=1.4, async_generation=True),
    dict(loss_type="dr_grpo", beta=0.1, vllm_importance_sampling_mode="sequence_mask"),
    dict(loss_type="cispo", epsilon_high=1.3, async_generation=True),
]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", CASES, ids=[c["loss_type"] for c in CASES])
def test_train_pass_packing_equals_micro_batches(case, lora, tiny_model_factory, char_tokenizer, tmp_path):
    import contextlib

    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                        num_generations=2, max_completion_length=10, temperature=0.8, logprob_chunk_size=5, **case)
    model = tiny_model_factory(seed=2)
    model = (with_lora(model, ["q_proj", "v_proj", "up_proj"]) if lora else model).train()
    pad = char_tokenizer.pad_token_id
    r, noise = fixed_rollout(config, seed=4, old_shift=0.5)
    cur = current_logprobs(model, r, config, pad)
    r.old_logprobs = [c + n for c, n in zip(cur, noise())]
    if config.beta:
        r.ref_logprobs = [c + n for c, n in zip(cur, noise())]
    if case.get("async_generation") or "vllm_importance_sampling_mode" in case:
        gen = [(c + n) for c, n in zip(r.old_logprobs, noise())]
        gen[0][0] = float("nan")
        r.gen_logprobs = [x.tolist() for x in gen]

    plan = config.batch_plan()
    order = list(range(len(r)))  # one optimizer step: GA micro-batches
    assert len(order) == plan.micro_batch * plan.grad_accum
    lengths = [len(p) + len(c) for p, c in zip(r.prompt_ids, r.completion_ids)]  # row widths, as the loop plans
    nullctx = contextlib.nullcontext
    step = lambda passes: run_step(model, r, config, passes, pad, nullctx)  # noqa: E731

    base_passes = B.plan_passes(order, plan.micro_batch, None, lengths)
    assert base_passes == [[0, 1, 2], [3, 4, 5]]
    ref_sums, ref_grads = step(base_passes)
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    assert float(ref_sums["clip_region"]) > 0, "old logprobs should put some tokens in the clipped region"
    for budget in (14, 24, 1000):
        passes = B.plan_passes(order, plan.micro_batch, budget, lengths)
        assert sorted(i for p in passes for i in p) == order
        if budget == 1000:
            assert len(passes) == 1  # everything in one pass
        else:
            assert passes != base_passes
        sums, grads = step(passes)
        for key in ("loss", "tokens", "entropy", "clip_low", "clip_high", "clip_region", "kl", "is_sum"):
            if key in ref_sums:
                torch.testing.assert_close(sums[key].double(), ref_sums[key].double(), rtol=1e-5, atol=1e-6, msg=key)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_token_budget_passes_cover_every_row_within_budget_and_leave_no_lone_tail():
    """plan_passes with a token budget, over random lengths: every row once, no pass over the budget (width of its
    widest row x rows) unless it is one row wider than the budget, rows grouped by width, and the last pass not a
    single row where two of its width fit and the pass before it can spare one (compiled layers would compile a
    second graph for a single row)."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 40)
        lengths = [rng.randint(1, 60) for _ in range(n)]
        budget = rng.randint(20, 400)
        passes = B.plan_passes(list(range(n)), 4, budget, lengths)
        assert sorted(i for p in passes for i in p) == list(range(n))
        for p in passes:
            assert len(p) == 1 or max(lengths[i] for i in p) * len(p) <= budget, (lengths, budget, passes)
        widest = [max(lengths[i] for i in p) for p in passes]
        assert widest == sorted(widest)
        if len(passes) > 1 and len(passes[-1]) == 1:
            # only where a partner would leave the pass before it a lone row, or two rows do not fit
            assert 2 * widest[-1] > budget or len(passes[-2]) <= 2, (lengths, budget, passes)
    # the tail that motivated it: 9 rows of width 10, room for 4 a pass -> 4, 4, 1 before, 4, 3, 2 now
    assert [len(p) for p in B.plan_passes(list(range(9)), 4, 40, [10] * 9)] == [4, 3, 2]


def run_step(model, r, config, passes, pad_id, autocast):
    model.zero_grad(set_to_none=True)
    params = L.LossParams(config.loss_type, config.importance_sampling_level, config.epsilon_low, config.clip_high,
                          config.delta, config.beta)
    sums: dict = {}
    for idx in passes:
        s = B.train_pass(model, r, idx, config, params, pad_id, torch.device("cpu"), autocast)
        for k, v in s.items():
            if k.endswith(("_min", "_max")):
                continue
            sums[k] = sums.get(k, 0) + v.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sums, grads


def _tiny(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB_USED + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg = {"gemma2": lambda: tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.7),
           "cohere": lambda: tf.CohereConfig(**common, logit_scale=2.5),
           "granite": lambda: tf.GraniteConfig(**common, logits_scaling=0.3)}[kind]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).float().train()


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_logits_transformed_after_the_head_are_respected(kind):
    """Gemma 2's soft-capping, Cohere's logit scale and Granite's logit scaling happen inside the model's forward,
    after the output layer: the fast path must give the model's own log-probabilities and gradients."""
    from fastgrpo.logprobs import logit_transform

    model = _tiny(kind)
    assert logit_transform(model) is not None
    with torch.no_grad():  # large output weights: the transforms then change the distribution a lot
        model.get_output_embeddings().weight.mul_(20)
    prompts, completions = ragged(1, [4, 2, 6], [5, 3, 1])
    rows = Rows.build(prompts, completions, pad_id=0)
    coeff = torch.linspace(-1.0, 1.0, sum(map(len, completions)))
    ref_lp, ref_ent, ref_grads = run_path(model, rows, 0.8, 4096, True, coeff)
    lp, ent, grads = run_path(model, rows, 0.8, 4096, False, coeff)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_qwen2_logits_are_the_output_layer_s(tiny_model_factory):
    from fastgrpo.logprobs import logit_transform

    assert logit_transform(tiny_model_factory()) is None
