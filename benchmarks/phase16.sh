#!/usr/bin/env bash
# Issue 16's speed call (device, carry [".whl", ".bench"]): the seed-style baseline, the fastest bf16
# configuration and the same with train.fp8, in one call (about 9 minutes).
#   timeout 590 bash benchmarks/phase16.sh          # results in $OUT (or $RES)
export RES=${RES:-${OUT:-/tmp/res}}
mkdir -p "$RES"
bash benchmarks/gpu.sh env > /dev/null
F="train.packing=true train.max_length=2048 train.attn_implementation=flex_attention train.lora.dropout=0.0
   train.use_liger_kernel=true train.torch_compile=true train.batch_size=4 train.max_steps=22"
L="bash benchmarks/gpu.sh llmft"
timeout 120 bash benchmarks/gpu.sh baseline baseline_b8_same_call --batch-size 8 --steps 40 --warmup 5 | grep RESULT
# shellcheck disable=SC2086  # the overrides are words
timeout 200 $L compile_flex_bs4 $F
# shellcheck disable=SC2086
timeout 200 $L fp8_compile_flex_bs4 $F train.fp8=true
grep -h "^RESULT" "$RES"/*.log
