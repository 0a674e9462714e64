"""train.attn_implementation=varlen_fa4: the packed documents' attention through FlashAttention-4's kernels.

torch's varlen kernels (train.attn_implementation=varlen) are FlashAttention-2's, written for Ampere. FlashAttention-4
(the flash-attn-4 package, `flash_attn.cute`) has Hopper and Blackwell kernels for the same variable-length, causal
attention, written in CUTLASS's CuTe DSL and compiled on first use. The boundaries and the layout are varlen's
(llmft/speed/varlen.py); only the kernel differs, and FA4 takes fewer key/value heads than query heads as they are.

The two kernels are torch custom ops, forward and backward, so torch.compile keeps each one call, as it does torch's
own varlen op; their fake versions give it the output shapes. torch >= 2.10 can also send its own flash ops to FA4
(`torch.nn.attention.activate_flash_attention_impl("FA4")`), but that bridge (read in torch 2.13) unpacks two values
from FA4's forward, and flash-attn-4 4.0.0b40's returns five: llmft calls FA4's functions itself.
"""
from __future__ import annotations

import torch

from ..errors import LlmftError

INSTALL = "pip install flash-attn-4==4.0.0b40 'nvidia-cutlass-dsl[cu13]==4.8.1' (tested with torch 2.11 + CUDA 13)"


def interface():
    """FA4's module of entry points: `_flash_attn_fwd` and `_flash_attn_bwd`, which the ops below call."""
    try:
        from flash_attn.cute import interface as fa4
    except ImportError as e:
        raise LlmftError(f"train.attn_implementation=varlen_fa4 needs FlashAttention-4 ({e}): {INSTALL}; or use "
                         "train.attn_implementation=varlen, torch's own kernels") from e
    return fa4


def check_gpu() -> None:
    """Fail before the model loads, saying what to use instead, where FA4's kernels cannot run."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10, 11):
        raise LlmftError("train.attn_implementation=varlen_fa4 runs FlashAttention-4, which needs a Hopper or Blackwell "
                         "GPU (compute capability 9.x-11.x): use train.attn_implementation=varlen on other GPUs")
    interface()


@torch.library.custom_op("llmft::fa4_varlen_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = interface()._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                           max_seqlen_k=max_len, softmax_scale=scale, causal=True,
                                           return_lse=True)[:2]
    return out, lse


@_fwd.register_fake
def _(q, k, v, cu, max_len, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("llmft::fa4_varlen_bwd", mutates_args=())
def _bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
         cu: torch.Tensor, max_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # contiguous gradients whatever the inputs' strides (FA4 would copy q's layout), so that they match the fakes
    dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))
    interface()._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True, cu_seqlens_q=cu,
                                cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


@_bwd.register_fake
def _(dout, q, k, v, out, lse, cu, max_len, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx, inputs, output):
    q, k, v, cu, ctx.max_len, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output, cu)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    return (*_bwd(dout, q, k, v, out, lse, cu, ctx.max_len, ctx.scale), None, None, None)


_fwd.register_autograd(_backward, setup_context=_save)


def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, enable_gqa=True):
    """torch's varlen_attn call, causal, as llmft/speed/varlen.py makes it: [T, H, D] query, [T, Hkv, D] key/value."""
    assert cu_q is cu_k and max_q == max_k, "self-attention within each document: one set of boundaries"
    return _fwd(q, k, v, cu_q, max_q, q.shape[-1] ** -0.5 if scale is None else scale)[0]
