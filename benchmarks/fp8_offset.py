"""How far does train.fp8 move a real model's loss before any training? (issue 16's FP8 tolerance, on the CPU)

The FP8 loss check on the H200 showed SmolLM2's validation loss 0.76 % above bf16 at step 0, with the adapter
still zero: the error of the FP8 forward itself. This measures that offset here, on the embedded SmolLM2 and the
Dolly validation rows, for llmft's per-tensor scales (fp8.py) and for row-wise scales (one per token and per
output channel, torchao's "rowwise" recipe, built here only to compare), optionally leaving some projections in
full precision (--keep, a regex on module names).

    PYTHONPATH=src python benchmarks/fp8_offset.py --rows .bench/dolly_split/validation.jsonl [--keep down_proj]
"""
from __future__ import annotations

import argparse
import json
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft import fp8
from llmft.models import materialise_embedded


def cast_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t in E4M3 with one scale per row (fp8._cast has one per tensor), and those scales, as a column."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(fp8.E4M3).max
    return (t.float() / scale).to(fp8.E4M3), scale


def rowwise_forward(layer, x):
    """x @ W^T with one scale per row of x and per row of W (E4M3 both)."""
    a8, sa = cast_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(a8, layer.w8_rows.t(), scale_a=sa, scale_b=layer.w_scales.t(), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], -1)


def convert(model, scaling: str, keep: str | None) -> int:
    kept = [m for n, m in fp8.convertible(model) if keep and re.search(keep, n)]
    if scaling == "tensorwise":  # llmft's own conversion; it skips trainable layers, so the kept ones are made so
        for m in kept:
            m.weight.requires_grad_(True)
        return fp8.convert(model)[0]
    layers = [m for _, m in fp8.convertible(model) if m not in kept]
    for m in layers:
        m.w8_rows, m.w_scales = cast_rows(m.weight)  # one scale per output channel
        m.forward = rowwise_forward.__get__(m)
    return len(layers)


def mean_loss(model, tok, texts, max_length: int) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", truncation=True, max_length=max_length).input_ids
            total += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", required=True, help="a prepared split (jsonl with instruction, context, response)")
    ap.add_argument("--n", type=int, default=24, help="rows to score")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--scaling", nargs="+", default=["tensorwise", "rowwise"], choices=["tensorwise", "rowwise"])
    ap.add_argument("--keep", nargs="*", default=[None], help="regexes of projections left unconverted (one run each)")
    args = ap.parse_args()
    torch.manual_seed(0)
    base_dir = materialise_embedded("/tmp/llmft_embedded")
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = [json.loads(line) for line in open(args.rows)][: args.n]
    texts = [f"{r['instruction']}\n{r['context']}\n{r['response']}" for r in rows]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).requires_grad_(False)
    ref = mean_loss(model, tok, texts, args.max_length)
    print(f"RESULT full precision (fp32): loss {ref:.5f} over {len(texts)} rows")
    for scaling in args.scaling:
        for keep in args.keep:
            m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).requires_grad_(False)
            k = convert(m, scaling, keep)
            loss = mean_loss(m, tok, texts, args.max_length)
            print(f"RESULT {scaling}, keep={keep}: {k} projections in FP8, loss {loss:.5f} ({(loss / ref - 1) * 100:+.3f} %)")


if __name__ == "__main__":
    main()
