import os, tempfile, torch, transformers; os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0")
from peft import LoraConfig, get_peft_model
from fastgrpo.config import GRPOConfig; from fastgrpo.rollout.base import SamplingParams
from fastgrpo.rollout.vllm_colocate import VLLMColocateGenerator; from fastgrpo.testing import build_random_qwen2_0_5b
d = build_random_qwen2_0_5b(tempfile.mkdtemp()); tok = transformers.AutoTokenizer.from_pretrained(d)
cfg = GRPOConfig(use_vllm=True, per_device_train_batch_size=8, num_generations=8, max_prompt_length=128, max_completion_length=64)
g = VLLMColocateGenerator(d, cfg, tok); print(g.engine_kwargs)
m = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda(), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
g.update_weights(m); out = g.generate([tok("Hello, what is 2+2?")["input_ids"]], SamplingParams(n=8, max_tokens=64, temperature=1.0))
print(len(out.completion_ids), out.finish_reasons[:4], [round(x, 3) for x in out.logprobs[0][:5]], g.stats()); g.close()
