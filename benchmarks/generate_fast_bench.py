"""The fast generation path (`llmft.generate`, `fast: true`) against plain batches, random bf16 Llama-2-7B (issue 15).

    # here: the answer set's prompt texts (AlpacaEval 805 + MT-Bench 80 x 2) into the git-ignored .bench/
    PYTHONPATH=src python benchmarks/generate_fast_bench.py prompts --shared ../shared/data --out .bench/answer_set.json
    # on the GPU (through gpu.sh py, which installs the carried wheels):
    bash benchmarks/gpu.sh py benchmarks/generate_fast_bench.py speed --out $OUT/speed.json
    bash benchmarks/gpu.sh py benchmarks/generate_fast_bench.py answers --side base --out $OUT/answers_base.json

`speed`: plain `generate` at batch 32 (the old path's best; 64 runs out of memory) and the fast path with its batch
from free memory, both greedy at 256 new tokens on Dolly prompts; random weights almost never emit EOS, so nearly
every row runs all 256 (new tokens are counted exactly). Then agreement: the fast path's answers to the baseline's
32 prompts, token for token, and the same comparison on the tiny fp32 model with the compiled step (must be equal).
`answers`: what `evaluate` generates, timed end to end: AlpacaEval's 805 prompts, MT-Bench turn 1 (80), then turn 2
(80, each holding its turn-1 answer), at max_new_tokens 1024; `--side tuned` adds a random LoRA adapter
(r=16, all linear layers) and generates with it merged, as evaluate does on a GPU (`--unmerged`: as before).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `llmft evaluate` sets it

sys.path.insert(0, str(Path(__file__).resolve().parent))


def prompts(args):
    """The prompt texts as evaluate renders them (alpaca template); turn 2 is filled in on the GPU from turn 1."""
    shared = Path(args.shared)
    alpaca = [r["instruction"] for r in json.loads((shared / "alpaca_eval/gpt4_1106_preview_outputs.json").read_text())]
    mt = [json.loads(l)["turns"] for l in (shared / "mt_bench/question.jsonl").read_text().splitlines() if l.strip()]
    Path(args.out).write_text(json.dumps({"alpaca_eval": alpaca, "mt_bench": mt}))
    print(f"{len(alpaca)} AlpacaEval instructions, {len(mt)} MT-Bench questions -> {args.out}")


class Counter:
    """New tokens that reached the answers: rows the fast path yields, or non-pad tokens of plain `generate`."""

    def __init__(self, model, tok):
        from llmft import generate as g

        self.n = 0
        refill, inner = g._refill, model.generate

        def counted_refill(*a, **k):
            for i, new in refill(*a, **k):
                self.n += len(new)
                yield i, new

        def counted_generate(*a, **k):
            out = inner(*a, **k)
            if "past_key_values" not in k:  # plain path only; the fast path is counted per finished row
                self.n += int((out[:, k["input_ids"].shape[1]:] != tok.pad_token_id).sum())
            return out

        g._refill, model.generate = counted_refill, counted_generate


def timed(fn, counter):
    from baseline_trainer import peak_gb, sync
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    counter.n = 0
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    dt = time.perf_counter() - t0
    return out, {"new_tokens": counter.n, "seconds": round(dt, 2), "new_tokens_per_s": round(counter.n / dt),
                 "peak_gib": round(peak_gb() or 0, 1)}


def setup(args):
    from baseline_trainer import random_model
    from llmft.models import load_tokenizer

    tok = load_tokenizer(args.model)
    model = random_model(args.model, None).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def speed(args):
    from baseline_trainer import load_rows, versions
    import torch
    from llmft.config import GenerationConfig
    from llmft.generate import batch_rows, generate

    model, tok = setup(args)
    counter = Counter(model, tok)
    rows = [r["prompt"] for r in load_rows(args.data, None)]
    res = {"gpu": torch.cuda.get_device_name(), "versions": versions(), "rows": []}
    plain = GenerationConfig(max_new_tokens=256, batch_size=32, fast=False)
    if not args.fast_only:
        generate(model, tok, rows[:2], GenerationConfig(max_new_tokens=8, batch_size=2, fast=False), progress=False)
        base_out, r = timed(lambda: generate(model, tok, rows[:32], plain, progress=False), counter)
        res["rows"].append({"path": "plain generate", "batch": 32, "prompts": 32, **r})
        print("RESULT", json.dumps(res["rows"][-1]), flush=True)
    for n_prompts, fb in args.fast_runs:
        gen = GenerationConfig(max_new_tokens=256, fast=True, fast_batch_size=fb)
        p = (rows * (n_prompts // len(rows) + 1))[:n_prompts]
        auto = batch_rows(model, 256 + 256, gen)
        # first pass compiles every shape it meets; the second, same prompts, is the steady figure
        out1, r1 = timed(lambda: generate(model, tok, p, gen, progress=False), counter)
        out2, r2 = timed(lambda: generate(model, tok, p, gen, progress=False), counter)
        res["rows"].append({"path": "fast", "fast_batch_size": fb, "auto_batch_at_512": auto, "prompts": n_prompts,
                            "first_pass_with_compile": r1, **r2, "passes_equal": out1 == out2})
        print("RESULT", json.dumps(res["rows"][-1]), flush=True)
        fast_out = out2[:32]
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    if args.fast_only:
        return
    res["agreement_7b_bf16"] = agreement(tok, base_out, fast_out)
    print("RESULT", json.dumps(res["agreement_7b_bf16"]), flush=True)
    res["tiny_fp32_compiled_equal"] = tiny_check(args)
    print("RESULT tiny", json.dumps(res["tiny_fp32_compiled_equal"]), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def agreement(tok, a: list[str], b: list[str]) -> dict:
    """How far two sets of greedy answers run token for token before they part."""
    same, first_diff = 0, []
    for x, y in zip(a, b):
        tx, ty = tok(x).input_ids, tok(y).input_ids
        k = next((i for i, (u, v) in enumerate(zip(tx, ty)) if u != v), min(len(tx), len(ty)))
        same += x == y
        first_diff.append(k)
    return {"answers": len(a), "identical": same, "first_difference_token": sorted(first_diff)}


def tiny_check(args) -> dict:
    """The tiny fp32 Llama on the GPU: the compiled fast path must give plain generate's answers exactly."""
    import torch
    from llmft import generate as g
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import helpers  # the tests' tiny model builder
    from llmft.config import GenerationConfig

    d = helpers.tiny_llama("/tmp/tiny_gen", args.model)
    model, tok = g.load(str(d), device="cuda", dtype=torch.float32)
    qs = [json.loads(l)["prompt"] for l in Path(args.data).read_text().splitlines()[:48]]
    plain = g.generate(model, tok, qs, GenerationConfig(max_new_tokens=64, batch_size=16, fast=False), progress=False)
    fast = g.generate(model, tok, qs, GenerationConfig(max_new_tokens=64, fast=True, fast_batch_size=16,
                                                       refill_tokens=32), progress=False)
    return {"prompts": len(qs), "equal": plain == fast, **agreement(tok, plain, fast)}


def answers(args):
    """evaluate's generation, end to end: AlpacaEval, MT-Bench turn 1, turn 2 built from turn 1's answers."""
    from baseline_trainer import versions
    import torch
    from llmft.config import GenerationConfig
    from llmft.generate import generate
    from llmft.templates import render_prompt

    model, tok = setup(args)
    if args.side == "tuned":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, lora).eval()
    counter = Counter(model, tok)
    data = json.loads(Path(args.prompts).read_text())
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, fast=True)
    res = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "versions": versions(), "side": args.side,
           "max_new_tokens": args.max_new_tokens, "parts": []}

    def part(name, texts):
        ps = [render_prompt("alpaca", turns) for turns in texts]
        lens = sorted(len(x) for x in tok(ps).input_ids)
        out, r = timed(lambda: generate(model, tok, ps, gen, desc=name, progress=False), counter)
        res["parts"].append({"part": name, "prompts": len(ps), "prompt_tokens_median": lens[len(lens) // 2],
                             "prompt_tokens_max": lens[-1], **r})
        print("RESULT", json.dumps(res["parts"][-1]), flush=True)
        return out

    import contextlib

    from llmft.generate import merged

    t0 = time.perf_counter()
    res["merged"] = args.side == "tuned" and not args.unmerged
    with merged(model) if res["merged"] else contextlib.nullcontext():  # as evaluate's candidates.generate
        part("alpaca_eval", [[(q, None)] for q in data["alpaca_eval"]])
        first = part("mt_bench_turn1", [[(t[0], None)] for t in data["mt_bench"]])
        part("mt_bench_turn2", [[(t[0], a), (t[1], None)] for t, a in zip(data["mt_bench"], first)])
    total = time.perf_counter() - t0
    n = sum(p["new_tokens"] for p in res["parts"])
    res["total"] = {"seconds": round(total, 1), "new_tokens": n, "new_tokens_per_s": round(n / total)}
    print("RESULT total", json.dumps(res["total"]), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--shared", default="../shared/data")
    p.add_argument("--out", default=".bench/answer_set.json")
    for name in ("speed", "answers"):
        p = sub.add_parser(name)
        p.add_argument("--model", default=".bench/llama2-7b")
        p.add_argument("--data", default=".bench/data/train.jsonl")
        p.add_argument("--out", required=True)
    sub.choices["speed"].add_argument("--fast-runs", type=lambda s: tuple(map(int, s.split("x"))), nargs="+",
                                      default=[(512, 0)], help="PROMPTSxFAST_BATCH_SIZE (0: from free memory)")
    sub.choices["speed"].add_argument("--fast-only", action="store_true",
                                      help="only the fast runs: no plain baseline, agreement or tiny-model check")
    sub.choices["answers"].add_argument("--side", choices=["base", "tuned"], default="base")
    sub.choices["answers"].add_argument("--unmerged", action="store_true", help="tuned: keep the adapter unmerged")
    sub.choices["answers"].add_argument("--prompts", default=".bench/answer_set.json")
    sub.choices["answers"].add_argument("--max-new-tokens", type=int, default=1024)
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("llmft.generate").setLevel(logging.DEBUG)  # one line per bucket: batch, tokens, seconds
    {"prompts": prompts, "speed": speed, "answers": answers}[args.cmd](args)


if __name__ == "__main__":
    main()
