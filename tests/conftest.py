"""Shared fixtures: a tiny random Llama model with the real Llama-2 tokenizer (fast, and it has the
real tokenizer's quirks: BOS, EOS, SentencePiece leading spaces)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

from llmft import models  # noqa: E402


@pytest.fixture(scope="session")
def llama2_tok_dir(tmp_path_factory) -> Path:
    return models.llama2_tokenizer(models.find_llama2_vocab(), tmp_path_factory.mktemp("llama2") / "tok")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, llama2_tok_dir) -> Path:
    """A 2-layer, 64-wide random LlamaForCausalLM with the Llama-2 tokenizer (~4M params, all embeddings)."""
    return models.tiny_llama(tmp_path_factory.mktemp("tiny") / "model", llama2_tok_dir)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real public data; CI has it too)."""
    p = ROOT.parent / "shared" / "data"
    if not p.is_dir():
        pytest.fail(f"{p} is missing: the shared data folder must sit beside the checkout")
    return p
