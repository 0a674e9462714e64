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

TRL's fused LM head waits too: it scores only the positions with a label, and selecting them (`hidden[mask]`) needs
their count on the CPU. The collator knows them already, on the CPU, where it builds the batch (`LabelIndex`): the
model's forward selects the same rows by those indices (`index_select`) and hands them to the same TRL kernel. So the
CPU no longer stops at every step's forward; it stays ahead of the GPU into the next step (benchmarks/README.md,
seventh session). Models whose LM head TRL scales or caps, and FSDP's sharded heads, keep TRL's path.
"""
from __future__ import annotations

import functools
import types

import torch
from trl import SFTTrainer

LABEL_INDEX = "label_index"
# the LM head settings TRL applies that the indexed path leaves out: a model with any of them keeps TRL's path
_SCALED_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class OverlapSFTTrainer(SFTTrainer):
    _pending_tokens: torch.Tensor | None = None
    indexed_head = True
    """Score the labelled positions by the collator's indices; benchmarks/head_sync.py turns it off to time the wait."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._head_indexed = not self.is_fsdp_enabled and _install_indexed_head(base)
        if self._head_indexed:
            self.data_collator = LabelIndex(self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop(LABEL_INDEX, None)
        pc = getattr(self.accelerator, "parallelism_config", None)
        if (not model.training or return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                or self.aux_loss_enabled or self.args.loss_type != "nll" or getattr(pc, "sp_enabled", False)
                or "shift_labels" in inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # SFTTrainer.compute_loss's plain branch (trl 1.16), without the metric reads that follow it
        inputs["use_cache"] = False
        if index is not None and self.indexed_head:
            log_probs = model(**inputs, fused_lm_head=True, label_index=index)
            num_tokens = index.numel() if num_items_in_batch is None else num_items_in_batch
        else:
            outputs = model(**inputs, fused_lm_head=True)
            log_probs = outputs.log_probs
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
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


class LabelIndex:
    """The collator's batches plus `label_index`: where the labels to score sit among the flattened shifted positions
    (row-major, as `hidden[:, :-1][labels[:, 1:] != -100]` takes them), found on the CPU; copied with the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if "labels" in batch and "shift_labels" not in batch:
            batch[LABEL_INDEX] = (batch["labels"][:, 1:] != -100).reshape(-1).nonzero().squeeze(1)
        return batch

    def __getattr__(self, name):
        if name == "collator":  # unpickled in a dataloader worker, before __dict__ is back: no recursion
            raise AttributeError(name)
        return getattr(self.collator, name)


def _install_indexed_head(model) -> bool:
    """Wrap the forward TRL's add_fused_lm_head gave `model`: with `label_index`, the backbone's output rows at those
    indices go through TRL's own chunked log-prob kernel, and the per-label log-probabilities come back. False (and
    nothing changed) for a model whose LM head TRL scales or caps."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    config = model.config.get_text_config()
    if any(getattr(config, name, None) is not None for name in _SCALED_HEAD):
        return False
    # TRL's function, not its method bound to `model`: accelerate's compile_regions copies the model into a new object
    # and rebinds its methods to it, and a bound `model` here would run the original, uncompiled layers
    fused = model.forward.__func__

    @functools.wraps(fused)
    def forward(self, *args, label_index=None, **kwargs):
        if label_index is None:
            return fused(self, *args, **kwargs)
        labels = kwargs.pop("labels")
        kwargs.pop("fused_lm_head", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        head = self.get_output_embeddings()
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, label_index)
        targets = labels[:, 1:].reshape(-1).index_select(0, label_index)
        return ChunkedLogProbFunction.apply(rows, head.weight, head.bias, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                            None, 1.0, ("log_probs",))[0]

    model.forward = types.MethodType(forward, model)
    return True


def trainer_args() -> dict:
    """What the SFTConfig needs for it: batches copied from (the Trainer's default) pinned memory without blocking."""
    return {"accelerator_config": {"non_blocking": True}}
