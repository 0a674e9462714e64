"""`train.fused_lora`: a LoRA projection and its frozen base in one autograd function, the adds inside the GEMMs.

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling` as written. At 7B that costs passes over full-size tensors
([tokens, 4096] or [tokens, 11008]) that carry no extra math: lora_B writes its own output, a pointwise kernel reads
it and the base output and writes the sum; in the backward another one scales the whole incoming gradient by
`scaling` before lora_B's two GEMMs read it, and autograd adds LoRA's input gradient to the base one in a kernel of
its own. Here each sum is a GEMM's C input, accumulated in place in its epilogue:
- bf16 base: the low-rank product (B already scaled) is written first and the base GEMM accumulates onto it, so the
  only extra full-size traffic is the C read of a compute-bound GEMM; the same for the input gradient.
- FP8 base (train.fp8): `torch._scaled_mm` takes no C, so LoRA's GEMMs accumulate onto the base output and onto
  the base input gradient instead.
The backward multiplies the incoming gradient as it is and applies `scaling` to the rank-r results ([tokens, r],
[out, r]), 256-700 times smaller. The adapters are cast to the activations' dtype once per call (what autocast did
to them anyway), not the activations to the adapters' fp32.

Only plain LoRA over a plain frozen `nn.Linear` is converted: one active adapter, no dropout (train.lora.dropout=0,
which config checks), no DoRA, no LoRA bias. The math is the same; the sums are rounded once instead of twice.
"""
from __future__ import annotations

import torch

from . import Check, Switch, fp8


class FusedLoRA(Switch):
    name = "fused_lora"
    fsdp = False  # untested with sharded adapters

    def checks(self, tc) -> Check:
        if tc.fused_lora:  # the fused layer has no dropout, DoRA or bias path; 4-bit base layers are PEFT's others
            yield "fused_lora", tc.lora.dropout == 0, f"needs train.lora.dropout=0 (it is {tc.lora.dropout})"
            yield "fused_lora", not tc.lora.use_dora, "cannot be combined with train.lora.use_dora=true"
            yield "fused_lora", tc.lora.bias == "none", "needs train.lora.bias=none"
            yield "fused_lora", not tc.qlora.enabled, "cannot be combined with train.qlora.enabled=true"

    def after_trainer(self, cfg, trainer) -> str:
        done, total = convert(trainer.model)
        return f"train.fused_lora: {done} of {total} LoRA layers fused"


@torch.library.custom_op("llmft::addmm_", mutates_args=("c",))
def _addmm_compiled(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    c.addmm_(a, b, alpha=alpha)


def _addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """c += alpha * a @ b in place (cuBLAS accumulates into C). torch.compile turns a plain addmm_ into an
    out-of-place addmm, which first copies C into its output: at 7B 233 device-to-device copies, 10 ms a step. A custom
    op that declares its mutation runs in place on the intermediate it is given."""
    if torch.compiler.is_compiling():
        _addmm_compiled(c, a, b, alpha)
    else:
        c.addmm_(a, b, alpha=alpha)
    return c


class _LoraLinear(torch.autograd.Function):
    """x W^T + scaling (x A^T) B^T for a frozen W: bf16 (`w`) or FP8 (`w8`, `w8_t`, `w_scale`, from train.fp8)."""

    @staticmethod
    def forward(ctx, x, w, w8, w8_t, w_scale, a, b, scaling: float):
        dt = x.dtype if w is None else w.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        a_, b_ = a.to(dt), b.to(dt)
        xa = x2 @ a_.t()  # [T, r]
        if w is None:  # FP8 base first, LoRA accumulated onto it
            out = _addmm_(fp8.mm(x2, w8.t(), w_scale, fp8.E4M3), xa, b_.t(), scaling)
        else:  # LoRA first (B scaled: [N, r]), the compute-bound base GEMM accumulates onto it
            out = _addmm_(xa @ (b_.t() * scaling), x2, w.t())
        ctx.save_for_backward(x2, xa, a_, b_, w, w8_t, w_scale)
        ctx.scaling, ctx.dtypes = scaling, (x.dtype, a.dtype, b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, xa, a_, b_, w, w8_t, w_scale = ctx.saved_tensors
        s, (x_dt, a_dt, b_dt) = ctx.scaling, ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gb = (g @ b_) * s  # [T, r]: d(xa), the scaling applied here and not to the full-size gradient
        grad_b = (g.t() @ xa) * s  # [N, r]
        grad_a = gb.t() @ x2  # [r, K]
        if w is None:
            grad_x = _addmm_(fp8.mm(g, w8_t.t(), w_scale, fp8.E5M2), gb, a_)
        else:
            grad_x = _addmm_(gb @ a_, g, w)
        grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(x_dt)
        return grad_x, None, None, None, None, grad_a.to(a_dt), grad_b.to(b_dt), None


def _forward(self, x, *args, **kwargs):
    """The PEFT layer's forward when it is one plain adapter, PEFT's own otherwise (disabled, merged, mixed batch)."""
    active = self.active_adapters
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(active) != 1 \
            or active[0] not in self.lora_A or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    name, base = active[0], self.base_layer
    w8 = fp8.weights(base)
    out = _LoraLinear.apply(x, None if w8 else base.weight, *(w8 or (None, None, None)),
                            self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
    return out if base.bias is None else out + base.bias


def convertible(model) -> list:
    """PEFT LoRA Linear layers over a frozen nn.Linear whose adapters are all plain: no dropout, no variant (DoRA),
    no bias."""
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if type(m) is Linear and type(m.base_layer) is torch.nn.Linear
            and not m.base_layer.weight.requires_grad
            and all(isinstance(d, torch.nn.Identity) for d in m.lora_dropout.values())
            and not m.lora_variant and all(a.bias is None and m.lora_B[k].bias is None for k, a in m.lora_A.items())]


def convert(model) -> tuple[int, int]:
    """Fuse every convertible LoRA layer in place: (converted, LoRA layers in all). State dicts are unchanged.
    After train.fp8's conversion, the fused layers multiply their base in FP8."""
    from peft.tuners.lora import Linear

    layers = convertible(model)
    for m in layers:
        m.forward = _forward.__get__(m)
    return len(layers), sum(type(m) is Linear for m in model.modules())
