"""The fast path's decoder: a fixed set of slots in one KV cache, each holding one row, refilled as rows finish.

Prompts come longest first. Slot j is as long as the first prompt it takes plus max_new_tokens, so every prompt queued
after it fits it too; the slots lie end to end in one flat cache per layer. A prompt enters a free slot by a prefill
of its own tokens only (prompts entering together are packed into one row, FlashAttention's varlen layout), so rows
already decoding are never read again. Every decode step runs all slots at once: each slot's new key/value goes to
that slot's own next position, and attention reads each slot's own tokens and nothing else (llmft's Triton kernel,
llmft/decode_attention.py, or torch's FlashAttention with `seqused_k`; `DECODE_KERNEL`). The cache holds the
model's dtype or, with `kv_cache: fp8`, float8 e4m3 (half the bytes). On a GPU the step is recorded once as a CUDA
graph (eager kernels, replayed without Python or launch overhead; recording takes about a second, no compile).
Every `refill_tokens` steps the host reads the new tokens, retires rows that reached EOS or max_new_tokens, and
prefills queued prompts into their slots.

The model runs its own forward with transformers' attention interface pointed at `attention` below (no mask is built
for it) and no transformers cache: the slots' KV tensors are ours. Decoder-only models whose attention modules take
transformers' attention interface (Llama, Mistral without a sliding window, Qwen2, ...) run here; others take the
plain path (`supported`).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time

from . import decode_attention

log = logging.getLogger(__name__)

NAME = "llmft_slots"
PREFILL_TOKENS = 16384
"""Most prompt tokens one prefill forward reads (bounds its activations; more prompts wait for the next)."""
DECODE_KERNEL = "auto"
"""The decode step's attention on a GPU: `flash` (torch's FlashAttention) or `auto`: llmft's Triton kernel
(llmft/decode_attention.py) where it compiles and passes its self-check, else flash. An fp8 cache (`kv_cache: fp8`)
takes the Triton kernel either way (FlashAttention reads only the model's dtype), else sdpa."""
USED = None
"""The decode-step attention the last decode step ran (triton, flash or sdpa): benchmarks record it."""
GRAPH_MIN_STEPS = 64
"""Calls of fewer new tokens (max_new_tokens) decode eagerly: recording costs about four eager steps, and a served
request of a few tokens would pay it for little."""


def supported(model) -> bool:
    """Whether the slot decoder can run `model`: attention modules with `layer_idx` and no sliding window."""
    c = model.config.get_text_config(decoder=True)
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    return bool(layers) and not getattr(c, "sliding_window", None) and not getattr(c, "use_sliding_window", False)


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of the decoder."""
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim


def cache_dtype(gen, model_dtype):
    """The slots' KV dtype: the model's, or float8 e4m3 for `kv_cache: fp8`."""
    return _t().float8_e4m3fn if gen.kv_cache == "fp8" else model_dtype


def fp8_reads_fast(model) -> bool:
    """Whether decode steps read an fp8 cache with llmft's Triton kernel on this model's GPU (a half-precision model,
    the kernel compiled and self-checked there). Elsewhere on a GPU sdpa would read it through padded bf16 copies of
    every slot, which can take more memory than the fp8 cache saves."""
    p = next(model.parameters())
    if not _flash(p):
        return False
    c = model.config.get_text_config(decoder=True)
    _, kv_heads, head_dim = kv_shape(model)
    return decode_attention.runs(p.device, p.dtype, _t().float8_e4m3fn, c.num_attention_heads, kv_heads, head_dim)


class State:
    """What one forward tells the attention function: the caches, and where this forward's tokens go."""

    def __init__(self, caches, first: list[int], caps: list[int], device):
        self.caches = caches  # per layer (keys, values), each [cache tokens, KV heads, head dim]: slots end to end
        self.prefill = False
        self.dest = None  # flat cache index of each new token
        self.used = None  # decode: tokens each slot's attention reads (its length, new token included)
        self.bounds: list[int] = []  # prefill: packed prompts' boundaries, on the host and (cu) on the device
        self.cu = None
        self.cu_q = _t().arange(len(caps) + 1, dtype=_t().int32, device=device)  # decode: a query per slot
        self.cu_k = _t().tensor([*first, sum(caps)], dtype=_t().int32, device=device)  # each slot's first index
        self.max_cap = max(caps)
        self.gather = self.pos = None  # CPU/fp32 decode: [slot, position] -> flat index, for sdpa over a padded view


def _t():
    import torch as t

    return t


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              slots: State | None = None, **kwargs):
    """transformers' attention signature. Prefill: query [1, H, T, D], packed prompts; decode: [slots, H, 1, D].
    Writes the new keys/values into the cache, then attends; returns ([., ., H, D], None)."""
    s = slots
    k_cache, v_cache = s.caches[module.layer_idx]
    if s.prefill:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    else:
        q, k, v = (t[:, :, 0] for t in (query, key, value))  # [slots, H, D]
    _store(k_cache, s.dest, k)
    _store(v_cache, s.dest, v)
    if s.prefill:
        return _prefill_attention(q, k, v, s, scaling).unsqueeze(0), None
    return _decode_attention(q, k_cache, v_cache, s, scaling).unsqueeze(1), None


FP8_MAX = 448.0
"""Largest float8_e4m3fn value: an fp8 cache clamps keys/values to it before the cast (e4m3fn has no infinity, so a
cast that does not saturate would make NaN of a larger value)."""


def _store(cache, dest, x) -> None:
    """New keys or values x into the cache at flat indices dest: as they are, or for an fp8 cache clamped and rounded
    to float8 e4m3 with no scale (as vLLM's fp8 cache without calibration), written as bytes (CPU torch has no fp8
    index_copy_). Prefill attention reads the unrounded ones."""
    if cache.dtype == _t().float8_e4m3fn:
        cache.view(_t().uint8).index_copy_(0, dest, x.clamp(-FP8_MAX, FP8_MAX).to(cache.dtype).view(_t().uint8))
    else:
        cache.index_copy_(0, dest, x)


def _flash(t) -> bool:
    """FlashAttention (torch's own kernels) runs half precision on CUDA GPUs from Ampere (compute capability 8) on;
    elsewhere sdpa does the same sums."""
    return t.is_cuda and t.dtype in (_t().float16, _t().bfloat16) and _ampere(t.device)


@functools.cache
def _ampere(device) -> bool:
    return _t().cuda.get_device_capability(device)[0] >= 8


@functools.cache
def _seqused_k() -> bool:
    """Whether torch's FlashAttention op takes `seqused_k` (each slot's length); without it decode steps read the
    slots through sdpa with a mask (same answers, slower), and say so once."""
    ok = "seqused_k" in str(_t().ops.aten._flash_attention_forward.default._schema)
    if not ok:
        log.warning("torch %s's FlashAttention op has no seqused_k: decode steps use sdpa", _t().__version__)
    return ok


def _prefill_attention(q, k, v, s: State, scale):
    """Each packed prompt attends causally to itself."""
    t = _t()
    if _flash(q):
        n = max(b - a for a, b in zip(s.bounds, s.bounds[1:]))
        return t.ops.aten._flash_attention_forward(q, k, v, s.cu, s.cu, n, n, 0.0, True, False, scale=scale)[0]
    out = []
    for a, b in zip(s.bounds, s.bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out.append(t.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=qs.shape[1] != ks.shape[1])[0].transpose(0, 1))
    return t.cat(out)


def _decode_attention(q, k_cache, v_cache, s: State, scale):
    """Each slot's query attends to its slot's first `used` tokens."""
    t = _t()
    global USED
    if _flash(q) and (DECODE_KERNEL != "flash" or k_cache.dtype != q.dtype) and decode_attention.fits(q, k_cache):
        USED = "triton"
        return decode_attention.attend(q, k_cache, v_cache, s.cu_k, s.used, scale)
    if _flash(q) and k_cache.dtype == q.dtype and _seqused_k():
        # slot j's keys start at cu_k[j]; seqused_k: read only the slot's own tokens
        USED = "flash"
        return t.ops.aten._flash_attention_forward(q, k_cache, v_cache, s.cu_q, s.cu_k, 1, s.max_cap, 0.0, False,
                                                   False, scale=scale, seqused_k=s.used)[0]
    USED = "sdpa"
    if s.gather is None:
        pos = t.arange(s.max_cap, device=q.device)
        s.pos = pos
        s.gather = (s.cu_k[:-1, None].long() + pos[None, :]).clamp(max=k_cache.shape[0] - 1)
    k, v = (c[s.gather].transpose(1, 2).to(q.dtype) for c in (k_cache, v_cache))  # [slots, KV heads, longest, D]
    mask = s.pos[None, :] < s.used[:, None]
    out = t.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                                       scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, 0]


@contextlib.contextmanager
def _attention_on(model):
    """transformers' attention interface pointed at `attention` for the block, then the model's own put back."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    for c, _ in saved:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


class Decoder:
    """Slots of the given capacities (tokens: prompt + max_new_tokens). `run` yields (prompt index, new token ids)
    as rows finish."""

    def __init__(self, model, caps: list[int], gen, eos: int | None):
        t = _t()
        self.model, self.caps, self.gen, self.eos = model, caps, gen, eos
        self.top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
        p = next(model.parameters())
        self.device, rows = p.device, len(caps)
        layers, kv_heads, head_dim = kv_shape(model)
        dtype = cache_dtype(gen, p.dtype)
        self.caches = [tuple(t.zeros(sum(caps), kv_heads, head_dim, dtype=dtype, device=p.device)
                             for _ in range(2)) for _ in range(layers)]
        self.first = [0, *itertools.accumulate(caps[:-1])]  # each slot's first flat index
        self.state = State(self.caches, self.first, caps, p.device)
        self.starts = self.state.cu_k[:-1].long()
        i32 = dict(dtype=t.int32, device=p.device)
        self.lens = t.zeros(rows, **i32)  # tokens in each slot
        self.live = t.zeros(rows, **i32)  # 1 while the slot holds an unfinished row
        self.tokens = t.zeros(rows, 1, dtype=t.long, device=p.device)  # each slot's next input token
        self.graph = None
    def _pick(self, logits):
        """Next token from each row's last logits: greedy, or temperature + top-p sampling (exponential race,
        no host sync, so it records into the graph)."""
        logits = logits.float()
        if self.gen.temperature <= 0:
            return logits.argmax(-1)
        if self.top_k:  # the model's generation_config.top_k, which plain `generate` applies when sampling
            logits = logits.masked_fill(logits < logits.topk(self.top_k, -1).values[:, -1:], float("-inf"))
        probs = _t().softmax(logits / self.gen.temperature, -1)
        if self.gen.top_p < 1:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.gen.top_p  # tokens past the nucleus
            probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
        return (probs / _t().empty_like(probs).exponential_(1)).argmax(-1)

    def _step(self):
        """One decode step of every slot: in-place on the slot tensors, so it can be recorded once and replayed."""
        s = self.state
        s.prefill, s.dest, s.used = False, self.starts + self.lens, self.lens + 1
        out = self.model(input_ids=self.tokens, position_ids=self.lens.long()[:, None], use_cache=False, slots=s)
        nxt = self._pick(out.logits[:, -1])
        self.tokens.copy_(nxt[:, None])
        self.lens.add_(self.live)
        return nxt

    def _record(self) -> None:
        """The decode step as a CUDA graph (three eager warm-up steps first, on a side stream as CUDA graphs want).
        If recording fails, the steps run eagerly and the reason is logged."""
        import torch

        if self.device.type != "cuda" or self.gen.max_new_tokens < GRAPH_MIN_STEPS:
            return
        t0 = time.perf_counter()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self._step()
            self.graph = graph
            log.debug("decode step of %d slots recorded as a CUDA graph in %.2f s", len(self.caps),
                      time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - eager steps give the same answers, slower
            log.warning("decode step not recorded as a CUDA graph (%s: %s); running it eagerly", type(e).__name__, e)
            self.graph = None
        self.lens.zero_()

    def step(self):
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.out

    def prefill(self, entries: list[tuple[int, list[int]]]):
        """Prompts into free slots: [(slot, token ids)]; each slot's first new token. One packed forward that writes
        the prompts' keys/values into their slots and keeps only each prompt's last logits."""
        import torch

        s, dev = self.state, self.device
        ids = [t for _, seq in entries for t in seq]
        bounds = [0, *itertools.accumulate(len(seq) for _, seq in entries)]
        s.prefill, s.bounds = True, bounds
        s.cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
        s.dest = torch.tensor([self.first[slot] + i for slot, seq in entries for i in range(len(seq))], device=dev)
        pos = torch.tensor([i for _, seq in entries for i in range(len(seq))], device=dev)
        last = torch.tensor(bounds[1:], device=dev) - 1
        out = self.model(input_ids=torch.tensor([ids], device=dev), position_ids=pos[None], use_cache=False,
                         logits_to_keep=last, slots=s)
        first = self._pick(out.logits[0])
        slots = torch.tensor([slot for slot, _ in entries], device=dev)
        self.tokens[slots, 0] = first
        self.lens[slots] = torch.tensor([len(seq) for _, seq in entries], dtype=torch.int32, device=dev)
        self.live[slots] = 1
        return first.tolist()

    def run(self, ids: list[list[int]], order: list[int]):
        """Decode the prompts `ids[i]` for i in `order` (queued in that order); yield (i, new ids) as each finishes."""
        import torch
        from collections import deque

        queue, slots = deque(order), [None] * len(self.caps)  # a slot: [prompt index, new ids] or None
        with torch.inference_mode(), _attention_on(self.model):
            self._record()
            while True:
                free = [j for j, x in enumerate(slots) if x is None]
                done = []
                while queue and free:  # prefill queued prompts into free slots, PREFILL_TOKENS at a time
                    entries, n = [], 0
                    while queue and free and (not entries or n + len(ids[queue[0]]) <= PREFILL_TOKENS):
                        i, j = queue.popleft(), free.pop(0)
                        entries.append((j, ids[i]))
                        slots[j] = [i, []]
                        n += len(ids[i])
                    for (j, _), t in zip(entries, self.prefill(entries)):
                        slots[j][1].append(t)
                        if self._finished(slots[j][1]):
                            done.append(j)
                for j in done:
                    yield self._retire(slots, j)
                free = [j for j, x in enumerate(slots) if x is None]
                if queue and free:
                    continue
                live = [x for x in slots if x is not None]
                if not live:
                    return
                # no row passes max_new_tokens inside a round; rows that end earlier idle to its end
                n = min(self.gen.refill_tokens, min(self.gen.max_new_tokens - len(new) for _, new in live))
                steps = torch.stack([self.step().clone() for _ in range(n)], 1).tolist()  # [rows, n], one sync
                for j, x in enumerate(slots):
                    if x is None:
                        continue
                    more = steps[j]
                    if self.eos in more:
                        more = more[:more.index(self.eos) + 1]  # keep the EOS (decode drops it), nothing after
                    x[1] += more
                    if self._finished(x[1]):
                        yield self._retire(slots, j)

    def _finished(self, new: list[int]) -> bool:
        """A row ends at EOS or at max_new_tokens."""
        return new[-1] == self.eos or len(new) >= self.gen.max_new_tokens

    def _retire(self, slots, j):
        i, new = slots[j]
        slots[j] = None
        self.live[j] = 0
        return i, new
