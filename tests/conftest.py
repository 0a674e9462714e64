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
def bench_data(tmp_path_factory) -> dict[str, Path]:
    """Benchmark files in the real formats, written by the project (tests/fixtures.py): no ../shared needed."""
    import fixtures

    root = tmp_path_factory.mktemp("bench_data")
    return {"mt_bench": fixtures.write_mt_bench(root / "mt_bench"),
            "alpaca_eval": fixtures.write_alpaca_eval(root / "alpaca_eval" / "model_outputs.json"),
            "dolly": fixtures.write_dolly(root / "dolly.jsonl")}


SHARED = Path(os.environ.get("LLMFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public benchmark files in ../shared/data, where a checkout has them beside it (CI does).
    Tests using it are marked `shared_data` and skip, saying why, where it is absent (a user's clone)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real benchmark files; only the shared_data tests need them)")
    return SHARED


def pytest_collection_modifyitems(config, items):
    # a test that asks for the real files is a shared_data test, marked or not
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)
