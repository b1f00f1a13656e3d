#!/usr/bin/env bash
# Multi-GPU runs for issues 7 and 9 on a 4-GPU host (bundle in /tmp/site):  bash tools/gpu_multi.sh PHASE OUT_DIR
# Every run has its own time limit so the phase ends inside one device call; results go to $R (tarred into OUT).
#  phase 1 (issue 7, server mode; two lanes at once on disjoint GPU pairs of the same host):
#    lane A: GPU 0 trainer + GPU 1 `fastgrpo vllm-serve`: fastgrpo server (sync) and server-async cells, then
#            torchrun 2 ranks, full fine-tuning (FSDP2), colocate, 3 steps (a correctness run, not a timing);
#    lane B: GPU 2 trainer + GPU 3 `trl vllm-serve`: TRL 1.16 GRPOTrainer server mode and AsyncGRPOTrainer cells.
#  phase 2 (issue 7): lane A: the fastgrpo server-async cell, torchrun 2 ranks colocate on GPUs 0,1 (the recipe's
#    script), the FSDP2 run again; lane B: TRL's AsyncGRPOTrainer cell, the recipe's script on 1 GPU (GPU 2), then a
#    full-weight NCCL push to a server (GPU 2 -> GPU 3).
#  phase 3 (issue 9, never run yet): 1 server GPU + 3 trainer ranks, server mode, recipe config: fastgrpo, then TRL.
#  phase 4: torchrun 2 ranks next to TRL's AsyncGRPOTrainer (the reruns after the fixes of phase 2's failures).
#  phases 5, 6 (issue 9, never run yet): 2 server GPUs (vLLM data parallel / tensor parallel) + 2 trainer ranks.
#  phase 7 (issue 9, never run yet): G 16, L 1024, full fine-tuning, 1 server GPU + 3 trainer ranks.
#  phase 8 (issue 7): GPUs 2+3: fastgrpo server-async, then TRL's AsyncGRPOTrainer (the same pair); at the same
#    time GPUs 0+1: TRL server mode (GRPOTrainer), then fastgrpo server (synchronous).
#  phase 9 (issues 6, 7): GPUs 0,1: the recipe's script on 1 GPU, then torchrun 2 ranks (scaling), then the GPU
#    tests; at the same time GPU 2: fastgrpo no-vLLM / colocate / async + vLLM alone; GPU 3: TRL no-vLLM / colocate.
#  phase 21 (issue 6, 4 GPUs, never run): the grid's no-vLLM cells and vLLM-alone column (phase 18 has the colocate ones).
#  phases 19, 20 (issue 6, one GPU): sampler-logprobs GPU test and generation profile; the recipe cells + vLLM alone.
#  phase 18 (issue 6, 4 GPUs): the colocate grid, fastgrpo and TRL x G {4, 8, 16} x L {256, 512, 1024}.
#  phase 17 (one GPU): server GPU tests, the attention stand-in's cost per step, vLLM alone, colocate GPU tests.
#  phase 16 (issues 6, 7; one GPU): server generation routes timed, then colocate fastgrpo (auto budget) / TRL / 8192.
#  phase 15 (issue 7, never run): phase 10's server lanes with each comparison on one pair: 2+3 fastgrpo
#    server-async then AsyncGRPOTrainer; 0+1 TRL server mode then fastgrpo server-async.
#  phases 11-13 (issue 9, 8 GPUs, never run): 2 server GPUs (vLLM DP 2) + 6 ranks; 4 server GPUs (DP 2 x TP 2) + 4
#    ranks; the larger config on 2 + 6. Phase 14: the 1-GPU, 2-rank and 1 + 1 server baselines on the same host.
#  phase 10 (issues 6, 7): GPUs 2+3: fastgrpo server-async, then TRL's AsyncGRPOTrainer; at the same time GPU 0: the
#    GPU tests, GPU 1: fastgrpo colocate, then TRL colocate.
# Results of the runs made: docs/benchmarks.md, section 5.
set -u
phase=$1; out=${2:-/tmp/out}; steps=${STEPS:-11}; R=/tmp/res/phase$phase; mkdir -p "$out" "$R"
repo=$PWD
export PYTHONPATH=/tmp/site:$repo/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
finish() {
  [ -z "${CUDA_MPS_PIPE_DIRECTORY:-}" ] || echo quit | timeout 10 nvidia-cuda-mps-control 2>/dev/null
  cp "$R"/*.txt "$out"/ 2>/dev/null
  tar czf "$out/phase$phase.tgz" -C /tmp/res "phase$phase" 2>/dev/null
}
trap finish EXIT
trap 'exit 124' TERM  # timeout's SIGTERM: exit through the EXIT trap, so that the results come back
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python -c "import vllm, torch, transformers, peft, trl; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
} > "$R/gpu.txt" 2>&1
if [ ! -d /tmp/site/vllm ]; then  # a fresh machine: the bundle's three-call upload has not run on it
  echo "no bundle in /tmp/site (upload .gpu-bundle/p0..p2 first)" | tee -a "$R/summary.txt"; exit 2; fi
python tools/gpu_prepare.py /tmp/assets 2>&1 | tail -1
python tools/make_trl_recipe.py /tmp/trl_recipe.py
bench() { python -m fastgrpo.bench --model /tmp/assets/model --data /tmp/assets/data/train.jsonl --num-generations 8 \
            --max-completion-length 512 --steps "$steps" "$@"; }
# recipe NAME GPUS TIMEOUT EXTRA_JSON LAUNCH...: the recipe's script (fastgrpo; TRL when LAUNCH runs /tmp/trl_recipe.py)
recipe() {
  local name=$1 gpus=$2 limit=$3 extra=$4; shift 4
  rm -rf /tmp/run-$name
  ( cd /tmp && export CUDA_VISIBLE_DEVICES=$gpus MODEL_ID=/tmp/assets/model DATASET_ID=/tmp/assets/data \
      OUTPUT_DIR=/tmp/run-$name \
      EXTRA_ARGS="{\"max_steps\": $steps, \"save_steps\": 1000, \"logging_steps\": 1, \"report_to\": \"none\", \"push_to_hub\": false${extra}}"
    timeout "$limit" "$@" 2>&1 | python "$repo/tools/stamp.py" > "$R/$name.log"
    echo "$name: exit ${PIPESTATUS[0]}" | tee -a "$R/summary.txt" )
  cp /tmp/run-$name/metrics.jsonl "$R/$name.jsonl" 2>/dev/null
}
summary() {  # summary NAME COMPLETIONS_PER_STEP (fastgrpo metrics.jsonl when present, else the stamped log)
  local f="$R/$1.jsonl"; [ -f "$f" ] || f="$R/$1.log"
  python tools/steps_summary.py "$f" "$2" "$1" | tee -a "$R/summary.txt"
}
# v NAME BUDGET ONLY EXTRA_JSON: one bench call into $R/bench-NAME; one summary line per cell of it
v() { local name=$1 budget=$2 only=$3 extra=$4; shift 4  # more arguments go to the bench command (--variant ...)
  bench --only "$only" --budget "$budget" --extra "$extra" "$@" --out "$R/bench-$name" > "$R/lane-$name.txt" 2>&1
  python - "$R/bench-$name/results.jsonl" "$name" <<'PY' 2>&1 | tee -a "$R/summary.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(sys.argv[2], r.get("key"), round(r.get("s_per_step") or 0, 3), r.get("split"), r.get("gpu_peak_used_gib"),
          r.get("error") or "")
PY
}
tables() {  # tables LABEL X...: table.md (and chart) of each $R/bench-X, one after another into $R/table.txt
  local label=$1; shift
  for x in "$@"; do python -m fastgrpo.bench --report "$R/bench-$x/results.jsonl" --out "$R/bench-$x" > /dev/null 2>&1
    echo "$label $x:"; cat "$R/bench-$x/table.md"; done | tee "$R/table.txt"
}
serve() {  # serve GPU PORT LAUNCHER... : start a server on GPU, wait for /health (max 240 s)
  local gpu=$1 port=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu VLLM_SERVER_DEV_MODE=1 "$@" --model /tmp/assets/model --port "$port" \
    --gpu-memory-utilization 0.9 --max-model-len "${MAX_MODEL_LEN:-1024}" > "$R/server-$port.log" 2>&1 &
  server_pid=$!
  for i in $(seq 1 240); do curl -sf 127.0.0.1:$port/health >/dev/null && break; sleep 1; done
  echo "server :$port up after ${i} s"
}

# versus TAG SERVER_GPUS TRAINER_GPUS RANKS TIMEOUT EXTRA_JSON OUR_SCRIPT TRL_SCRIPT [SERVER_ARGS...]: server mode,
# fastgrpo's script against `fastgrpo vllm-serve`, then TRL's against `trl vllm-serve`, same GPUs, torchrun RANKS
versus() {
  local tag=$1 sgpus=$2 tgpus=$3 n=$4 limit=$5 extra=$6 ours=$7 theirs=$8; shift 8
  serve "$sgpus" 8301 python -m fastgrpo.cli vllm-serve "$@"
  recipe "$tag" "$tgpus" "$limit" "$extra, \"vllm_mode\": \"server\", \"vllm_server_port\": 8301" \
    torchrun --nproc_per_node "$n" --master_port 29613 "$ours"
  kill $server_pid; sleep 8
  serve "$sgpus" 8302 python -m trl.scripts.vllm_serve "$@"
  recipe "trl$tag" "$tgpus" "$limit" "$extra, \"vllm_mode\": \"server\", \"vllm_server_port\": 8302, \"vllm_server_host\": \"127.0.0.1\"" \
    torchrun --nproc_per_node "$n" --master_port 29614 "$theirs"
  kill $server_pid
  summary "$tag" $((128 * n)); summary "trl$tag" $((128 * n))
}

BIG=', "num_generations": 16, "max_completion_length": 1024, "learning_rate": 1e-6'
full_ft_scripts() {  # the recipe's scripts (fastgrpo, TRL) with get_peft_model(...) taken out; prompts + 1024 tokens
  sed 's/^model = get_peft_model(model, lora_config)$/pass  # full fine-tuning/' "$repo/examples/recipe.py" > /tmp/recipe_full.py
  sed 's/^model = get_peft_model(model, lora_config)$/pass  # full fine-tuning/' /tmp/trl_recipe.py > /tmp/trl_recipe_full.py
  grep -q "full fine-tuning" /tmp/recipe_full.py && grep -q "full fine-tuning" /tmp/trl_recipe_full.py || echo "full-FT edit failed"
  export MAX_MODEL_LEN=1536
}

fsdp2_smoke() {  # fsdp2_smoke STEPS TIMEOUT: torchrun 2 ranks on GPUs 0,1, full fine-tuning (FSDP2), vLLM colocate
  cat > /tmp/full-ft.yaml <<YAML
model: /tmp/assets/model
dataset: {path: /tmp/assets/data, split: "train", prompt_column: problem}
rewards: [format, accuracy]
output_dir: /tmp/run-fsdp2
max_steps: $1
num_generations: 8
max_completion_length: 256
gradient_accumulation_steps: 4
learning_rate: 1.0e-6
bf16: true
use_vllm: true
vllm_mode: colocate
save_steps: $1
logging_steps: 1
report_to: none
YAML
  rm -rf /tmp/run-fsdp2
  CUDA_VISIBLE_DEVICES=0,1 timeout "$2" torchrun --nproc_per_node 2 --master_port 29611 -m fastgrpo.cli train \
    /tmp/full-ft.yaml > "$R/fsdp2.log" 2>&1
  echo "fsdp2 full fine-tuning, 2 ranks: exit $?; output: $(ls /tmp/run-fsdp2 2>/dev/null | tr '\n' ' ')" | tee -a "$R/summary.txt"
  cp /tmp/run-fsdp2/metrics.jsonl "$R/fsdp2.jsonl" 2>/dev/null
}

case $phase in
0)  # CPU smoke of the helpers above (tiny model in /tmp/assets/model): bash tools/gpu_multi.sh 0 /tmp/out
  small=', "use_vllm": false, "bf16": false, "gradient_accumulation_steps": 2, "max_completion_length": 16'
  recipe one "" 300 "$small" python "$repo/examples/recipe.py"
  recipe trlone "" 300 "$small, \"use_cpu\": true" python /tmp/trl_recipe.py
  summary one 16; summary trlone 16
  ;;
1)
  ( bench --only fastgrpo-server,fastgrpo-server-async --trainer-gpus 0 --server-gpus 1 --budget 330 --out "$R/bench-a" \
      > "$R/lane-a.txt" 2>&1
    fsdp2_smoke 3 120
  ) &
  a=$!
  bench --only trl-server,trl-server-async --trainer-gpus 2 --server-gpus 3 --budget 450 --out "$R/bench-b" \
    > "$R/lane-b.txt" 2>&1
  wait $a
  python -m fastgrpo.bench --report "$R/bench-a/results.jsonl" "$R/bench-b/results.jsonl" --out "$R/bench" > /dev/null 2>&1
  cp "$R/bench/table.md" "$R/table.txt"; cat "$R/table.txt"; tail -2 "$R/lane-a.txt"
  ;;
2)  # issue 7: the overlapped server cells (fastgrpo, TRL's AsyncGRPOTrainer), torchrun scaling, full-weight sync
  ( bench --only fastgrpo-server-async --trainer-gpus 0 --server-gpus 1 --budget 175 --out "$R/bench-a" > "$R/lane-a.txt" 2>&1
    recipe ddp2 0,1 170 "" torchrun --nproc_per_node 2 --master_port 29612 "$repo/examples/recipe.py"
    fsdp2_smoke 2 95 ) &
  a=$!
  bench --only trl-server-async --trainer-gpus 2 --server-gpus 3 --budget 200 --out "$R/bench-b" > "$R/lane-b.txt" 2>&1
  recipe one 2 140 "" python "$repo/examples/recipe.py"
  SERVER_GPUS=3 CUDA_VISIBLE_DEVICES=2 timeout 130 python tools/gpu_sync_full.py /tmp/assets/model "$R/sync" \
    > "$R/sync.log" 2>&1; grep SYNC_FULL "$R/sync.log" | tee "$R/sync.txt"
  wait $a
  summary one 128; summary ddp2 256
  python -m fastgrpo.bench --report "$R/bench-a/results.jsonl" "$R/bench-b/results.jsonl" --out "$R/bench" > /dev/null 2>&1
  cp "$R/bench/table.md" "$R/table.txt"; cat "$R/table.txt"; tail -3 "$R/lane-a.txt"
  ;;
3)  # issue 9: 1 server GPU + 3 trainer ranks, recipe config
  versus srv3 3 0,1,2 3 200 "" "$repo/examples/recipe.py" /tmp/trl_recipe.py
  ;;
5|6)  # issue 9: 2 server GPUs (vLLM data parallel in phase 5, tensor parallel in 6) + 2 trainer ranks
  versus srv22 2,3 0,1 2 150 "" "$repo/examples/recipe.py" /tmp/trl_recipe.py \
    $([ "$phase" = 5 ] && echo "--data-parallel-size 2" || echo "--tensor-parallel-size 2")
  ;;
7)  # issue 9: the larger config (G 16, L 1024, full fine-tuning: FSDP2 in fastgrpo, DDP in TRL under torchrun) on
    # 1 server GPU + 3 trainer ranks; the recipe's scripts with get_peft_model(...) taken out
  full_ft_scripts
  versus big3 3 0,1,2 3 170 "$BIG" /tmp/recipe_full.py /tmp/trl_recipe_full.py
  ;;
11)  # issue 9, 8 GPUs: 2 server GPUs (vLLM data parallel) + 6 trainer ranks, recipe config
  versus srv26 0,1 2,3,4,5,6,7 6 200 "" "$repo/examples/recipe.py" /tmp/trl_recipe.py --data-parallel-size 2
  ;;
12)  # issue 9, 8 GPUs: 4 server GPUs (vLLM data parallel 2 x tensor parallel 2) + 4 trainer ranks, recipe config
  versus srv44 0,1,2,3 4,5,6,7 4 200 "" "$repo/examples/recipe.py" /tmp/trl_recipe.py \
    --data-parallel-size 2 --tensor-parallel-size 2
  ;;
13)  # issue 9, 8 GPUs: the larger config (as phase 7) on 2 server GPUs (data parallel) + 6 trainer ranks
  full_ft_scripts
  versus big26 0,1 2,3,4,5,6,7 6 200 "$BIG" /tmp/recipe_full.py /tmp/trl_recipe_full.py --data-parallel-size 2
  ;;
14)  # issue 9's baselines on the same host: the recipe on 1 GPU (GPU 0), then torchrun 2 ranks colocate (GPUs 0,1);
     # at the same time 1 server GPU + 1 trainer GPU (GPUs 2,3), fastgrpo then TRL
  ( recipe one 0 150 "" python "$repo/examples/recipe.py"
    recipe ddp2 0,1 170 "" torchrun --nproc_per_node 2 --master_port 29612 "$repo/examples/recipe.py"
    summary one 128; summary ddp2 256 ) &
  a=$!
  versus srv11 3 2 1 170 "" "$repo/examples/recipe.py" /tmp/trl_recipe.py
  wait $a
  ;;
8)
  bench --only fastgrpo-server-async,trl-server-async --trainer-gpus 2 --server-gpus 3 --budget "${BUDGET:-520}" \
    --out "$R/bench-a" > "$R/lane-a.txt" 2>&1 &
  a=$!
  bench --only trl-server,fastgrpo-server --trainer-gpus 0 --server-gpus 1 --budget "${BUDGET:-520}" \
    --out "$R/bench-b" > "$R/lane-b.txt" 2>&1
  wait $a
  python -m fastgrpo.bench --report "$R/bench-a/results.jsonl" "$R/bench-b/results.jsonl" --out "$R/bench" > /dev/null 2>&1
  cp "$R/bench/table.md" "$R/table.txt"; cat "$R/table.txt"
  ;;
9)
  ( recipe one 0 150 "" python "$repo/examples/recipe.py"
    recipe ddp2 0,1 170 "" torchrun --nproc_per_node 2 --master_port 29612 "$repo/examples/recipe.py"
    summary one 128; summary ddp2 256
    CUDA_VISIBLE_DEVICES=0 timeout 170 python -m pytest -q -p no:cacheprovider -m gpu -x tests/test_graphed.py \
      tests/test_vllm_colocate.py > "$R/gpu-tests.txt" 2>&1; tail -3 "$R/gpu-tests.txt" ) &
  a=$!
  CUDA_VISIBLE_DEVICES=2 bench --only fastgrpo-novllm,fastgrpo-colocate,vllm-alone,fastgrpo-async --budget 520 \
    --out "$R/bench-c" > "$R/lane-c.txt" 2>&1 &
  c=$!
  CUDA_VISIBLE_DEVICES=3 bench --only trl-novllm,trl-colocate --budget 520 --out "$R/bench-d" > "$R/lane-d.txt" 2>&1
  wait $a $c
  python -m fastgrpo.bench --report "$R/bench-c/results.jsonl" "$R/bench-d/results.jsonl" --out "$R/bench" > /dev/null 2>&1
  cp "$R/bench/table.md" "$R/table.txt"; cat "$R/table.txt"
  ;;
10)
  bench --only fastgrpo-server-async,trl-server-async --trainer-gpus 2 --server-gpus 3 --budget "${BUDGET:-500}" \
    --out "$R/bench-a" > "$R/lane-a.txt" 2>&1 &
  a=$!
  CUDA_VISIBLE_DEVICES=1 bench --only fastgrpo-colocate,trl-colocate --budget 470 --out "$R/bench-b" \
    > "$R/lane-b.txt" 2>&1 &
  b=$!
  CUDA_VISIBLE_DEVICES=0 timeout 480 python -m pytest -q -p no:cacheprovider -m gpu tests/test_graphed.py \
    tests/test_vllm_colocate.py > "$R/gpu-tests.txt" 2>&1; tail -3 "$R/gpu-tests.txt"
  wait $a $b
  python -m fastgrpo.bench --report "$R/bench-a/results.jsonl" "$R/bench-b/results.jsonl" --out "$R/bench" > /dev/null 2>&1
  cp "$R/bench/table.md" "$R/table.txt"; cat "$R/table.txt"
  ;;
15)  # issue 7's two comparisons, each on one GPU pair (never run): GPUs 2+3: fastgrpo server-async, then TRL's
     # AsyncGRPOTrainer; at the same time GPUs 0+1: TRL server mode, fastgrpo server-async, fastgrpo synchronous.
     # GPU_TESTS=1: the server GPU tests on GPU 0 as well, while lane b's TRL server starts on GPU 1 (before lane b
     # trains on GPU 0).
  if [ "${GPU_TESTS:-0}" = 1 ]; then
    ( CUDA_VISIBLE_DEVICES=0 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_vllm_server_gpu.py \
      > "$R/gpu-tests.txt" 2>&1 ) &
  fi
  bench --only fastgrpo-server-async,trl-server-async --trainer-gpus 2 --server-gpus 3 --budget "${BUDGET:-500}" \
    --out "$R/bench-a" > "$R/lane-a.txt" 2>&1 &
  a=$!
  bench --only trl-server,fastgrpo-server-async,fastgrpo-server --trainer-gpus 0 --server-gpus 1 --budget "${BUDGET:-500}" \
    --out "$R/bench-b" > "$R/lane-b.txt" 2>&1
  wait
  tail -3 "$R/gpu-tests.txt" 2>/dev/null
  tables "GPU pair" a b
  ;;
16)  # one GPU (issues 6, 7): server generation through fastgrpo's compact route vs vLLM's /inference/v1/generate;
     # then the colocate recipe cells: fastgrpo (automatic token budget), TRL, fastgrpo at the old 8192-token budget
  export CUDA_VISIBLE_DEVICES=0
  serve 0 8311 python -m fastgrpo.cli vllm-serve
  timeout 150 python tools/gpu_server_gen.py 8311 /tmp/assets/data/train.jsonl 3 > "$R/server-gen.txt" 2>&1
  cat "$R/server-gen.txt" | tail -3
  kill $server_pid; wait $server_pid 2>/dev/null; sleep 2
  bench --only fastgrpo-colocate,trl-colocate --budget "${BUDGET:-260}" --out "$R/bench-a" > "$R/lane-a.txt" 2>&1
  bench --only fastgrpo-colocate --extra '{"micro_batch_tokens": 8192}' --budget 125 --out "$R/bench-b" \
    > "$R/lane-b.txt" 2>&1
  tables "run" a b
  ;;
17)  # one GPU: the server GPU tests, the cost of TRL's attention stand-in per step, vLLM alone, the colocate GPU tests
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_vllm_server_gpu.py > "$R/gpu-tests.txt" 2>&1
  tail -2 "$R/gpu-tests.txt"
  timeout 120 python tools/gpu_tree_attention_cost.py 112 2>&1 | tail -1 | tee "$R/tree-attention.txt"
  bench --only vllm-alone --budget 100 --out "$R/bench-a" > "$R/lane-a.txt" 2>&1; cat "$R/bench-a/table.md" | sed -n 3p
  timeout 250 python -m pytest -q -p no:cacheprovider -m gpu tests/test_graphed.py tests/test_vllm_colocate.py \
    > "$R/gpu-tests-colocate.txt" 2>&1; tail -2 "$R/gpu-tests-colocate.txt"
  ;;
18)  # issue 6's grid, colocate only (TRL's no-vLLM cells take ~20 s a step): {fastgrpo, TRL} x G {4, 8, 16} x
     # L {256, 512, 1024}, STEPS (default 5) steps per cell, one cell per GPU at a time, four lanes at once
  grid() { local gpu=$1 name=$2 budget=$3; shift 3
    CUDA_VISIBLE_DEVICES=$gpu bench --steps "${STEPS:-5}" --budget "$budget" --out "$R/bench-$name" "$@" \
      >> "$R/lane-$gpu.txt" 2>&1; }
  ( grid 0 trl4 380 --only trl-colocate --num-generations 4 --max-completion-length 256,512,1024
    grid 0 fg16a 110 --only fastgrpo-colocate --num-generations 16 --max-completion-length 256 ) &
  ( grid 1 trl8 380 --only trl-colocate --num-generations 8 --max-completion-length 256,512,1024
    grid 1 fg16b 110 --only fastgrpo-colocate --num-generations 16 --max-completion-length 512 ) &
  ( grid 2 trl16 380 --only trl-colocate --num-generations 16 --max-completion-length 256,512,1024
    grid 2 fg16c 115 --only fastgrpo-colocate --num-generations 16 --max-completion-length 1024 ) &
  grid 3 fg48 495 --only fastgrpo-colocate --num-generations 4,8 --max-completion-length 256,512,1024
  wait
  python -m fastgrpo.bench --report "$R"/bench-*/results.jsonl --out "$R/bench" > /dev/null 2>&1
  cp "$R/bench/table.md" "$R/table.txt"; cat "$R/table.txt"
  ;;
19)  # one GPU (issue 6): the sampler-logprobs GPU test (in-process and engine process), where colocated generation
     # spends its time (vLLM logprobs vs the sampler's record vs none; prefix caching off)
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python -m pytest -s -q -p no:cacheprovider -m gpu tests/test_vllm_colocate.py -k sampler_logprobs \
    > "$R/gpu-tests.txt" 2>&1; grep -h "FIGURE\|passed\|failed" "$R/gpu-tests.txt"
  P="/tmp/assets/model /tmp/assets/data/train.jsonl"
  REPS=4 timeout 200 python tools/gpu_gen_profile.py colocate $P > "$R/gen-colocate.txt" 2>&1
  REPS=4 ENGINE_KWARGS='{"enable_prefix_caching": false}' timeout 120 python tools/gpu_gen_profile.py colocate $P \
    > "$R/gen-colocate-noprefix.txt" 2>&1
  grep -h '"variant"' "$R"/gen-*.txt | tee "$R/gen.txt"
  ;;
20)  # one GPU (issue 6): the recipe cells in one call: vLLM alone first (the ratio needs it), fastgrpo colocate (sync,
    # async), TRL colocate; ONLY= picks a subset (a call's 600 s hold about three of the four). To bracket a cell with
    # vLLM alone on a drifting host: ONLY=vllm-alone,fastgrpo-async,vllm-alone (the table pools the two runs)
  export CUDA_VISIBLE_DEVICES=0
  bench --only "${ONLY:-vllm-alone,fastgrpo-colocate,fastgrpo-async,trl-colocate}" --budget "${BUDGET:-540}" \
    --out "$R/bench-a" > "$R/lane-a.txt" 2>&1
  tables "run" a
  ;;
26)  # one GPU (issue 6, async): vLLM alone, then the async cell as is, with 4096-token passes (shorter training
    # kernels between generation's), with compiled layers, and with compiled layers and the engine in-process
  export CUDA_VISIBLE_DEVICES=0
  for cell in ${CELLS:-alone async tok4096 compiled inproc}; do case $cell in
    alone) v alone "${B1:-90}" vllm-alone '{}' ;;
    async) v async "${B2:-100}" fastgrpo-async '{}' ;;
    tok4096) v tok4096 "${B3:-100}" fastgrpo-async '{"micro_batch_tokens": 4096}' ;;
    compiled) v compiled "${B4:-160}" fastgrpo-async '{"torch_compile": true}' ;;
    inproc) v inproc "${B5:-140}" fastgrpo-async '{"torch_compile": true, "vllm_engine_process": false}' ;;
  esac; done
  ;;
27)  # one GPU (issue 6, async): the same cells under CUDA MPS, where the host lets us start its daemon: with MPS the
    # engine process's and the trainer's kernels can share the GPU at once instead of taking turns by time slice
  export CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if ! nvidia-cuda-mps-control -d; then echo "MPS: the daemon does not start here" | tee -a "$R/summary.txt"; exit 0; fi
  if ! timeout 60 python -c "import torch; print('CUDA under MPS:', torch.ones(2, device='cuda').sum().item())"; then
    echo "MPS: CUDA does not run under it here" | tee -a "$R/summary.txt"; cat /tmp/mps-log/* | tail -5; exit 0; fi
  bench --only "${ONLY:-vllm-alone,fastgrpo-async,fastgrpo-colocate}" --budget "${BUDGET:-420}" --out "$R/bench-a" \
    > "$R/lane-a.txt" 2>&1
  tables "MPS" a
  echo quit | nvidia-cuda-mps-control
  ;;
28)  # one GPU (issue 6, async): under CUDA MPS, the trainer's kernels confined to a share of the SMs (capN cells; the
    # engine process got every SM at 8159530-071e250, and inherits the share since 5f89c35), so decoding finds SMs free;
    # vLLM alone and the uncapped async cell in the same call, without MPS first (NOMPS cells) and under it
  export CUDA_VISIBLE_DEVICES=0
  for cell in ${NOMPS:-}; do case $cell in
    alone|alone2) v $cell "${BA:-100}" vllm-alone '{}' ;;
    async) v async "${BB:-110}" fastgrpo-async '{}' ;;
    sync) v sync "${BB:-110}" fastgrpo-colocate '{}' ;;
    compiled) v compiled "${BC:-170}" fastgrpo-async '{"torch_compile": true}' ;;
  esac; done
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if ! nvidia-cuda-mps-control -d; then echo "MPS: the daemon does not start here" | tee -a "$R/summary.txt"; exit 0; fi
  for cell in ${MPS:-alone cap50 cap35}; do case $cell in
    alone) v mps-alone "${BA:-100}" vllm-alone '{}' ;;
    async) v mps-async "${BB:-110}" fastgrpo-async '{}' ;;
    sync) v mps-sync "${BB:-110}" fastgrpo-colocate '{}' ;;
    cap*) CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${cell#cap} v "mps-$cell" "${BB:-110}" fastgrpo-async '{}' ;;
    pcap*) CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${cell#pcap} v "mps-$cell" "${BB:-110}" fastgrpo-async '{"use_liger_kernel": false}' ;;
    ccap*) CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${cell#ccap} v "mps-$cell" "${BC:-170}" fastgrpo-async '{"torch_compile": true}' ;;
  esac; done
  echo quit | nvidia-cuda-mps-control
  ;;
32)  # one GPU: the recipe's script with settings not yet run on a GPU: max_prompt_length=None (vLLM's context from
    # the longest prompt), liger_kernel_config with a value; STEPS steps each (default 3)
  export CUDA_VISIBLE_DEVICES=0; steps=${STEPS:-3}
  recipe nolimit 0 240 ', "max_prompt_length": null' python "$repo/examples/recipe.py"
  summary nolimit 128; grep -aE "max_model_len|context|Error|error" "$R/nolimit.log" | grep -v Warning | head -8 | tee -a "$R/summary.txt"
  recipe ligercfg 0 240 ', "liger_kernel_config": {"rope": true, "swiglu": false}' python "$repo/examples/recipe.py"
  summary ligercfg 128; grep -aE "liger|Liger|Error" "$R/ligercfg.log" | head -6 | tee -a "$R/summary.txt"
  ;;
31)  # one GPU (issue 6, async): yield points (async_yield 'layer' / 'block') against none, in one bench command,
    # alternated and bracketed by vLLM alone (ORDER, budget BB); GT=1 first runs GPU tests (GTESTS, default the
    # kernel tests; TT seconds)
  export CUDA_VISIBLE_DEVICES=0
  if [ -n "${GT:-}" ]; then
    timeout "${TT:-200}" python -m pytest -q -p no:cacheprovider -m gpu -rs -s \
      ${GTESTS:-tests/test_kernels.py tests/test_logprobs.py} > "$R/gpu-tests.txt" 2>&1
    echo "gpu tests: exit $?" | tee -a "$R/summary.txt"
    grep -E "passed|failed|Error|FIGURE" "$R/gpu-tests.txt" | tail -16 | tee -a "$R/summary.txt"
  fi
  [ -n "${ORDER-x}" ] || exit 0  # ORDER= (set, empty): the tests only
  v yield "${BB:-500}" "${ORDER:-vllm-alone,fastgrpo-async@layer,fastgrpo-async,vllm-alone}" '{}' \
    --variant 'layer={"async_yield": "layer"}' --variant 'block={"async_yield": "block"}' \
    --variant 'off={"async_yield": "off"}'
  tables run yield
  for f in "$R"/bench-yield/cells/fastgrpo-async*/metrics.jsonl; do  # per-step times of each async run
    [ -f "$f" ] && cp "$f" "$R/$(basename "$(dirname "$f")")-metrics.jsonl"; done
  ;;
30)  # one GPU (issue 6, async): each async cell bracketed by vLLM alone in one bench call (pooled); NOMPS cells without
    # MPS, then MPS cells: prio = the trainer at MPS client priority 1 (below normal), the engine process at 0
    # (vllm_engine_env), so that decode kernels are scheduled before training's; plain = MPS without priorities
  export CUDA_VISIBLE_DEVICES=0
  b3="vllm-alone,fastgrpo-async,vllm-alone"; eng='"vllm_engine_env": {"CUDA_MPS_CLIENT_PRIORITY": "0"}'
  for cell in ${NOMPS:-}; do case $cell in
    async) v async "${BB:-300}" "$b3" '{}' ;;
    async2) v async2 "${BB:-400}" "$b3,fastgrpo-async,vllm-alone" '{}' ;;  # alone/async in turn, pooled
    compiled) v compiled "${BC:-300}" "$b3" '{"torch_compile": true}' ;;
    # never run: the engine in the trainer's process (one CUDA context: no time slices between generation and
    # training) with the training layers replayed as CUDA graphs, so that training holds the GIL far less
    graphs) v graphs "${BC:-360}" "$b3" '{"torch_compile_mode": "reduce-overhead", "vllm_engine_process": false}' ;;
  esac; done
  [ -n "${MPS:-}" ] || exit 0
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  echo quit | timeout 10 nvidia-cuda-mps-control 2>/dev/null && sleep 2  # a daemon left by a call cut short
  if ! nvidia-cuda-mps-control -d; then echo "MPS: the daemon does not start here" | tee -a "$R/summary.txt"; exit 0; fi
  for cell in $MPS; do case $cell in
    prio) CUDA_MPS_CLIENT_PRIORITY=1 v mps-prio "${BB:-300}" "$b3" "{$eng}" ;;
    prio1) CUDA_MPS_CLIENT_PRIORITY=1 v mps-prio1 "${BB:-150}" fastgrpo-async "{$eng}" ;;
    prioc) CUDA_MPS_CLIENT_PRIORITY=1 v mps-prioc "${BC:-300}" "$b3" "{$eng, \"torch_compile\": true}" ;;
    cap*) CUDA_MPS_CLIENT_PRIORITY=1 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${cell#cap} v "mps-$cell" "${BB:-300}" "$b3" \
      "{\"vllm_engine_env\": {\"CUDA_MPS_CLIENT_PRIORITY\": \"0\", \"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE\": \"100\"}}" ;;
    plain) v mps-plain "${BB:-200}" fastgrpo-async '{}' ;;
  esac; done
  echo quit | nvidia-cuda-mps-control
  ;;
29)  # one GPU: under CUDA MPS with the process's SMs capped (CAP percent): the kernel GPU tests, and the training
    # half's first grad norm per layer variant (which kernel gives NaN with a capped share: phase 28 found NaN losses)
  export CUDA_VISIBLE_DEVICES=0 CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d || { echo "MPS: no daemon" | tee -a "$R/summary.txt"; exit 0; }
  export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${CAP:-50}
  python -c "import torch; print('SMs seen under the cap:', torch.cuda.get_device_properties(0).multi_processor_count)" \
    | tee -a "$R/summary.txt"
  timeout "${TT:-170}" python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_kernels.py tests/test_logprobs.py \
    > "$R/gpu-tests.txt" 2>&1; echo "gpu tests under cap: exit $?" | tee -a "$R/summary.txt"
  grep -E "passed|failed|Error|assert" "$R/gpu-tests.txt" | tail -12 | tee -a "$R/summary.txt"
  for v in ${VARIANTS:-plain liger}; do
    FG_VARIANT=$v FG_QUICK=1 timeout "${VT:-100}" python tools/gpu_train_profile.py /tmp/assets/model \
      /tmp/assets/data/train.jsonl "$R/tp-$v" > "$R/train-$v.txt" 2>&1
    echo "$v: exit $?" | tee -a "$R/summary.txt"; grep -E "variant|grad norm|budget|Error" "$R/train-$v.txt" | tail -4 | tee -a "$R/summary.txt"
  done
  echo quit | nvidia-cuda-mps-control
  ;;
25)  # one GPU: the GPU tests of kernels.py (Liger, compiled layers), then phase 20's cells (ONLY, BUDGET)
  export CUDA_VISIBLE_DEVICES=0
  timeout "${TT:-200}" python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_kernels.py tests/test_logprobs.py \
    > "$R/gpu-tests.txt" 2>&1; echo "gpu tests: exit $?" | tee -a "$R/summary.txt"
  grep -E "passed|failed|Error" "$R/gpu-tests.txt" | tail -8
  bench --only "${ONLY:-vllm-alone,fastgrpo-colocate,fastgrpo-async}" --budget "${BUDGET:-330}" \
    --out "$R/bench-a" > "$R/lane-a.txt" 2>&1
  tables "run" a
  ;;
23)  # one GPU: the GPU tests of the fused log-softmax and the colocated engine, then the training half profiled
  export CUDA_VISIBLE_DEVICES=0
  timeout 360 python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_logprobs.py tests/test_vllm_colocate.py \
    -s > "$R/gpu-tests.txt" 2>&1; echo "gpu tests: exit $?" | tee -a "$R/summary.txt"
  grep -E "passed|failed|FIGURE|Error" "$R/gpu-tests.txt" | tail -20
  timeout 120 python tools/gpu_train_profile.py /tmp/assets/model /tmp/assets/data/train.jsonl "$R/train-profile" \
    > "$R/train-profile.txt" 2>&1
  grep -E "budget|forward|profiled|rewards" "$R/train-profile.txt"
  ;;
24)  # one GPU: the fused log-softmax GPU tests (self-check included), then the training half under kernel variants
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_logprobs.py > "$R/gpu-tests.txt" 2>&1
  echo "gpu tests: exit $?" | tee -a "$R/summary.txt"; tail -2 "$R/gpu-tests.txt"
  for v in ${VARIANTS:-plain liger compile}; do
    FG_VARIANT=$v FG_QUICK=1 timeout "${VT:-150}" python tools/gpu_train_profile.py /tmp/assets/model \
      /tmp/assets/data/train.jsonl "$R/tp-$v" > "$R/train-$v.txt" 2>&1
    echo "$v: exit $?"; grep -E "variant|budget|grad norm|rewards|Error" "$R/train-$v.txt" | tail -5
  done
  ;;
22a)  # one GPU (issue 6): the training half profiled (tools/gpu_train_profile.py), then sync, async, vLLM alone
  export CUDA_VISIBLE_DEVICES=0
  timeout 150 python tools/gpu_train_profile.py /tmp/assets/model /tmp/assets/data/train.jsonl "$R/train-profile" \
    > "$R/train-profile.txt" 2>&1
  bench --only fastgrpo-colocate,fastgrpo-async,vllm-alone --budget "${BUDGET:-330}" --out "$R/bench-a" \
    > "$R/lane-a.txt" 2>&1
  tables "run" a
  ;;
22b)  # one GPU (issue 6): async variants: engine process; Python's GIL switch interval 1 ms; the plain stream
  export CUDA_VISIBLE_DEVICES=0
  bench --only fastgrpo-async --budget 170 --out "$R/bench-engine" --extra '{"vllm_engine_process": true}' \
    > "$R/lane-engine.txt" 2>&1
  mkdir -p /tmp/switch && echo 'import sys; sys.setswitchinterval(0.001)' > /tmp/switch/sitecustomize.py
  PYTHONPATH=/tmp/switch:$PYTHONPATH bench --only fastgrpo-async --budget 150 --out "$R/bench-switch" \
    > "$R/lane-switch.txt" 2>&1
  bench --only fastgrpo-async --budget 150 --out "$R/bench-plain" --extra '{"vllm_priority_stream": false}' \
    > "$R/lane-plain.txt" 2>&1
  tables "run" engine switch plain
  ;;
21)  # issue 6's grid, the rest (4 GPUs, never run): the no-vLLM cells of fastgrpo and TRL and the vLLM-alone column,
     # G {4, 8, 16} x L {256, 512, 1024}, STEPS (default 3) steps per no-vLLM cell; one cell per GPU at a time
  grid() { local gpu=$1 name=$2 budget=$3; shift 3
    CUDA_VISIBLE_DEVICES=$gpu bench --steps "${STEPS:-3}" --budget "$budget" --out "$R/bench-$name" "$@" \
      >> "$R/lane-$gpu.txt" 2>&1; }
  grid 0 trl1024 "${LANE:-500}" --only trl-novllm --num-generations 4,8,16 --max-completion-length 1024 &
  grid 1 trl256 "${LANE:-500}" --only trl-novllm --num-generations 4,8,16 --max-completion-length 256,512 &
  grid 2 fgnovllm "${LANE:-500}" --only fastgrpo-novllm --num-generations 4,8,16 --max-completion-length 256,512,1024 &
  grid 3 alone "${LANE:-500}" --only vllm-alone --num-generations 4,8,16 --max-completion-length 256,512,1024
  wait
  python -m fastgrpo.bench --report "$R"/bench-*/results.jsonl --out "$R/bench" > /dev/null 2>&1
  cp "$R/bench/table.md" "$R/table.txt"; cat "$R/table.txt"
  ;;
4)  # reruns after fixes: torchrun 2 ranks colocate (GPUs 0,1) next to TRL's AsyncGRPOTrainer (GPUs 2,3)
  recipe ddp2 0,1 165 "" torchrun --nproc_per_node 2 --master_port 29612 "$repo/examples/recipe.py" &
  a=$!
  bench --only trl-server-async --trainer-gpus 2 --server-gpus 3 --budget 180 --out "$R/bench-b" > "$R/lane-b.txt" 2>&1
  wait $a
  summary ddp2 256
  cp "$R/bench-b/table.md" "$R/table.txt"; cat "$R/table.txt"
  ;;
esac
