"""train.fp8's FP8 matmul for frozen projections: close to full precision, not equal, and no weight gradient."""
from __future__ import annotations

import pytest
import torch

from llmft.speed import fp8
from llmft.config import load_config
from llmft.errors import LlmftError


def _rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_frozen_projection_in_fp8_is_close_forward_and_backward_and_gets_no_weight_grad():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False), torch.nn.Linear(128, 64))
    model[0].weight.requires_grad_(False)  # frozen: converted; the trainable second layer is left alone
    x = torch.randn(3, 21, 256, requires_grad=True)  # 63 rows: the row count need not divide by 16
    ref = model[0](x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert [n for n, _ in fp8.convertible(model)] == ["0"]
    assert fp8.convert(model) == (1, 0)
    out = model[0](x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert out.shape == ref.shape and g.shape == x.shape
    # E4M3 carries 3 mantissa bits: a few % apart, never equal (an unconverted layer would give 0)
    assert 1e-3 < _rel(out, ref) < 0.08
    assert 1e-3 < _rel(g, g_ref) < 0.15
    assert model[0].weight.grad is None and not any("fp8" in k for k in model.state_dict())
    assert model[1].forward.__func__ is torch.nn.Linear.forward


def test_released_bf16_weights_free_their_memory_and_change_nothing():
    """train.fp8 in one process gives back the converted layers' bf16 weights: the FP8 path never reads them."""
    torch.manual_seed(0)
    kept, freed = (torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 16)) for _ in range(2))
    freed.load_state_dict(kept.state_dict())
    for m in (kept, freed):
        m[0].weight.requires_grad_(False)
    x = torch.randn(5, 64, requires_grad=True)
    assert fp8.convert(kept) == (1, 0)
    assert fp8.convert(freed, release=True) == (1, 64 * 32 * 4)
    assert freed[0].weight.untyped_storage().nbytes() == 0 and freed[0].weight.shape == (32, 64)
    assert kept[0].weight.untyped_storage().nbytes() == 64 * 32 * 4 and freed[1].weight.untyped_storage().nbytes() > 0
    outs = [m(x) for m in (kept, freed)]
    grads = [torch.autograd.grad(o.square().sum(), x)[0] for o in outs]
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert list(freed.state_dict()) == list(kept.state_dict())


def test_output_embedding_and_odd_shapes_stay_in_full_precision(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.requires_grad_(False)
    names = [n for n, _ in fp8.convertible(model)]
    layers = model.config.num_hidden_layers
    assert len(names) == 7 * layers and "lm_head" not in names  # q, k, v, o, gate, up, down per layer


def test_fp8_with_qlora_fails_at_load():
    with pytest.raises(LlmftError, match="train.fp8.*qlora"):
        load_config("none.yaml", ["train.fp8=true", "train.qlora.enabled=true"])
