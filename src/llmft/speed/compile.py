"""`train.torch_compile` (+ `train.compile_regions`): the model compiled by torch.compile, whole or layer by layer.

With compile_regions each decoder layer is compiled on its own (accelerate's regional compilation): the layers share
one compiled graph, so the first step compiles one layer, not 32, and the model runs as a few large graphs.
Embeddings, the loss and the block mask run uncompiled. torch.compile's default mode: the CUDA-graph modes measured
slower at 7B (0.21x) and left (config.REMOVED).
"""
from __future__ import annotations

from . import Check, Switch


class Compile(Switch):
    name = "torch_compile"

    def checks(self, tc) -> Check:
        if tc.compile_regions:
            yield "compile_regions", tc.torch_compile, "needs train.torch_compile=true"

    def trainer_args(self, cfg) -> dict:
        return {"torch_compile": True}

    def after_trainer(self, cfg, trainer) -> str | None:
        # accelerate's dynamo plugin belongs to the process's one AcceleratorState, shared by every Trainer it builds
        # (tune's trials): set for this trainer, whichever way the last one set it
        trainer.accelerator.state.dynamo_plugin.use_regional_compilation = cfg.train.compile_regions
        return None
