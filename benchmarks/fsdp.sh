#!/usr/bin/env bash
# FSDP2 benchmark at Llama-2-7B size (issue 17), run from the repo root on a CUDA machine:
#
#   bash benchmarks/fsdp.sh                # N = the visible GPUs (nvidia-smi -L); NPROC=N to choose
#
# In one call, with the same settings and random bf16 7B weights (model.random_init=true):
#   1. plain_1gpu      `python -m llmft train`, one process
#   2. ddp_<N>gpu      the same under accelerate launch, configs/accelerate/ddp.yaml, N processes (only if N > 1)
#   3. fsdp2_<N>gpu    the same under accelerate launch, configs/accelerate/fsdp.yaml, N processes, through
#                      benchmarks/fsdp_check.py, which afterwards keeps the sharded model's logits on a fixed row
#   4. the FSDP adapter reloaded on one process without FSDP (PeftModel.from_pretrained over the same random base),
#      its logits against the sharded model's: RESULT {"variant": "fsdp_reload_check", ..., "ok": ...}
# Each run prints a RESULT line (benchmarks/collect.py): stage_steady_tok_s = the stage's own steady rate
# (optimizer steps only: no validation, saving or the first 2 steps), steady_tok_s = the log-history window
# (includes the epoch-end validations), peak_gpu_gib = rank 0's torch.cuda.max_memory_allocated. Tokens are
# counted over all processes. Needs what gpu.sh needs: .bench/ (benchmarks/make_assets.py) and, where the machine
# lacks trl/datasets/mlflow, the wheels in .whl/. About 4 min for N=1, 5.5 min for N>1 on H200s.
set -uo pipefail
export RES=${RES:-${OUT:-benchmarks/results/fsdp_bench}}
export RUNS=${RUNS:-/tmp/llmft_runs}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # keep NVLink multicast off
MODEL=${MODEL:-.bench/llama2-7b}
mkdir -p "$RES"
N=${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
if [ "${N:-0}" -lt 1 ]; then echo "fsdp.sh: no GPU visible (nvidia-smi -L) and NPROC not set"; exit 2; fi
STEPS=${STEPS:-30}
# The llmft flex configuration of benchmarks/README.md without Liger and torch.compile (neither checked under FSDP).
F="train.packing=true train.max_length=2048 train.attn_implementation=flex_attention train.lora.dropout=0.0
   train.batch_size=4 train.max_steps=$STEPS ${EXTRA:-}"  # EXTRA: more key=value overrides (later ones win)
G="bash benchmarks/gpu.sh"
show() { grep -E "^RESULT|Error|error:" | tail -n 6; }
start=$SECONDS
echo "fsdp.sh: $N process(es), $STEPS steps per run, results in $RES"
$G env > /dev/null || echo "fsdp.sh: gpu.sh env failed (see $RES/env.json); trying the runs anyway"

timeout 300 $G llmft plain_1gpu $F 2>&1 | show
if [ "$N" -gt 1 ]; then
  LAUNCH="python3 -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes $N -m llmft" \
    timeout 300 $G llmft "ddp_${N}gpu" $F 2>&1 | show
fi
FSDP_ENTRY=benchmarks/fsdp_check.py NPROC=$N timeout 360 $G fsdp "fsdp2_${N}gpu" $F 2>&1 | show
# The reload: same overrides as the FSDP run (gpu.sh llmft's output paths), so the same config and random base.
d=$RUNS/fsdp2_${N}gpu
timeout 240 $G py benchmarks/fsdp_check.py reload model.base="$MODEL" model.random_init=true paths.data=.bench/data \
  paths.adapter="$d/adapter" $F > "$RES/fsdp_reload_check.log" 2>&1
echo "fsdp.sh: reload check rc=$?"; show < "$RES/fsdp_reload_check.log"
[ -f "$d/adapter/adapter_model.safetensors" ] && ls -l "$d/adapter/adapter_model.safetensors" "$d"/ckpt/checkpoint-*/pytorch_model_fsdp_0 \
  > "$RES/fsdp_files.txt" 2>&1

echo "fsdp.sh: done in $((SECONDS - start)) s"
shopt -s nullglob  # no ddp_*gpu log at N=1: an unmatched glob would make grep exit 2
grep -h "^RESULT" "$RES"/llmft_plain_1gpu.log "$RES"/llmft_ddp_*gpu.log "$RES"/llmft_fsdp2_*gpu.log "$RES/fsdp_reload_check.log" 2>/dev/null
