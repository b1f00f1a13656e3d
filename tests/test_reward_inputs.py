"""Data and reward-function inputs that TRL scripts bring: containers, reserved column names, signatures, async
functions with a shared client, multi-task None batches, log_metric, and the messages for what cannot work."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.config import ConfigError
from fastgrpo.data import DataError, validate_dataset
from fastgrpo.rewards import RewardError, check_columns, check_signature, resolve_reward, score
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2

SMALL = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_steps=1,
             disable_tqdm=True, save_strategy="no", report_to="none", use_vllm=False)
ROWS = [{"prompt": f"Q{i}: 1+{i}=", "solution": str(i + 1)} for i in range(4)]


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _batch(n: int = 4):
    return {"prompts": ["q"] * n, "completions": ["a" * (i + 1) for i in range(n)], "completion_ids": [[1]] * n,
            "task": ["math", "math", "code", "code"][:n], "trainer_state": None}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_containers_other_than_a_dataset_get_the_conversion_to_use():
    import datasets
    import pandas as pd

    ds = datasets.Dataset.from_list(ROWS)
    cases = [(pd.DataFrame(ROWS), "is a DataFrame.*Dataset.from_pandas"),
             (datasets.DatasetDict({"train": ds}), "is a DatasetDict.*dataset\\['train'\\]"),
             (ds.to_iterable_dataset(), "is a IterableDataset.*Dataset.from_list"),
             ({"prompt": ["a", "b"]}, "is a dict.*Dataset.from_dict"),
             (["a", "b"], "row 0 is a str, not a dict"), (42, "is a int")]
    for bad, words in cases:
        with pytest.raises(DataError, match=words):
            validate_dataset(bad)
    assert len(validate_dataset(ds)) == 4 and len(validate_dataset(tuple(ROWS))) == 4


def test_reserved_column_names(caplog):
    """'prompts'/'completions' columns would be shadowed by the trainer's values: an error naming the rename;
    'completion_ids'/'trainer_state'/... are dropped with a warning (TRL passes its own values there too)."""
    with pytest.raises(DataError, match="column named 'completions'.*rename_column\\('completions'"):
        validate_dataset([{**r, "completions": "gold"} for r in ROWS])
    with pytest.raises(DataError, match="column named 'prompts'"):
        validate_dataset([{**r, "prompts": "x"} for r in ROWS])
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        rows = validate_dataset([{**r, "completion_ids": [1, 2], "trainer_state": 3} for r in ROWS])
    assert "completion_ids, trainer_state" in caplog.text
    assert all(set(r) == {"prompt", "solution"} for r in rows)


def test_signatures_checked_before_the_model_loads():
    def needs_answer(completions, answer, **kwargs):
        return [1.0] * len(completions)

    def no_kwargs(completions):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="'needs_answer' needs an argument 'answer'.*columns are \\['solution'\\]"):
        check_signature(resolve_reward(needs_answer), ["solution"])
    with pytest.raises(RewardError, match="'no_kwargs' takes no \\*\\*kwargs.*def no_kwargs\\(prompts, completions"):
        check_signature(resolve_reward(no_kwargs), ["solution"])
    check_signature(resolve_reward("accuracy"), ["solution"])
    with pytest.raises(RewardError, match="'accuracy_reward' needs an argument 'solution'"):
        check_signature(resolve_reward("accuracy"), ["answer"])


def test_each_dataset_must_have_the_columns_its_rewards_need():
    """Checked per dataset: an eval batch passes only the eval dataset's columns, so a column that only the train
    dataset has (the union passes check_signature) would otherwise fail at the first evaluation."""
    def needs_answer(completions, answer, **kwargs):
        return [1.0] * len(completions)

    def answer_optional(completions, answer=None, **kwargs):
        return [1.0] * len(completions)

    funcs = [resolve_reward(reward_len), resolve_reward(answer_optional), resolve_reward(needs_answer)]
    train = validate_dataset([{**r, "answer": r["solution"]} for r in ROWS])
    check_columns(funcs, train, "train_dataset")
    check_columns(funcs, None, "eval_dataset")  # no eval dataset: nothing to check
    with pytest.raises(RewardError, match=r"reward function 'needs_answer' needs the column 'answer', which "
                                          r"eval_dataset does not have \(its columns: \['solution'\]\)\. Fix: add an? "
                                          r"'answer' column to eval_dataset"):
        check_columns(funcs, validate_dataset(ROWS, what="eval_dataset"), "eval_dataset")
    some = [{**r, "answer": "1"} if i != 2 else dict(r) for i, r in enumerate(ROWS)]  # a list of dicts: row 2 lacks it
    with pytest.raises(RewardError, match=r"eval_dataset row 2 has no 'answer' \(1 of 4 rows lack it\), which reward "
                                          r"function 'needs_answer' needs"):
        check_columns(funcs, validate_dataset(some, what="eval_dataset"), "eval_dataset")
    with pytest.raises(RewardError, match=r"'accuracy_reward' needs the column 'solution', which train_dataset"):
        check_columns([resolve_reward("accuracy")], validate_dataset([{"prompt": "1+1=", "answer": "2"}]))


def test_a_column_missing_at_the_call_is_blamed_on_the_data_not_the_signature():
    """evaluate(eval_dataset=...) scores a dataset given after construction: a reward's missing column then
    surfaces at the call, and the message must say which column the batch lacks."""
    def needs_answer(completions, answer, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"'needs_answer' raised TypeError.*The batch has no 'answer': the dataset "
                                          r"being scored has no such column") as e:
        score([resolve_reward(needs_answer)], _batch(), 4)
    assert "signature must take" not in str(e.value)


def test_trainer_refuses_what_cannot_work(tok, tmp_path):
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    with pytest.raises(RewardError, match="needs an argument 'answer'"):
        GRPOTrainer(model, lambda completions, answer, **kw: [0.0] * len(completions),
                    args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=ROWS, processing_class=tok)
    with pytest.raises(ConfigError, match="eval_strategy='steps' needs an eval_dataset"):
        GRPOTrainer(model, reward_len, args=GRPOConfig(output_dir=str(tmp_path), eval_strategy="steps",
                                                       eval_steps=1, **SMALL), train_dataset=ROWS, processing_class=tok)
    with pytest.raises(ConfigError, match="processing_class must be a tokenizer"):
        GRPOTrainer(model, reward_len, args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=ROWS,
                    processing_class="/some/path")
    bare = build_char_tokenizer()
    bare.pad_token = None
    bare.eos_token = None
    with pytest.raises(ConfigError, match="neither a pad token nor an EOS token"):
        GRPOTrainer(model, reward_len, args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=ROWS,
                    processing_class=bare)


def test_chat_template_that_raises_names_the_row(tok, tmp_path):
    t = build_char_tokenizer()
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                       "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}] * 3 + \
        [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError, match="train_dataset row 3: the tokenizer's chat template rejected this "
                                        "conversation.*System role not supported"):
        GRPOTrainer(build_tiny_qwen2(t, hidden_size=32, intermediate_size=64), reward_len,
                    args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=rows, processing_class=t)


def test_multi_task_none_for_a_whole_batch_is_allowed():
    """TRL's multi-task pattern: a function returns None where it does not apply, even for a whole batch."""
    def only_code(completions, task, **kw):
        return [1.0 if t == "code" else None for t in task]

    out = score([resolve_reward(reward_len), resolve_reward(only_code)], {**_batch(), "task": ["math"] * 4}, 4)
    assert out.rewards[:, 1].isnan().all() and out.rewards[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.warns(UserWarning, match="every reward function returned None for some completions"):
        score([resolve_reward(only_code)], _batch(), 4)


def test_async_rewards_share_one_loop_across_calls_and_run_inside_a_running_loop():
    """A client bound to the first call's loop (httpx.AsyncClient, AsyncOpenAI) still works at the next call; and
    scoring from inside a running event loop (Jupyter, asyncio.run(main())) works."""
    state = {}

    async def judge(completions, **kw):
        loop = asyncio.get_running_loop()
        state.setdefault("loop", loop)
        assert loop is state["loop"], "a new event loop per call breaks clients created once"
        await asyncio.sleep(0)
        return [0.5] * len(completions)

    class AsyncJudge:  # an instance with async __call__ is async too
        async def __call__(self, completions, **kw):
            return [0.25] * len(completions)

    funcs = [resolve_reward(judge), resolve_reward(AsyncJudge())]
    assert funcs[1].is_async and funcs[1].name == "AsyncJudge"
    for _ in range(2):
        assert score(funcs, _batch(), 4).rewards.tolist() == [[0.5, 0.25]] * 4

    async def main():
        return score(funcs, _batch(), 4)
    assert asyncio.run(main()).rewards.tolist() == [[0.5, 0.25]] * 4


def test_log_metric_outputs_iterables_and_partial_names():
    def counted(completions, log_metric, log_extra, **kw):
        log_metric("judge/calls", 2.0)
        log_metric("judge/calls", 4.0)
        log_extra("why", ["ok"] * len(completions))
        return (float(i) for i in range(len(completions)))  # a generator, as TRL accepts

    def scaled(completions, scale, **kw):
        return [scale] * len(completions)

    out = score([resolve_reward(counted), resolve_reward(functools.partial(scaled, scale=2.0))], _batch(), 4)
    assert out.metrics == {"judge/calls": 3.0}
    assert out.rewards.tolist() == [[0.0, 2.0], [1.0, 2.0], [2.0, 2.0], [3.0, 2.0]]
    assert resolve_reward(functools.partial(scaled, scale=2.0)).name == "scaled"


def test_reward_error_zero_says_so(caplog):
    def broken(completions, **kw):
        raise ConnectionError("grader down")

    f = resolve_reward(broken)
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        for _ in range(3):
            assert score([f], _batch(), 4, on_error="zero").failures == 1
    lines = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(lines) == 1 and "ConnectionError: grader down" in lines[0] and f.failures == 3


def test_a_signature_error_at_the_call_gets_the_signature_hint():
    def picky(completions, **kw):
        raise TypeError("picky() missing 1 required positional argument: 'answer'")

    with pytest.raises(RewardError, match="def f\\(prompts, completions, \\*\\*kwargs\\)"):
        score([resolve_reward(picky)], _batch(), 4)


def test_a_loaded_reward_model_with_its_processing_class(tok, tmp_path):
    """TRL takes reward models as objects with reward_processing_classes; the model scores, the run trains."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    rm = Qwen2ForSequenceClassification(cfg)
    f = resolve_reward(rm, tokenizer=tok)
    out = score([f], {"prompts": ["1+1="] * 2, "completions": ["2", "3"], "completion_ids": [[1], [1]],
                      "trainer_state": None}, 2).rewards
    assert out.shape == (2, 1) and out[0, 0] != out[1, 0]
    with pytest.raises(RewardError, match="without its tokenizer.*reward_processing_classes"):
        resolve_reward(Qwen2ForSequenceClassification(cfg))
    with pytest.raises(RewardError, match="not a sequence-classification model"):
        resolve_reward(build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64))
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    with pytest.raises(ConfigError, match="reward_processing_classes has 1 entries for 2 reward functions"):
        GRPOTrainer(model, [reward_len, rm], args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=ROWS,
                    processing_class=tok, reward_processing_classes=[tok])
    t = GRPOTrainer(model, [reward_len, rm], args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=ROWS,
                    processing_class=tok, reward_processing_classes=[None, tok])
    assert t.train().global_step == 1


def test_a_scripts_own_optimizer_is_used_and_checked(tok, tmp_path):
    import torch

    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    GRPOTrainer(model, reward_len, args=GRPOConfig(output_dir=str(tmp_path), learning_rate=1e-2, **SMALL),
                train_dataset=ROWS, processing_class=tok, optimizers=(frozen, None)).train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # lr 0: the script's SGD ran
    from peft import LoraConfig

    lora = GRPOTrainer(build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward_len,
                       args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=ROWS, processing_class=tok,
                       peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
                       optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ConfigError, match="does not hold exactly the parameters that train"):
        lora.train()
    with pytest.raises(ConfigError, match="peft_config must be a peft config"):
        GRPOTrainer(model, reward_len, args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=ROWS,
                    processing_class=tok, peft_config={"r": 8})


def test_vllm_generation_kwargs_are_left_out_by_the_transformers_fallback(tok):
    """use_vllm=True without vLLM generates with transformers: vLLM-only keys are dropped with a warning."""
    from fastgrpo.rollout import HFGenerator, SamplingParams

    gen = HFGenerator(build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), [tok.eos_token_id],
                      tok.pad_token_id)
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0, extra={"min_tokens": 2, "min_new_tokens": 1})
    with pytest.warns(UserWarning, match=r"\['min_tokens'\] are not arguments of transformers' generate"):
        out = gen.generate([tok("1+1=", add_special_tokens=False)["input_ids"]], params)
    assert len(out.completion_ids) == 2
    assert GRPOConfig(output_dir="/tmp/x", use_vllm=True, generation_kwargs={"min_tokens": 2}).use_vllm


def test_an_eval_dataset_without_a_column_a_reward_needs_fails_at_construction(tmp_path):
    tok = build_char_tokenizer()
    rows = [{"prompt": f"{i}+1=", "solution": str(i + 1)} for i in range(4)]
    small = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=4, max_steps=1,
                 disable_tqdm=True, save_strategy="no", report_to="none")
    with pytest.raises(RewardError, match="'accuracy_reward' needs the column 'solution', which eval_dataset does not"):
        GRPOTrainer(build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), "accuracy",
                    args=GRPOConfig(output_dir=str(tmp_path), **small), train_dataset=rows,
                    eval_dataset=[{"prompt": "1+1="}], processing_class=tok)
