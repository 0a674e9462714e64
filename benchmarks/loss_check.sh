#!/usr/bin/env bash
# Issue 16's check that the speed switches leave the math alone, on real weights: the embedded SmolLM2-135M
# (landed on the device by benchmarks/hop.sh) trained on the Dolly sample with the reference configuration and
# with each switch of the fastest configuration added to it; then loss_equivalence.py compares the curves.
#
#   here:   PYTHONPATH=src python -m llmft prepare data.source=../shared/data/dolly/dolly_sample.jsonl \
#               paths.data=.bench/dolly_split paths.data_metrics=/tmp/dolly_split.json
#   device: bash benchmarks/hop.sh land 1; bash benchmarks/hop.sh land 2   (two calls on one machine, see hop.sh)
#           bash benchmarks/loss_check.sh            (after them nothing more to carry; results in $RES or $OUT)
#
# The reference is the fastest configuration's data layout (packing 2048, flex attention: packed rows attend
# only within their own example, LoRA dropout 0, batch 4) with every speed-only switch off; `sdpa_nopack`
# (padded batches, no packing) is there for scale: it sees other batches, so its curve differs by more.
# CONFIGS picks which runs (default: all); STEPS the optimizer steps of each (default 60, evaluated every 5).
set -uo pipefail
STEPS=${STEPS:-60}
RES=${RES:-${OUT:-/tmp/loss_check}}
export PYTHONPATH=/tmp/hop/site${PYTHONPATH:+:$PYTHONPATH} MODEL=embedded RES
# every speed switch of the fastest configuration (configs/llama2-7b-lora.yaml)
FASTEST="train.use_liger_kernel=true train.torch_compile=true train.fused_lora=true train.overlap_steps=true"
# Liger's norms and SwiGLU left to inductor. With compile_regions (RoPE off) and TRL's own loss, Liger then patches
# nothing: the same as train.use_liger_kernel=false, spelled as the sixth session's runs were
IND='train.liger_kernels={"rms_norm":false,"swiglu":false}'
declare -A SWITCHES=(
  [ref]=""
  [liger]="train.use_liger_kernel=true"
  [compile]="train.torch_compile=true"
  [liger_compile]="train.use_liger_kernel=true train.torch_compile=true"  # "fastest" until 2026-12-02's second session
  [fused_lora]="train.fused_lora=true"
  [overlap]="train.overlap_steps=true"
  [fastest]="$FASTEST"
  [fp8]="train.fp8=true"
  [fastest_fp8]="$FASTEST train.fp8=true"
  # third session: one shape every step (the padding masked), and CUDA graphs over it
  [fastest_static]="$FASTEST train.static_shapes=true"
  [fastest_static_fp8]="$FASTEST train.static_shapes=true train.fp8=true"
  [fastest_graphs]="$FASTEST train.static_shapes=true train.compile_mode=reduce-overhead"
  [fastest_graphs_fp8]="$FASTEST train.static_shapes=true train.fp8=true train.compile_mode=reduce-overhead"
  # fifth session: each decoder layer compiled on its own (Liger's RoPE left to inductor), with and without Liger
  [fastest_regions]="$FASTEST train.static_shapes=true train.compile_regions=true"
  [fastest_regions_fp8]="$FASTEST train.static_shapes=true train.fp8=true train.compile_regions=true"
  [regions_noliger]="$FASTEST train.static_shapes=true train.compile_regions=true train.use_liger_kernel=false"
  [regions_noliger_fp8]="$FASTEST train.static_shapes=true train.fp8=true train.compile_regions=true train.use_liger_kernel=false"
  # sixth session: torch's FlashAttention varlen kernels instead of flex; Liger's norms and SwiGLU left to inductor
  [fastest_varlen]="$FASTEST train.compile_regions=true train.attn_implementation=varlen"
  [fastest_varlen_ind]="$FASTEST train.compile_regions=true train.attn_implementation=varlen $IND"
  [fastest_varlen_ind_fp8]="$FASTEST train.compile_regions=true train.attn_implementation=varlen $IND train.fp8=true"
  [fastest_varlen_fp8]="$FASTEST train.compile_regions=true train.attn_implementation=varlen train.fp8=true"
  # eighth session: FlashAttention-4's kernels on the same boundaries
  [fastest_fa4_ind]="$FASTEST train.compile_regions=true train.attn_implementation=varlen_fa4 $IND"
  [fastest_fa4_ind_fp8]="$FASTEST train.compile_regions=true train.attn_implementation=varlen_fa4 $IND train.fp8=true"
  [sdpa_nopack]="train.packing=false train.attn_implementation=sdpa train.max_length=512"
)
CONFIGS=${CONFIGS:-ref liger compile fused_lora overlap fastest fp8 fastest_fp8 sdpa_nopack}
COMMON="model.random_init=false paths.data=${DATA:-.bench/dolly_split} paths.base_cache=/tmp/hop/base
  train.max_steps=$STEPS train.eval_steps=5 train.logging_steps=1 train.max_eval_rows=null train.seed=42
  train.packing=true train.max_length=2048 train.attn_implementation=flex_attention train.lora.dropout=0.0
  train.batch_size=4 ${EXTRA:-}"
# a later call on the same machine (same RES) adds its runs to the earlier call's: compared against one ref run
[ -f "$RES/curves.tgz" ] && tar xzf "$RES/curves.tgz" -C "$RES" curves
for name in $CONFIGS; do
  # shellcheck disable=SC2086  # the overrides are words
  bash benchmarks/gpu.sh llmft "$name" $COMMON ${SWITCHES[$name]}
  # the curves into $RES at once, flat: a call cut short still brings back the runs that finished
  mkdir -p "$RES/curves/$name" && cp "${RUNS:-/tmp/llmft_runs}/$name"/plots/*_loss.csv "$RES/curves/$name/" \
    || { echo "loss_check: $name left no curves"; rm -rf "$RES/curves/$name"; }
done
names=$(for n in "$RES"/curves/*/; do n=$(basename "$n"); [ "$n" != ref ] && echo "$n"; done)
# shellcheck disable=SC2086
python3 benchmarks/loss_equivalence.py --runs "$RES/curves" --ref ref --names $names --out "$RES"
# a device call brings back about 8 files (the curves and the plot were left out on 2026-12-02): one archive
tar czf "$RES/curves.tgz" -C "$RES" curves loss_equivalence.png && rm -rf "$RES/curves" "$RES/loss_equivalence.png"
