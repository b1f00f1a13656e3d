"""How prompts are rendered before generation: as TRL 1.16's GRPOTrainer renders them (the generation prompt after
whatever message comes last, warned of when that is not the user's), and chat messages written out as a string (a CSV
round trip) are warned about, not silently trained on as text nor silently converted."""

from __future__ import annotations

import json
import logging

import pytest

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.data import prepare_prompts, validate_dataset
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2

SMALL = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_steps=1,
             disable_tqdm=True, save_strategy="no", report_to="none", use_vllm=False)
USER = {"role": "user", "content": "1+1?"}
PREFILL = [USER, {"role": "assistant", "content": "<think>"}]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _text(tok, prompt) -> str:
    return tok.decode(prepare_prompts([{"prompt": prompt}], tok, None)[0].ids)


# ------------------------------------------------------------------------------------------- final role
def test_a_final_assistant_message_is_closed_and_warned_of_as_trl_grpo_renders_it(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        text = _text(tok, PREFILL)
    assert text == tok.apply_chat_template(PREFILL, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<think><|im_end|>\n<|im_start|>assistant\n") and text.count("<|im_start|>assistant") == 2
    assert "1 of 1 conversations end with a message that is not the user's (first: row 0, 'assistant')" in caplog.text
    assert "continue_final_message=True" in caplog.text


@pytest.mark.parametrize("prompt", [[USER], [USER, {"role": "assistant", "content": "2"},
                                             {"role": "tool", "content": "{\"result\": 2}"}]],
                         ids=["user", "tool"])
def test_a_final_user_or_tool_message_gets_the_generation_prompt_without_a_warning(tok, prompt, caplog):
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        assert _text(tok, prompt) == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert _text(tok, prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "not the user's" not in caplog.text


def test_a_conversation_ending_in_assistant_trains_and_reaches_rewards_as_given(tok, tmp_path):
    seen = []

    def record(prompts, completions, **kw):
        seen.extend(prompts)
        return [float(len(c[0]["content"])) for c in completions]

    rows = [{"prompt": PREFILL}] * 4
    t = GRPOTrainer(build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), record,
                    args=GRPOConfig(output_dir=str(tmp_path), **SMALL), train_dataset=rows, processing_class=tok)
    assert tok.decode(t.train_prompts[0].ids).endswith("<|im_start|>assistant\n")
    assert t.train().global_step == 1
    assert seen and all(p == PREFILL for p in seen)


@pytest.mark.parametrize("prompt", [[{"role": "system", "content": "Solve: 1+1"}],
                                    [USER, {"role": "developer", "content": "be brief"}]], ids=["system", "developer"])
def test_a_conversation_ending_in_a_system_message_is_taken_and_warned_of(prompt, caplog):
    rows = [{"prompt": [USER]}, {"prompt": [USER]}, {"prompt": prompt}]
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        assert len(validate_dataset(rows, what="eval_dataset")) == 3
    assert f"eval_dataset: 1 of 3 conversations end with a message that is not the user's (first: row 2, " \
           f"'{prompt[-1]['role']}')" in caplog.text


# -------------------------------------------------------------------------------- messages as a string
def test_messages_written_as_json_text_are_warned_of_once_and_left_as_text(tok, caplog):
    as_json = json.dumps([USER])
    rows = [{"prompt": as_json}, {"prompt": "plain"}, {"prompt": as_json}]
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        prompts = prepare_prompts(rows, tok, None)
    warned = [r.getMessage() for r in caplog.records if "written as a" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "train_dataset column 'prompt': 2 of 3 prompts (first: row 0" in warned[0]
    assert "JSON string" in warned[0] and "json.loads(x['prompt'])" in warned[0]
    assert prompts[0].prompt == as_json  # not converted: the row is used as written
    assert prompts[0].ids == tok(as_json, add_special_tokens=False)["input_ids"]


def test_a_csv_round_trip_is_recognised_and_named_with_its_dataset(tmp_path, caplog):
    import datasets

    path = str(tmp_path / "data.csv")
    datasets.Dataset.from_list([{"prompt": [USER], "solution": "2"}] * 2).to_csv(path)
    back = datasets.load_dataset("csv", data_files=path, split="train")
    assert isinstance(back[0]["prompt"], str)  # the list column came back as Python's repr of it
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        validate_dataset(back, what="eval_dataset")
    assert "eval_dataset column 'prompt': 2 of 2 prompts" in caplog.text
    assert "ast.literal_eval(x['prompt'])" in caplog.text


@pytest.mark.parametrize("text", ["[INST] What is 1+1? [/INST]", "[1, 2, 3]: their sum?",
                                  '[{"name": "x", "value": 1}] -> role of x?', "['role', 'play']"])
def test_text_that_merely_starts_with_a_bracket_is_not_warned_of(text, caplog):
    with caplog.at_level(logging.WARNING, logger="fastgrpo"):
        validate_dataset([{"prompt": text}])
    assert "written as a" not in caplog.text
