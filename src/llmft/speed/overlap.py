"""`train.overlap_steps`: the CPU queues the next training step's work while the GPU is still on this one.

TRL's SFTTrainer makes the CPU wait for the GPU several times per step, and whatever the CPU does next (launching
gradient clipping and AdamW over every LoRA tensor, loading and copying the next batch, launching the next forward)
then runs with the GPU idle: 78 ms of a 536 ms step in the 7B profile (benchmarks/README.md). The waits:
- `SFTTrainer.compute_loss` reads its entropy, token-accuracy and token-count metrics with `.item()` between the
  forward and the backward;
- `Trainer._track_num_input_tokens` reads the batch's token count with `.item()` after the backward;
- the batch is copied to the GPU with a blocking copy.
This trainer computes the same loss the same way (TRL's fused LM head, the lines of its plain branch) but leaves out
the per-step training metrics llmft never logs (entropy, mean_token_accuracy, num_tokens); evaluation keeps them.
It adds the token counts up on the GPU and reads them where the loop waits anyway (`flush_tokens`: LossCurve calls
it at logging, evaluation, checkpoint and last steps); and it copies batches from pinned memory without blocking.
The same kernels run in the same order: the math does not change.

One wait stays, inside TRL's fused LM head: it scores only the positions with a label, and selecting them
(`hidden[mask]`) needs their count on the CPU.
"""
from __future__ import annotations

import torch

from . import Switch


class Overlap(Switch):
    name = "overlap_steps"

    def trainer_args(self, cfg) -> dict:
        # batches copied from (the Trainer's default) pinned memory without blocking
        return {"accelerator_config": {"non_blocking": True}}

    def trainer_class(self, cls: type) -> type:
        return type(f"Overlap{cls.__name__}", (OverlapSteps, cls), {})


class OverlapSteps:
    """Mixed in before TRL's SFTTrainer (Overlap.trainer_class): its loss and token count without host waits."""

    _pending_tokens: torch.Tensor | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pc = getattr(self.accelerator, "parallelism_config", None)
        if (not model.training or return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                or self.aux_loss_enabled or self.args.loss_type != "nll" or getattr(pc, "sp_enabled", False)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # SFTTrainer.compute_loss's plain branch (trl 1.16), without the metric reads that follow it
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _track_num_input_tokens(self, inputs):
        """Trainer's count ("non_padding", as llmft asks), kept on the GPU until `flush_tokens`."""
        if self.args.include_num_input_tokens_seen == "no":
            return
        if "attention_mask" in inputs:
            n = inputs["attention_mask"].sum()
        else:
            ids = inputs[getattr(self.model, "main_input_name", "input_ids")]
            pad = getattr(self.processing_class, "pad_token_id", None)
            n = (ids != pad).sum() if pad is not None else torch.tensor(ids.numel(), device=ids.device)
        n = self.accelerator.gather(n.to(torch.int64).reshape(1)).sum()
        self._pending_tokens = n if self._pending_tokens is None else self._pending_tokens + n

    def flush_tokens(self) -> None:
        """Move the GPU-side count into state.num_input_tokens_seen (one host sync)."""
        if self._pending_tokens is not None:
            self.state.num_input_tokens_seen += int(self._pending_tokens.item())
            self._pending_tokens = None
