"""Markdown tables from the raw JSON in benchmarks/results/ (baseline_*.json, llmft_*.json, generate.json).

    python benchmarks/summarize.py benchmarks/results/phase2 [more dirs...] [--baseline NAME]

Ratio column: real tokens/s over the baseline's (default: the fastest baseline_* found).
Epoch column: one Dolly-15k epoch = 15,011 rows x the mean formatted length of the sample
(benchmarks/results/dolly_lengths.json), at that throughput.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DOLLY_ROWS = 15011


def fmt_cfg(ov: list[str]) -> str:
    skip = ("train.max_steps", "train.logging_steps")
    return " ".join(o.removeprefix("train.") for o in ov if not o.startswith(skip))


def rows_from(dirs):
    base, ours, gen = [], [], []
    for d in dirs:
        for p in sorted(Path(d).glob("*.json")):
            j = json.loads(p.read_text())
            if p.name.startswith("llmft_"):
                ours.append(j)
            elif "real_tokens_per_s" in j:
                base.append(j)
            elif p.name.startswith("generate"):
                gen.append(j)
    return base, ours, gen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--baseline", default=None)
    args = ap.parse_args()
    base, ours, gen = rows_from(args.dirs)
    stats = json.loads(Path("benchmarks/results/dolly_lengths.json").read_text())
    epoch_tokens = DOLLY_ROWS * stats["mean"]
    ref = None
    if base:
        cands = [b for b in base if not b.get("qlora")]
        if args.baseline:
            cands = [b for b in base if b["variant"] == args.baseline]
        ref = max(cands, key=lambda b: b["real_tokens_per_s"])["real_tokens_per_s"] if cands else None

    print("| variant | path | config | real tok/s (steady) | tok/s (whole train()) | step s | real tok/step | MFU | peak GiB | x baseline | Dolly-15k epoch |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in base:
        tps = b["real_tokens_per_s"]
        cfg = (f"bs {b['batch_size']}, pad to {b['max_length']}, {b['attn']}, "
               f"{'ckpt' if b['grad_ckpt'] else 'no ckpt'}{', QLoRA nf4' if b.get('qlora') else ''}")
        ratio = f"{tps / ref:.2f}" if ref else ""
        print(f"| {b['variant']} | (a) Trainer+PEFT | {cfg} | {tps:,.0f} | | {b['step_time_s']:.3f} | "
              f"{b['real_tokens_per_step']:,.0f} | {100 * b['mfu']:.1f}% | {b.get('peak_mem_gib') or b['peak_mem_gb'] * 1e9 / 2**30:.1f} | "
              f"{ratio} | {epoch_tokens / tps / 60:.0f} min |")
    for o in ours:
        tj, st = o.get("train_json", {}), o.get("steady", {})
        if o["rc"] != 0 or not st:
            print(f"| {o['variant']} | (b) llmft train | {fmt_cfg(o['overrides'])} | failed (rc {o['rc']}) | | | | | | | |")
            continue
        tps = st["tokens_per_s"]
        ratio = f"{tps / ref:.2f}" if ref else ""
        print(f"| {o['variant']} | (b) llmft train | {fmt_cfg(o['overrides'])} | {tps:,.0f} | {tj.get('tokens_per_s', 0):,.0f} | "
              f"{st['step_time_s']:.3f} | {st['tokens_per_step']:,.0f} | {100 * o['mfu_steady']:.1f}% | "
              f"{tj.get('peak_gpu_gib', tj.get('peak_gpu_gb', float('nan'))):.1f} | {ratio} | {epoch_tokens / tps / 60:.0f} min |")
    for g in gen:
        print()
        print("| generation batch | prompts | max new tokens | new tokens | seconds | new tok/s | peak GB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in g["rows"]:
            if "error" in r:
                print(f"| {r['batch_size']} | {r['prompts']} | {r['max_new_tokens']} | {r['error'][:60]} | | | |")
                continue
            print(f"| {r['batch_size']} | {r['prompts']} | {r['max_new_tokens']} | {r['new_tokens']} | {r['seconds']:.1f} | "
                  f"{r['new_tokens_per_s']:,.0f} | {r['peak_mem_gb']:.1f} |")
    print(f"\nbaseline reference: {ref:,.0f} real tok/s; Dolly-15k epoch = {epoch_tokens:,.0f} tokens" if ref else "")


if __name__ == "__main__":
    main()
