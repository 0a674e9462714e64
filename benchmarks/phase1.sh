#!/usr/bin/env bash
# Phase 1 on the GPU: environment, baseline (a) with and without checkpointing, generation, attention
# micro-benchmark, QLoRA (baseline-style). Results land in /tmp/res and, tarred after every step, in $OUT.
export RES=${RES:-/tmp/res}
mkdir -p $RES
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/res.tgz" -C "$RES" . ; }  # device tool: one file back
bash benchmarks/gpu.sh env; pack
timeout 170 bash benchmarks/gpu.sh baseline baseline_b8 --batch-size 8 --steps 45 --warmup 5; pack
timeout 130 bash benchmarks/gpu.sh generate --batch-sizes 8 32 64; pack
timeout 130 bash benchmarks/gpu.sh baseline baseline_b8_ckpt --batch-size 8 --grad-ckpt --steps 30 --warmup 5; pack
timeout 70 bash benchmarks/gpu.sh attn; pack
timeout 120 bash benchmarks/gpu.sh baseline qlora_baseline_b8_ckpt --qlora --grad-ckpt --batch-size 8 --steps 20 --warmup 5; pack
grep -h RESULT $RES/*.log
