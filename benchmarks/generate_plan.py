"""Predict the fast path's plan and time at 7B before spending device time on it (issue 15), on any machine.

    PYTHONPATH=src python benchmarks/generate_plan.py [--max-new-tokens 256] [--free-gb 125]

The speed benchmark's 512 Dolly prompts (`generate_fast_bench.py speed`), tokenised with the Llama-2 tokenizer,
are cut into buckets by `llmft.generate.buckets` with the row limit `batch_rows` would give at --free-gb free
memory. Each batch runs in rounds of refill_tokens; a round's decode step reads its cache view (text so far plus
the round, rounded up to bucket_tokens; the whole cache for the code before views) and takes the time measured on
the H200 (`results/generate/decode_micro.json`: 14.8 / 19.6 / 24.7 ms at 128 / 192 / 256 rows x 512 slots fit
4.95 ms + 1.5e-4 ms per row-slot), plus 30 ms per round (a `generate` call's setup and first step, a guess) and
each batch's prefill at 600 TFLOP/s; every row runs all max_new_tokens (random weights). Printed: the code that
ran on the H200 in the second pass (bucket 256, refill 256, no long-prompt rule, no views), for which this
predicts 26.2 s against 28.0 s measured (7 % short), and the current code at the current defaults.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FIXED_MS, SLOT_MS = 4.95, 1.5e-4  # decode step = FIXED_MS + SLOT_MS x rows x cache length (H200, 7B, bf16)
ROUND_S = 0.03  # per round: generate's setup and its first (uncompiled) step; a guess
PARAMS, KV_BYTES, MLP = 6.74e9, 2 * 32 * 32 * 128 * 2, 11008  # Llama-2-7B


def seconds(plan, lengths, new_tokens: int, refill: int, view_step: int) -> float:
    """Predicted time of a bucket plan; view_step 0: every step reads the whole cache."""
    t = 0.0
    for cache_len, rows, batch in plan:
        for b in range(0, len(rows), batch):
            width = max(lengths[i] for i in rows[b:b + batch])
            t += batch * width * 2 * PARAMS / 600e12
            for done in range(0, new_tokens, refill):
                n = min(refill, new_tokens - done)
                view = min(cache_len, -(-(width + done + n) // view_step) * view_step) if view_step else cache_len
                t += n * (FIXED_MS + SLOT_MS * batch * view) / 1e3 + ROUND_S
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
    per_token = KV_BYTES + 6 * MLP * 2  # as batch_rows counts a row

    def rows_for(cache_len):
        return max(1, min(256, int((0.8 * args.free_gb * 1e9 - 4 * 2**30) // (per_token * cache_len))))

    now = GenerationConfig(max_new_tokens=args.max_new_tokens, fast=True)
    second_pass = GenerationConfig(max_new_tokens=args.max_new_tokens, fast=True, bucket_tokens=256, refill_tokens=256)
    for label, gen, slots, views in (("second pass on the H200 (no long-prompt rule, no views)", second_pass, 0, 0),
                                     (f"now (bucket {now.bucket_tokens}, refill {now.refill_tokens}, views)", now,
                                      int(PARAMS * 2 // KV_BYTES), now.bucket_tokens)):
        plan = buckets(lengths, gen, rows_for, slots)
        t = seconds(plan, lengths, args.max_new_tokens, gen.refill_tokens, views)
        print(f"{label}: " + ", ".join(f"{len(r)} prompts at cache {c} in batches of {b}" for c, r, b in plan)
              + f" -> {t:.1f} s, {len(lengths) * args.max_new_tokens / t:,.0f} new tok/s (predicted)")


if __name__ == "__main__":
    main()
