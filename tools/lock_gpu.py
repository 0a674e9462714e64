"""The GPU lock (requirements-gpu.lock): write it from requirements-gpu.txt, or check it, by pip's own resolution.

    python tools/lock_gpu.py check [--python PY]   # `make lock-gpu-check`: dry-run resolution of the lock, no download
    python tools/lock_gpu.py write [--python PY]   # `make lock-gpu`: re-resolve requirements-gpu.txt into the lock
    python tools/lock_gpu.py compare               # offline: the two locks agree (tests/test_locks.py runs this too)

Both locks are for the same code, so every package they both pin has one version: `write` resolves
requirements-gpu.txt constrained by requirements.lock (torch aside), and `compare` fails on any other difference
than torch's build and the GPU-only packages named in GPU_ONLY.

Resolution needs a Python 3.12 on Linux x86_64 (PY, default `python3.12`): pip's `--platform` mode refuses
source-only packages (rouge_score, ...), so the resolution runs natively. pip's configuration files, find-links
and extra indexes of this machine are ignored (PIP_CONFIG_FILE=/dev/null): PyPI alone, as a user's machine sees it.
PyPI's Linux x86_64 wheel of torch 2.11.0 is the CUDA 13.0 build (it requires cuda-toolkit 13.0.2 and nvidia-*-cu13),
the build the GPU numbers were measured with, so no PyTorch index is needed; `check` asserts that too.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_LOCK = ROOT / "requirements.lock"
GPU_LOCK = ROOT / "requirements-gpu.lock"
GPU_TOP = ROOT / "requirements-gpu.txt"
TORCH_GPU = "2.11.0"

# Packages only the GPU lock pins: the CUDA 13 runtime that PyPI's torch 2.11.0 wheel requires, triton, and the GPU
# extras of requirements-gpu.txt with their dependencies (FlashAttention-4 and its CuTe DSL, Liger, bitsandbytes).
# nvidia-cutlass-dsl requires its -libs-cu12 unconditionally; the [cu13] extra adds -libs-cu13.
GPU_ONLY = frozenset({
    "apache-tvm-ffi", "bitsandbytes", "cuda-bindings", "cuda-pathfinder", "cuda-toolkit", "einops", "flash-attn-4",
    "liger-kernel", "nvidia-cublas", "nvidia-cuda-cupti", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime",
    "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-cufile", "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse",
    "nvidia-cusparselt-cu13", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
    "nvidia-cutlass-dsl-libs-cu12", "nvidia-cutlass-dsl-libs-cu13", "nvidia-nccl-cu13", "nvidia-nvjitlink",
    "nvidia-nvshmem-cu13", "nvidia-nvtx", "quack-kernels", "torch-c-dlpack-ext", "triton",
})
# Packages both locks pin at different versions: torch only (2.13.0 on a CPU, 2.11.0 with CUDA 13 on a GPU).
DIFFERENT = frozenset({"torch"})
# The GPU extras at the versions the committed GPU numbers were measured with (benchmarks/device_fa4.txt, NOTES).
GPU_PINS = {
    "torch": TORCH_GPU, "flash-attn-4": "4.0.0b40", "nvidia-cutlass-dsl": "4.8.1",
    "nvidia-cutlass-dsl-libs-base": "4.8.1", "nvidia-cutlass-dsl-libs-core": "4.8.1",
    "nvidia-cutlass-dsl-libs-cu13": "4.8.1", "quack-kernels": "0.6.5", "apache-tvm-ffi": "0.1.15.post2",
    "torch-c-dlpack-ext": "0.1.5", "liger-kernel": "0.8.5", "bitsandbytes": "0.50.2",
}
HEADER = """\
# The full pinned set for an NVIDIA GPU machine (Linux x86_64, Python 3.12, a driver for CUDA 13): pip's resolution
# of requirements-gpu.txt on PyPI, constrained by requirements.lock so that every package both locks pin has one
# version (torch aside). Written by `make lock-gpu`, checked by `make lock-gpu-check` (tools/lock_gpu.py);
# `make setup` installs it when `nvidia-smi -L` lists a GPU, or with GPU=1.
"""


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """name (canonical) -> version of every `name==version` line; comments and blank lines skipped."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)", line)
        if not m:
            raise ValueError(f"{path.name}:{n}: not a `name==version` pin: {line!r}")
        pins[canon(m.group(1))] = m.group(3)
    return pins


def compare(cpu: dict[str, str], gpu: dict[str, str]) -> list[str]:
    """Every way the two locks disagree beyond torch's build and GPU_ONLY; empty when they agree."""
    problems = []
    for name in sorted(set(cpu) & set(gpu) - DIFFERENT):
        if cpu[name] != gpu[name]:
            problems.append(f"{name}: requirements.lock pins {cpu[name]}, requirements-gpu.lock {gpu[name]}")
    for name in sorted(set(cpu) - set(gpu)):
        problems.append(f"{name}=={cpu[name]} is in requirements.lock but not in requirements-gpu.lock")
    for name in sorted(set(gpu) - set(cpu) - GPU_ONLY):
        problems.append(f"{name}=={gpu[name]} is only in requirements-gpu.lock and not a named GPU-only package "
                        "(tools/lock_gpu.py GPU_ONLY)")
    for name in sorted(GPU_ONLY - set(gpu)):
        problems.append(f"{name} is named GPU-only but requirements-gpu.lock does not pin it")
    for name, version in GPU_PINS.items():
        if gpu.get(name) != version:
            problems.append(f"requirements-gpu.lock pins {name}=={gpu.get(name)}, the GPU numbers used {version}")
    return problems


def resolve(python: str, args: list[str]) -> list[dict]:
    """pip's dry-run resolution (no install, metadata only) on PyPI alone: the report's `install` entries."""
    probe = subprocess.run([python, "-c", "import platform, sys; print(sys.version_info[:2] == (3, 12) and "
                            "sys.platform == 'linux' and platform.machine() == 'x86_64')"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        sys.exit(f"{python} is not a Python 3.12 on Linux x86_64 ({probe.stdout.strip() or probe.stderr.strip()}): "
                 "pass --python (make lock-gpu-check LOCK_PYTHON=...)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", str(report), *args]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True, cwd=tmp)
        return json.loads(report.read_text())["install"]


def torch_cuda(entries: list[dict]) -> str:
    """The CUDA major version that the resolved torch wheel requires (from its Requires-Dist), or 'none'."""
    for e in entries:
        if canon(e["metadata"]["name"]) == "torch":
            reqs = " ".join(e["metadata"].get("requires_dist") or [])
            if "-cu13" in reqs or re.search(r"cuda-toolkit\S*==13", reqs):
                return "13"
            if "-cu12" in reqs:
                return "12"
            return "none"
    return "absent"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["check", "write", "compare"])
    ap.add_argument("--python", default="python3.12", help="a Python 3.12 on Linux x86_64 (default: python3.12)")
    a = ap.parse_args()
    cpu = read_lock(CPU_LOCK)
    if a.action == "write":
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
            c.write("".join(f"{n}=={v}\n" for n, v in cpu.items() if n not in DIFFERENT))
        try:
            entries = resolve(a.python, ["-r", str(GPU_TOP), "-c", c.name])
        finally:
            os.unlink(c.name)
        # The CPU lock's spelling of each shared name (pip freeze's), the metadata's for the rest.
        spelled = {canon(line.split("==")[0]): line.split("==")[0]
                   for line in CPU_LOCK.read_text().splitlines() if "==" in line}
        pins = {}
        for e in entries:
            name = e["metadata"]["name"]
            pins[spelled.get(canon(name), name)] = e["metadata"]["version"]
        GPU_LOCK.write_text(HEADER + "".join(f"{n}=={pins[n]}\n" for n in sorted(pins, key=str.lower)))
        print(f"wrote {GPU_LOCK.name}: {len(pins)} pins, torch {pins.get('torch')} (CUDA {torch_cuda(entries)})")
    gpu = read_lock(GPU_LOCK)
    problems = compare(cpu, gpu)
    if a.action == "check":
        entries = resolve(a.python, ["-r", str(GPU_LOCK)])
        got = {canon(e["metadata"]["name"]): e["metadata"]["version"] for e in entries}
        for name in sorted(set(got) | set(gpu)):
            if got.get(name) != gpu.get(name):
                problems.append(f"resolving requirements-gpu.lock gives {name}=={got.get(name)}, "
                                f"the lock pins {gpu.get(name)}")
        cuda = torch_cuda(entries)
        if cuda != "13":
            problems.append(f"PyPI's torch {gpu.get('torch')} for Linux x86_64 is not the CUDA 13 build (CUDA {cuda})")
        print(f"resolved {len(got)} packages for Linux x86_64, Python 3.12 from PyPI; torch {got.get('torch')} "
              f"requires CUDA {cuda}")
    for p in problems:
        print("PROBLEM:", p)
    if problems:
        sys.exit(1)
    print(f"OK: requirements-gpu.lock ({len(gpu)} pins) agrees with requirements.lock ({len(cpu)} pins) "
          f"beyond torch ({cpu.get('torch')} vs {gpu.get('torch')}) and {len(GPU_ONLY)} GPU-only packages")


if __name__ == "__main__":
    main()
