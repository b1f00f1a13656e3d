"""The real vocabulary path: one GRPO step with Qwen2's tokenizer (151,646 tokens) and a tiny Qwen2 whose output
layer has Qwen2's 151,936 rows, so chunked log-softmax, generation, decoding and the chat template run at full
vocabulary size. 2 prompts x 2 completions of 8 tokens keep it to a few seconds on CPU."""

from __future__ import annotations

import json
import os

import torch

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.logprobs import Rows, completion_logprobs
from fastgrpo.testing import QWEN2_VOCAB_SIZE, build_qwen2_tokenizer, build_tiny_qwen2


def test_one_step_with_qwen2_vocabulary(tmp_path, conversational_dataset):
    tok = build_qwen2_tokenizer()
    model = build_tiny_qwen2(tok, num_layers=2, hidden_size=32, intermediate_size=64, seed=0)
    assert model.get_output_embeddings().weight.shape == (QWEN2_VOCAB_SIZE, 32)
    seen = []

    def reward(prompts, completions, completion_ids, solution, **kw):
        for p, c, ids in zip(prompts, completions, completion_ids):
            assert c[0]["content"] == tok.decode(ids, skip_special_tokens=True)
            assert all(0 <= i < QWEN2_VOCAB_SIZE for i in ids) and 1 <= len(ids) <= 8
        seen.append((list(completion_ids), [c[0]["content"] for c in completions]))
        return [(sum(ids) % 13) / 13.0 for ids in completion_ids]  # differs within a group: non-zero advantages

    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                     max_completion_length=8, learning_rate=1e-2, logprob_chunk_size=8, save_strategy="no",
                     disable_tqdm=True, torch_threads=1, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(model, reward, args=cfg, train_dataset=conversational_dataset.select(range(2)),
                          processing_class=tok)
    # the chat template is Qwen2-Instruct's: system prompt, ChatML markers, generation prompt at the end
    first = trainer.train_prompts[0]
    text = tok.decode(first.ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert first.ids == tok.apply_chat_template(first.prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]

    out = trainer.train()
    assert out.global_step == 1 and len(seen) == 1 and len(seen[0][0]) == 4
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        m = json.loads(f.readline())
    assert m["step"] == 1 and torch.isfinite(torch.tensor([m["loss"], m["grad_norm"], m["entropy"]])).all()
    # a random 151,936-way output layer: the entropy is close to log(V)
    assert abs(m["entropy"] - torch.log(torch.tensor(float(QWEN2_VOCAB_SIZE))).item()) < 0.5
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())

    # chunked logprobs over the full vocabulary equal the plain path on the sampled completions
    ids, _ = seen[0]
    rows = Rows.build([first.ids] * 2, ids[:2], tok.pad_token_id)
    with torch.no_grad():
        lp_chunked, _ = completion_logprobs(trainer.model, rows, 1.0, 8)
        lp_plain, _ = completion_logprobs(trainer.model, rows, 1.0, plain=True)
    torch.testing.assert_close(lp_chunked, lp_plain, rtol=0, atol=1e-5)
