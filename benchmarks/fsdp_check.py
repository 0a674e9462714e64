"""Does the adapter an FSDP run saves give the logits the sharded model gave at the end of training? (`bench.py fsdp`)

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N benchmarks/fsdp_check.py train k=v
        The train stage as `-m llmft train` runs it (params.yaml + the overrides); afterwards every process runs the
        still-sharded model on one fixed validation row (a collective) and rank 0 saves its logits, with and without
        the adapter, beside the adapter (fsdp_logits.pt).
    python benchmarks/fsdp_check.py reload k=v ...     (the same overrides)
        One process, no FSDP: the base built the way the stage builds it (model.random_init is seeded, so it is
        the same random base) + PeftModel.from_pretrained(paths.adapter); prints a RESULT line and writes it
        beside the adapter (reload_check.json).

Under bf16 FSDP2 computes the LoRA layers in bf16 (its param_dtype), while PEFT keeps a reloaded adapter in fp32:
the reload is compared both as loaded and with the adapter cast to the training compute dtype (which should match
to rounding). The base-only logits check that the random base really was rebuilt identically.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROWS_TOKENS = 256  # one fixed row, cut at this many tokens


def _batch(cfg, tok) -> torch.Tensor:
    row = json.loads((Path(cfg.paths.data) / "validation.jsonl").open(encoding="utf-8").readline())
    return tok(row["prompt"] + row["completion"], return_tensors="pt").input_ids[:, :ROWS_TOKENS]


def _logits_file(cfg) -> Path:
    return Path(cfg.paths.adapter).parent / "fsdp_logits.pt"


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    tuned = model(input_ids=ids).logits.float().cpu()
    with model.disable_adapter():
        base = model(input_ids=ids).logits.float().cpu()
    return tuned, base


def train_then_capture(overrides: list[str]) -> int:
    from transformers import TrainerCallback

    from llmft.config import load_config
    from llmft.train import train

    class Capture(TrainerCallback):
        """The sharded model as training leaves it, so it can run once more after train() returns."""

        def on_train_end(self, args, state, control, model=None, processing_class=None, **kw):
            seen.update(model=model, tok=processing_class, args=args)

    seen = {}
    cfg = load_config("params.yaml", overrides)
    train(cfg, callbacks=[Capture()])
    if "model" not in seen:
        return 1
    from torch.distributed.tensor import DTensor

    model, args = seen["model"], seen["args"]
    ids = _batch(cfg, seen["tok"]).to(args.device)
    tuned, base = _logits(model, ids)  # every rank: FSDP all-gathers the shards
    if int(os.environ.get("RANK", "0")) == 0:
        # the precision the stage trained in, as the Trainer was told it (train.precision may say `auto`)
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        sharded = any(isinstance(p, DTensor) for p in model.parameters())  # FSDP2 holds its parameters as DTensors
        torch.save({"ids": ids.cpu(), "tuned": tuned, "base": base, "fsdp": sharded, "precision": precision,
                    "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, _logits_file(cfg))
        print(f"fsdp_check: sharded logits of {tuple(ids.shape)} tokens -> {_logits_file(cfg)}", flush=True)
    return 0


def reload(argv: list[str]) -> int:
    from llmft import models
    from llmft.config import load_config

    cfg = load_config("params.yaml", argv)
    ref = torch.load(_logits_file(cfg))
    precision = ref["precision"]
    model = models.load(cfg, cfg.paths.adapter, dtype=precision)  # the random base again (seeded), the adapter on it
    ids = _batch(cfg, models.tokenizer(cfg))
    assert torch.equal(ids, ref["ids"]), "the fixed row differs from the one the FSDP run used"
    ids = ids.to(next(model.parameters()).device)
    tuned_as_loaded, base = _logits(model, ids)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(compute)
    tuned_compute, _ = _logits(model, ids)

    diff = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    absmax = ref["tuned"].abs().max().item()
    tol = 2 * 2.0 ** -7 * max(absmax, 1.0) if precision != "fp32" else 1e-4  # two bf16 ulps at the largest logit
    out = {"variant": "fsdp_reload_check", "fsdp": ref["fsdp"], "world_size": ref["world_size"], "precision": precision,
           "tokens": ids.shape[1], "logits_absmax": absmax,
           "base_max_abs_diff": diff(base, ref["base"]),  # is the rebuilt random base the trained one's?
           "adapter_effect_max_abs": diff(ref["tuned"], ref["base"]),  # how far training moved the logits
           "max_abs_diff_as_loaded": diff(tuned_as_loaded, ref["tuned"]),  # fp32 adapter, the user's view
           "max_abs_diff_same_dtype": diff(tuned_compute, ref["tuned"]),  # adapter in the training compute dtype
           "tolerance": tol}
    out["ok"] = (out["base_max_abs_diff"] <= tol and out["max_abs_diff_same_dtype"] <= tol
                 and out["adapter_effect_max_abs"] > tol)
    print("RESULT", json.dumps(out), flush=True)
    (_logits_file(cfg).parent / "reload_check.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    verb, args = (sys.argv[1:2] or ["--help"])[0], sys.argv[2:]
    if verb not in ("train", "reload"):
        print(__doc__)
        sys.exit(0 if verb in ("-h", "--help") else 2)
    sys.exit(train_then_capture(args) if verb == "train" else reload(args) if verb == "reload" else 2)
