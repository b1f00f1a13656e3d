"""The recipe "Efficient Online Training with GRPO and vLLM in TRL", sections 2 and 3, with one change:
`from trl import ...` became `from fastgrpo import ...`.

Offline or on a test machine, point it at local copies with environment variables (the code is otherwise the
recipe's): MODEL_ID (a model folder), DATASET_ID (a folder with train.jsonl and test.jsonl in the NuminaMath-TIR
schema), and EXTRA_ARGS (a JSON object of GRPOConfig fields added to the recipe's, e.g. '{"max_steps": 3}').
"""

import json
import os

# ---- 2. Load Dataset ----------------------------------------------------------------------------------------
from datasets import load_dataset

dataset_id = os.environ.get("DATASET_ID", "AI-MO/NuminaMath-TIR")
train_dataset, test_dataset = load_dataset(dataset_id, split=["train[:10%]", "test[:10%]"])
print(train_dataset)

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)


def make_conversation(example):
    return {
        "prompt": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": example["problem"]},
        ],
    }


train_dataset = train_dataset.map(make_conversation)
test_dataset = test_dataset.map(make_conversation)
train_dataset = train_dataset.remove_columns(["messages", "problem"])

# ---- 3.1 Loading the Baseline Model -------------------------------------------------------------------------
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

model_id = os.environ.get("MODEL_ID", "Qwen/Qwen2-0.5B-Instruct")
model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained(model_id)

# ---- 3.2 Configuring LoRA -----------------------------------------------------------------------------------
from peft import LoraConfig, get_peft_model  # noqa: E402

lora_config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
model = get_peft_model(model, lora_config)
model.print_trainable_parameters()

# ---- 3.3 Loading Reward Functions ---------------------------------------------------------------------------
import re  # noqa: E402


def format_reward(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


from math_verify import LatexExtractionConfig, parse, verify  # noqa: E402


def accuracy_reward(completions, **kwargs):
    """Reward function that checks if the completion is the same as the ground truth."""
    solutions = kwargs["solution"]
    completion_contents = [completion[0]["content"] for completion in completions]
    rewards = []
    for content, solution in zip(completion_contents, solutions):
        gold_parsed = parse(solution, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])
        answer_parsed = parse(content, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])
        if len(gold_parsed) != 0:
            try:
                rewards.append(float(verify(answer_parsed, gold_parsed)))
            except Exception:
                rewards.append(0.0)
        else:
            rewards.append(1.0)
    return rewards


# ---- 3.4 Configuring GRPO Training Parameters ---------------------------------------------------------------
from fastgrpo import GRPOConfig  # noqa: E402  (was: from trl import GRPOConfig)

output_dir = os.environ.get("OUTPUT_DIR", "Qwen2-0-5B-GRPO-vllm-trl")
training_args = GRPOConfig(
    output_dir=output_dir,
    learning_rate=1e-5,
    gradient_accumulation_steps=16,
    num_train_epochs=1,
    max_completion_length=512,
    num_generations=8,
    max_prompt_length=512,
    report_to=["trackio"],
    project=output_dir,
    trackio_space_id=f"sergiopaniego/{output_dir}",
    push_to_hub=True,
    save_strategy="steps",
    save_steps=10,
    use_vllm=True,
    vllm_mode="colocate",
)
if os.environ.get("EXTRA_ARGS"):  # local/test runs only: e.g. {"max_steps": 3}
    import dataclasses

    training_args = dataclasses.replace(training_args, **json.loads(os.environ["EXTRA_ARGS"]))

# ---- 3.5 Training the Model ---------------------------------------------------------------------------------
from fastgrpo import GRPOTrainer  # noqa: E402  (was: from trl import GRPOTrainer)

trainer = GRPOTrainer(model=model, reward_funcs=[format_reward, accuracy_reward], args=training_args,
                      train_dataset=train_dataset)
trainer.train()
trainer.save_model(training_args.output_dir)
trainer.push_to_hub(dataset_name=dataset_id)
