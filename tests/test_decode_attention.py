"""The decode-step attention kernel (llmft/decode_attention.py) against sdpa, slot by slot.

Triton's interpreter runs the kernel on the CPU when the triton package is installed (`pip install triton`); without
it the test is skipped. On a GPU the same check compiles the kernel (the benchmarks' speed runs use it there).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="the triton package is not installed (pip install triton to run this)")

CHECK = r"""
import torch
from llmft import decode_attention as da
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
worst = 0.0
cases = [(4, 4, 64, torch.float32), (9, 3, 64, torch.float32), (2, 2, 128, torch.float32),
         (9, 3, 64, torch.float8_e4m3fn)]  # the last: an fp8 cache (kv_cache: fp8), read back as its fp8 values
for heads, kv_heads, dim, cache in cases:
    # 4 slots end to end; slot 1 is long but reads 1 token, slot 2 short; the rest of each slot holds stale values
    starts = torch.tensor([0, 70, 200, 205, 245], dtype=torch.int32, device=dev)
    used = torch.tensor([70, 1, 3, 33], dtype=torch.int32, device=dev)
    k, v = (torch.randn(245, kv_heads, dim, device=dev).to(cache) for _ in range(2))
    q = torch.randn(4, heads, dim, device=dev)
    out = da.attend(q, k, v, starts, used, None, block=16)
    for j in range(4):
        a, n = int(starts[j]), int(used[j])
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[j][:, None], k[a:a + n].transpose(0, 1).float(), v[a:a + n].transpose(0, 1).float(),
            enable_gqa=heads != kv_heads)
        worst = max(worst, float((out[j] - ref[:, 0]).abs().max()))
passed = (da._checked(torch.device(dev), torch.float32, torch.float32, 9, 3, 64)
          and da._checked(torch.device(dev), torch.float32, torch.float8_e4m3fn, 9, 3, 64))
da._checked.cache_clear()
real = da.attend
da.attend = lambda *a, **k: real(*a, **k) * 0.5  # a wrong kernel must fail the self-check
print(worst, passed, da._checked(torch.device(dev), torch.float32, torch.float8_e4m3fn, 9, 3, 64))
"""


def test_each_slot_attends_to_its_own_used_tokens_as_sdpa_does():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    worst, passed, wrong = out.stdout.split()[-3:]
    assert float(worst) < 1e-5
    # the self-check that decides whether a GPU uses the kernel: passes where it is right, fails where it is not
    assert (passed, wrong) == ("True", "False")
