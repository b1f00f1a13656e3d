#!/usr/bin/env bash
# GPU validation of the colocated vLLM path (issue 5), run on the device host after the bundle is unpacked:
#   bash tools/gpu_validate.sh OUT_DIR
# 1. assets (random Qwen2-0.5B shape + Qwen2 tokenizer + NuminaMath-schema data), 2. GPU tests,
# 3. the recipe's script with only the import changed, colocate, 6 steps, with and without sleep mode.
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import vllm, torch, transformers, peft; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
python tools/gpu_prepare.py /tmp/assets 2>&1 | tail -2
for mode in nosleep sleep; do
  sleep_flag=false; [ $mode = sleep ] && sleep_flag=true
  rm -rf /tmp/recipe-$mode
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$out/mem-$mode.csv" & smi=$!
  ( cd /tmp && MODEL_ID=/tmp/assets/model DATASET_ID=/tmp/assets/data OUTPUT_DIR=/tmp/recipe-$mode \
    EXTRA_ARGS="{\"max_steps\": ${STEPS:-6}, \"save_steps\": 5, \"logging_steps\": 1, \"vllm_enable_sleep_mode\": $sleep_flag}" \
    timeout ${RECIPE_TIMEOUT:-240} python $OLDPWD/examples/recipe.py ) > "$out/recipe-$mode.log" 2>&1
  rc=$?; kill $smi; echo "recipe $mode rc=$rc peak GPU MiB: $(sort -n "$out/mem-$mode.csv" | tail -1)"; ls /tmp/recipe-$mode | tr '\n' ' '; echo
  cp /tmp/recipe-$mode/metrics.jsonl "$out/metrics-$mode.jsonl" 2>/dev/null
  python - "$out/metrics-$mode.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    print({k: round(r[k], 3) if isinstance(r.get(k), float) else r.get(k) for k in ("step", "step_time", "generation_time", "train_time", "sync_time", "weight_sync_time", "reward", "completions/mean_length", "sampling/sampling_logp_difference/mean")})
st = [r["step_time"] for r in rows[1:]]
print("median step_time (steps 2..):", statistics.median(st) if st else None)
PY
  tail -5 "$out/recipe-$mode.log"
done
