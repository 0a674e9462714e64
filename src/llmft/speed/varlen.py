"""train.attn_implementation=varlen (or varlen_fa4): packed rows attend through FlashAttention's varlen kernels.

Flex attention masks a packed row in 128 x 128 blocks. Dolly's documents are short (about 200 tokens), so most of
every block it computes is masked out. FlashAttention's varlen kernels take each document's boundaries and compute
only its causal triangle. TRL's padding-free collator already computes those boundaries on the CPU (`cu_seq_lens_q`,
`max_length_q`), and transformers passes them down to the attention function as keyword arguments. torch ships the
kernels, forward and backward (`torch.nn.attention.varlen`, torch >= 2.10), so no flash-attn package is needed.
`varlen_fa4` runs FlashAttention-4's Hopper/Blackwell kernels on the same boundaries instead (llmft/speed/fa4.py).

Registered with transformers' AttentionInterface under its name; no mask function is registered, so transformers builds
no mask for it. Padding-free packing only: one flat row, positions restarting at every document.
"""
from __future__ import annotations

import functools
import inspect
import math

from ..config import VARLEN
from ..errors import LlmftError
from . import Check, Switch


class Varlen(Switch):
    """train.attn_implementation=varlen or varlen_fa4."""

    name = "attn_implementation"

    def on(self, tc) -> bool:
        return tc.attn_implementation in VARLEN

    def checks(self, tc) -> Check:
        a = tc.attn_implementation
        if a in VARLEN:  # the documents' boundaries come from the padding-free collator
            yield "attn_implementation", tc.packing, f"{a} needs train.packing=true"

    def before_model_load(self, cfg) -> None:
        register(cfg.train.attn_implementation)  # transformers must know the name before it loads the model

KERNELS: dict[str, tuple] = {}
"""name -> (causal varlen attention, whether it takes fewer key/value heads than query heads): torch's for varlen,
FA4's for varlen_fa4, filled by register()."""


def register(name: str = "varlen") -> None:
    """Make `name` (one of config.VARLEN) an attention implementation transformers can load a model with. Fails at once
    without a GPU that runs its kernels, or without FlashAttention-4 for varlen_fa4."""
    from transformers import AttentionInterface

    if name not in KERNELS:
        KERNELS[name] = _torch_kernel() if name == "varlen" else _fa4_kernel()
    AttentionInterface.register(name, functools.partial(attention, impl=name))


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              cu_seq_lens_q=None, max_length_q=None, impl: str = "varlen", **kwargs):
    """transformers' attention signature: query [1, H, T, D], key/value [1, Hkv, T, D]; returns ([1, T, H, D], None).
    `impl` names the registered kernel, a key of KERNELS (register() binds it)."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise LlmftError("train.attn_implementation=varlen(_fa4) needs the documents' boundaries (cu_seq_lens_q, "
                         "max_length_q) that TRL's padding-free collator adds: set train.packing=true")
    if query.shape[0] != 1:
        raise LlmftError(f"train.attn_implementation=varlen(_fa4) takes one packed row per batch, got {query.shape[0]}")
    if dropout:
        raise LlmftError("train.attn_implementation=varlen(_fa4) has no attention dropout")
    kernel, gqa = KERNELS[impl]
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and not gqa:  # torch 2.10/2.11's varlen_attn wants as many key/value heads as query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # [1, H, T, D] -> [T, H, D]: a view of the projections' own [T, H*D] layout (the kernels need only the head
    # dimension contiguous)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    extra = {"enable_gqa": True} if groups > 1 and gqa else {}
    if scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5):  # torch 2.10 has no `scale`
        extra["scale"] = scaling
    out = kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **extra)
    return out.unsqueeze(0), None


def _torch_kernel():
    """torch 2.10 spells causality `is_causal=True`; 2.12 and later spell it `window_size=(-1, 0)`."""
    import torch

    if not torch.cuda.is_available():
        raise LlmftError("train.attn_implementation=varlen runs torch's FlashAttention kernels, which need a CUDA GPU: "
                         "use flex_attention or sdpa on this machine")
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return functools.partial(varlen_attn, **causal), "enable_gqa" in params


def _fa4_kernel():
    from . import fa4

    fa4.check_gpu()
    return fa4.varlen_attn, True
