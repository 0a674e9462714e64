"""Batched generation throughput at Llama-2-7B size through the evaluate stage's own code path
(`llmft.generate.generate`), random bf16 weights, real Dolly prompts (left-padded per batch).

    PYTHONPATH=src python benchmarks/generate_bench.py --out benchmarks/results/generate.json \
        [--batch-sizes 8 32 64] [--max-new-tokens 256]

Random weights rarely emit EOS, so nearly every row generates max_new_tokens: the count is the
worst case of an evaluation run, and new tokens are counted exactly (non-pad tokens after the prompt).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_trainer import DEVICE, load_rows, peak_gb, random_model, sync, versions  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".bench/llama2-7b")
    ap.add_argument("--data", default=".bench/data/train.jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, default=1, help="batches timed per batch size")
    args = ap.parse_args()

    from llmft.config import GenerationConfig
    from llmft.generate import generate
    from llmft.models import load_tokenizer

    tok = load_tokenizer(args.model)
    model = random_model(args.model, None).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    prompts = [r["prompt"] for r in load_rows(args.data, None)]

    counted = {"new": 0}
    inner = model.generate

    def counting_generate(*a, **kw):
        out = inner(*a, **kw)
        n_in = kw["input_ids"].shape[1]
        counted["new"] += int((out[:, n_in:] != tok.pad_token_id).sum())
        return out

    model.generate = counting_generate
    generate(model, tok, prompts[:2], GenerationConfig(max_new_tokens=8, batch_size=2), progress=False)  # warm-up
    rows = []
    for bs in args.batch_sizes:
        n = bs * args.batches
        batch_prompts = (prompts * (n // len(prompts) + 1))[:n]
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=bs)
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        counted["new"] = 0
        row = {"batch_size": bs, "prompts": n, "max_new_tokens": args.max_new_tokens}
        sync()
        t0 = time.perf_counter()
        try:
            generate(model, tok, batch_prompts, gen, progress=False)
            sync()
            dt = time.perf_counter() - t0
            row.update(new_tokens=counted["new"], seconds=dt, new_tokens_per_s=counted["new"] / dt, peak_mem_gb=peak_gb())
        except torch.OutOfMemoryError as e:  # the largest batch that fits is itself a result
            row["error"] = f"OutOfMemoryError: {str(e)[:200]}"
            torch.cuda.empty_cache()
        rows.append(row)
        print("RESULT generate", json.dumps(row), flush=True)
        res = {"what": "llmft.generate.generate, greedy, random bf16 Llama-2-7B, Dolly prompts",
               "attn": model.config._attn_implementation, "rows": rows,
               "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "versions": versions()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
