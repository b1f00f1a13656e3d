"""Tests for fastgrpo.testing: the Qwen2 tokenizer equals tiktoken on Qwen's ranks, the char tokenizer round-trips,
tiny models are deterministic and loadable from a path, and the synthetic NuminaMath-like data is verifiable."""

from __future__ import annotations

import json
import random
import string
import unicodedata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from fastgrpo import testing as T

CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "<think>4</think> 4"}]
EXPECTED_CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n<think>4</think> 4<|im_end|>\n"
)
SAMPLES = [
    "Hello, world! It's a test; we'll see what they've done.",
    "The answer is $\\boxed{\\frac{7}{5}}$ since \\int_0^1 x^2\\,dx = \\frac{1}{3}.",
    "1234567890 + 3.14159 = 1234567893.14159, and 10^{-6} ≈ 0.000001",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # squares\n\n\n\tpass\r\n",
    "    leading spaces, trailing spaces    \n\n   \n",
    "Ünïcödé: café naïve 日本語のテキスト 中文字符 한국어 Ελληνικά русский عربى हिन्दी",
    "emoji 🙂👍🏽 and symbols ∑∫√∞ ≤ ≥ → ←",
    "MiXeD CaSe DON'T I'M YOU'RE we'D",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def qwen_tok() -> PreTrainedTokenizerFast:
    return T.build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def char_tok() -> PreTrainedTokenizerFast:
    return T.build_char_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_enc():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    specials = {T.ENDOFTEXT: 151643, T.IM_START: 151644, T.IM_END: 151645}
    ranks = load_tiktoken_bpe(T.qwen_tiktoken_path())
    return tiktoken.Encoding("qwen2", pat_str=T.QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens=specials)


def test_qwen2_tokenizer_matches_tiktoken(qwen_tok, tiktoken_enc):
    assert isinstance(qwen_tok, PreTrainedTokenizerFast) and isinstance(qwen_tok, Qwen2Tokenizer)
    rng = random.Random(0)
    alphabet = string.printable + "éüñßø中文字日本한국αβγ∑√🙂\u00a0\u3000"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    for text in SAMPLES + fuzz:
        ids = qwen_tok.encode(text, add_special_tokens=False)
        assert ids == tiktoken_enc.encode(text, allowed_special="all"), text
        assert qwen_tok.decode(ids) == text
    # NFC normalizer: a decomposed string encodes like its composed form.
    nfd = unicodedata.normalize("NFD", "café naïve")
    assert qwen_tok.encode(nfd) == tiktoken_enc.encode(unicodedata.normalize("NFC", nfd))


def test_qwen2_tokenizer_specials_and_config(qwen_tok):
    assert len(qwen_tok) == 151646
    for token, idx in [(T.ENDOFTEXT, 151643), (T.IM_START, 151644), (T.IM_END, 151645)]:
        assert qwen_tok.encode(token, add_special_tokens=False) == [idx]
        assert qwen_tok.convert_ids_to_tokens(idx) == token
    assert (qwen_tok.eos_token, qwen_tok.eos_token_id) == (T.IM_END, 151645)
    assert (qwen_tok.pad_token, qwen_tok.pad_token_id) == (T.ENDOFTEXT, 151643)
    assert qwen_tok.bos_token is None and qwen_tok.unk_token is None
    assert qwen_tok.model_max_length == 32768
    assert qwen_tok.encode("Hello world") == [9707, 1879]  # no BOS/EOS added; Qwen2's well-known ids
    assert qwen_tok.decode([9707, 1879, 151645], skip_special_tokens=True) == "Hello world"


@pytest.mark.parametrize("kind", ["qwen", "char"])
def test_chat_template_is_chatml(kind, qwen_tok, char_tok):
    tok = qwen_tok if kind == "qwen" else char_tok
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHATML
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED_CHATML.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    with_system = [{"role": "system", "content": "Be brief."}, CONVERSATION[0]]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_qwen2_tokenizer_cache_and_save_dir(tmp_path, monkeypatch, qwen_tok):
    monkeypatch.setenv("FASTGRPO_CACHE", str(tmp_path / "cache"))
    built = T.build_qwen2_tokenizer(save_dir=str(tmp_path / "tok"))  # cold: builds merges from the ranks
    assert (T._qwen2_cache_dir() / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert isinstance(loaded, Qwen2Tokenizer) and len(loaded) == len(built) == len(qwen_tok)
    for text in SAMPLES:
        assert loaded.encode(text) == built.encode(text) == qwen_tok.encode(text)
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHATML
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (151645, 151643, None)


def test_char_tokenizer(char_tok, tmp_path):
    assert 100 <= len(char_tok) <= 110
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "   \n\t"
    for text in ["Hello,  world!\n\n  x = 3 * 4\t# twelve ", " leading", "trailing ", " . ,"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(50)
    ]:
        ids = char_tok.encode(text)
        assert len(ids) == len(text) and char_tok.decode(ids) == text
    for token in [T.ENDOFTEXT, T.IM_START, T.IM_END, *T.REASONING_TOKENS]:
        assert len(char_tok.encode(token)) == 1
    assert char_tok.eos_token == T.IM_END and char_tok.pad_token == T.ENDOFTEXT and char_tok.bos_token is None
    # Reasoning tags are plain added tokens: they survive skip_special_tokens, the ChatML markers do not.
    ids = char_tok.encode("<think>a b</think><answer>7</answer><|im_end|><|endoftext|>")
    assert char_tok.decode(ids, skip_special_tokens=True) == "<think>a b</think><answer>7</answer>"
    assert char_tok.decode(char_tok.encode("é")) == "<unk>"  # out-of-alphabet chars don't crash
    char_tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.encode("Hi <think>x</think>\n") == char_tok.encode("Hi <think>x</think>\n")


def test_tiny_qwen2_shapes_ids_and_determinism(char_tok):
    model = T.build_tiny_qwen2(char_tok)
    cfg = model.config
    assert cfg.vocab_size % 8 == 0 and len(char_tok) <= cfg.vocab_size < len(char_tok) + 8
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (
        char_tok.eos_token_id,
        char_tok.pad_token_id,
        char_tok.pad_token_id,
    )
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (char_tok.eos_token_id, char_tok.pad_token_id)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 64 and cfg.num_key_value_heads == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    state = torch.get_rng_state()
    again, other = T.build_tiny_qwen2(char_tok, seed=0), T.build_tiny_qwen2(char_tok, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # building leaves the global RNG alone
    for name, p in model.state_dict().items():
        assert torch.equal(p, again.state_dict()[name])
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    ids = torch.tensor([char_tok.encode("2+2=")])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 4
    bf16 = T.build_tiny_qwen2(char_tok, dtype=torch.bfloat16, tie_word_embeddings=False)
    assert bf16.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    assert bf16.lm_head.weight.data_ptr() != bf16.model.embed_tokens.weight.data_ptr()


def test_tiny_qwen2_with_qwen_tokenizer_and_0_5b_config(qwen_tok):
    model = T.build_tiny_qwen2(qwen_tok, num_layers=1, hidden_size=32, intermediate_size=64)
    assert model.config.vocab_size == 151936
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (151645, 151643, 151643)
    cfg = T.qwen2_0_5b_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (896, 24, 14, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (4864, 151936, 32768)
    assert cfg.tie_word_embeddings and not cfg.use_sliding_window and cfg.rms_norm_eps == 1e-6
    assert cfg.rope_parameters["rope_theta"] == 1e6
    with torch.device("meta"):
        meta = T.Qwen2ForCausalLM(cfg)
    assert sum(p.numel() for p in meta.parameters()) == 494_032_768  # Qwen2-0.5B's published parameter count


def test_save_tiny_model_loads_from_path(tmp_path):
    path = T.save_tiny_model(str(tmp_path / "tiny"), tokenizer_kind="char", num_layers=1, seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    reference = T.build_tiny_qwen2(T.build_char_tokenizer(), num_layers=1, seed=3)
    ids = torch.tensor([tok.encode("1+1=")])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError):
        T.save_tiny_model(str(tmp_path / "bad"), tokenizer_kind="gpt2")


def test_make_numina_like_dataset(tmp_path):
    from math_verify import parse, verify

    path = T.make_numina_like_dataset(str(tmp_path / "data" / "numina.jsonl"), n=64, seed=0)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(rows) == 64 and len({r["problem"] for r in rows}) > 48
    for row in rows:
        assert set(row) == {"problem", "solution", "messages"}
        assert row["messages"] == [
            {"role": "user", "content": row["problem"]},
            {"role": "assistant", "content": row["solution"]},
        ]
        answer = row["solution"].rsplit("\\boxed{", 1)[1].rsplit("}", 1)[0]
        gold = parse(row["solution"])
        assert gold and verify(gold, parse(f"${answer}$")), row["solution"]
    again = T.make_numina_like_dataset(str(tmp_path / "again.jsonl"), n=64, seed=0)
    assert open(again).read() == open(path).read()
