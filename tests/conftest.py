"""Shared fixtures: tiny tokenizers/models/datasets for fast CPU tests, and the `gpu` marker's skip logic.

Everything here is local (no Hugging Face hub access). Training fixtures use the character tokenizer and a
2-layer Qwen2 with hidden size 32 so that a few GRPO steps take well under a second on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if SRC not in sys.path:  # `pytest tests/` works without PYTHONPATH=src
    sys.path.insert(0, SRC)

from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2  # noqa: E402

# One intra-op thread: the models are tiny, and on a shared 2-core machine OpenMP's thread pool spinning against
# other processes makes each forward pass ~40x slower. Subprocesses started by tests inherit OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

# Keys of metrics.jsonl lines that measure wall time and so differ between otherwise identical runs.
TIMING_KEYS = ("step_time", "tokens_per_second", "train_runtime", "train_steps_per_second")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def drop_timing(record: dict) -> dict:
    """A metrics record without wall-clock measurements (keys ending in _time, step_time, tokens_per_second...)."""
    return {k: v for k, v in record.items() if not (k.endswith("_time") or k in TIMING_KEYS)}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def char_tokenizer():
    """A fresh character-level tokenizer with ChatML template (pad <|endoftext|>, eos <|im_end|>)."""
    return build_char_tokenizer()


@pytest.fixture
def tiny_model_factory(char_tokenizer):
    """make(seed=0, hidden=32, layers=2, tie=True, tokenizer=None) -> a fresh fp32 tiny Qwen2 (deterministic)."""

    def make(seed: int = 0, hidden: int = 32, layers: int = 2, tie: bool = True, tokenizer=None):
        return build_tiny_qwen2(tokenizer or char_tokenizer, num_layers=layers, hidden_size=hidden,
                                intermediate_size=2 * hidden, num_heads=4, num_kv_heads=2, seed=seed,
                                tie_word_embeddings=tie)

    return make


def _conversational_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 3 + i, 2 * i + 1
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "solution": str(a + b),
                     "row_id": i})
    return rows


@pytest.fixture
def conversational_dataset():
    """8 rows: `prompt` (a one-message conversation), `solution` (the sum as text) and `row_id`."""
    import datasets

    return datasets.Dataset.from_list(_conversational_rows(8))


@pytest.fixture
def plain_text_dataset():
    """8 rows with a plain-text `prompt` and a `solution` column."""
    import datasets

    return datasets.Dataset.from_list([{"prompt": f"Q: {i} plus {i}? A:", "solution": str(2 * i)} for i in range(8)])


@pytest.fixture
def output_dir(tmp_path):
    """A fresh, not yet existing output folder."""
    return str(tmp_path / "run")


@pytest.fixture
def tiny_config(output_dir):
    """make(**overrides) -> GRPOConfig for a tiny, quiet CPU run: 2 prompts x 2 generations per step, 8 tokens,
    a large learning rate (so that weights visibly move), no checkpoints unless asked, 1 torch thread (results do
    not depend on the thread count, and the machine is shared)."""
    from fastgrpo import GRPOConfig

    def make(**overrides):
        values = dict(output_dir=output_dir, max_steps=2, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, learning_rate=1e-2, seed=0, logging_steps=1, save_strategy="no",
                      disable_tqdm=True, report_to="none", torch_threads=1, max_prompt_length=256)
        values.update(overrides)
        return GRPOConfig(**values)

    return make


def content_reward(completions, **kwargs) -> list[float]:
    """Deterministic, content-dependent reward in [0, 1) (so groups have non-zero std and gradients flow)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [(sum(map(ord, t)) % 13) / 13.0 for t in texts]


@pytest.fixture
def numina_folder(tmp_path):
    """(model folder, dataset folder): a saved 2-layer char-tokenizer Qwen2 and NuminaMath-TIR-schema
    train.jsonl/test.jsonl, as a recipe user passes them by path."""
    from fastgrpo.testing import make_numina_like_dataset, save_tiny_model

    def make(n_train: int = 24, n_test: int = 6) -> tuple[str, "os.PathLike"]:
        model = save_tiny_model(str(tmp_path / "model"), tokenizer_kind="char", num_layers=2)
        data = tmp_path / "data"
        data.mkdir()
        make_numina_like_dataset(str(data / "train.jsonl"), n=n_train, seed=0)
        make_numina_like_dataset(str(data / "test.jsonl"), n=n_test, seed=1)
        return model, data
    return make
