"""Generation speed at 7B: llmft's fast path (`evaluate.generation.fast`) against plain `generate` batches, greedy,
random bf16 Llama-2-7B weights, Dolly prompts.

    python benchmarks/bench.py generate          # how the record runs `speed` (.bench/ from make_assets.py)
    python benchmarks/generate_fast_bench.py speed --out runs/speed.json
    python benchmarks/generate_fast_bench.py prompts --shared ../shared/data --out .bench/answer_set.json
    python benchmarks/generate_fast_bench.py answers --side base --out runs/answers_base.json

`speed`: plain `generate` at batch 32 (the plain path's best at 7B; 64 runs out of memory) and the fast path with its
slots from free memory, both at --new-tokens (256); random weights almost never emit EOS, so nearly every row runs
all of them (new tokens are counted exactly). The fast path runs twice over the same prompts in one process: the
first pass records the decode step's CUDA graph (no compile), the second is the steady figure. Then agreement: the fast
path's answers to the plain run's 32 prompts, token for token; `--decode-kernels`: the fast path once per decode-step
attention kernel (`auto`: llmft's Triton kernel on a GPU; `flash`: torch's FlashAttention); `--kv-caches model fp8`:
once per KV-cache dtype (`evaluate.generation.kv_cache`: fp8 with the Triton kernel); `--generate-batch`:
transformers' continuous batching over the fast run's prompts (warm-up run, then timed); the tiny fp32 model (fast
must equal plain); `--smollm2 N`: real weights, the embedded SmolLM2 in bf16, plain against fast over N prompts (how
many answers are identical, per KV-cache dtype of --kv-caches).
`prompts` writes the answer set's prompt texts (AlpacaEval 805 + MT-Bench 80 x 2); `answers`: what `evaluate`
generates with them, timed end to end: AlpacaEval's 805 prompts, MT-Bench turn 1 (80), then turn 2
(80, each holding its turn-1 answer), at max_new_tokens 1024; `--side tuned` adds a random LoRA adapter
(r=16, all linear layers) and generates with it merged, as evaluate does on a GPU (`--unmerged`: as before).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `llmft evaluate` sets it

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEVICE, environment, peak_gib, random_model, sync  # noqa: E402


def prompts(args):
    """The prompt texts as evaluate renders them (alpaca template); turn 2 is filled in on the GPU from turn 1."""
    shared = Path(args.shared)
    alpaca = [r["instruction"] for r in json.loads((shared / "alpaca_eval/gpt4_1106_preview_outputs.json").read_text())]
    mt = [json.loads(l)["turns"] for l in (shared / "mt_bench/question.jsonl").read_text().splitlines() if l.strip()]
    Path(args.out).write_text(json.dumps({"alpaca_eval": alpaca, "mt_bench": mt}))
    print(f"{len(alpaca)} AlpacaEval instructions, {len(mt)} MT-Bench questions -> {args.out}")


class Counter(logging.Handler):
    """New tokens that reached the answers. The fast path reports its count on the `llmft.generate` logger (its DEBUG
    line "slots: ... %d new tokens in %.1f s"); plain `generate` calls are counted by their non-pad tokens."""

    def __init__(self, model, tok):
        super().__init__(logging.DEBUG)
        self.n = 0
        inner = model.generate

        def counted_generate(*a, **k):
            out = inner(*a, **k)
            if "past_key_values" not in k:  # plain path only; the fast path is counted from its log
                self.n += int((out[:, k["input_ids"].shape[1]:] != tok.pad_token_id).sum())
            return out

        model.generate = counted_generate
        log = logging.getLogger("llmft.generate")
        log.setLevel(logging.DEBUG)
        log.addHandler(self)

    def emit(self, record):
        if record.getMessage().startswith("slots:"):
            self.n += record.args[3]


def timed(fn, counter):
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counter.n = 0
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    dt = time.perf_counter() - t0
    return out, {"new_tokens": counter.n, "seconds": round(dt, 2), "new_tokens_per_s": round(counter.n / dt),
                 "peak_gib": peak_gib() and round(peak_gib(), 1)}


def setup(args):
    from llmft import models

    tok = models.tokenizer(models.config_for(args.model))
    model = random_model(args.model, None).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def speed(args):
    from llmft.config import GenerationConfig
    from llmft.generate import batch_rows, generate

    model, tok = setup(args)
    counter = Counter(model, tok)
    rows = [json.loads(line)["prompt"] for line in Path(args.data).read_text().splitlines() if line.strip()]
    from llmft import decode_attention

    res = {**environment(), "new_tokens": args.new_tokens, "decode_block": decode_attention.BLOCK_N,
           "decode_warps": decode_attention.WARPS, "rows": []}
    plain = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=32, fast=False)

    def record(row):
        res["rows"].append(row)
        print("RESULT", json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")

    fast_out = None
    if not args.fast_only:
        generate(model, tok, rows[:2], GenerationConfig(max_new_tokens=8, batch_size=2, fast=False), progress=False)
        base_out, r = timed(lambda: generate(model, tok, rows[:32], plain, progress=False), counter)
        record({"path": "plain generate", "batch": 32, "prompts": len(base_out), **r})
    from llmft import slots

    # an fp8 cache takes the Triton kernel whatever DECODE_KERNEL says: it runs once, under the first kernel named
    runs = [(run, kernel, kv) for run in args.fast_runs for kv in args.kv_caches for kernel in args.decode_kernels
            if kv == "model" or kernel == args.decode_kernels[0]]
    for (n_prompts, fb), kernel, kv in runs:
        slots.DECODE_KERNEL = kernel
        gen = GenerationConfig(max_new_tokens=args.new_tokens, fast=True, fast_batch_size=fb, kv_cache=kv)
        p = repeat(rows, n_prompts)
        lengths = sorted((len(x) for x in tok(p).input_ids), reverse=True)
        n_slots = batch_rows(model, lengths, gen)
        # the first pass records the decode step's CUDA graph (and warms cuBLAS); the second is the steady figure
        out1, r1 = timed(lambda: generate(model, tok, p, gen, progress=False), counter)
        out2, r2 = timed(lambda: generate(model, tok, p, gen, progress=False), counter)
        record({"path": "fast", "decode_kernel": kernel, "kv_cache": kv, "decode_attention_ran": slots.USED,
                "fast_batch_size": fb, "slots": n_slots,
                "cache_tokens": sum(lengths[:n_slots]) + n_slots * args.new_tokens, "prompts": n_prompts,
                "first_pass": r1, **r2, "passes_equal": out1 == out2})
        if kv == "model":
            fast_out = fast_out or out2[:32]
    slots.DECODE_KERNEL = "auto"
    if args.fast_only:
        return
    res["agreement_7b_bf16"] = agreement(tok, base_out, fast_out)
    print("RESULT", json.dumps(res["agreement_7b_bf16"]), flush=True)
    if args.generate_batch:
        record(generate_batch(model, tok, repeat(rows, args.fast_runs[0][0]), args.new_tokens, counter))
    res["tiny_fp32_equal"] = tiny_check(args)
    print("RESULT tiny", json.dumps(res["tiny_fp32_equal"]), flush=True)
    if args.smollm2:
        import gc

        import torch

        del model, counter  # the counter's generate wrapper holds the model too
        gc.collect()
        torch.cuda.empty_cache()
        res["smollm2_bf16_agreement"] = smollm2_check(args, rows)
        print("RESULT smollm2", json.dumps(res["smollm2_bf16_agreement"]), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def generate_batch(model, tok, prompts: list[str], new_tokens: int, counter) -> dict:
    """transformers' continuous batching (`model.generate_batch`: paged cache, its own scheduler) with its defaults,
    greedy, over the same prompts; last, since it switches the model's attention to its paged variant."""
    from transformers import GenerationConfig as HFGen

    ids = [list(x) for x in tok(prompts).input_ids]
    cfg = HFGen(max_new_tokens=new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)

    def run():
        out = model.generate_batch(inputs=ids, generation_config=cfg)
        counter.n = sum(len(o.generated_tokens) for o in out.values())
        return out

    try:
        run()  # warm-up: its CUDA graphs and caches
        _, r = timed(run, counter)
        n = counter.n
        r.update(new_tokens=n, new_tokens_per_s=round(n / r["seconds"]))
        return {"path": "transformers generate_batch", "prompts": len(ids), **r}
    except Exception as e:  # noqa: BLE001 - a comparison row, not the subject: say why it is missing
        return {"path": "transformers generate_batch", "error": f"{type(e).__name__}: {e}"[:500]}


def smollm2_check(args, rows: list[str]) -> dict:
    """Real weights: the embedded SmolLM2-135M-Instruct in bf16 on the GPU, greedy, plain generate (batch 32) against
    the fast path over the same Dolly prompts: how many answers are identical, and where the others part."""
    from llmft import models, slots
    from llmft.config import GenerationConfig
    from llmft.generate import generate

    model, tok = models.load_with_tokenizer(models.config_for("embedded"), dtype="bf16", device=DEVICE)
    p = repeat(rows, args.smollm2)
    n = 128
    plain = generate(model, tok, p, GenerationConfig(max_new_tokens=n, batch_size=32, fast=False), progress=False)
    res = {"prompts": len(p), "max_new_tokens": n}
    for kv in args.kv_caches:  # "model": the bf16 cache; "fp8": what the fp8 cache changes on top
        fast = generate(model, tok, p, GenerationConfig(max_new_tokens=n, fast=True, kv_cache=kv), progress=False)
        parted = sorted(first_difference(tok, x, y) for x, y in zip(plain, fast) if x != y)
        same = len(p) - len(parted)
        res[kv if kv == "fp8" else "bf16"] = {
            "kv_cache": kv, "decode_attention_ran": slots.USED, "identical": same,
            "identical_rate": round(same / len(p), 3),
            "parted_at_token_median": parted[len(parted) // 2] if parted else None}
    return res


def repeat(rows: list, n: int) -> list:
    """The first n of rows, repeated as often as needed."""
    return (rows * (n // len(rows) + 1))[:n]


def first_difference(tok, x: str, y: str) -> int:
    """The index of the first token where two answers differ (the shorter's length if one is a prefix)."""
    tx, ty = tok(x).input_ids, tok(y).input_ids
    return next((i for i, (u, v) in enumerate(zip(tx, ty)) if u != v), min(len(tx), len(ty)))


def agreement(tok, a: list[str], b: list[str]) -> dict:
    """How far two sets of greedy answers run token for token before they part."""
    first_diff = [first_difference(tok, x, y) for x, y in zip(a, b)]
    same = sum(x == y for x, y in zip(a, b))
    return {"answers": len(first_diff), "identical": same, "first_difference_token": sorted(first_diff)}


def tiny_check(args) -> dict:
    """The tiny Llama in fp32 (on the GPU: the compiled step): the fast path must give plain generate's answers
    exactly. In bf16 at 7B they part after a few tokens (near-flat logits of random weights, bf16 ties)."""
    import tempfile

    from llmft import generate as g
    from llmft import models
    from llmft.config import GenerationConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import helpers  # the tests' tiny model builder

    d = helpers.tiny_llama(Path(tempfile.mkdtemp()) / "tiny", args.model)
    model, tok = models.load_with_tokenizer(models.config_for(d), dtype="fp32", device=DEVICE)
    qs = [json.loads(line)["prompt"] for line in Path(args.data).read_text().splitlines()[:48]]
    n = min(64, args.new_tokens)
    plain = g.generate(model, tok, qs, GenerationConfig(max_new_tokens=n, batch_size=16, fast=False), progress=False)
    fast = g.generate(model, tok, qs, GenerationConfig(max_new_tokens=n, fast=True, fast_batch_size=16,
                                                       refill_tokens=max(1, n // 4)), progress=False)
    return {"prompts": len(qs), "equal": plain == fast, **agreement(tok, plain, fast)}


def answers(args):
    """evaluate's generation, end to end: AlpacaEval, MT-Bench turn 1, turn 2 built from turn 1's answers."""
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
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, fast=True, kv_cache=args.kv_cache)
    res = {**environment(), "side": args.side, "max_new_tokens": args.max_new_tokens, "kv_cache": args.kv_cache,
           "parts": []}

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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="the answer set's prompt texts, from the shared benchmark files")
    p.add_argument("--shared", default="../shared/data")
    p.add_argument("--out", default=".bench/answer_set.json")
    for name, what in (("speed", "plain against fast on Dolly prompts"), ("answers", "evaluate's answer set")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--model", default=".bench/llama2-7b", help="model folder: its config.json, random weights")
        p.add_argument("--data", default=".bench/data/train.jsonl", help="prompt/completion rows (make_assets.py)")
        p.add_argument("--out", required=True, help="result JSON")
    sub.choices["speed"].add_argument("--new-tokens", type=int, default=256, help="new tokens per prompt")
    sub.choices["speed"].add_argument("--fast-runs", type=lambda s: tuple(map(int, s.split("x"))), nargs="+",
                                      default=[(512, 0)], help="PROMPTSxFAST_BATCH_SIZE (0: from free memory)")
    sub.choices["speed"].add_argument("--fast-only", action="store_true",
                                      help="only the fast runs: no plain baseline, agreement or tiny-model check")
    sub.choices["speed"].add_argument("--decode-kernels", nargs="+", default=["auto"],
                                      choices=["auto", "flash"],
                                      help="the fast path once per decode-step attention kernel (llmft.slots)")
    sub.choices["speed"].add_argument("--kv-caches", nargs="+", default=["model"], choices=["model", "fp8"],
                                      help="the fast path once per KV-cache dtype (evaluate.generation.kv_cache)")
    sub.choices["speed"].add_argument("--generate-batch", action="store_true",
                                      help="also transformers' continuous batching over the first fast run's prompts")
    sub.choices["speed"].add_argument("--smollm2", type=int, default=0, metavar="N",
                                      help="also the embedded SmolLM2 (bf16): plain vs fast over N prompts")
    sub.choices["answers"].add_argument("--side", choices=["base", "tuned"], default="base")
    sub.choices["answers"].add_argument("--unmerged", action="store_true", help="tuned: keep the adapter unmerged")
    sub.choices["answers"].add_argument("--prompts", default=".bench/answer_set.json")
    sub.choices["answers"].add_argument("--kv-cache", choices=["model", "fp8"], default="model",
                                        help="evaluate.generation.kv_cache")
    sub.choices["answers"].add_argument("--max-new-tokens", type=int, default=1024)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("llmft.generate", "llmft.slots"):  # a line per generate call (slots, tokens, seconds), per recording
        logging.getLogger(name).setLevel(logging.DEBUG)
    {"prompts": prompts, "speed": speed, "answers": answers}[args.cmd](args)


if __name__ == "__main__":
    main()
