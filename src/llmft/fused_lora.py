"""`train.fused_lora`: each LoRA projection adds its low-rank product inside a GEMM, and scales on the rank-r side.

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling` as written. At 7B that costs passes over full-size tensors
([tokens, 4096] or [tokens, 11008]) that carry no extra math: lora_B writes its own output, a pointwise kernel reads
it and the base output and writes the sum, and in the backward another one scales the whole incoming gradient by
`scaling` before lora_B's two GEMMs read it. Here the forward is one `addmm`: the base output is the GEMM's C input,
read once in its epilogue. The backward multiplies the incoming gradient as it is and applies `scaling` to the
rank-r results ([tokens, r], [out, r]), which are 256-700 times smaller. The adapters are cast to the activations'
dtype once per call (what autocast did to them anyway), not the activations to the adapters' fp32.

Only plain LoRA is converted: one active adapter, no dropout (train.lora.dropout=0, which config checks), no DoRA,
no LoRA bias. The base layer is called as it is, so this composes with train.fp8's FP8 base projections. The math is
the same; the sums are rounded once instead of twice (addmm accumulates in fp32).
"""
from __future__ import annotations

import torch


class _LoraAdd(torch.autograd.Function):
    """base_out + scaling * (x A^T) B^T, the last product accumulated into base_out by addmm."""

    @staticmethod
    def forward(ctx, base_out, x, a, b, scaling: float):
        dt = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        a_, b_ = a.to(dt), b.to(dt)
        xa = x2 @ a_.t()  # [T, r]
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), xa, b_.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, a_, b_)
        ctx.scaling, ctx.dtypes = scaling, (x.dtype, a.dtype, b.dtype)
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, xa, a_, b_ = ctx.saved_tensors
        s, (x_dt, a_dt, b_dt) = ctx.scaling, ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1])
        gb = (g @ b_) * s  # [T, r]: d(xa), the scaling applied here and not to the full-size gradient
        grad_b = (g.t() @ xa) * s  # [N, r]
        grad_a = gb.t() @ x2  # [r, K]
        grad_x = (gb @ a_).view(*grad.shape[:-1], a_.shape[1])  # summed with the base layer's dx by autograd
        return grad, grad_x.to(x_dt), grad_a.to(a_dt), grad_b.to(b_dt), None


def _forward(self, x, *args, **kwargs):
    """The PEFT layer's forward when it is one plain adapter, PEFT's own otherwise (disabled, merged, mixed batch)."""
    active = self.active_adapters
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(active) != 1 \
            or active[0] not in self.lora_A:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    return _LoraAdd.apply(self.base_layer(x, *args, **kwargs), x, self.lora_A[name].weight,
                          self.lora_B[name].weight, self.scaling[name])


def convertible(model) -> list:
    """PEFT LoRA Linear layers whose adapters are all plain: no dropout, no variant (DoRA), no bias."""
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if type(m) is Linear
            and all(isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values())
            and not m.lora_variant and all(a.bias is None and m.lora_B[k].bias is None for k, a in m.lora_A.items())]


def convert(model) -> tuple[int, int]:
    """Fuse every convertible LoRA layer in place: (converted, LoRA layers in all). State dicts are unchanged."""
    from peft.tuners.lora import Linear

    layers = convertible(model)
    for m in layers:
        m.forward = _forward.__get__(m)
    return len(layers), sum(type(m) is Linear for m in model.modules())
