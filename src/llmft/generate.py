"""Load a base model (optionally with a PEFT adapter) and generate answers in batches.

Used in process by `evaluate` and inside the served MLflow model, so both produce the same outputs.
"""
from __future__ import annotations

from typing import Optional

from .config import GenerationConfig


def load(base: str, adapter: Optional[str] = None, device: Optional[str] = None, dtype=None,
         trust_remote_code: bool = False, use_safetensors: Optional[bool] = True):
    """(model, tokenizer) ready for inference; the tokenizer is the adapter's when it saved one.
    Safe by default: no code from the hub, safetensors weights only (models.load_kwargs relaxes both)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=use_safetensors)
    tok_src = base
    if adapter:
        from pathlib import Path

        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if (Path(adapter) / "tokenizer_config.json").exists():
            tok_src = adapter
    tok = load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return model, tok


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

    # Each bucket's shape (and the tuned model beside the base) is one more compiled graph of the same forward;
    # past dynamo's default of 8 it would fall back to eager without a word, and decode 10x slower.
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    ids = tok(prompts, truncation=limit is not None, max_length=limit)["input_ids"]
    outputs: list[str] = [""] * len(prompts)
    for cache_len, rows, batch in buckets([len(x) for x in ids], gen, lambda n: batch_rows(model, n, gen)):
        for i, new in _refill(model, tok, ids, rows, batch, cache_len, gen, seed):
            outputs[i] = tok.decode(new, skip_special_tokens=True).strip()
            bar.update(1)
    return outputs


def buckets(lengths: list[int], gen: GenerationConfig, rows_for) -> list[tuple[int, list[int], int]]:
    """(cache length, prompt indices shortest first, batch rows) per bucket. A prompt's length is rounded up to
    a multiple of `bucket_tokens`; the static cache then holds that plus max_new_tokens. Each cache length is
    one compiled decode shape, so a bucket that would not fill one batch joins the next longer one."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(-(-lengths[i] // gen.bucket_tokens) * gen.bucket_tokens, []).append(i)
    out, carry = [], []
    for width in sorted(groups):
        carry += groups[width]
        cache_len = width + gen.max_new_tokens
        rows = rows_for(cache_len)
        if len(carry) >= rows or width == max(groups):
            out.append((cache_len, carry, rows))
            carry = []
    return out


def batch_rows(model, cache_len: int, gen: GenerationConfig, cap: int = 256) -> int:
    """Rows per batch: `fast_batch_size`, else as many as fit in free GPU memory (`batch_size` on CPU).
    A row costs its static KV cache (2 x layers x KV heads x head dim x dtype bytes per token) plus room for
    the prefill's MLP activations; the cap keeps one prefill (rows x tokens) from being the memory peak."""
    import torch

    if gen.fast_batch_size:
        return gen.fast_batch_size
    device = next(model.parameters()).device
    if device.type != "cuda":
        return gen.batch_size
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    width = next(model.parameters()).element_size()
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * width + 4 * c.intermediate_size * width
    torch.cuda.empty_cache()  # the last bucket's caches, freed but still reserved, would count as used
    free, _ = torch.cuda.mem_get_info(device)
    usable = 0.8 * free - 4 * 2**30  # headroom: allocator fragmentation, logits, compile workspace
    return max(1, min(cap, int(usable // (per_token * cache_len))))


def _refill(model, tok, ids, rows, batch, cache_len, gen, seed):
    """Yield (prompt index, new token ids) as rows finish. Each round generates up to `refill_tokens` for up to
    `batch` rows; then rows that hit EOS or max_new_tokens leave and queued prompts take their slots, so a short
    answer stops costing decode steps at the next round. Kept rows go on from their prompt + tokens so far."""
    from collections import deque

    queue, active, round_ = deque(rows), [], 0
    while queue or active:
        while queue and len(active) < batch:
            active.append((queue.popleft(), []))
        # the round stops where the row with least budget left stops, so no row passes max_new_tokens and every
        # row's prompt + answer fits the cache (cache_len = bucket + max_new_tokens)
        n = min(gen.refill_tokens, min(gen.max_new_tokens - len(new) for _, new in active))
        more = _round(model, tok, [ids[i] + new for i, new in active], n, cache_len, batch, gen, seed + round_)
        kept = []
        for (i, new), extra in zip(active, more):
            done = tok.eos_token_id in extra
            # keep the EOS itself (decode drops it as plain generate's decode does) and nothing after it (padding)
            new = new + (extra[:extra.index(tok.eos_token_id) + 1] if done else extra)
            if done or len(new) >= gen.max_new_tokens:
                yield i, new
            else:
                kept.append((i, new))
        active, round_ = kept, round_ + 1


def _round(model, tok, seqs: list[list[int]], n: int, cache_len: int, batch: int, gen, seed: int) -> list[list[int]]:
    """Up to n new tokens per sequence: one `model.generate` on a fresh static cache of `cache_len` tokens
    (transformers compiles the decode step for it on a GPU). The batch is padded to `batch` rows with copies of
    the first sequence so every round of the bucket has the same shape and reuses the compiled step."""
    import torch
    from transformers import StaticCache

    device = next(model.parameters()).device
    compiled = device.type == "cuda"
    rows = seqs + [seqs[0]] * (batch - len(seqs)) if compiled else seqs
    width = max(len(s) for s in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, s in enumerate(rows):
        input_ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                             max_new_tokens=n, **_generate_kwargs(tok, gen))
    return out[:len(seqs), width:].tolist()
