"""Shared fixtures: a tiny random Llama model with the real Llama-2 tokenizer (fast, and it has the
real tokenizer's quirks: BOS, EOS, SentencePiece leading spaces), and the stores, data and servers that
several test modules use. Module-scoped fixtures here are made once per test module that asks for them.
Plain helper functions are in helpers.py."""
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

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def llama2_tok_dir(tmp_path_factory) -> Path:
    return helpers.llama2_tokenizer(helpers.find_llama2_vocab(), tmp_path_factory.mktemp("llama2") / "tok")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, llama2_tok_dir) -> Path:
    """A 2-layer, 64-wide random LlamaForCausalLM with the Llama-2 tokenizer (~4M params, all embeddings)."""
    return helpers.tiny_llama(tmp_path_factory.mktemp("tiny") / "model", llama2_tok_dir)


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


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, artifact location): the default kind of store, a local SQLite file with artifacts in a
    folder (no server process)."""
    import mlflow

    root = tmp_path_factory.mktemp("store")
    yield f"sqlite:///{root}/mlflow.db", str(root / "mlartifacts")
    mlflow.set_tracking_uri(None)  # later modules must not inherit this store


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """The embedded sample formatted with the Llama-2 chat template."""
    return helpers.prepare_sample(tmp_path_factory.mktemp("data") / "processed")


@pytest.fixture(scope="module")
def judge():
    """The stand-in judge (tests/judge_server.py) on 127.0.0.1."""
    from judge_server import JudgeServer

    with JudgeServer() as s:
        yield s


def pytest_collection_modifyitems(config, items):
    # a test that asks for the real files is a shared_data test, marked or not
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)
