"""The CPU and GPU locks describe one stack: the same version of every package both pin, torch's build and the
named GPU-only packages aside; and `make setup` picks the lock asked for. Offline and fast (no resolution: that is
`make lock-gpu-check`)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock_gpu", ROOT / "tools" / "lock_gpu.py")
lock_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_gpu)

CPU = lock_gpu.read_lock(ROOT / "requirements.lock")
GPU = lock_gpu.read_lock(ROOT / "requirements-gpu.lock")


def test_locks_agree_beyond_torch_and_the_gpu_only_packages():
    assert lock_gpu.compare(CPU, GPU) == []
    assert set(GPU) - set(CPU) == lock_gpu.GPU_ONLY
    assert set(CPU) <= set(GPU)


def test_gpu_lock_pins_the_measured_gpu_stack():
    assert GPU["torch"] == "2.11.0" and CPU["torch"].startswith("2.13.0")
    for name, version in {"flash-attn-4": "4.0.0b40", "nvidia-cutlass-dsl": "4.8.1",
                          "nvidia-cutlass-dsl-libs-cu13": "4.8.1", "quack-kernels": "0.6.5",
                          "liger-kernel": "0.8.5", "bitsandbytes": "0.50.2", "transformers": "5.23.0",
                          "trl": "1.16.0", "accelerate": "1.15.0", "datasets": "5.2.0"}.items():
        assert GPU.get(name) == version, name
    assert GPU["peft"].startswith("0.21.")
    # The CUDA 13 runtime of PyPI's torch 2.11.0 wheel, not CUDA 12's.
    assert "nvidia-nccl-cu13" in GPU and not any(n.endswith("-cu12") and n.startswith("nvidia-nccl") for n in GPU)
    # The top-level GPU pins are the CPU ones with torch 2.11.0, plus the extras.
    top_cpu = lock_gpu.read_lock(ROOT / "requirements.txt")
    top_gpu = lock_gpu.read_lock(ROOT / "requirements-gpu.txt")
    assert {n: v for n, v in top_gpu.items() if n in top_cpu and n != "torch"} == \
        {n: v for n, v in top_cpu.items() if n != "torch"}
    assert top_gpu["torch"] == "2.11.0"
    assert all(GPU[n] == v for n, v in top_gpu.items())


@pytest.mark.parametrize("edit", ["shared version", "cpu-only package", "unnamed gpu package", "gpu extra"])
def test_compare_catches_a_broken_lock(edit):
    cpu, gpu = dict(CPU), dict(GPU)
    if edit == "shared version":
        gpu["transformers"] = "5.17.0"
    elif edit == "cpu-only package":
        del gpu["mlflow"]
    elif edit == "unnamed gpu package":
        gpu["flash-attn"] = "2.8.3"
    else:
        gpu["flash-attn-4"] = "4.0.0b39"
    assert lock_gpu.compare(cpu, gpu)


def test_read_lock_refuses_a_line_that_is_not_a_pin(tmp_path):
    (tmp_path / "x.lock").write_text("# comment\ntorch==2.11.0\ntransformers>=5\n")
    with pytest.raises(ValueError, match="x.lock:3"):
        lock_gpu.read_lock(tmp_path / "x.lock")


def _setup_plan(tmp_path, *args):
    """`make -n setup` for a venv under tmp_path: the lines that would run."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on PATH")
    env = {k: v for k, v in os.environ.items() if k != "GPU"}
    return subprocess.run([make, "-n", "setup", f"VENV={tmp_path / 'venv'}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout.splitlines()


def _installs(lines):
    return [line.split(" -r ")[1] for line in lines if "pip install" in line and " -r " in line]


def test_make_setup_picks_the_lock_asked_for(tmp_path):
    assert _installs(_setup_plan(tmp_path, "GPU=1")) == ["requirements-gpu.lock"]
    assert _installs(_setup_plan(tmp_path, "GPU=0")) == ["requirements.lock"]


def test_make_setup_switching_locks_rebuilds(tmp_path):
    bin_ = tmp_path / "venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / ".installed").touch()                    # a venv set up from the CPU lock, up to date
    assert _installs(_setup_plan(tmp_path, "GPU=0")) == []
    plan = _setup_plan(tmp_path, "GPU=1")            # switching reinstalls, and empties the venv first
    assert _installs(plan) == ["requirements-gpu.lock"]
    assert any("grep -qvx '" + str(bin_ / ".installed-gpu") + "'" in line and "venv --clear" in line for line in plan)
    (bin_ / ".installed").unlink()
    (bin_ / ".installed-gpu").touch()                # set up from the GPU lock: kept without GPU=1 or a GPU
    assert _installs(_setup_plan(tmp_path)) == []
    assert _installs(_setup_plan(tmp_path, "GPU=0")) == ["requirements.lock"]
