"""`train.use_liger_kernel`: Liger's fused Triton kernels in the decoder layers (RMSNorm, SwiGLU, RoPE).

transformers patches them in (TrainingArguments.use_liger_kernel); `train.liger_kernels` picks them by name. The loss
is TRL's fused LM head either way (TRL turns Liger's fused linear cross-entropy off). Liger's RoPE dispatcher runs
under torch.compiler.disable, a graph break in every layer: under train.compile_regions it is off unless named, and
inductor fuses the rotation into its neighbours instead. Inside compiled layers inductor's own norms and SwiGLU measured
faster than Liger's (benchmarks/README.md), which is why the 7B config names them off.
"""
from __future__ import annotations

from . import Check, Switch

KERNELS = ("rope", "rms_norm", "swiglu")


class Liger(Switch):
    name = "use_liger_kernel"

    def checks(self, tc) -> Check:
        from ..config import one_of  # config imports this package only when it checks a train block

        if tc.liger_kernels:
            yield "liger_kernels", tc.use_liger_kernel, "needs train.use_liger_kernel=true"
            for name in tc.liger_kernels:
                yield ("liger_kernels", *one_of(name, KERNELS, "Liger kernel"))

    def trainer_args(self, cfg) -> dict:
        tc = cfg.train
        chosen = {"rope": False} if tc.compile_regions else {}
        return {"use_liger_kernel": True, "liger_kernel_config": {**chosen, **tc.liger_kernels} or None}
