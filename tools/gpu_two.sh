#!/usr/bin/env bash
# Two-GPU checks (issue 7), on a 2-GPU device host with the bundle in /tmp/site:  bash tools/gpu_two.sh OUT_DIR
# 1. `fastgrpo vllm-serve` on GPU 1; the recipe's script in server mode on GPU 0, synchronous then async
#    (one step off-policy), STEPS steps each; 2. torchrun with 2 ranks in colocate mode (one vLLM engine per rank).
set -u
out=${1:-/tmp/out}; mkdir -p "$out"; steps=${STEPS:-8}
export PYTHONPATH=/tmp/site:$PWD/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python tools/gpu_prepare.py /tmp/assets 2>&1 | tail -1
summary() { python - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"step_time"' in l]
st = [r["step_time"] for r in rows[1:]]
keys = ("step", "step_time", "generation_time", "train_time", "weight_sync_time", "completions/mean_length")
for r in rows: print({k: round(r[k], 3) if isinstance(r.get(k), float) else r.get(k) for k in keys})
print("median step_time (steps 2..):", round(statistics.median(st), 3) if st else None)
PY
}
CUDA_VISIBLE_DEVICES=1 python -m fastgrpo.cli vllm-serve --model /tmp/assets/model --port 8000 \
  --gpu-memory-utilization 0.3 --max-model-len 1024 > "$out/server.log" 2>&1 &
server=$!
for i in $(seq 1 120); do curl -sf 127.0.0.1:8000/health >/dev/null && break; sleep 2; done
echo "server up after ~$((i * 2)) s"
for mode in sync async; do
  async=false; [ $mode = async ] && async=true
  rm -rf /tmp/srv-$mode
  ( cd /tmp && CUDA_VISIBLE_DEVICES=0 MODEL_ID=/tmp/assets/model DATASET_ID=/tmp/assets/data OUTPUT_DIR=/tmp/srv-$mode \
    EXTRA_ARGS="{\"max_steps\": $steps, \"save_steps\": 100, \"logging_steps\": 1, \"vllm_mode\": \"server\", \"async_generation\": $async, \"report_to\": \"none\", \"push_to_hub\": false}" \
    timeout 200 python $OLDPWD/examples/recipe.py ) > "$out/server-$mode.log" 2>&1
  echo "server-mode $mode rc=$?"; tail -3 "$out/server-$mode.log"
  cp /tmp/srv-$mode/metrics.jsonl "$out/server-$mode.jsonl" 2>/dev/null && summary "$out/server-$mode.jsonl"
done
kill $server; wait $server 2>/dev/null
rm -rf /tmp/ddp
( cd /tmp && MODEL_ID=/tmp/assets/model DATASET_ID=/tmp/assets/data OUTPUT_DIR=/tmp/ddp \
  EXTRA_ARGS="{\"max_steps\": $steps, \"save_steps\": 100, \"logging_steps\": 1, \"report_to\": \"none\", \"push_to_hub\": false}" \
  timeout 240 torchrun --nproc_per_node 2 $OLDPWD/examples/recipe.py ) > "$out/torchrun.log" 2>&1
echo "torchrun colocate rc=$?"; tail -3 "$out/torchrun.log"
cp /tmp/ddp/metrics.jsonl "$out/torchrun.jsonl" 2>/dev/null && summary "$out/torchrun.jsonl"
