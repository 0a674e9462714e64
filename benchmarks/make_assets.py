"""The inputs of the 7B speed benchmark, in the git-ignored .bench/: a Llama-2-7B model folder with config and
tokenizer but no weights (the runs build random weights from it: no gated download, same speed), and the Dolly
sample formatted as prompt/completion rows with their Llama-2 token lengths.

    python benchmarks/make_assets.py [--out .bench] [--dolly ../shared/data/dolly/dolly_sample.jsonl]
    python benchmarks/make_assets.py --random-weights DIR [--model .bench/llama2-7b]

The first also writes the lengths' statistics to --stats (benchmarks/results/dolly_lengths.json, which
benchmarks/README.md quotes). The second saves seeded random weights of --model's config to DIR (with its
tokenizer): QLoRA quantises weights as it loads them, so it needs them on disk, where model.random_init has none.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_model  # noqa: E402  (also puts this checkout's src/ first)

from llmft import templates  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import helpers  # noqa: E402 (the Llama-2 tokenizer builder, with the tests' tiny models)

# Llama-2-7B's published config (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2, hidden_act="silu", rope_theta=10000.0, tie_word_embeddings=False,
                 initializer_range=0.02)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".bench", help="assets folder (llama2-7b/, data/)")
    ap.add_argument("--dolly", default="../shared/data/dolly/dolly_sample.jsonl", help="Dolly rows (JSONL)")
    ap.add_argument("--template", default="alpaca", help="prompt template, as data.template")
    ap.add_argument("--stats", default="benchmarks/results/dolly_lengths.json", help="where the length statistics go")
    ap.add_argument("--random-weights", metavar="DIR", help="instead: save random weights of --model to DIR")
    ap.add_argument("--model", default=".bench/llama2-7b", help="with --random-weights: the model folder")
    args = ap.parse_args()
    if args.random_weights:
        return random_weights(args.model, args.random_weights)
    from transformers import AutoTokenizer, LlamaConfig

    out = Path(args.out)
    tok_dir = helpers.llama2_tokenizer(helpers.find_llama2_vocab(), out / "llama2-tok")
    model_dir = out / "llama2-7b"
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**LLAMA2_7B)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.save_pretrained(model_dir)

    rows = [json.loads(l) for l in Path(args.dolly).read_text().splitlines() if l.strip()]
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    formatted, p_len, c_len = [], [], []
    for r in rows:
        ex = templates.format_example(args.template, r["instruction"], r.get("context") or "", r["response"])
        formatted.append({**r, **ex})
        p = tok(ex["prompt"])["input_ids"]  # BOS included, as in training
        c = tok(ex["completion"], add_special_tokens=False)["input_ids"]
        p_len.append(len(p))
        c_len.append(len(c) + 1)  # + EOS
    # All rows train (the benchmark wants many tokens); a few rows as validation so the stage has one.
    for name, part in (("train", formatted), ("validation", formatted[:16]), ("test", formatted[16:32])):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in part))
    total = [a + b for a, b in zip(p_len, c_len)]
    stats = {"rows": len(rows), "template": args.template, "tokenizer": "Llama-2 (llama.cpp vocab gguf, fixed)",
             "total_tokens": sum(total), "mean": statistics.mean(total), "median": pct(total, 50),
             "p90": pct(total, 90), "p99": pct(total, 99), "max": max(total),
             "mean_prompt": statistics.mean(p_len), "mean_completion": statistics.mean(c_len),
             "over_512": sum(t > 512 for t in total), "over_2048": sum(t > 2048 for t in total),
             "tokens_truncated_at_512": sum(min(t, 512) for t in total),
             "tokens_truncated_at_2048": sum(min(t, 2048) for t in total)}
    # E[s^2]/E[s] over tokens: the mean causal-attention context a token sees, x2 (see flops.py).
    for m in (512, 2048):
        ls = [min(t, m) for t in total]
        stats[f"s2_over_s_{m}"] = sum(x * x for x in ls) / sum(ls)
    (data_dir / "lengths.json").write_text(json.dumps(total))
    Path(args.stats).parent.mkdir(parents=True, exist_ok=True)
    Path(args.stats).write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))


def random_weights(model_dir: str, out: str) -> None:
    """Seeded random weights of model_dir's config (bf16 on a GPU), saved with its tokenizer."""
    from transformers import AutoTokenizer

    random_model(model_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    print(f"random weights of {model_dir} -> {out}")


if __name__ == "__main__":
    main()
