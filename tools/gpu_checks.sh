#!/usr/bin/env bash
# GPU checks for issue 5 on the device host (bundle unpacked in /tmp/site):  bash tools/gpu_checks.sh OUT_DIR
# 1. GPU-marked tests (vLLM vs transformers greedy equality after a push, logprob agreement, sleep/wake);
# 2. the CLI on GPU: train 3 steps with vLLM colocate + eval_steps, then `fastgrpo eval` of the checkpoint.
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python tools/gpu_prepare.py /tmp/assets 2>&1 | tail -1
FASTGRPO_VLLM_EAGER=1 timeout ${TEST_TIMEOUT:-300} python -m pytest -s -q -m gpu -p no:cacheprovider tests/ > "$out/gpu-tests.log" 2>&1
echo "gpu tests rc=$?"; grep -E "FIGURE|passed|failed|Error" "$out/gpu-tests.log" | tail -15
common="--model /tmp/assets/model --dataset.path /tmp/assets/data --report_to none --push_to_hub false"
rm -rf /tmp/cli-run
timeout 240 python -m fastgrpo.cli train examples/recipe.yaml $common --output_dir /tmp/cli-run --max_steps 3 \
  --save_steps 3 --eval_strategy steps --eval_steps 3 --dataset.eval_split "test[:32]" --disable_tqdm true > "$out/cli-train.log" 2>&1
echo "cli train rc=$?"; tail -2 "$out/cli-train.log"; grep eval_ /tmp/cli-run/metrics.jsonl | cut -c1-300
timeout 180 python -m fastgrpo.cli eval /tmp/cli-run/checkpoint-3 --config examples/recipe.yaml $common --split "test[:32]" > "$out/cli-eval.log" 2>&1
echo "cli eval rc=$?"; tail -8 "$out/cli-eval.log"
