"""The seed-style baseline that llmft's speed is compared with: HF `Trainer` + PEFT LoRA on a random bf16
Llama-2-7B, every example padded to a fixed length, no packing, the model's default attention (SDPA).

    python benchmarks/bench.py baseline        # how the record runs it (batch 8, 40 steps, 5 of warm-up)
    python benchmarks/baseline_trainer.py --model .bench/llama2-7b --data .bench/data/train.jsonl \
        --out runs/baseline.json [--grad-ckpt] [--batch-size 8] [--qlora]

Same data as llmft's path (prompt/completion rows), prompt tokens masked from the loss, LoRA r=16 alpha=32
dropout=0.05 on all linear layers (q,k,v,o,gate,up,down). Times optimizer steps after `--warmup` steps
with a CUDA sync at each step end; counts real (non-pad) tokens of exactly the timed batches.
`--qlora` quantises the random base to 4-bit NF4 (bitsandbytes) in place, since a random model has no
checkpoint for from_pretrained to quantise on load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402
from common import DEVICE, environment, peak_gib, random_model, sync  # noqa: E402


def quantize_4bit(model):
    """Swap every decoder nn.Linear for a bitsandbytes NF4 Linear4bit holding the same random weights."""
    import bitsandbytes as bnb

    for name, mod in list(model.model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).cuda()
                setattr(mod, child_name, q)
                del child
    model.is_loaded_in_4bit = True
    torch.cuda.empty_cache()
    return model


def load_rows(path: str, limit: int | None):
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    return rows[:limit] if limit else rows


def encode(rows, tok, max_len: int):
    """prompt + completion + EOS, truncated; labels mask the prompt. Padding is the collator's job."""
    out = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + c)[:max_len]
        labels = ([-100] * len(p) + c)[:max_len]
        out.append({"input_ids": ids, "labels": labels})
    return out


class PadToMax:
    """Pads every example to the same fixed length (seed style) and records real tokens per batch."""

    def __init__(self, pad_id: int, max_len: int):
        self.pad_id, self.max_len, self.real = pad_id, max_len, []

    def __call__(self, feats):
        n = len(feats)
        ids = torch.full((n, self.max_len), self.pad_id, dtype=torch.long)
        labels = torch.full((n, self.max_len), -100, dtype=torch.long)
        mask = torch.zeros((n, self.max_len), dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        self.real.append(int(mask.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".bench/llama2-7b", help="model folder: its config.json, random weights")
    ap.add_argument("--data", default=".bench/data/train.jsonl", help="prompt/completion rows (make_assets.py)")
    ap.add_argument("--lengths", default=".bench/data/lengths.json", help="the rows' token lengths, for the MFU")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--name", default="baseline", help="the result's name")
    ap.add_argument("--max-length", type=int, default=512, help="every row padded (or cut) to this many tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=45, help="optimizer steps in all")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (>= 1)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--attn", default=None, help="attn_implementation; default: the model's default")
    ap.add_argument("--qlora", action="store_true", help="quantise the random base to NF4 (bitsandbytes, CUDA)")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.unk_token
    model = random_model(args.model, args.attn)
    if args.qlora:
        from peft import prepare_model_for_kbit_training

        model = quantize_4bit(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.grad_ckpt)
    if args.grad_ckpt:
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    need = args.steps * args.batch_size
    rows = load_rows(args.data, None)
    rows = (rows * (need // len(rows) + 1))[:need]
    ds = encode(rows, tok, args.max_length)
    collate = PadToMax(tok.pad_token_id, args.max_length)

    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            sync()
            stamps.append(time.perf_counter())

    targs = TrainingArguments(output_dir=str(Path(args.out).parent / "trainer_out"), per_device_train_batch_size=args.batch_size,
                              max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=2,
                              bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu", logging_steps=5, save_strategy="no", report_to="none", seed=42,
                              gradient_checkpointing=args.grad_ckpt,
                              gradient_checkpointing_kwargs={"use_reentrant": False} if args.grad_ckpt else None,
                              remove_unused_columns=False, disable_tqdm=True, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate,
                      callbacks=[StepTimer()])
    trainer.train()

    w = args.warmup
    # Trainer shuffles, but the collator sees batches in the order the steps consume them.
    timed_tokens = sum(collate.real[w:args.steps])
    dt = stamps[args.steps - 1] - stamps[w - 1]
    tps = timed_tokens / dt
    res = {"variant": args.name, "path": "HF Trainer + PEFT (baseline_trainer.py)",
           "qlora": args.qlora, "grad_ckpt": args.grad_ckpt, "batch_size": args.batch_size,
           "max_length": args.max_length, "padding": "max_length", "packing": False,
           "attn": model.config._attn_implementation, "lora": "r=16 alpha=32 dropout=0.05 all-linear",
           "trainable_params": n_train, "timed_steps": args.steps - w,
           "real_tokens_per_s": tps, "padded_tokens_per_s": (args.steps - w) * args.batch_size * args.max_length / dt,
           "step_time_s": dt / (args.steps - w), "real_tokens_per_step": timed_tokens / (args.steps - w),
           "peak_mem_gib": peak_gib(), **mfu(model, args, tps), "env": environment()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    keys = ("variant", "real_tokens_per_s", "step_time_s", "peak_mem_gib", "mfu")
    print("RESULT", json.dumps({k: res.get(k) for k in keys}))


def mfu(model, args, tps: float) -> dict:
    """Model FLOPs utilisation against the H100's dense bf16 peak, for the 7B config only (flops.py counts
    Llama-2-7B's shapes); {} for any other model, such as the tiny one of the smoke test."""
    c = model.config
    if (c.hidden_size, c.num_hidden_layers, c.intermediate_size) != (4096, 32, 11008):
        return {}
    lengths = json.loads(Path(args.lengths).read_text()) if Path(args.lengths).exists() else None
    fl = flops.llama2_7b(16, lengths, args.max_length)
    return {"flops": fl, "mfu": flops.mfu(tps, fl["flops_per_token"])}


if __name__ == "__main__":
    main()
