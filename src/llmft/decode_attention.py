"""One query per slot attending to its slot's own tokens: the slot decoder's decode-step attention on a GPU.

torch's FlashAttention kernels (FA2) compute a query tile of 128 rows per (slot, head). A decode step has one query
row per slot, so 127 of the 128 rows are wasted multiply-adds: on an H100 (random bf16 Llama-2-7B, 171 slots of
~235 tokens) FA2 took 447 us a layer, 59 % of the step, at 1.5 TB/s, bound by those multiply-adds rather than by
reading the cache. FlashAttention's decode kernels (split-KV, or FA4's decode kernels) are not reachable from torch
2.11 on Hopper. This kernel reads each slot's keys and values once, in blocks, and computes the one row with plain
fused multiply-adds and an online softmax (Triton, which torch's CUDA builds ship): it is bound by reading the cache.
It also reads an fp8 cache (`evaluate.generation.kv_cache: fp8`), which FlashAttention cannot: half the bytes.
benchmarks/decode_attention_bench.py times it against FA2 over BLOCK_N and WARPS.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


BLOCK_N = 64
"""Cache tokens a program reads per iteration (keys and values of one KV head)."""
WARPS = 2
"""Warps per program (one program: one slot x one query head)."""


def fits(q, k_cache) -> bool:
    """Whether the kernel runs for these queries [slots, heads, dim] and this cache [tokens, KV heads, dim]."""
    return runs(q.device, q.dtype, k_cache.dtype, q.shape[1], k_cache.shape[1], q.shape[-1])


def runs(device, dtype, cache_dtype, heads: int, kv_heads: int, dim: int) -> bool:
    """Whether the kernel runs for these shapes: on a CUDA device with the triton package, head dim a power of 2,
    and its self-check passed there (once per process and shape: it compiles the kernel and compares it with sdpa
    over the same cache values)."""
    return (device.type == "cuda" and dim & (dim - 1) == 0 and _triton()
            and _checked(device, dtype, cache_dtype, heads, kv_heads, dim))


@functools.cache
def _checked(device, dtype, cache_dtype, heads: int, kv_heads: int, dim: int) -> bool:
    """Run the kernel on random slots of 1 to 300 tokens and compare with sdpa; on any failure or mismatch log why
    and answer False, so decode steps take torch's FlashAttention (or sdpa, for an fp8 cache) instead of failing."""
    import torch

    try:
        g = torch.Generator(device=device).manual_seed(0)
        used = torch.tensor([1, 37, 300, 64], dtype=torch.int32, device=device)
        starts = torch.tensor([0, 1, 38, 338, 402], dtype=torch.int32, device=device)
        k, v = (torch.randn(402, kv_heads, dim, generator=g, device=device).to(cache_dtype) for _ in range(2))
        q = torch.randn(4, heads, dim, generator=g, device=device, dtype=dtype)
        out = attend(q, k, v, starts, used)
        worst = 0.0 if bool(torch.isfinite(out).all()) else float("inf")
        for j in range(4):
            a, n = int(starts[j]), int(used[j])
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[j][:, None].float(), k[a:a + n].transpose(0, 1).float(), v[a:a + n].transpose(0, 1).float(),
                enable_gqa=heads != kv_heads)[:, 0]
            worst = max(worst, float((out[j].float() - ref).abs().max()))
        if worst < 0.02:
            return True
        log.warning("llmft's decode attention kernel is off by %.3g against sdpa here: using torch's kernels", worst)
    except Exception as e:  # noqa: BLE001 - any failure to compile or run: torch's kernels still work
        log.warning("llmft's decode attention kernel does not run here (%s: %s): using torch's kernels",
                    type(e).__name__, str(e)[:300])
    return False


@functools.cache
def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode(Q, K, V, Out, starts, used, scale, stride_qb, stride_qh, stride_kt, stride_kh, stride_ob, stride_oh,
               GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        start, n = tl.load(starts + b).to(tl.int64), tl.load(used + b)  # int64: token x stride passes 2**31
        d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
        kv = h // GROUP  # the key/value head this query head reads
        m = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for s in range(0, n, BLOCK_N):
            offs = s + tl.arange(0, BLOCK_N)
            inside = offs < n
            at = (start + offs)[:, None] * stride_kt + kv * stride_kh + d[None, :]
            k = tl.load(K + at, mask=inside[:, None], other=0.0).to(tl.float32)
            v = tl.load(V + at, mask=inside[:, None], other=0.0).to(tl.float32)  # issued with k's: both in flight
            scores = tl.where(inside, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)
            total = total * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        tl.store(Out + b * stride_ob + h * stride_oh + d, (acc / total).to(Out.dtype.element_ty))

    return decode


def attend(q, k_cache, v_cache, starts, used, scale: float | None = None, block: int | None = None,
           warps: int | None = None):
    """q [slots, H, D]; k_cache, v_cache [cache tokens, KV heads, D] (slots end to end; q's dtype or fp8); slot j
    reads tokens starts[j] .. starts[j] + used[j] - 1. Returns [slots, H, D] in q's dtype. No host sync: CUDA graphs
    record it. `block`, `warps`: BLOCK_N and WARPS unless given."""
    import torch

    q = q.contiguous()
    rows, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty_like(q)
    scale = dim ** -0.5 if scale is None else scale
    _kernel()[(rows, heads)](q, k_cache, v_cache, out, starts, used, scale, q.stride(0), q.stride(1),
                             k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
                             GROUP=heads // kv_heads, D=dim, BLOCK_N=block or BLOCK_N, num_warps=warps or WARPS)
    return out
