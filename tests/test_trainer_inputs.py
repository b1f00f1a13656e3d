"""Inputs a TRL user brings that fastgrpo used to take silently or fail on deep inside torch: TRL's torch_dtype,
a tokenizer grown without resizing the model, a model folder without tokenizer files, misspelt train() keywords,
the output folder given as the checkpoint to resume."""

from __future__ import annotations

import os

import pytest
import torch

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.checkpoint import CheckpointError
from fastgrpo.config import ConfigError
from fastgrpo.testing import build_char_tokenizer, build_tiny_qwen2, save_tiny_model

DATA = [{"prompt": f"Q{i}: 1+{i}=", "solution": str(i + 1)} for i in range(4)]
SMALL = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=4, max_steps=1,
             disable_tqdm=True, report_to="none")


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _args(tmp_path, **kw):
    return GRPOConfig(output_dir=str(tmp_path / "out"), **{**SMALL, "save_strategy": "no", **kw})


@pytest.mark.parametrize("kwargs", [{"torch_dtype": "bfloat16"}, '{"torch_dtype": "torch.bfloat16"}',
                                    {"dtype": torch.bfloat16}])
def test_trl_torch_dtype_loads_the_model_in_that_dtype(tmp_path, kwargs):
    folder = save_tiny_model(str(tmp_path / "m"), hidden_size=32, intermediate_size=64)
    args = _args(tmp_path, model_init_kwargs=kwargs)
    assert args.model_init_kwargs == {"dtype": "bfloat16"}
    trainer = GRPOTrainer(model=folder, reward_funcs=reward_len, args=args, train_dataset=DATA)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kwargs, match", [
    ({"torch_dtype": "bfloat32"}, r"model_init_kwargs\['dtype'\]='bfloat32' is not a torch dtype"),
    ({"dtype": "float32", "torch_dtype": "float16"}, "both dtype='float32' and torch_dtype='float16'"),
    ({"dtype": 16}, "is not a torch dtype"),
])
def test_bad_model_dtypes_fail_in_the_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GRPOConfig(model_init_kwargs=kwargs)


def test_a_tokenizer_larger_than_the_embedding_fails_before_training(tmp_path):
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    rows = model.get_input_embeddings().num_embeddings
    n = rows - len(tok) + 3  # the last added token's id is past the embedding's rows
    tok.add_tokens([f"<extra_{i}>" for i in range(n)])
    data = [{"prompt": f"Q{i}: 1+1? <extra_{n - 1}>"} for i in range(4)]
    with pytest.raises(ConfigError, match=r"embedding has \d+ rows.*resize_token_embeddings\(len\(tokenizer\)\)"):
        GRPOTrainer(model=model, reward_funcs=reward_len, args=_args(tmp_path), train_dataset=data,
                    processing_class=tok)
    model.resize_token_embeddings(len(tok))  # the fix the message names
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=_args(tmp_path), train_dataset=data,
                          processing_class=tok)
    assert trainer.train().global_step == 1


def test_a_model_folder_without_tokenizer_files_names_the_fix(tmp_path):
    folder = str(tmp_path / "m")
    build_tiny_qwen2(build_char_tokenizer(), hidden_size=32, intermediate_size=64).save_pretrained(folder)
    with pytest.raises(ConfigError, match="holds no tokenizer files.*processing_class="):
        GRPOTrainer(model=folder, reward_funcs=reward_len, args=_args(tmp_path), train_dataset=DATA)
    build_char_tokenizer(save_dir=folder)
    GRPOTrainer(model=folder, reward_funcs=reward_len, args=_args(tmp_path), train_dataset=DATA)


def test_misspelt_train_keyword_and_the_output_folder_as_checkpoint(tmp_path):
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    args = _args(tmp_path, save_strategy="steps", save_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=DATA, processing_class=tok)
    trainer.train()
    assert os.path.isdir(tmp_path / "out" / "checkpoint-1")
    with pytest.raises(TypeError, match="'resume_from_checkpint' \\(did you mean 'resume_from_checkpoint'\\?\\)"):
        trainer.train(resume_from_checkpint=True)
    with pytest.raises(CheckpointError, match="folder of checkpoints \\(checkpoint-1\\).*checkpoint-1'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out"))


def test_stop_strings_reach_transformers_generate_with_the_tokenizer(tmp_path):
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    args = _args(tmp_path, use_vllm=False, generation_kwargs={"stop_strings": ["a"]}, max_completion_length=12)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=DATA, processing_class=tok)
    assert trainer.train().global_step == 1


def _oom_trainer(tmp_path, fail_at: int, where: str):
    """A run whose training forward (where='forward') or optimizer step (where='update') runs out of memory at its
    `fail_at`-th call: the error a too-large micro-batch gives on a GPU, raised here on CPU."""
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    calls = {"n": 0}

    def count_and_fail():
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")

    class Adam(torch.optim.AdamW):
        def step(self, closure=None):
            if where == "update":
                count_and_fail()
            return super().step(closure)

    if where == "forward":
        model.model.layers[0].register_forward_pre_hook(lambda m, a: count_and_fail() if m.training else None)
    args = _args(tmp_path, max_steps=4, use_vllm=False, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=DATA, processing_class=tok,
                       optimizers=(opt, None))


def test_out_of_memory_in_a_training_pass_keeps_the_last_finished_step(tmp_path):
    from fastgrpo.loop import TrainingStopped

    trainer = _oom_trainer(tmp_path, fail_at=3, where="forward")
    with pytest.raises(TrainingStopped, match="out of memory.*checkpoint-2"):
        trainer.train()
    assert os.path.isfile(tmp_path / "out" / "checkpoint-2" / "training_state.pt")


def test_out_of_memory_inside_the_optimizer_step_saves_no_half_updated_state(tmp_path):
    trainer = _oom_trainer(tmp_path, fail_at=3, where="update")
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")]


def test_paths_and_numpy_scalars_are_taken_as_plain_values(tmp_path):
    import json
    import pathlib

    import numpy as np

    folder = pathlib.Path(save_tiny_model(str(tmp_path / "m"), hidden_size=32, intermediate_size=64))
    args = GRPOConfig(output_dir=tmp_path / "out", num_generations=np.int64(2), learning_rate=np.float64(1e-4),
                      **{k: v for k, v in SMALL.items() if k != "num_generations"}, save_strategy="no")
    assert (args.output_dir, args.num_generations) == (str(tmp_path / "out"), 2)
    assert type(args.num_generations) is int and type(args.learning_rate) is float
    json.dumps(args.to_dict())  # what checkpoints and trackio record
    trainer = GRPOTrainer(model=folder, reward_funcs=reward_len, args=args, train_dataset=DATA)
    assert trainer.train().global_step == 1


def test_a_model_without_a_language_model_head_or_weights_fails_at_construction(tmp_path):
    tok = build_char_tokenizer()
    causal = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    with pytest.raises(ConfigError, match="Qwen2Model.*no language-model head.*AutoModelForCausalLM"):
        GRPOTrainer(model=causal.model, reward_funcs=reward_len, args=_args(tmp_path), train_dataset=DATA,
                    processing_class=tok)
    with torch.device("meta"):
        empty = type(causal)(causal.config)
    with pytest.raises(ConfigError, match="meta device"):
        GRPOTrainer(model=empty, reward_funcs=reward_len, args=_args(tmp_path), train_dataset=DATA,
                    processing_class=tok)


def test_train_again_past_the_end_says_there_is_nothing_to_train(tmp_path):
    tok = build_char_tokenizer()
    model = build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=_args(tmp_path), train_dataset=DATA,
                          processing_class=tok)
    trainer.train()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="nothing to train: the run is at step 1.*raise max_steps"):
        assert trainer.train().global_step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_rewards_of_one_name_get_a_metric_each_and_rows_may_differ_in_columns(tmp_path):
    import json

    tok = build_char_tokenizer()
    seen = []

    def hint_reward(completions, hint=None, **kw):
        seen.extend(kw.get("extra") or [None] * len(completions))
        return [float(h is not None) for h in hint]

    rows = [{"prompt": f"Q{i}: 1+{i}=", **({"hint": "x"} if i else {}), **({"extra": i} if i == 3 else {})}
            for i in range(4)]
    trainer = GRPOTrainer(model=build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64),
                          reward_funcs=[lambda completions, **kw: [1.0] * len(completions),
                                        lambda completions, **kw: [0.0] * len(completions), hint_reward],
                          args=_args(tmp_path, save_strategy="no", per_device_train_batch_size=8),
                          train_dataset=rows, processing_class=tok)
    assert [f.name for f in trainer.reward_funcs] == ["<lambda>", "<lambda>_2", "hint_reward"]
    trainer.train()
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert (row["rewards/<lambda>/mean"], row["rewards/<lambda>_2/mean"]) == (1.0, 0.0)
    assert row["rewards/hint_reward/mean"] == 0.75  # row 0 has no hint: None reaches the reward, whatever row is first
    assert sorted(x for x in seen if x is not None) == [3, 3]


def test_save_model_into_a_folder_of_the_other_kind_leaves_one_model(tmp_path):
    from peft import LoraConfig

    tok = build_char_tokenizer()
    folder = str(tmp_path / "saved")
    lora = GRPOTrainer(model=build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward_funcs=reward_len,
                       args=_args(tmp_path), train_dataset=DATA, processing_class=tok,
                       peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora.save_model(folder)
    assert os.path.isfile(os.path.join(folder, "adapter_config.json"))
    full = GRPOTrainer(model=build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward_funcs=reward_len,
                       args=_args(tmp_path), train_dataset=DATA, processing_class=tok)
    full.save_model(folder)
    names = os.listdir(folder)
    assert "model.safetensors" in names and not [n for n in names if n.startswith("adapter_")], names
    lora.save_model(folder)
    names = os.listdir(folder)
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names, names


def test_push_to_hub_saves_the_model_first(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the upload fails, the model must be on disk
    tok = build_char_tokenizer()
    trainer = GRPOTrainer(model=build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward_funcs=reward_len,
                          args=_args(tmp_path, hub_model_id="me/run"), train_dataset=DATA, processing_class=tok)
    trainer.train()
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    assert trainer.push_to_hub() is None and "saved locally" in trainer.push_error
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_log_completions_writes_the_rounds_completions(tmp_path):
    import json

    tok = build_char_tokenizer()
    trainer = GRPOTrainer(model=build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward_funcs=reward_len,
                          args=_args(tmp_path, log_completions=True, logging_steps=2, max_steps=3),
                          train_dataset=DATA, processing_class=tok)
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 3]  # rounds starting at steps 0 and 2 (logging_steps=2)
    assert len(rows) == 2 * 4  # 4 completions per round (per_device_train_batch_size)
    for r in rows:
        assert r["prompt"] in [d["prompt"] for d in DATA]
        assert r["rewards"] == {"reward_len": float(len(r["completion"]))} and r["reward"] == r["rewards"]["reward_len"]
        assert isinstance(r["advantage"], float)


def test_a_round_whose_completions_are_all_masked_is_warned_of(tmp_path):
    import json

    tok = build_char_tokenizer()
    trainer = GRPOTrainer(model=build_tiny_qwen2(tok, hidden_size=32, intermediate_size=64), reward_funcs=reward_len,
                          args=_args(tmp_path, mask_truncated_completions=True, max_completion_length=1),
                          train_dataset=DATA, processing_class=tok)
    with pytest.warns(UserWarning, match="mask_truncated_completions=True masks them all: that round trains nothing"):
        trainer.train()
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["completions/clipped_ratio"] == 1.0  # the premise: every completion reached the 1-token limit
