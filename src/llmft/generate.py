"""Generate answers in batches (the fast path on a GPU), for a model that models.load loaded.

Used in process by `evaluate` and `ask` and inside the served MLflow model, so all produce the same outputs.
"""
from __future__ import annotations

import contextlib
import logging
import time

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
    `gen.fast` picks the path: bucketed static-cache generation with refills (GPU default) or plain batches."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    # auto: the fast path on a GPU, unless a repetition penalty is set: it would also penalise the pad (= EOS)
    # tokens a row was padded with, by how much it was padded, and part from plain generate
    fast = gen.fast if gen.fast != "auto" else device.type == "cuda" and gen.repetition_penalty == 1.0
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
    """Length-sorted buckets, each decoded with a static cache in rounds that refill finished rows."""
    import torch

    # Dynamo compiles the decode step for the first shape, then once more for each dimension that changed (rows,
    # cache length), marking it dynamic; later shapes reuse that graph (the tiny model on CPU: 3 compiles for 5
    # shapes). The tuned model beside the base is another forward; the raised limit keeps a long evaluate from
    # falling back to eager without a word (10x slower).
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    ids = tok(prompts, truncation=limit is not None, max_length=limit)["input_ids"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = buckets([len(x) for x in ids], gen, lambda n: batch_rows(model, n, gen), weights // kv_bytes(model))
    outputs: list[str] = [""] * len(prompts)
    for cache_len, rows, batch in plan:
        t0, made = time.perf_counter(), 0
        for i, new in _refill(model, tok, ids, rows, batch, cache_len, gen, seed):
            outputs[i] = tok.decode(new, skip_special_tokens=True).strip()
            made += len(new)
            bar.update(1)
        log.debug("bucket of cache length %d: %d prompts in batches of %d, %d new tokens in %.1f s", cache_len,
                  len(rows), batch, made, time.perf_counter() - t0)
    return outputs


def buckets(lengths: list[int], gen: GenerationConfig, rows_for, step_slots: int = 0) -> list[tuple[int, list[int], int]]:
    """(cache length, prompt indices shortest first, batch rows) per bucket. A prompt's length is rounded up to
    a multiple of `bucket_tokens`; the static cache then holds that plus max_new_tokens (`rows_for` gives the most
    rows a batch of that cache length may hold). A bucket that would not fill one batch joins the next longer one,
    unless that would cost its rows more cache reads per decode step than a batch of its own costs in weight
    reads: rows x extra width > `step_slots` (weight bytes / KV-cache bytes per token; 0: always join)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(-(-lengths[i] // gen.bucket_tokens) * gen.bucket_tokens, []).append(i)
    widths = sorted(groups)
    out, carry = [], []
    for width, wider in zip(widths, widths[1:] + [None]):
        carry += groups[width]
        cache_len = width + gen.max_new_tokens
        rows = rows_for(cache_len)
        # a few long prompts joined to the longest bucket made every row of it read a 3,072-token cache (H200)
        alone = wider is not None and step_slots > 0 and len(carry) * (wider - width) > step_slots
        if len(carry) >= rows or wider is None or alone:
            # as many batches as `rows` allows, evened out: 450 prompts at 180 rows are 3 batches of 150, not 180,
            # 180 and 90 padded to 180 (padding rows cost decode steps like real ones)
            batches = -(-len(carry) // rows)
            out.append((cache_len, carry, -(-len(carry) // batches)))
            carry = []
    return out


def _kv_heads(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of the decoder."""
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim


def kv_bytes(model) -> int:
    """KV-cache bytes per token: 2 (K and V) x layers x KV heads x head dim x dtype bytes."""
    layers, kv_heads, head_dim = _kv_heads(model)
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def batch_rows(model, cache_len: int, gen: GenerationConfig, cap: int = 256) -> int:
    """Rows per batch: `fast_batch_size`, else as many as fit in free GPU memory (`batch_size` on CPU).
    A row costs its static KV cache (`kv_bytes` per token) plus room for
    the prefill's MLP activations; the cap keeps one prefill (rows x tokens) from being the memory peak."""
    import torch

    if gen.fast_batch_size:
        return gen.fast_batch_size
    device = next(model.parameters()).device
    if device.type != "cuda":
        return gen.batch_size
    c = model.config.get_text_config(decoder=True)
    # the prefill term: a refill reads rows of up to cache_len tokens at once; gate, up, their product and a LoRA
    # layer's output are live together (at 4 x intermediate_size a tuned 7B at 132 rows x 1280 ran out of memory
    # on an H200, fragmentation included)
    per_token = kv_bytes(model) + 6 * c.intermediate_size * next(model.parameters()).element_size()
    torch.cuda.empty_cache()  # the last bucket's caches, freed but still reserved, would count as used
    free, _ = torch.cuda.mem_get_info(device)
    usable = 0.8 * free - 4 * 2**30  # headroom: allocator fragmentation, logits, compile workspace
    return max(1, min(cap, int(usable // (per_token * cache_len))))


def _refill(model, tok, ids, rows, batch, cache_len, gen, seed):
    """Yield (prompt index, new token ids) as rows finish. Each round generates up to `refill_tokens` for up to
    `batch` rows. After a round, rows that hit EOS or max_new_tokens leave; once an eighth of the slots are free
    and prompts are queued, these take the free slots and the next round reads every row's text so far into a
    fresh cache (one prefill), so short answers stop costing decode steps. Otherwise the rows go on in the same
    cache with no prefill; a finished row's slot idles meanwhile."""
    from collections import deque

    # A refill's prefill of every row's text costs about as much as a hundred decode steps of the batch (7B, 132
    # rows of ~1000 tokens: ~3 s against ~25 ms a step); one free slot in eight idling for the rest of the batch
    # costs about that much, so fewer free slots wait. (On the H200 the rare EOS of a random 7B set off such a
    # prefill of all 132 rows nearly every 256-token round when any free slot refilled.)
    want = max(1, batch // 8)
    queue, slots, state, round_ = deque(rows), [], None, 0  # a slot: [prompt index, new ids], None once finished
    while queue or any(slots):
        # going on in the same cache needs room in it: the tensor is as wide as the longest text at the last fresh
        # start, so rows that start shorter can outlast it; then the live rows start afresh without the finished
        room = cache_len - state[1].shape[1] if state is not None else 0
        free = batch - len(slots) + slots.count(None)
        if room < 1 or (queue and free >= min(want, len(queue))) or not any(slots):
            slots = [s for s in slots if s is not None]
            while queue and len(slots) < batch:
                slots.append([queue.popleft(), []])
            state, room = None, cache_len
        live = [s for s in slots if s is not None]
        # the round stops where the row with least budget left stops, so no row passes max_new_tokens and, from a
        # fresh start, every row's prompt + answer fits the cache (cache_len = bucket + max_new_tokens)
        n = min(gen.refill_tokens, room, min(gen.max_new_tokens - len(new) for _, new in live))
        seqs = [ids[s[0]] + s[1] if s is not None else None for s in slots]
        more, state = _round(model, tok, seqs, n, cache_len, batch, gen, seed + round_, state)
        for j, (s, extra) in enumerate(zip(slots, more)):
            if s is None:
                continue
            done = tok.eos_token_id in extra
            # keep the EOS itself (decode drops it as plain generate's decode does) and nothing after it (padding)
            s[1] += extra[:extra.index(tok.eos_token_id) + 1] if done else extra
            if done or len(s[1]) >= gen.max_new_tokens:
                yield s[0], s[1]
                slots[j] = None
        round_ += 1


def _pads(device) -> bool:
    """Whether rounds pad their batch to a fixed row count: on a GPU, so that a bucket's rounds replay one
    recorded CUDA graph of the compiled step instead of recording one per row count."""
    return device.type == "cuda"


def _round(model, tok, seqs: list, n: int, cache_len: int, batch: int, gen, seed: int, state=None):
    """(up to n new tokens per slot, state to go on from): one `model.generate` on a static cache of `cache_len`
    tokens (transformers compiles the decode step for it on a GPU). Without `state` the cache is fresh and holds
    `seqs`, padded to `batch` rows with copies of the first so every round of the bucket has one shape and reuses
    the compiled step; with it, generation goes on from the last round's cache and tokens (`seqs` unread)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    if state is None:
        rows = seqs + [seqs[0]] * (batch - len(seqs)) if _pads(device) else seqs
        width = max(len(s) for s in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, s in enumerate(rows):
            input_ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        cache = _cache(model, len(rows), cache_len)
    else:
        cache, input_ids, mask = state
    width = input_ids.shape[1]
    _view(cache, min(cache_len, -(-(width + n) // gen.bucket_tokens) * gen.bucket_tokens))
    # Padding rows and finished rows' slots count as done from the first token, so the call ends when the real
    # rows do: `generate` starts every row unfinished, and these would run the round to n steps for nothing.
    idle = torch.tensor([s is None for s in seqs] + [True] * (input_ids.shape[0] - len(seqs)), device=device)

    class Idle(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return idle

    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n,
                             stopping_criteria=StoppingCriteriaList([Idle()]), **_generate_kwargs(tok, gen))
    mask = torch.cat([mask, mask.new_ones((mask.shape[0], out.shape[1] - width))], dim=1)
    return out[:len(seqs), width:].tolist(), (cache, out, mask)


def _cache(model, rows: int, cache_len: int):
    """A static cache of `cache_len` slots per row, allocated now; `_view` sets how many of them attention reads."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    _, kv_heads, head_dim = _kv_heads(model)
    p = next(model.parameters())
    # one slot more than any view reads: a view as long as its buffer is contiguous, and the compiled step,
    # specialised on that, would compile once more (about 40 s at 7B)
    cache = StaticCache(config=model.config, max_cache_len=cache_len + 1)
    cache.early_initialization(rows, kv_heads, head_dim, p.dtype, p.device)
    # sliding-window layers keep their own ring buffer: a shorter view would change which tokens they see
    cache.full = [(l.keys, l.values) for l in cache.layers] if all(type(l) is StaticLayer for l in cache.layers) else None
    return cache


def _view(cache, n: int) -> None:
    """Let every layer attend to the first n slots of its cache only. A decode step reads every slot it is given,
    used or not: a row of AlpacaEval holds ~600 tokens on average in a 1,280-slot cache. A view that grows with the
    text, rounded up to a bucket so the compiled step meets few lengths: at 7B on an H200 the short Dolly prompts
    decoded at 10.4k new tok/s this way (buckets and rounds of 128), 8.3k with whole caches (buckets and rounds of
    256; benchmarks/README.md, "Generation"). The view starts at the buffer's start, so the tensors keep their
    address (the CUDA graphs' static inputs)."""
    import torch

    if cache.full is None:
        return
    for layer, (k, v) in zip(cache.layers, cache.full):
        layer.keys, layer.values, layer.max_cache_len = k[:, :, :n], v[:, :, :n], n
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)
