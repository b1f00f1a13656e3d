"""iter_sync_weights / bucketed on a tiny CPU Qwen2: names, merged values, no side effects."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from fastgrpo.rollout.weights import bucketed, iter_sync_weights


def tiny_config(tied: bool = True) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )


def tiny_model(tied: bool = True, seed: int = 0, dtype=torch.float32) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(tiny_config(tied)).to(dtype).eval()


def lora_model(base, dropout: float = 0.0, seed: int = 1, **kw):
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=dropout, **kw)
    peft_model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapter actually change the model
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1, 5, 9, 33, 100, 7, 2, 64], [3, 3, 4, 120, 17, 8, 0, 1]])


def load_into_fresh(pairs, tied=True, seed=123):
    fresh = tiny_model(tied, seed=seed)
    missing, unexpected = fresh.load_state_dict(dict(pairs), strict=False)
    assert not unexpected
    return fresh


def test_lora_only_changed_names_values_and_no_side_effects():
    base = tiny_model()
    reference_base = copy.deepcopy(base)
    peft_model = lora_model(base)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}

    pairs = list(iter_sync_weights(peft_model, only_changed=True))
    names = [n for n, _ in pairs]
    expected = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
    assert names == expected  # only q/v weights; 48 for a 24-layer model
    assert set(names) <= set(transformers.Qwen2ForCausalLM(tiny_config()).state_dict())

    # The trainer's model is untouched: no merge/unmerge, no in-place changes, no attributes.
    after = peft_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # Merged weights in a fresh copy of the base model reproduce the adapted model.
    merged = copy.deepcopy(reference_base)
    merged.load_state_dict(dict(pairs), strict=False)
    torch.testing.assert_close(logits(merged, IDS), logits(peft_model, IDS), atol=1e-5, rtol=0)
    # ... and the LoRA really changed something (the test would be vacuous otherwise).
    assert (logits(reference_base, IDS) - logits(peft_model, IDS)).abs().max() > 1e-3


def test_lora_full_yields_every_base_parameter():
    base = tiny_model()
    peft_model = lora_model(base)
    pairs = list(iter_sync_weights(peft_model, only_changed=False))
    names = [n for n, _ in pairs]
    state_names = set(transformers.Qwen2ForCausalLM(tiny_config()).state_dict()) - {"lm_head.weight"}
    assert len(names) == len(set(names))
    assert set(names) == state_names
    assert not any("lora" in n or "base_layer" in n for n in names)
    # Everything sent into a model with different random weights reproduces the adapted model.
    fresh = load_into_fresh(pairs, seed=999)
    torch.testing.assert_close(logits(fresh, IDS), logits(peft_model, IDS), atol=1e-5, rtol=0)


def test_plain_model_yields_all_parameters_once():
    model = tiny_model()
    pairs = list(iter_sync_weights(model))  # only_changed is meaningless without PEFT
    names = [n for n, _ in pairs]
    assert names == [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names
    sd = model.state_dict()
    assert all(torch.equal(t, sd[n]) for n, t in pairs)
    assert all(t is not p for (_, t), (_, p) in zip(pairs, model.named_parameters()))  # fresh tensor objects

    untied = tiny_model(tied=False)
    names = [n for n, _ in iter_sync_weights(untied)]
    assert "lm_head.weight" in names and len(names) == len(set(names))


def test_modules_to_save_sends_the_trained_copy():
    base = tiny_model(tied=False)
    peft_model = lora_model(base, modules_to_save=["lm_head"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    pairs = dict(iter_sync_weights(peft_model, only_changed=True))
    assert "lm_head.weight" in pairs and len(pairs) == 5
    wrapper = peft_model.base_model.model.lm_head
    assert torch.equal(pairs["lm_head.weight"], wrapper.modules_to_save["default"].weight)
    assert not torch.equal(pairs["lm_head.weight"], wrapper.original_module.weight)

    full = list(iter_sync_weights(peft_model, only_changed=False))
    assert len([n for n, _ in full if n == "lm_head.weight"]) == 1
    assert not any("original_module" in n or "modules_to_save" in n for n, _ in full)
    fresh = load_into_fresh(full, tied=False, seed=5)
    torch.testing.assert_close(logits(fresh, IDS), logits(peft_model, IDS), atol=1e-5, rtol=0)


def test_dropout_is_ignored_and_train_mode_is_fine():
    base = tiny_model()
    reference_base = copy.deepcopy(base)
    peft_model = lora_model(base, dropout=0.3)
    peft_model.train()
    pairs = list(iter_sync_weights(peft_model))
    peft_model.eval()
    reference_base.load_state_dict(dict(pairs), strict=False)
    torch.testing.assert_close(logits(reference_base, IDS), logits(peft_model, IDS), atol=1e-5, rtol=0)


def test_bf16_weights_stay_bf16_and_are_rounded_once():
    base = tiny_model(dtype=torch.bfloat16)
    peft_model = lora_model(base)
    pairs = dict(iter_sync_weights(peft_model))
    module = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    exact = module.base_layer.weight.float() + module.scaling["default"] * (
        module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
    )
    got = pairs["model.layers.0.self_attn.q_proj.weight"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, exact.to(torch.bfloat16))


def test_already_merged_adapter_is_not_added_twice():
    base = tiny_model()
    peft_model = lora_model(base)
    unmerged = dict(iter_sync_weights(peft_model))
    peft_model.merge_adapter()
    merged = dict(iter_sync_weights(peft_model))
    for name in unmerged:
        torch.testing.assert_close(merged[name], unmerged[name], atol=1e-6, rtol=0)
    peft_model.unmerge_adapter()


def test_disabled_adapter_sends_base_weights():
    base = tiny_model()
    reference = copy.deepcopy(base)
    peft_model = lora_model(base)
    with peft_model.disable_adapter():
        pairs = dict(iter_sync_weights(peft_model))
    assert torch.equal(pairs["model.layers.1.self_attn.v_proj.weight"], reference.model.layers[1].self_attn.v_proj.weight)


def test_dora_is_rejected():
    peft_model = lora_model(tiny_model(), use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        list(iter_sync_weights(peft_model))


def test_bucketed_keeps_order_and_bounds_size():
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 20, 5, 100, 1, 1, 30])]
    buckets = list(bucketed(iter(tensors), bucket_bytes=30 * 4))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    for b in buckets:
        size = sum(t.numel() * 4 for _, t in b)
        assert size <= 30 * 4 or len(b) == 1  # an oversized tensor travels alone
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    assert list(bucketed(iter([]))) == []
    with pytest.raises(ValueError):
        list(bucketed(iter(tensors), bucket_bytes=0))


def test_complete_parents_sends_whole_attention_blocks():
    """A server-side layerwise reload rebuilds fused qkv_proj from scratch: q/v LoRA must carry k and the biases."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from fastgrpo.rollout.weights import iter_sync_weights

    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = transformers.Qwen2ForCausalLM(cfg)
    expected = {n: p.detach().clone() for n, p in base.named_parameters() if ".self_attn." in n}
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    changed = dict(iter_sync_weights(peft, only_changed=True))
    whole = dict(iter_sync_weights(peft, only_changed=True, complete_parents=True))
    assert set(changed) < set(whole) and set(whole) == set(expected)          # q,k,v,o weights + q,k,v biases
    for name in whole:
        if name not in changed:
            assert torch.equal(whole[name], expected[name])                     # untouched siblings as they are
    for name in changed:
        assert torch.equal(whole[name], changed[name])
