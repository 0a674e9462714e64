"""train.fp8's per-tensor cast, compiled, at Llama-2-7B activation shapes (issue 16): the amax over the whole tensor
in one reduction against row by row first, contiguous and transposed inputs (a gradient can arrive either way).

    bash benchmarks/gpu.sh py benchmarks/amax_micro.py --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

E4M3 = torch.float8_e4m3fn


def cast_whole(t):
    scale = t.abs().amax().float().clamp(min=1e-12) / torch.finfo(E4M3).max
    return (t.float() / scale).to(E4M3), scale


def cast_rows(t):
    scale = t.abs().amax(dim=-1).amax().float().clamp(min=1e-12) / torch.finfo(E4M3).max
    return (t.float() / scale).to(E4M3), scale


def amax_whole(t):
    return t.abs().amax()


def amax_rows(t):
    return t.abs().amax(dim=-1).amax()


def time_us(fn, t, iters=50) -> float:
    for _ in range(5):
        fn(t)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn(t)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/amax_micro")
    args = ap.parse_args()
    rows = []
    fns = {name: torch.compile(f) for name, f in
           [("amax_whole", amax_whole), ("amax_rows", amax_rows), ("cast_whole", cast_whole), ("cast_rows", cast_rows)]}
    for n in (4096, 11008):
        for layout in ("contiguous", "transposed"):
            t = torch.randn(8192, n, device="cuda", dtype=torch.bfloat16)
            if layout == "transposed":
                t = torch.randn(n, 8192, device="cuda", dtype=torch.bfloat16).t()
            gb = t.numel() * 2 / 1e9
            ref = fns["cast_whole"](t)
            same = torch.equal(fns["cast_rows"](t)[1], ref[1])
            for name, f in fns.items():
                us = time_us(f, t)
                rows.append({"shape": [8192, n], "layout": layout, "fn": name, "us": round(us, 1),
                             "read_TB_s": round(gb * 1e3 / us, 2), "same_scale": same})
                print(f"[8192, {n}] {layout:10s} {name:10s} {us:8.1f} us  {rows[-1]['read_TB_s']:5.2f} TB/s of input"
                      f"  same scale: {same}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "amax_micro.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                     "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
