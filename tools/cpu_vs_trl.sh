#!/usr/bin/env bash
# Issue 6's CPU comparison: the recipe's script at the recipe's settings (16 prompts x 8 generations x 512 tokens,
# accumulation 16, LoRA r8 q/v) on a tiny 2-layer Qwen2 with Qwen2's 151,936-token vocabulary, without vLLM,
# fastgrpo and TRL 1.16 side by side, each pinned to 2 cores of its own (one after the other on a 2-core machine),
# OMP_NUM_THREADS=2, no GPU visible.
#   bash tools/cpu_vs_trl.sh RESULT_DIR [STEPS]       (needs /tmp/assets/data from tools/gpu_prepare.py)
set -u
R=${1:-/tmp/res/cpu}; steps=${2:-2}; repo=$PWD; mkdir -p "$R"
export PYTHONPATH=/tmp/site:$repo/src CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
python -c "from fastgrpo import testing; testing.save_tiny_model('/tmp/cpu-model', 'qwen', num_layers=2)" > "$R/build.log" 2>&1
python -c "import json; c = json.load(open('/tmp/cpu-model/config.json')); print({k: c[k] for k in ('hidden_size', 'num_hidden_layers', 'vocab_size')})" > "$R/model.txt"
python tools/make_trl_recipe.py /tmp/trl_recipe_cpu.py
lscpu | grep -E "Model name|^CPU\(s\)|Thread" > "$R/cpu.txt"
run() {  # run NAME CORES EXTRA SCRIPT
  local name=$1 cores=$2 extra=$3 script=$4
  ( cd /tmp && MODEL_ID=/tmp/cpu-model DATASET_ID=/tmp/assets/data OUTPUT_DIR=/tmp/cpu-$name \
    EXTRA_ARGS="{\"max_steps\": $steps, \"save_steps\": 1000, \"logging_steps\": 1, \"report_to\": \"none\", \"push_to_hub\": false, \"use_vllm\": false, \"bf16\": false$extra}" \
    taskset -c "$cores" python -u "$script" 2>&1 | python "$repo/tools/stamp.py" > "$R/$name.log" )
  cp /tmp/cpu-$name/metrics.jsonl "$R/$name.jsonl" 2>/dev/null
  echo "$name done $(date +%s)" >> "$R/done.txt"
}
date +%s > "$R/start.txt"
if [ "$(nproc)" -ge 4 ]; then  # side by side, 2 cores each
  run fastgrpo 2,3 "" "$repo/examples/recipe.py" &
  run trl 0,1 ", \"use_cpu\": true" /tmp/trl_recipe_cpu.py &
  wait
else                           # a 2-core machine: one after the other on both cores
  run fastgrpo 0,1 "" "$repo/examples/recipe.py"
  run trl 0,1 ", \"use_cpu\": true" /tmp/trl_recipe_cpu.py
fi
