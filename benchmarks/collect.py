"""Turn one `llmft train` benchmark run into a results JSON (called by gpu.sh llmft).

    python benchmarks/collect.py NAME RUN_DIR RES_DIR RC [overrides...]

Two throughputs: `tokens_per_s` exactly as the stage wrote it to metrics/train.json (whole train() call:
first steps, epoch-end validation and the final checkpoint included), and `steady_tokens_per_s` from the
Trainer's own log history (num_input_tokens_seen and train_runtime at each logging step, both read after a
loss sync), from the first logged step to the last: warm-up excluded.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402


def main():
    name, run, res, rc, *overrides = sys.argv[1:]
    run, res = Path(run), Path(res)
    ov = dict(o.split("=", 1) for o in overrides if "=" in o)
    out = {"variant": name, "path": "python -m llmft train (TRL SFTTrainer)", "rc": int(rc), "overrides": overrides}
    m = run / "train.json"
    if m.exists():
        out["train_json"] = json.loads(m.read_text())
    states = sorted(run.glob("ckpt/checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if states:
        hist = json.loads(states[-1].read_text())["log_history"]
        pts = [(h["step"], h["num_input_tokens_seen"], h["train_runtime"]) for h in hist
               if "num_input_tokens_seen" in h and "train_runtime" in h and "loss" in h]
        if len(pts) >= 2:
            (s0, t0, r0), (s1, t1, r1) = pts[0], pts[-1]
            out["steady"] = {"from_step": s0, "to_step": s1, "tokens": t1 - t0, "seconds": r1 - r0,
                             "tokens_per_s": (t1 - t0) / (r1 - r0), "step_time_s": (r1 - r0) / (s1 - s0),
                             "tokens_per_step": (t1 - t0) / (s1 - s0)}
        out["log_history"] = hist
    if os.environ.get("MODEL", ".bench/llama2-7b") != ".bench/llama2-7b":  # the FLOP count is Llama-2-7B's
        return _write(out, name, rc, res, tj=out.get("train_json", {}))
    lengths = json.loads(Path(".bench/data/lengths.json").read_text())
    fl = flops.llama2_7b(int(ov.get("train.lora.r", 16)), lengths, int(ov.get("train.max_length", 512)))
    out["flops"] = fl
    tj = out.get("train_json", {})
    if tj.get("tokens_per_s"):
        out["mfu_stage"] = flops.mfu(tj["tokens_per_s"], fl["flops_per_token"])
    if "steady" in out:
        out["mfu_steady"] = flops.mfu(out["steady"]["tokens_per_s"], fl["flops_per_token"])
    _write(out, name, rc, res, tj)


def _write(out: dict, name: str, rc: str, res: Path, tj: dict) -> None:
    res.mkdir(parents=True, exist_ok=True)
    (res / f"llmft_{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    short = {"variant": name, "rc": int(rc), "stage_tok_s": tj.get("tokens_per_s"),
             "stage_steady_tok_s": tj.get("steady_tokens_per_s"), "steady_tok_s": out.get("steady", {}).get("tokens_per_s"),
             "step_s": out.get("steady", {}).get("step_time_s"), "peak_gpu_gib": tj.get("peak_gpu_gib", tj.get("peak_gpu_gb")),
             "mfu_steady": out.get("mfu_steady")}
    print("RESULT", json.dumps(short), flush=True)


if __name__ == "__main__":
    main()
