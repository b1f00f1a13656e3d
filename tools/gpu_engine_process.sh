#!/usr/bin/env bash
# Engine-in-its-own-process check and benchmark (bundle in /tmp/site):  bash tools/gpu_engine_process.sh OUT_DIR
set -u
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python tools/gpu_prepare.py /tmp/assets 2>&1 | tail -1
FASTGRPO_VLLM_EAGER=1 VLLM_LOGGING_LEVEL=WARNING timeout 200 python -m pytest -s -q -m gpu -k "engine_process and greedy" \
  -p no:cacheprovider tests/test_vllm_colocate.py > "$out/engine_process.log" 2>&1
echo "engine-process test rc=$?"; grep -E "FIGURE|passed|failed|Error" "$out/engine_process.log" | tail -8
python -m fastgrpo.bench --model /tmp/assets/model --data /tmp/assets/data/train.jsonl --only fastgrpo-async,fastgrpo-colocate,trl-colocate,vllm-alone \
  --num-generations 8 --max-completion-length 512 --steps 10 --budget ${BUDGET:-400} --extra '{"vllm_engine_process": true}' \
  --out "$out/bench" > "$out/bench.log" 2>&1
grep "^\[bench\]\|^|" "$out/bench.log" | tail -12
