#!/usr/bin/env bash
# Phase 2, call B: baseline (a) again in the same call as (b), QLoRA through the stage, torch.compile.
export RES=${RES:-/tmp/res}
mkdir -p $RES
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/res.tgz" -C "$RES" . ; }  # device tool: one file back
bash benchmarks/gpu.sh env > /dev/null; pack
F="train.packing=true train.max_length=2048 train.attn_implementation=flex_attention train.lora.dropout=0.0 train.use_liger_kernel=true"
L="bash benchmarks/gpu.sh llmft"
timeout 150 $L best_flex_bs4_repeat $F train.batch_size=4 train.max_steps=22; pack
timeout 120 bash benchmarks/gpu.sh baseline baseline_b8_same_call --batch-size 8 --steps 40 --warmup 5 | grep RESULT; pack
# QLoRA needs weights on disk to quantise on load (random_init builds bf16 in memory)
timeout 90 bash benchmarks/gpu.sh randckpt
timeout 170 $L qlora_flex_bs2_ckpt $F train.batch_size=2 train.max_steps=22 train.gradient_checkpointing=true \
  train.qlora.enabled=true model.random_init=false model.base=/tmp/rand7b; pack
rm -rf /tmp/rand7b
timeout 200 $L compile_flex_bs4 $F train.batch_size=4 train.max_steps=22 train.torch_compile=true; pack
grep -h "^RESULT" $RES/*.log
