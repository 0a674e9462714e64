"""llmft/varlen.py on this CPU: the layout and head grouping around torch's FlashAttention varlen kernels.

The kernels need CUDA, so `reference` stands in for them here: torch's varlen_attn signature, causal attention within
each document through sdpa. On the GPU, `python benchmarks/bench.py loss` compares the stage's curves with the real
kernels against flex attention's. The stage's own wiring is in test_train.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import packed, varlen_reference
from llmft.speed import varlen
from llmft.errors import LlmftError


@pytest.mark.parametrize("takes_gqa", [True, False], ids=["kernel-groups-heads", "heads-repeated"])
def test_each_document_attends_to_itself_whatever_the_head_grouping(monkeypatch, takes_gqa):
    lengths = [5, 1, 9, 3]
    q, k, v, cu = packed(lengths, heads=6, kv_heads=2)
    monkeypatch.setitem(varlen.KERNELS, "varlen", (varlen_reference, takes_gqa))
    out, weights = varlen.attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=max(lengths))
    assert out.shape == (1, sum(lengths), 6, 8) and weights is None  # [1, T, H, D], as transformers' own return
    # each document alone, query head h reading key/value head h // 3 (transformers' repeat_kv), scale passed on
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        kk, vv = (t[:, :, s].repeat_interleave(3, dim=1) for t in (k, v))
        alone = F.scaled_dot_product_attention(q[:, :, s], kk, vv, is_causal=True, scale=0.3).transpose(1, 2)
        assert torch.allclose(out[:, s], alone, atol=1e-6)
        start += n


def test_without_the_boundaries_or_a_gpu_it_says_what_to_set(monkeypatch):
    q, k, v, cu = packed([4, 4], heads=2, kv_heads=2)
    monkeypatch.setitem(varlen.KERNELS, "varlen", (varlen_reference, True))
    with pytest.raises(LlmftError, match="set train.packing=true"):
        varlen.attention(None, q, k, v, None)
    monkeypatch.delitem(varlen.KERNELS, "varlen")
    if not torch.cuda.is_available():
        with pytest.raises(LlmftError, match="need a CUDA GPU: use flex_attention or sdpa"):
            varlen.register()


def test_each_registered_name_runs_its_own_kernel_in_one_process(monkeypatch):
    """llmft tune trains its trials in one process: a trial with varlen_fa4 after one with varlen (or the reverse)
    must get FA4's kernel, through transformers' own table of attention functions."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []

    def kernel(tag):
        def run(q, k, v, *args, **kw):
            calls.append(tag)
            return varlen_reference(q, k, v, *args, **kw)
        return run

    monkeypatch.setattr(varlen, "KERNELS", {})
    monkeypatch.setattr(varlen, "_torch_kernel", lambda: (kernel("torch"), True))
    monkeypatch.setattr(varlen, "_fa4_kernel", lambda: (kernel("fa4"), True))
    q, k, v, cu = packed([3, 4], heads=2, kv_heads=2)
    for name in ("varlen", "varlen_fa4", "varlen"):
        varlen.register(name)
        ALL_ATTENTION_FUNCTIONS[name](None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=4)
    assert calls == ["torch", "fa4", "torch"]
