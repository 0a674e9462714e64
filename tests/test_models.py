"""The one loader: every verb that loads weights goes through models.load / models.tokenizer, so what params say of
the base (model.revision among it) reaches every path."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "llmft"
LOADERS = {"from_pretrained", "from_config", "HFLM"}


def test_only_models_py_loads_weights_or_tokenizers():
    """No module but models.py calls from_pretrained/from_config, or builds lm-eval's model from a name."""
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "models.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                if name in LOADERS and not (name == "HFLM" and _model_instance(node)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, found


def _model_instance(call: ast.Call) -> bool:
    """HFLM(pretrained=<a loaded model>): lm-eval wraps weights models.load loaded (a name would load them again)."""
    return any(k.arg == "pretrained" and not isinstance(k.value, ast.Constant) and "model" in ast.unparse(k.value)
               for k in call.keywords)


def _hub_cache(root: Path, tiny_model_dir: Path) -> Path:
    """An offline Hugging Face cache holding `llmft-test/tiny` at two revisions: `v1`, the tiny model, and `main`,
    a config with no weights and no tokenizer, which nothing can load. Only a path that passes model.revision works."""
    repo = root / "models--llmft-test--tiny"
    for ref, commit in (("main", "a" * 40), ("v1", "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    good, broken = repo / "snapshots" / ("b" * 40), repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, good)
    broken.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", broken / "config.json")
    return root


def _llmft(project: Path, cache: Path, *args: str) -> str:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-m", "llmft", *args], cwd=project, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, f"llmft {' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.slow
def test_a_revision_reaches_every_path(tmp_path, tiny_model_dir):
    """model.base=llmft-test/tiny model.revision=v1 through prepare (its tokenizer), train, evaluate (test loss and
    lm-eval on the loaded weights), register and the served model, ask and merge; `main` cannot load, so a path
    that dropped the revision fails. tune's trials run train.train, the same path."""
    import mlflow
    import pandas as pd

    from llmft.config import rebased_paths

    cache = _hub_cache(tmp_path / "hub", tiny_model_dir)
    project = tmp_path / "project"
    shutil.copytree(ROOT / "tests" / "data" / "lm_eval", project / "tests" / "data" / "lm_eval")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    params = {k: v for k, v in (o.split("=", 1) for o in rebased_paths(project))}
    overrides = [*(f"{k}={v}" for k, v in params.items()),
                 "model.base=llmft-test/tiny", "model.revision=v1", "data.stats_tokenizer=true",
                 "train.max_steps=2", "train.batch_size=4", "train.max_length=96", "train.eval_steps=2",
                 "train.save_steps=2", "train.max_train_rows=16", "train.max_eval_rows=4",
                 f"tracking.uri={uri}", f"tracking.artifact_location={project / 'mlartifacts'}",
                 "evaluate.benchmarks=[test_loss,lm_eval]", "evaluate.test_rows=4",
                 "evaluate.lm_eval_tasks=[llmft_tiny_qa]", "evaluate.lm_eval_include_path=tests/data/lm_eval",
                 "evaluate.lm_eval_limit=2", "evaluate.generation.max_new_tokens=4", "evaluate.bootstrap_samples=100",
                 "register.metric=test_loss.tuned"]
    for verb in ("prepare", "train", "evaluate", "register"):
        _llmft(project, cache, verb, *overrides)
    stats = json.loads((Path(params["paths.data"]) / "stats.json").read_text())
    assert stats["splits"]["train"]["tokens"]["max"] > 0, "prepare tokenised with the v1 tokenizer"
    table = json.loads((Path(params["paths.eval_dir"]) / "table.json").read_text())
    assert table["test_loss"]["n"] > 0 and table["lm_eval_llmft_tiny_qa_acc"]["n"] == 2, table.keys()

    mlflow.set_tracking_uri(uri)
    try:
        served = mlflow.pyfunc.load_model("models:/llmft@champion")  # the served model's own loader, offline
        assert "b" * 40 in served.unwrap_python_model().meta["base_model"], "registered with the v1 snapshot"
        assert len(served.predict(pd.DataFrame([{"instruction": "Say hi"}]), params={"max_new_tokens": 3})) == 1
    finally:
        mlflow.set_tracking_uri(None)
    assert "base:" in _llmft(project, cache, "ask", "Name a colour.", *overrides)
    _llmft(project, cache, "merge", *overrides)
    assert (Path(params["paths.adapter"] + "-merged") / "model.safetensors").exists()


def test_the_broken_revision_fails_without_the_pin(tmp_path, tiny_model_dir):
    """The test above proves something: `main` of the same cache does not load."""
    cache = _hub_cache(tmp_path / "hub", tiny_model_dir)
    code = ("import sys; from llmft import models; from llmft.config import Config, ModelConfig\n"
            "rev = sys.argv[1] if sys.argv[1] != 'none' else None\n"
            "models.load(Config(model=ModelConfig(base='llmft-test/tiny', revision=rev)), device='cpu')\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    run = lambda rev: subprocess.run([sys.executable, "-c", code, rev], env=env, capture_output=True, text=True)  # noqa: E731
    assert run("v1").returncode == 0
    failed = run("none")
    assert failed.returncode != 0 and "model.safetensors" in failed.stderr + failed.stdout
