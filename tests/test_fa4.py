"""llmft/fa4.py on this CPU: the custom ops around FlashAttention-4's varlen kernels, eager and compiled.

FA4 needs a Hopper or Blackwell GPU, so `Reference` stands in for its module here: the same two entry points, the same
layouts (out [T, H, D], lse [H, T] in float32, five values back from the forward), and a backward that works from the
saved output and log-sum-exp as FlashAttention's does, so that the ops must hand it the right tensors. On the GPU,
`python benchmarks/bench.py loss` compares the stage's curves with the real kernels against flex attention's.
"""
from __future__ import annotations

import sys

import pytest
import torch

from helpers import packed, varlen_reference
from llmft.speed import fa4, varlen
from llmft.errors import LlmftError


def _documents(cu):
    return zip(cu[:-1].tolist(), cu[1:].tolist())


def _scores(q, k, scale):
    """[H, n, n] causal scores of one document, key/value heads shared by groups of query heads."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    return s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))


class Reference:
    """flash_attn.cute.interface's two entry points, for causal self-attention within each document."""

    @staticmethod
    def _flash_attn_fwd(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                        return_lse):
        assert causal and return_lse and torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
        out, lse = q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
        for a, b in _documents(cu_seqlens_q):
            s = _scores(q[a:b], k[a:b], softmax_scale)
            lse[:, a:b] = s.logsumexp(-1)
            vv = v[a:b].repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            out[a:b] = torch.einsum("hij,jhd->ihd", s.softmax(-1), vv)
        return out, lse, None, None, None

    @staticmethod
    def _flash_attn_bwd(q, k, v, out, dout, lse, *, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, dq, dk, dv):
        """FlashAttention's backward: P from the saved lse, D = rowsum(dO * O) from the saved output."""
        g = q.shape[1] // k.shape[1]
        for a, b in _documents(cu_seqlens_q):
            p = (_scores(q[a:b], k[a:b], softmax_scale) - lse[:, a:b, None]).exp()  # [H, n, n]
            do, vv = dout[a:b], v[a:b].repeat_interleave(g, dim=1)
            ds = p * (torch.einsum("ihd,jhd->hij", do, vv) - (do * out[a:b]).sum(-1).T[:, :, None])
            dq[a:b] = torch.einsum("hij,jhd->ihd", ds, k[a:b].repeat_interleave(g, dim=1)) * softmax_scale
            dk_, dv_ = (torch.einsum("hij,ihd->jhd", x, y) for x, y in ((ds * softmax_scale, q[a:b]), (p, do)))
            dk[a:b], dv[a:b] = (t.unflatten(1, (k.shape[1], g)).sum(2) for t in (dk_, dv_))
        return dq, dk, dv


def through(attend, q, k, v, cu, lengths):
    """Output [1, T, H, D] and the q/k/v gradients of a fixed weighting of it."""
    out = attend(q, k, v, cu, max(lengths))
    w = torch.linspace(-1, 1, out.numel()).view(out.shape)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    return out.detach(), grads


def by_sdpa(q, k, v, cu, max_len):
    """helpers.varlen_reference: each document alone through sdpa, query head h reading key/value head h // 3."""
    q1, k1, v1 = (t[0].transpose(0, 1) for t in (q, k, v))
    return varlen_reference(q1, k1, v1, cu, cu, max_len, max_len, scale=0.3, enable_gqa=True).unsqueeze(0)


def by_fa4(q, k, v, cu, max_len):
    return varlen.attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=max_len,
                            impl="varlen_fa4")[0]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fa4_ops_give_each_documents_attention_and_its_gradients(monkeypatch, compiled):
    """The ops pass FA4 the boundaries, the scale and the grouped heads as they are, save what its backward reads, and
    under torch.compile their fake versions agree with what the kernels return."""
    monkeypatch.setattr(fa4, "interface", lambda: Reference)
    monkeypatch.setitem(varlen.KERNELS, "varlen_fa4", (fa4.varlen_attn, True))
    lengths = [5, 1, 9, 3]
    q, k, v, cu = packed(lengths, heads=6, kv_heads=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    want_out, want_grads = through(by_sdpa, q, k, v, cu, lengths)
    torch._dynamo.reset()
    attend = torch.compile(by_fa4, fullgraph=True) if compiled else by_fa4
    # no compiled graph from an earlier run: inductor's on-disk caches do not key on the ops' Python bodies
    with torch._inductor.config.patch(force_disable_caches=True):
        out, grads = through(attend, q, k, v, cu, lengths)
    assert out.shape == (1, sum(lengths), 6, 8)
    assert torch.allclose(out, want_out, atol=1e-5)
    for name, got, want in zip("qkv", grads, want_grads):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), name


def test_without_flash_attn_4_or_a_hopper_gpu_it_says_what_to_install_or_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # None in sys.modules: the import fails
    with pytest.raises(LlmftError, match=r"needs FlashAttention-4 .*pip install flash-attn-4.*or use .*=varlen"):
        fa4.interface()
    monkeypatch.delitem(varlen.KERNELS, "varlen_fa4", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(LlmftError, match="needs a Hopper or Blackwell GPU .*use train.attn_implementation=varlen"):
            varlen.register("varlen_fa4")
