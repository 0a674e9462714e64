"""The decode step's attention alone, at the 7B speed run's shape: torch's FlashAttention (FA2, `seqused_k`) against
llmft's Triton kernel (llmft/decode_attention.py) over its block sizes and warps, with a bf16 and an fp8 cache.

    python benchmarks/decode_attention_bench.py --out runs/decode_attention.json
    python benchmarks/decode_attention_bench.py --slots 256 --tokens 235 --blocks 32 64 128 --warps 2 4 8

Llama-2-7B's attention (32 heads of 128, no GQA): --slots slots end to end in one flat cache, each reading a length
drawn uniformly from [tokens/2, 3 tokens/2] (235: an earlier decode-step profile's shape; the speed run's slots read
more, about 264 on average over its 512 prompts and about 435 in its first wave of the 171 longest).
Each kernel runs --iters times after a warm-up, timed with CUDA events; GB/s counts the keys and values read once.
Every row's output is compared with sdpa over the same cache values (max abs error). A GPU only: Triton compiles
for it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, nargs="+", default=[171, 256])
    ap.add_argument("--tokens", type=int, default=235, help="mean tokens a slot reads")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None, help="result JSON")
    args = ap.parse_args()

    import torch
    from llmft import decode_attention as da

    res = {**environment(), "tokens_mean": args.tokens, "heads": args.heads, "kv_heads": args.kv_heads,
           "dim": args.dim, "rows": []}
    dev = torch.device("cuda")
    for n_slots in args.slots:
        g = torch.Generator(device=dev).manual_seed(0)
        used = torch.randint(args.tokens // 2, 3 * args.tokens // 2 + 1, (n_slots,), generator=g, device=dev,
                             dtype=torch.int32)
        starts = torch.zeros(n_slots + 1, dtype=torch.int32, device=dev)
        starts[1:] = used.cumsum(0)
        total = int(starts[-1])
        q = torch.randn(n_slots, args.heads, args.dim, generator=g, device=dev, dtype=torch.bfloat16)
        kv16 = [torch.randn(total, args.kv_heads, args.dim, generator=g, device=dev, dtype=torch.bfloat16)
                for _ in range(2)]
        kv8 = [x.to(torch.float8_e4m3fn) for x in kv16]
        ref = reference(q, kv16, starts, used)
        ref8 = reference(q, [x.to(torch.bfloat16) for x in kv8], starts, used)
        cu_q = torch.arange(n_slots + 1, dtype=torch.int32, device=dev)

        def flash():
            return torch.ops.aten._flash_attention_forward(q, kv16[0], kv16[1], cu_q, starts, 1, int(used.max()),
                                                           0.0, False, False, seqused_k=used)[0]

        cases = [("flash", "bf16", None, None, flash, ref)]
        for cache, kv, r in (("bf16", kv16, ref), ("fp8", kv8, ref8)):
            for block in args.blocks:
                for warps in args.warps:
                    cases.append(("triton", cache, block, warps,
                                  lambda kv=kv, b=block, w=warps: da.attend(q, kv[0], kv[1], starts, used, None, b, w),
                                  r))
        for kernel, cache, block, warps, fn, r in cases:
            row = {"slots": n_slots, "kernel": kernel, "cache": cache, "block": block, "warps": warps}
            try:
                err = float((fn().float() - r).abs().max())
                us = timed(fn, args.iters)
                size = total * args.kv_heads * args.dim * 2 * (1 if cache == "fp8" else 2)
                row.update(us=round(us, 1), gb_per_s=round(size / us / 1e3), max_abs_error=round(err, 4))
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a row, not the end
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            res["rows"].append(row)
            print("RESULT", json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def reference(q, kv, starts, used):
    """sdpa per slot in fp32 over the cache as given: [slots, H, D]."""
    import torch

    out = []
    for j in range(q.shape[0]):
        a, n = int(starts[j]), int(used[j])
        k, v = (x[a:a + n].transpose(0, 1).float() for x in kv)
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q[j][:, None].float(), k, v, enable_gqa=q.shape[1] != k.shape[0])[:, 0])
    return torch.stack(out)


def timed(fn, iters: int) -> float:
    """Mean microseconds per call over `iters` calls after 3 warm-up calls (CUDA events)."""
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


if __name__ == "__main__":
    main()
