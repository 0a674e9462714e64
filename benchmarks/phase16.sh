#!/usr/bin/env bash
# Issue 16's speed call (device, carry [".whl", ".bench"]): the seed-style baseline and the chosen `train` stage
# variants in one call. A compiled variant takes 1.5-3 minutes, most of it compiling (the FP8 one's first step
# compiled for 19-88 s in the calls of 2026-12-02): EACH_S (default 240) must cover it.
#   timeout 590 bash benchmarks/phase16.sh                       # results in $OUT (or $RES)
#   VARIANTS="fp8_fused compile_fused" STEPS=30 timeout 590 bash benchmarks/phase16.sh
# Call 1 (2026-12-02) ran VARIANTS="compile_flex_bs4 fp8_compile_flex_bs4" STEPS=22; call 2 the default list with
# EACH_S=165, which cut both FP8 runs while they compiled (results/phase16b).
# The afternoon's call ran VARIANTS="fast_fp8 fast_bf16 overlap_bf16" STEPS=30 EACH_S=200 (results/phase16d). The
# default now puts the earlier fastest (compile_flex_bs4) last, beside the two new ones, to pin overlap_steps' gain
# in one call; a new batch size recompiles from scratch and took over 200 s there.
export RES=${RES:-${OUT:-/tmp/res}} TORCH_LOGS=${TORCH_LOGS-recompiles}  # a recompile inside the timed steps shows
mkdir -p "$RES"
bash benchmarks/gpu.sh env > /dev/null
# The fastest layout so far (packing 2048, flex attention, dropout 0, batch 4, compiled); the variants add to it.
F="train.packing=true train.max_length=2048 train.attn_implementation=flex_attention train.lora.dropout=0.0
   train.torch_compile=true train.batch_size=4 train.max_steps=${STEPS:-30}"
FAST="train.use_liger_kernel=true train.overlap_steps=true train.fused_lora=true"  # added to F: the fastest
# Liger's norms and SwiGLU left to inductor. With compile_regions (RoPE off) and TRL's own loss, Liger then patches
# nothing: the same as train.use_liger_kernel=false, spelled as the sixth session's runs were
IND='train.liger_kernels={"rms_norm":false,"swiglu":false}'
VL="$FAST train.compile_regions=true train.attn_implementation=varlen"  # sixth session: FlashAttention's varlen kernels
declare -A V=(
  [compile_flex_bs4]="train.use_liger_kernel=true"
  [fp8_compile_flex_bs4]="train.use_liger_kernel=true train.fp8=true"
  [compile_fused]="train.use_liger_kernel=true train.optim=adamw_torch_fused"
  [fp8_fused]="train.use_liger_kernel=true train.optim=adamw_torch_fused train.fp8=true"
  [fp8_fused_noliger]="train.optim=adamw_torch_fused train.fp8=true"
  [compile_fused_noliger]="train.optim=adamw_torch_fused"
  # 2026-12-02, second session: the step without host waits, and LoRA's adds inside the GEMMs
  [fast_bf16]="$FAST"
  [fast_fp8]="$FAST train.fp8=true"
  [overlap_bf16]="train.use_liger_kernel=true train.overlap_steps=true"
  # third session: one shape every step (one compile, CUDA graphs possible), more rows per step under 80 GB
  [static_bf16]="$FAST train.static_shapes=true"
  [static_fp8]="$FAST train.static_shapes=true train.fp8=true"
  [static_bf16_bs6]="$FAST train.static_shapes=true train.batch_size=6"
  [static_fp8_bs6]="$FAST train.static_shapes=true train.fp8=true train.batch_size=6"
  [graphs_bf16]="$FAST train.static_shapes=true train.compile_mode=reduce-overhead"
  [graphs_fp8_bs6]="$FAST train.static_shapes=true train.fp8=true train.batch_size=6 train.compile_mode=reduce-overhead"
  [autotune_bf16]="$FAST train.static_shapes=true train.compile_mode=max-autotune-no-cudagraphs"
  # fourth session: CUDA graphs with FP8 at batch 4 and 8 (batch 8 is past 80 GB), batch 8 without them
  [graphs_fp8]="$FAST train.static_shapes=true train.fp8=true train.compile_mode=reduce-overhead"
  [graphs_fp8_bs8]="$FAST train.static_shapes=true train.fp8=true train.batch_size=8 train.compile_mode=reduce-overhead"
  [static_fp8_bs8]="$FAST train.static_shapes=true train.fp8=true train.batch_size=8"
  # fifth session: each decoder layer compiled on its own (train.compile_regions: no RoPE graph break, one compile
  # for 32 layers); without Liger, inductor fuses the norms and SwiGLU with their neighbours (and FP8's casts)
  [regions_bf16]="$FAST train.compile_regions=true"
  [regions_fp8_bs6]="$FAST train.static_shapes=true train.fp8=true train.batch_size=6 train.compile_regions=true"
  [regions_bf16_noliger]="$FAST train.compile_regions=true train.use_liger_kernel=false"  # a later override wins
  [regions_fp8_bs6_noliger]="$FAST train.static_shapes=true train.fp8=true train.batch_size=6 train.compile_regions=true
    train.use_liger_kernel=false"
  # sixth session: torch's FlashAttention varlen kernels instead of flex (each document's triangle, not every 128 x 128
  # block it touches), with Liger's norms and SwiGLU or inductor's (_ind)
  [varlen_bf16]="$VL"
  [varlen_bf16_ind]="$VL $IND"
  [regions_bf16_ind]="$FAST train.compile_regions=true $IND"
  [varlen_fp8]="$VL train.fp8=true"
  [varlen_fp8_ind]="$VL train.fp8=true $IND"
  [varlen_fp8_bs6]="$VL train.fp8=true train.batch_size=6"
  [varlen_fp8_bs6_ind]="$VL train.fp8=true train.batch_size=6 $IND"
  [varlen_bf16_noliger]="$VL train.use_liger_kernel=false"
  [varlen_bf16_bs6_ind]="$VL train.batch_size=6 $IND"
  [varlen_bf16_ind_workers]="$VL $IND train.dataloader_workers=2"  # collation off the main thread
  # eighth session: FlashAttention-4's Hopper kernels on the same boundaries (needs `hop.sh land 2`)
  [fa4_bf16_ind]="$VL $IND train.attn_implementation=varlen_fa4"
  [fa4_bf16_bs6_ind]="$VL $IND train.attn_implementation=varlen_fa4 train.batch_size=6"
  [fa4_fp8_bs6_ind]="$VL $IND train.attn_implementation=varlen_fa4 train.fp8=true train.batch_size=6"
)
# SMI=1: the GPU's power, SM clock and clock-limit reasons every 200 ms into $RES/smi.csv, each run's start and end
# (epoch seconds) into $RES/marks.txt: whether a run is held back by the power cap
if [ -n "${SMI:-}" ]; then
  why=clocks_event_reasons.active
  nvidia-smi --query-gpu=$why --format=csv > /dev/null 2>&1 || why=clocks_throttle_reasons.active
  nvidia-smi --query-gpu=timestamp,power.draw,power.limit,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu,$why \
    --format=csv -lms 200 > "$RES/smi.csv" &
  SMI_PID=$!; trap 'kill $SMI_PID 2> /dev/null' EXIT
fi
mark() { [ -n "${SMI:-}" ] && echo "$(date +%s.%N) $*" >> "$RES/marks.txt"; return 0; }
[ -n "${NO_BASELINE:-}" ] || { mark start baseline; timeout 110 bash benchmarks/gpu.sh baseline baseline_b8_same_call \
  --batch-size 8 --steps 40 --warmup 5 | grep RESULT; mark end baseline; }
for name in ${VARIANTS:-fast_fp8 fast_bf16 compile_flex_bs4}; do
  # each run gets EACH_S, or what is left of DEADLINE_S (seconds since the script started), whichever is less
  each=${EACH_S:-240}; left=$(( ${DEADLINE_S:-100000} - SECONDS - 5 )); [ "$left" -lt "$each" ] && each=$left
  [ "$each" -lt 30 ] && { echo "phase16: no time left for $name"; continue; }
  mark start "$name"
  # shellcheck disable=SC2086  # the overrides are words
  timeout "$each" bash benchmarks/gpu.sh llmft "$name" $F ${V[$name]} | grep -E "^RESULT|^train:"
  mark end "$name"
  # a run cut by its timeout writes no log of its own: keep the tail of the raw one (what it was compiling)
  [ -s "$RES/llmft_$name.log" ] || tr '\r' '\n' < "${RUNS:-/tmp/llmft_runs}/$name/log" | grep -v "^W12" \
    | tail -c 100000 > "$RES/llmft_$name.killed.log"
done
grep -h "^RESULT" "$RES"/*.log
