"""generate.merged: the tuned side generates with its LoRA merged, and the base weights come back bit for bit."""
from __future__ import annotations

import types

import pytest
import torch

from llmft import generate, models


@pytest.fixture()
def tuned(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model, tok = models.load_with_tokenizer(models.config_for(str(tiny_model_dir)), device="cpu")
    torch.manual_seed(0)
    # a trained-looking adapter: B is not zero, so merging changes every adapted weight
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return peft.eval(), tok, [m for m in peft.modules() if isinstance(m, LoraLayer)]


def _logits(model, tok):
    with torch.no_grad():
        return model(**tok(["Name a colour.", "Why is the sky blue?"], return_tensors="pt", padding=True)).logits


def test_merged_answers_as_unmerged_and_puts_the_base_back_exactly(tuned):
    model, tok, layers = tuned
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = _logits(model, tok)
    with generate.merged(model) as m:
        assert layers and all(layer.merged for layer in layers)
        assert torch.allclose(_logits(m, tok), unmerged, atol=1e-4)
    assert not any(layer.merged for layer in layers)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == []  # unmerging alone leaves (W + BA) - BA, off by rounding
    assert torch.equal(_logits(model, tok), unmerged)


def test_disabled_adapter_or_too_little_host_memory_stays_unmerged(tuned, monkeypatch):
    model, _, layers = tuned
    with model.disable_adapter(), generate.merged(model):  # the base side: nothing to merge
        assert not any(layer.merged for layer in layers)
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1024))
    with generate.merged(model):
        assert not any(layer.merged for layer in layers)
