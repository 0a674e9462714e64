"""`train.fp8`: the frozen base projections multiply in FP8, forward and input gradient; everything else as before.

LoRA's A and B, norms, attention, lm_head, the loss and the optimizer keep their dtypes. Scaling is per tensor
and dynamic, torchao's "tensorwise" float8 recipe: an activation is cast to E4M3 and an incoming gradient to
E5M2 (wider range, less precision), each scaled by its own absolute maximum at every call. The weights are frozen,
so they are cast once, and kept twice (W and its transpose): the FP8 GEMM (`torch._scaled_mm`) wants its second
operand column-major, and the backward multiplies by W where the forward multiplies by W^T. torchao's Float8Linear
is not used because it also computes a weight gradient, a third of the GEMM FLOPs, for weights that take none.
"""
from __future__ import annotations

import os

import torch

from . import Check, Switch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class FP8(Switch):
    name = "fp8"
    fsdp = False  # each process would cast and keep the whole base in FP8

    def checks(self, tc) -> Check:
        # a 4-bit base has no bf16 nn.Linear to cast, and QLoRA already cut the base's bytes more than FP8 would
        yield "fp8", not (tc.fp8 and tc.qlora.enabled), "cannot be combined with train.qlora.enabled=true"

    def before_model_load(self, cfg) -> None:
        check_device()  # a GPU without FP8 matmuls fails in a second, not after minutes of loading

    def after_trainer(self, cfg, trainer) -> str:
        # One process holds the only copy and saves only the adapter; DDP broadcasts every parameter at wrapping
        done, released = convert(trainer.model, release=int(os.environ.get("WORLD_SIZE", "1")) == 1)
        return (f"train.fp8: {done} frozen projections multiply in FP8"
                + (f"; their bf16 weights released ({released / 2**30:.1f} GiB)" if released else ""))


def _cast(t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale in `dtype`, scale), scale = amax / the dtype's largest value, as float32 (what _scaled_mm takes).
    The amax is taken row by row first, the same maximum: inductor compiled the one-step reduction over a whole
    [8192, 11008] activation at under 1 TB/s (41 ms of amax a 7B step; 342 against 91 us row by row,
    measured with a micro-benchmark since retired; git history keeps it)."""
    scale = t.abs().amax(dim=-1).amax().float().clamp(min=1e-12) / torch.finfo(dtype).max
    return (t.float() / scale).to(dtype), scale


def mm(a: torch.Tensor, b8: torch.Tensor, b_scale: torch.Tensor, a_dtype) -> torch.Tensor:
    """a @ b in FP8, `a` (any leading dims) cast now, `b8` already cast (column-major). _scaled_mm needs K and N
    divisible by 16 (convertible() checks), not the row count: padding rows to 16 would put a branch on the token
    count into the compiled graph, and each batch that first flips it would recompile (34 s on the H200)."""
    a8, a_scale = _cast(a.reshape(-1, a.shape[-1]), a_dtype)
    out = torch._scaled_mm(a8, b8, scale_a=a_scale, scale_b=b_scale, out_dtype=a.dtype)
    return out.reshape(*a.shape[:-1], b8.shape[1])


class _FrozenFP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, w8_t, w_scale):
        ctx.save_for_backward(w8_t, w_scale)
        return mm(x, w8.t(), w_scale, E4M3)

    @staticmethod
    def backward(ctx, grad):
        w8_t, w_scale = ctx.saved_tensors
        return mm(grad, w8_t.t(), w_scale, E5M2), None, None, None


def _forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = _FrozenFP8Linear.apply(x, *layer.fp8)
    return y if layer.bias is None else y + layer.bias


def weights(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(W in FP8, its transpose, the scale) of a layer `convert` made multiply in FP8, else None (fused_lora reads
    them to run the base GEMM inside its own)."""
    return getattr(layer, "fp8", None)


def convertible(model) -> list[tuple[str, torch.nn.Linear]]:
    """The frozen linear layers to convert: every nn.Linear without a trainable weight, both sides divisible by 16,
    except the output embedding (the logits and the loss stay in full precision)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, m) for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and m is not head and not m.weight.requires_grad
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def convert(model, release: bool = False) -> tuple[int, int]:
    """Make the frozen projections multiply in FP8 (in place): (layers converted, bytes of bf16 weight released).

    The FP8 copies are plain attributes, not in state_dict. With `release`, the memory of each converted layer's
    bf16 weight is given back (its storage resized to 0; shape and dtype stay, so parameter counts and state_dict
    keys are unchanged): at 7B, 12.1 GiB, as much as the two FP8 copies take. Only for a process that trains and saves
    the adapter alone, as the train stage does (evaluate and merge load the base again from disk): nothing can read
    those weights afterwards. A weight whose storage is shared with another tensor, or memory-mapped from the
    checkpoint (CPU runs), is kept."""
    layers = convertible(model)
    released = 0
    for _, m in layers:
        with torch.no_grad():
            w8, scale = _cast(m.weight, E4M3)
        m.fp8 = (w8, w8.t().contiguous(), scale)
        m.forward = _forward.__get__(m)
        storage = m.weight.untyped_storage()
        if release and storage.resizable() and storage.nbytes() == m.weight.numel() * m.weight.element_size():
            released += storage.nbytes()
            storage.resize_(0)
    return len(layers), released


def check_device() -> None:
    """FP8 GEMMs need compute capability 8.9 or newer (Ada, Hopper, Blackwell); CPUs run them slowly (tests)."""
    from ..errors import LlmftError

    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        raise LlmftError(f"train.fp8=true needs a GPU with FP8 matmuls (compute capability 8.9+: L4, L40S, H100, H200); "
                         f"this {name} is {cap[0]}.{cap[1]}. Set train.fp8=false.")
