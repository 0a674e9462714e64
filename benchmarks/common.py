"""What every benchmark script shares: the device, a random model from a config, peak memory, and the facts a
result must carry to be read later (GPU, package versions, git commit, date).

Numbers come from CUDA; the CPU path exists so that each script can be smoke-tested with the tiny model.
"""
from __future__ import annotations

import datetime
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# This checkout's llmft, not an installed copy: a benchmark measures the code beside it.
sys.path.insert(0, str(ROOT / "src"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

# The packages a speed result depends on; None where one is not installed (flash-attn-4 off Hopper machines).
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow-skinny", "mlflow", "liger-kernel",
            "bitsandbytes", "triton", "tokenizers", "flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels")


def sync() -> None:
    """Wait for the GPU: a timing taken without it measures how fast the CPU queues work, not the work."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    """torch.cuda.max_memory_allocated in GiB (2**30 bytes), as the train stage's peak_gpu_gib; None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def random_model(model_dir: str, attn: str | None = None):
    """The model of `model_dir`'s config.json with random weights, built on the GPU (seconds instead of a minute
    on the CPU at 7B), in bf16 there and fp32 on CPU. Seeded: two calls give the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    kw = {"attn_implementation": attn} if attn else {}
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(cfg, dtype=DTYPE, **kw)


def versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # a copy of the tree without .git (some GPU machines get one): the result says so


def environment() -> dict:
    """Where and on what a result was measured: enough to tell two results apart a month later."""
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short=7", "HEAD"), "uncommitted_changes": bool(status) if status is not None
            else None, "gpu": gpu, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "versions": versions()}
