#!/usr/bin/env bash
# Phase 2, call A: llmft's own train stage, one change at a time. Results in /tmp/res, tarred into $OUT.
export RES=${RES:-/tmp/res}
mkdir -p $RES
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/res.tgz" -C "$RES" . ; }  # device tool: one file back
bash benchmarks/gpu.sh env; pack
# sqlite tracking needs cryptography; fall back to MLflow's file store if anything else is missing
grep -q '"mlflow_sqlite": "ok"' $RES/env.json || { export TRACKING_URI=file:///tmp/mlruns MLFLOW_ALLOW_FILE_STORE=true; echo "TRACKING -> file store"; }
P="train.packing=true train.max_length=2048"
L="bash benchmarks/gpu.sh llmft"
timeout 150 $L p_sdpa_bs2 $P train.batch_size=2 train.max_steps=40 train.attn_implementation=sdpa; pack
timeout 150 $L p_sdpa_bs2_drop0 $P train.batch_size=2 train.max_steps=40 train.attn_implementation=sdpa train.lora.dropout=0.0; pack
timeout 150 $L p_sdpa_bs2_drop0_liger $P train.batch_size=2 train.max_steps=40 train.attn_implementation=sdpa train.lora.dropout=0.0 train.use_liger_kernel=true; pack
timeout 150 $L p_flex_bs2_drop0_liger $P train.batch_size=2 train.max_steps=40 train.attn_implementation=flex_attention train.lora.dropout=0.0 train.use_liger_kernel=true; pack
timeout 150 $L p_flex_bs4_drop0_liger $P train.batch_size=4 train.max_steps=30 train.attn_implementation=flex_attention train.lora.dropout=0.0 train.use_liger_kernel=true; pack
timeout 150 $L lean_flex_bs4_ckpt $P train.batch_size=4 train.max_steps=30 train.attn_implementation=flex_attention train.lora.dropout=0.0 train.use_liger_kernel=true train.gradient_checkpointing=true; pack
grep -h "^RESULT" $RES/*.log | grep -v attn
