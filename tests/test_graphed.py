"""Static-cache decoding (fastgrpo.rollout.graphed): its grouped attention against transformers' eager attention
(which repeats KV heads), and `decode` with an argmax draw against greedy `generate`, token for token (static cache
columns, positions, left padding, the ready-made mask and EOS cut), run eagerly on CPU and, on a GPU, replayed from
a CUDA graph; HFGenerator takes it on CUDA only where it samples as `generate` would."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from fastgrpo.logprobs import causal_lm_parts
from fastgrpo.rollout import graphed
from fastgrpo.rollout.base import SamplingParams
from fastgrpo.rollout.hf import HFGenerator, draw
from fastgrpo.rollout.decode import left_padded


class _Heads(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.training = groups, False


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("as_bool", [True, False])
def test_grouped_attention_matches_repeated_kv(T, as_bool):
    g = torch.Generator().manual_seed(0)
    B, H, hkv, L, D = 3, 6, 2, 9, 5
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, T), (hkv, L), (hkv, L)))
    allowed = torch.rand(B, 1, T, L, generator=g) > 0.4
    allowed[..., 0] = True  # every query attends somewhere
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    want, _ = eager_attention_forward(_Heads(H // hkv), q, k, v, additive, scaling=0.3)
    got, _ = graphed.grouped_attention(None, q, k, v, allowed if as_bool else additive, scaling=0.3)
    assert got.shape == (B, T, H, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _loud(model, seed):
    """Large random weights: greedy output then depends on the whole context, not an echo of the prompt."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.eval()


def _tiny_llama(vocab, attn):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _check_against_generate(model, pad, device="cpu", graph=False, steps=13):
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    ids, att = (x.to(device) for x in left_padded(prompts, pad))
    width = ids.shape[1]
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=steps, do_sample=False,
                             eos_token_id=None, pad_token_id=pad)[:, width:].tolist()
    backbone, head = causal_lm_parts(model)
    greedy = functools.partial(draw, temperature=0.0)
    attn_before = backbone.config._attn_implementation
    assert graphed.decode(backbone, head, greedy, ids, att, steps, eos_ids=[], graph=graph) == ref
    assert backbone.config._attn_implementation == attn_before
    # an EOS that row 1 emits after its first step and some other row never: each row stops at its first one
    eos = next(t for t in ref[1][1:] if t not in ref[1][:1] and any(t not in r for r in ref))
    want = [r[:r.index(eos) + 1] if eos in r else r for r in ref]
    got = graphed.decode(backbone, head, greedy, ids, att, steps, eos_ids=[eos], graph=graph)
    assert got == want and 1 < len(got[1]) < steps and any(len(r) == steps for r in got)
    # every row ends in EOS early: the host check stops the loop, the rows are still cut at their EOS
    firsts = sorted({r[0] for r in ref})
    short = graphed.decode(backbone, head, greedy, ids, att, steps, eos_ids=firsts, graph=graph)
    assert short == [r[:1] for r in ref]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_matches_greedy_generate_qwen2(tiny_model_factory, char_tokenizer, attn):
    model = _loud(tiny_model_factory(seed=5, hidden=64, tie=False), seed=9)
    model.set_attn_implementation(attn)
    _check_against_generate(model, char_tokenizer.pad_token_id)


def test_decode_matches_greedy_generate_llama(char_tokenizer):
    model = _loud(_tiny_llama(len(char_tokenizer), "sdpa"), seed=3)
    _check_against_generate(model, char_tokenizer.pad_token_id)


def test_attention_setting_restored_after_a_failure(tiny_model_factory, char_tokenizer):
    model = tiny_model_factory(seed=1)
    backbone, head = causal_lm_parts(model)
    ids, att = left_padded([[5, 6], [7]], char_tokenizer.pad_token_id)

    def broken(logits):
        raise RuntimeError("draw failed")

    with pytest.raises(RuntimeError, match="draw failed"):
        graphed.decode(backbone, head, broken, ids, att, 4, eos_ids=[], graph=False)
    assert backbone.config._attn_implementation == "sdpa"


def test_generator_takes_the_static_path_only_on_cuda_and_only_where_it_samples_the_same(tiny_model_factory,
                                                                                         char_tokenizer):
    gen = HFGenerator(tiny_model_factory(seed=2), [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for ok in (dict(), dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(temperature=0.0)):
        params = SamplingParams(**{**dict(n=2, max_tokens=6, temperature=0.9), **ok})
        assert gen._static(params, cuda) is not None, ok
        assert gen._static(params, cpu) is None
    for change in (dict(repetition_penalty=1.2), dict(extra={"no_repeat_ngram_size": 2})):
        params = SamplingParams(**{**dict(n=2, max_tokens=6, temperature=0.9), **change})
        assert gen._static(params, cuda) is None, change
    gen.model.config.layer_types = ["full_attention", "sliding_attention"]  # a sliding-window layer: not handled
    assert gen._static(SamplingParams(n=2, max_tokens=6), cuda) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_greedy_generate(tiny_model_factory, char_tokenizer):
    model = _loud(tiny_model_factory(seed=5, hidden=64, tie=False), seed=9).cuda()
    _check_against_generate(model, char_tokenizer.pad_token_id, device="cuda", graph=True, steps=70)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generator_on_cuda_samples_through_the_graph(tiny_model_factory, char_tokenizer):
    model = tiny_model_factory(seed=2).cuda()
    eos = char_tokenizer.eos_token_id
    gen = HFGenerator(model, [eos], char_tokenizer.pad_token_id, dtype=torch.bfloat16)
    out = gen.generate([[5, 6, 7], [8]] * 3, SamplingParams(n=4, max_tokens=40, temperature=1.0, top_p=0.95))
    assert gen._graph == "graph", "the capture failed and fell back"
    assert len(out.completion_ids) == 24 and all(1 <= len(c) <= 40 for c in out.completion_ids)
    for c, r in zip(out.completion_ids, out.finish_reasons):
        assert (r == "stop") == (c[-1] == eos) and (r == "stop" or len(c) == 40)
    assert len({tuple(c) for c in out.completion_ids}) > 12, "samples of one prompt should differ"


def test_generator_falls_back_to_eager_steps_then_generate_on_failures(tiny_model_factory, char_tokenizer,
                                                                        monkeypatch):
    """A failing capture is retried as eager static steps; a failure of those turns the static path off for good
    (generate from then on); each is warned about once and no chunk is lost."""
    gen = HFGenerator(tiny_model_factory(seed=2), [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id)
    params = SamplingParams(n=2, max_tokens=5, temperature=0.0)
    static = gen._static(params, torch.device("cuda"))  # built as on a GPU; decode runs on CPU tensors here
    ids, att = left_padded([[5, 6, 7], [8, 9]], char_tokenizer.pad_token_id)
    want = graphed.decode(*static[:2], static[2], ids, att, 5, gen.eos_ids, graph=False)
    real, calls = graphed.decode, []

    def flaky(*a, graph, **k):
        calls.append(graph)
        if graph:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(*a, graph=graph, **k)

    monkeypatch.setattr(graphed, "decode", flaky)
    with pytest.warns(UserWarning, match="without a CUDA graph"):
        assert gen._decode_static(static, ids, att, params) == want
    assert calls == [True, False] and gen._graph == "eager"
    assert gen._decode_static(static, ids, att, params) == want and calls[-1] is False  # no second capture

    def broken(*a, **k):
        raise TypeError("cache.update() got an unexpected keyword")

    monkeypatch.setattr(graphed, "decode", broken)
    with pytest.warns(UserWarning, match=r"generate\(\)"):
        assert gen._decode_static(static, ids, att, params) is None
    assert gen._graph == "off" and gen._static(params, torch.device("cuda")) is None
