"""Build what the GPU benchmark carries to the device (git-ignored .bench/): a Llama-2-7B model folder
with config + tokenizer and no weights, and the Dolly sample formatted as prompt/completion.

    PYTHONPATH=src python benchmarks/make_assets.py [--out .bench] [--dolly ../shared/data/dolly/dolly_sample.jsonl]

Also writes benchmarks/results/dolly_lengths.json (Llama-2 token lengths of the formatted rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from llmft import templates

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
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".bench")
    ap.add_argument("--dolly", default="../shared/data/dolly/dolly_sample.jsonl")
    ap.add_argument("--template", default="alpaca")
    args = ap.parse_args()
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
    res = Path("benchmarks/results")
    res.mkdir(parents=True, exist_ok=True)
    (res / "dolly_lengths.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
