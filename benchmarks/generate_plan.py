"""Predict the fast path's plan and time at 7B before spending device time on it (issue 15), on any machine.

    PYTHONPATH=src python benchmarks/generate_plan.py [--max-new-tokens 256] [--free-gb 125]

The speed benchmark's 512 Dolly prompts (`generate_fast_bench.py speed`), tokenised with the Llama-2 tokenizer,
are cut into buckets by `llmft.generate.buckets` with the row limit `batch_rows` would give at --free-gb free
memory, once without the long-prompt rule (step_slots 0, the code that ran on the H200) and once with it (weight
bytes / KV bytes per token of Llama-2-7B). Each batch's time comes from the decode step measured there
(`results/generate/decode_micro.json`: 14.8 / 19.6 / 24.7 ms at 128 / 192 / 256 rows x 512 slots fit
4.95 ms + 1.5e-4 ms per row-slot) plus its prefill at 600 TFLOP/s, every row running all max_new_tokens (random
weights). For the H200 run without the rule this predicts 29.0 s (4,514 tok/s) against 28.0 s (4,640) measured.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FIXED_MS, SLOT_MS = 4.95, 1.5e-4  # decode step = FIXED_MS + SLOT_MS x rows x cache length (H200, 7B, bf16)
PARAMS, KV_BYTES, MLP = 6.74e9, 2 * 32 * 32 * 128 * 2, 11008  # Llama-2-7B


def seconds(plan, new_tokens: int) -> float:
    t = 0.0
    for cache_len, rows, batch in plan:
        batches = -(-len(rows) // batch)
        prefill = batch * (cache_len - new_tokens) * 2 * PARAMS / 600e12
        t += batches * (new_tokens * (FIXED_MS + SLOT_MS * batch * cache_len) / 1e3 + prefill)
    return t


def main():
    from baseline_trainer import load_rows
    from llmft.config import GenerationConfig
    from llmft.generate import buckets
    from llmft.models import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".bench/llama2-7b", help="the 7B folder (its tokenizer)")
    ap.add_argument("--data", default=".bench/data/train.jsonl")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--free-gb", type=float, default=125.0, help="free GPU memory when a bucket is sized")
    ap.add_argument("--answer-set", metavar="JSON", help="instead: AlpacaEval's prompts from this file "
                    "(`generate_fast_bench.py prompts`), as evaluate renders them; use --max-new-tokens 1024")
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    if args.answer_set:
        import json

        from llmft.templates import render_prompt

        texts = [render_prompt("alpaca", [(q, None)]) for q in json.loads(Path(args.answer_set).read_text())["alpaca_eval"]]
    else:
        rows = [r["prompt"] for r in load_rows(args.data, None)]
        texts = (rows * (args.prompts // len(rows) + 1))[:args.prompts]
    lengths = [len(x) for x in tok(texts).input_ids]
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, fast=True)
    per_token = KV_BYTES + 6 * MLP * 2  # as batch_rows counts a row

    def rows_for(cache_len):
        return max(1, min(256, int((0.8 * args.free_gb * 1e9 - 4 * 2**30) // (per_token * cache_len))))

    for label, slots in (("without the long-prompt rule", 0), ("with it", int(PARAMS * 2 // KV_BYTES))):
        plan = buckets(lengths, gen, rows_for, slots)
        t = seconds(plan, args.max_new_tokens)
        print(f"{label}: " + ", ".join(f"{len(r)} prompts at cache {c} in batches of {b}" for c, r, b in plan)
              + f" -> {t:.1f} s, {len(lengths) * args.max_new_tokens / t:,.0f} new tok/s (predicted)")


if __name__ == "__main__":
    main()
