"""Where a 7B decode step goes (issue 15): the fast path's per-step cost, split, on random bf16 Llama-2-7B.

    bash benchmarks/gpu.sh py benchmarks/decode_micro.py --out $OUT/decode_micro.json [--parts attn steps profile]

`attn`: one layer's decode attention alone (q_len 1, 32 heads x 128, K/V of B rows x L slots), per kernel choice:
  SDPA with the boolean padding mask the static cache path gives it, SDPA with no mask (a lower bound: what a
  mask-free kernel reads), SDPA over half the slots (reading only the used part of the cache), and flex_attention
  with a block mask that skips blocks past each row's length. GB/s counts the K and V bytes read.
`steps`: `llmft.generate._round` (the fast path's unit: one `generate` on a static cache, decode compiled by
  transformers) at n1 and n2 new tokens; (t2 - t1) / (n2 - n1) is the decode step with no prefill in it.
  Against it: bytes the step must read (weights + the whole static cache) at the copy bandwidth.
`loop`: the same step without `generate` (own_loop: constant-shape inputs, CUDA graphs, no per-step host sync).
`profile`: torch.profiler over 24 decode steps of one batch: GPU busy fraction, time per kernel class.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADS, HEAD_DIM, LAYERS = 32, 128, 32


def bench(fn, reps=50) -> float:
    """Median ms of fn over reps, CUDA events, after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def attn(res):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch.nn.functional as F

    rows = []
    flex = torch.compile(flex_attention, dynamic=False)
    for B, L in [(128, 512), (192, 512), (256, 512), (128, 1280)]:
        q = torch.randn(B, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HEADS, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.randint(L // 4, L + 1, (B,), device="cuda")  # rows at different lengths, as in a batch
        valid = torch.arange(L, device="cuda")[None, :] < lens[:, None]
        mask = valid[:, None, None, :]
        gb = 2 * k.numel() * 2 / 1e9
        case = {"B": B, "L": L, "kv_gb": round(gb, 2)}

        def rec(name, fn):
            try:
                ms = bench(fn)
                case[name] = {"ms": round(ms, 3), "GB_per_s": round(gb / ms * 1e3)}
            except Exception as e:  # a backend that refuses these shapes is a finding, not a crash
                case[name] = f"{type(e).__name__}: {e}"[:200]

        rec("sdpa_mask_default", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        for name, be in [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH),
                         ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
            def f(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            rec(f"sdpa_mask_{name}", f)
        rec("sdpa_nomask", lambda: F.scaled_dot_product_attention(q, k, v))
        kh, vh = k[:, :, :L // 2].contiguous(), v[:, :, :L // 2].contiguous()
        rec("sdpa_nomask_half_slots", lambda: F.scaled_dot_product_attention(q, kh, vh))

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]
        bm = create_block_mask(mask_mod, B, None, 1, L, device="cuda", BLOCK_SIZE=128)
        rec("flex_blockmask", lambda: flex(q, k, v, block_mask=bm))
        case["used_fraction"] = round(float(lens.float().mean()) / L, 3)
        rows.append(case)
        print("RESULT attn", json.dumps(case), flush=True)
        torch.cuda.empty_cache()
    res["attn"] = rows


def setup(args):
    from baseline_trainer import random_model
    from llmft.models import load_tokenizer

    tok = load_tokenizer(args.model)
    model = random_model(args.model, None).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    prompts = [json.loads(line)["prompt"] for line in Path(args.data).read_text().splitlines()[:512]]
    ids = [x[-256:] for x in tok(prompts).input_ids]
    return model, tok, ids


def steps(res, model, tok, ids):
    from llmft import generate as g
    from llmft.config import GenerationConfig

    torch._dynamo.config.recompile_limit = 64
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    rows = []
    for B, cache_len in [(128, 512), (192, 512), (256, 512)]:
        seqs = (ids * (B // len(ids) + 1))[:B]
        t = {}
        for n in (16, 16, 80):  # the first call compiles this shape
            gen = GenerationConfig(max_new_tokens=n, fast=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g._round(model, tok, seqs, n, cache_len, B, gen, 0)
            torch.cuda.synchronize()
            t[n] = time.perf_counter() - t0
        step = (t[80] - t[16]) / 64
        kv_gb = 2 * LAYERS * HEADS * HEAD_DIM * 2 * B * cache_len / 1e9
        case = {"B": B, "cache_len": cache_len, "step_ms": round(step * 1e3, 2), "row_tokens_per_s": round(B / step),
                "prefill_plus_16_s": round(t[16], 2), "must_read_gb": round(weights_gb + kv_gb, 1),
                "ms_at_4300GBps": round((weights_gb + kv_gb) / 4300 * 1e3, 2)}
        rows.append(case)
        print("RESULT steps", json.dumps(case), flush=True)
        torch.cuda.empty_cache()
    res["steps"] = rows


def own_loop(model, tok, seqs: list[list[int]], n: int, cache_len: int, compiled: bool = True):
    """Greedy decode without `generate`: eager prefill on a static cache, then one compiled step (CUDA graphs)
    per token with constant-shape inputs (the whole-cache padding mask), and no host sync until the end."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    B, width = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, cache_len), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1  # slots after the prompt: the causal mask hides those not yet written
    input_ids, mask = input_ids.to(device), mask.to(device)
    pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=cache_len)

    def step(ids, mask, pos):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)

    fn = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False) if compiled else step
    with torch.inference_mode():
        nxt = step(input_ids, mask[:, :width], pos)
        out, p = [nxt], pos[:, -1:] + 1
        for _ in range(n - 1):
            nxt = fn(nxt[:, None].clone(), mask, p).clone()
            out.append(nxt)
            p = p + 1
    return torch.stack(out, 1).tolist()


def loop(res, model, tok, ids):
    rows = []
    for B, cache_len in [(192, 512), (256, 512)]:
        seqs = (ids * (B // len(ids) + 1))[:B]
        t = {}
        for n in (16, 16, 80):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            own_loop(model, tok, seqs, n, cache_len)
            torch.cuda.synchronize()
            t[n] = time.perf_counter() - t0
        step = (t[80] - t[16]) / 64
        case = {"B": B, "cache_len": cache_len, "step_ms": round(step * 1e3, 2), "row_tokens_per_s": round(B / step),
                "prefill_plus_16_s": round(t[16], 2)}
        rows.append(case)
        print("RESULT loop", json.dumps(case), flush=True)
        torch.cuda.empty_cache()
    res["loop"] = rows


def profile(res, model, tok, ids, B=192, cache_len=512, n=24):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_ctx

    from llmft import generate as g
    from llmft.config import GenerationConfig

    seqs = (ids * (B // len(ids) + 1))[:B]
    gen = GenerationConfig(max_new_tokens=n, fast=True)
    g._round(model, tok, seqs, n, cache_len, B, gen, 0)  # compiled already by `steps`; warm again
    torch.cuda.synchronize()
    with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        g._round(model, tok, seqs, n, cache_len, B, gen, 0)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, -1.0
    for s, e in spans:  # union of kernel intervals
        if e > end:
            busy += e - max(s, end)
            end = e
    by = {}
    for e in kernels:
        by[e.name] = by.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
    total = sum(by.values())

    def cls(name):
        n_ = name.lower()
        if any(s in n_ for s in ("fmha", "flash", "attention", "cudnn")):
            return "attention"
        if any(s in n_ for s in ("gemm", "nvjet", "cutlass", "gemv", "xmma", "sm90")):
            return "matmul"
        if "memcpy" in n_ or "memset" in n_:
            return "memcpy_memset"
        return "other"
    classes = {}
    for name, us in by.items():
        classes[cls(name)] = classes.get(cls(name), 0.0) + us
    span = spans[-1][1] - spans[0][0] if spans else 0
    res["profile"] = {
        "B": B, "cache_len": cache_len, "new_tokens": n, "wall_s": round(wall, 3),
        "gpu_span_ms": round(span / 1e3, 1), "gpu_busy_ms": round(busy / 1e3, 1),
        "busy_fraction_of_span": round(busy / span, 3) if span else None,
        "classes_ms": {k: round(v / 1e3, 1) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [[k[:120], round(v / 1e3, 2)] for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:20]],
        "kernel_total_ms": round(total / 1e3, 1)}
    print("RESULT profile", json.dumps(res["profile"]), flush=True)


def main():
    from baseline_trainer import versions

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".bench/llama2-7b")
    ap.add_argument("--data", default=".bench/data/train.jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", nargs="+", default=["attn", "steps", "profile", "loop"])
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "versions": versions()}
    if "attn" in args.parts:
        attn(res)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    if {"steps", "profile", "loop"} & set(args.parts):
        model, tok, ids = setup(args)
        if "steps" in args.parts:
            steps(res, model, tok, ids)
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        if "profile" in args.parts:
            profile(res, model, tok, ids)
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        if "loop" in args.parts:
            loop(res, model, tok, ids)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
