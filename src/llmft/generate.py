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
    """Answers to already-templated prompts; generation stops at EOS or max_new_tokens."""
    import torch
    from tqdm.auto import tqdm

    tok.padding_side = "left"  # decoder-only batched generation must pad on the left
    sample = gen.temperature > 0
    kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=sample, repetition_penalty=gen.repetition_penalty,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    outputs: list[str] = []
    device = next(model.parameters()).device
    # A prompt longer than the model's context (a 1 MB instruction in the test split) asked sdpa for a 40 GB mask
    # and killed evaluate after training. Keep the end of such a prompt (where the template's answer cue is),
    # as much of it as fits with the answer; shorter prompts are untouched.
    context = getattr(model.config, "max_position_embeddings", None)
    limit = max(1, context - gen.max_new_tokens) if context else None
    side, tok.truncation_side = tok.truncation_side, "left"
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, len(prompts), gen.batch_size), desc=desc, disable=not progress, unit="batch"):
                batch = prompts[i:i + gen.batch_size]
                enc = tok(batch, return_tensors="pt", padding=True, truncation=limit is not None,
                          max_length=limit).to(device)
                torch.manual_seed(seed + i)
                out = model.generate(**enc, **kwargs)
                new = out[:, enc["input_ids"].shape[1]:]
                outputs += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side, tok.truncation_side = "right", side
    return outputs
