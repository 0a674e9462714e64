"""Attention alone at Llama-2-7B head shape (32 heads x 128), forward + backward, on Dolly-length documents:
what packing costs with each attention kernel that transformers can pick here (no flash-attn package).

    python benchmarks/attn_micro.py --out benchmarks/results/attn_micro.json

- sdpa, padded:   [B, 512] rows, key-padding + causal mask (the baseline's shape).
- sdpa, packed:   one flattened row of T tokens (TRL padding-free), block-diagonal causal bool mask
                  (what transformers builds from packed position_ids): cost grows with T^2.
- flex, packed:   same row, document-causal BlockMask: fully masked blocks are skipped.
Time per layer call; multiply by 32 layers for a step.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

H, D = 32, 128


def doc_lengths(lengths, total, max_len, seed=0):
    rng = random.Random(seed)
    out, n = [], 0
    while n < total:
        s = min(rng.choice(lengths), max_len, total - n)
        out.append(s)
        n += s
    return out


def time_it(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def qkv(b, t):
    return [torch.randn(b, H, t, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]


def cli():
    """The attention benchmarks' arguments (--lengths, --out) and the Dolly document lengths they read."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default=".bench/data/lengths.json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    return args, json.loads(Path(args.lengths).read_text())


def main():
    args, lengths = cli()
    flex = torch.compile(flex_attention)
    rows = []

    def fwd_bwd(f, q, k, v):
        def run():
            o = f(q, k, v)
            o.backward(torch.ones_like(o))
        return run

    # baseline shape: 8 rows padded to 512
    ls = doc_lengths(lengths, 10**9, 512)[:8]
    mask = torch.zeros(8, 1, 512, 512, dtype=torch.bool, device="cuda")
    causal = torch.ones(512, 512, dtype=torch.bool, device="cuda").tril()
    for i, s in enumerate(ls):
        mask[i, 0, :s, :s] = causal[:s, :s]
        mask[i, 0, s:, 0] = True  # pad queries attend somewhere (as transformers does), avoids NaN rows
    q, k, v = qkv(8, 512)
    ms = time_it(fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v))
    rows.append({"kind": "sdpa padded 8x512", "tokens": 8 * 512, "real_tokens": sum(ls), "ms_per_layer": ms})

    for total in (2048, 4096, 8192, 16384):
        docs = doc_lengths(lengths, total, 2048)
        doc_id = torch.repeat_interleave(torch.arange(len(docs), device="cuda"), torch.tensor(docs, device="cuda"))
        q, k, v = qkv(1, total)
        dense = (doc_id[:, None] == doc_id[None, :]) & torch.ones(total, total, dtype=torch.bool, device="cuda").tril()
        ms = time_it(fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense[None, None]),
                             q, k, v))
        rows.append({"kind": f"sdpa packed 1x{total}", "tokens": total, "real_tokens": total, "ms_per_layer": ms})
        del dense

        def doc_causal(b, h, qi, ki):
            return (doc_id[qi] == doc_id[ki]) & (qi >= ki)

        bm = create_block_mask(doc_causal, 1, None, total, total, device="cuda")
        ms = time_it(fwd_bwd(lambda q, k, v: flex(q, k, v, block_mask=bm), q, k, v))
        rows.append({"kind": f"flex packed 1x{total}", "tokens": total, "real_tokens": total, "ms_per_layer": ms})
        ms = time_it(fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v))
        rows.append({"kind": f"sdpa causal 1x{total} (no doc mask, lower bound)", "tokens": total,
                     "real_tokens": total, "ms_per_layer": ms})
    for r in rows:
        r["ms_per_step_32_layers"] = 32 * r["ms_per_layer"]
        r["us_per_real_token_per_step"] = 1000 * r["ms_per_step_32_layers"] / r["real_tokens"]
        print("RESULT attn", json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
