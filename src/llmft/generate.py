"""Generate answers in batches (the fast path on a GPU), for a model that models.load loaded.

Used in process by `evaluate` and `ask` and inside the served MLflow model, so all produce the same outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from . import slots
from .config import GenerationConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def merged(model):
    """The model's LoRA adapter merged into its base weights for the block, then the base weights put back exactly.

    Unmerged, every decode step runs two small matmuls per adapted layer beside the base one: on an H200 the tuned
    7B answer set took 541 s against the base model's 284 s. Merged, the tuned model decodes as the base does.
    Unmerging alone would not give the base back: (W + BA) - BA in bf16 rounds, and evaluate answers for the base
    with the same weights. So the base weights are copied to host memory first and copied back after; when host
    memory cannot hold twice their size, or the adapter is disabled, already merged or not over plain linear layers,
    the block runs unmerged."""
    import psutil
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    bases = [m.get_base_layer() for m in layers]
    size = sum(b.weight.numel() * b.weight.element_size() for b in bases)
    if (not layers or any(m.disable_adapters or m.merged for m in layers)
            or any(type(b) is not torch.nn.Linear for b in bases) or psutil.virtual_memory().available < 2 * size):
        yield model
        return
    saved = [b.weight.detach().to("cpu", copy=True) for b in bases]
    model.base_model.merge_adapter()
    try:
        yield model
    finally:
        model.base_model.unmerge_adapter()
        with torch.no_grad():
            for b, w in zip(bases, saved):
                b.weight.copy_(w)


def generate(model, tok, prompts: list[str], gen: GenerationConfig, desc: str = "generating",
             progress: bool = True, seed: int = 0) -> list[str]:
    """Answers to already-templated prompts, in their order; generation stops at EOS or max_new_tokens.
    `gen.fast` picks the path: the slot decoder with refills (GPU default) or plain batches."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    # auto: the fast path on a GPU (which takes the plain one itself where it cannot run: _generate_fast)
    fast = gen.fast if gen.fast != "auto" else device.type == "cuda"
    if not fast and gen.kv_cache != "model":
        log.info("kv_cache %s is the fast path's; plain batches keep the model's dtype", gen.kv_cache)
    # A prompt longer than the model's context (a 1 MB instruction in the test split) asked sdpa for a 40 GB mask
    # and killed evaluate after training. Keep the end of such a prompt (where the template's answer cue is),
    # as much of it as fits with the answer; shorter prompts are untouched.
    context = getattr(model.config, "max_position_embeddings", None)
    limit = max(1, context - gen.max_new_tokens) if context else None
    side, tok.truncation_side = tok.truncation_side, "left"
    tok.padding_side = "left"  # decoder-only batched generation must pad on the left
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")
    try:
        run = _generate_fast if fast else _generate_plain
        return run(model, tok, prompts, gen, limit, seed, bar)
    finally:
        bar.close()
        tok.padding_side, tok.truncation_side = "right", side


def _generate_kwargs(tok, gen: GenerationConfig) -> dict:
    sample = gen.temperature > 0
    kwargs = dict(do_sample=sample, repetition_penalty=gen.repetition_penalty,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _generate_plain(model, tok, prompts, gen, limit, seed, bar) -> list[str]:
    """Batches of `batch_size` in input order, each one `model.generate` call with a dynamic cache."""
    import torch

    kwargs = _generate_kwargs(tok, gen)
    outputs: list[str] = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(prompts), gen.batch_size):
            batch = prompts[i:i + gen.batch_size]
            enc = tok(batch, return_tensors="pt", padding=True, truncation=limit is not None,
                      max_length=limit).to(device)
            torch.manual_seed(seed + i)
            out = model.generate(**enc, max_new_tokens=gen.max_new_tokens, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
            bar.update(len(batch))
    return outputs


def _generate_fast(model, tok, prompts, gen, limit, seed, bar) -> list[str]:
    """The slot decoder (llmft/slots.py) over every prompt, longest first, finished rows refilled from the queue."""
    import torch

    if not prompts:
        return []
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the model it wraps
    why = ("sliding-window attention" if not slots.supported(inner) else
           "repetition_penalty is not 1" if gen.repetition_penalty != 1.0 else None)
    ids = [] if why else tok(prompts, truncation=limit is not None, max_length=limit)["input_ids"]
    why = why or ("a prompt of no tokens" if not all(ids) else None)
    if why:
        log.info("the fast path does not run here (%s); plain batches instead", why)
        return _generate_plain(model, tok, prompts, gen, limit, seed, bar)
    if gen.kv_cache == "fp8" and inner.device.type == "cuda" and not slots.fp8_reads_fast(inner):
        log.info("kv_cache fp8: llmft's Triton decode kernel does not run here; the cache keeps the model's dtype")
        gen = dataclasses.replace(gen, kv_cache="model")
    # longest first: a slot holds its first prompt + max_new_tokens, so every prompt queued after it fits a freed slot
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    rows = batch_rows(model, [len(ids[i]) for i in order], gen)
    caps = [len(ids[i]) + gen.max_new_tokens for i in order[:rows]]
    outputs: list[str] = [""] * len(prompts)
    t0, made = time.perf_counter(), 0
    torch.manual_seed(seed)
    for i, new in slots.Decoder(inner, caps, gen, tok.eos_token_id).run(ids, order):
        outputs[i] = tok.decode(new, skip_special_tokens=True).strip()
        made += len(new)
        bar.update(1)
    log.debug("slots: %d prompts in %d slots of %d cache tokens, %d new tokens in %.1f s", len(ids), rows, sum(caps),
              made, time.perf_counter() - t0)
    return outputs


def kv_bytes(model, gen: GenerationConfig) -> int:
    """KV-cache bytes per token: 2 (K and V) x layers x KV heads x head dim x the cache dtype's bytes."""
    layers, kv_heads, head_dim = slots.kv_shape(model)
    return 2 * layers * kv_heads * head_dim * slots.cache_dtype(gen, next(model.parameters()).dtype).itemsize


def batch_rows(model, lengths: list[int], gen: GenerationConfig, cap: int = 512) -> int:
    """Slots for prompts of these lengths, longest first: `fast_batch_size`, else as many of the longest as free GPU
    memory holds (each slot's KV cache: `kv_bytes` x (its prompt + max_new_tokens)), evened out over the waves the
    prompts need (450 prompts at 180 slots: 150 slots; `batch_size` on CPU). A prefill reads at most
    slots.PREFILL_TOKENS tokens at once, so its activations (gate, up, their product and a LoRA layer's output:
    6 x intermediate_size per token, plus the attention's projections) are a fixed reserve."""
    import torch

    device = next(model.parameters()).device
    if gen.fast_batch_size or device.type != "cuda":
        return max(1, min(len(lengths), gen.fast_batch_size or gen.batch_size))
    c = model.config.get_text_config(decoder=True)
    size = next(model.parameters()).element_size()
    prefill = slots.PREFILL_TOKENS * (6 * c.intermediate_size + 8 * c.hidden_size) * size
    torch.cuda.empty_cache()  # caches freed but still reserved would count as used
    free, _ = torch.cuda.mem_get_info(device)
    budget = (0.9 * free - prefill - 2 * 2**30) // kv_bytes(model, gen)  # headroom: fragmentation, logits, graph pool
    rows, used = 0, 0
    for n in lengths[:cap]:
        if rows and used + n + gen.max_new_tokens > budget:
            break
        rows, used = rows + 1, used + n + gen.max_new_tokens
    waves = -(-len(lengths) // rows)
    return -(-len(lengths) // waves)
