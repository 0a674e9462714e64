"""The real DVC pipeline: repro runs a stage once, a second repro skips it, and a param change marks
only the stages that read it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import child_env, dvc_project, sh

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # `dvc repro` of the whole pipeline: not in make test-fast


@pytest.fixture
def project(tmp_path) -> Path:
    """The real dvc.yaml and params.yaml in a git + DVC project (the default model: this test is about DVC)."""
    return dvc_project(tmp_path)


def test_repro_is_incremental(project):
    out = sh("dvc", "repro", "prepare", cwd=project).stdout
    assert "Running stage 'prepare'" in out and (project / "data/processed/train.jsonl").exists()
    assert "didn't change, skipping" in sh("dvc", "repro", "prepare", cwd=project).stdout
    assert "up to date" in sh("dvc", "status", "prepare", cwd=project).stdout

    params = project / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("learning_rate: 0.0003", "learning_rate: 0.0001"))
    assert "up to date" in sh("dvc", "status", "prepare", cwd=project).stdout, "a train param must not dirty prepare"
    params.write_text(text.replace("  seed: 42\n", "  seed: 7\n", 1))
    status = sh("dvc", "status", "prepare", cwd=project).stdout
    assert "params.yaml" in status and "modified:           data" in status
    before = (project / "data/processed/train.jsonl").read_bytes()
    assert "Running stage 'prepare'" in sh("dvc", "repro", "prepare", cwd=project).stdout
    assert (project / "data/processed/train.jsonl").read_bytes() != before


def test_moving_a_path_keeps_dvc_tracking_it(project):
    """dvc.yaml names outputs as ${paths.*}: a path changed in params.yaml is what DVC tracks."""
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  data: data/processed\n", "  data: data/elsewhere\n", 1))
    assert "Running stage 'prepare'" in sh("dvc", "repro", "prepare", cwd=project).stdout
    assert (project / "data/elsewhere/train.jsonl").exists() and not (project / "data/processed").exists()
    lock = (project / "dvc.lock").read_text()
    assert "path: data/elsewhere" in lock and "data/processed" not in lock
    assert "up to date" in sh("dvc", "status", "prepare", cwd=project).stdout


@pytest.fixture
def tiny_project(tmp_path, tiny_model_dir) -> Path:
    """The whole pipeline on the tiny model: quick stages, the real dvc.yaml."""
    return dvc_project(tmp_path, {
        "model": {"base": str(tiny_model_dir)}, "data": {"template": "llama2_chat"},
        "train": dict(max_steps=4, batch_size=4, max_length=96, eval_steps=2, save_steps=2, max_eval_rows=8,
                      max_train_rows=32),
        "evaluate": {"benchmarks": ["test_loss", "rouge"], "test_rows": 8, "rouge_rows": 2,
                     "generation": {"max_new_tokens": 4, "batch_size": 2}, "bootstrap_samples": 200}})


def test_experiments_show_their_params_and_headline_metrics(tiny_project):
    """`dvc exp run -S`, then `dvc exp show --json`: the experiment and the baseline have their
    params and headline metrics (train/validation loss, test loss base/tuned/delta, the registry decision);
    `dvc metrics diff` and `dvc plots diff` read both commits; each MLflow run names its DVC experiment."""
    from mlflow import MlflowClient

    p = tiny_project
    sh("dvc", "repro", cwd=p)
    assert (p / "reports/report.pdf").read_bytes()[:5] == b"%PDF-"
    # what `make test` does after `make pipeline`: every module imported, bytecode written beside it
    env = child_env(p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    sh(sys.executable, "-c", "import pkgutil, importlib, llmft\nfor m in pkgutil.walk_packages(llmft.__path__, 'llmft.'):"
       "\n    importlib.import_module(m.name)", cwd=p, env=env)
    assert list((p / "src/llmft/speed").glob("__pycache__/*.pyc")), "the imports wrote bytecode"
    assert "up to date" in sh("dvc", "status", cwd=p).stdout, "__pycache__ must not dirty a stage"
    overlap = p / "src/llmft/speed/overlap.py"  # code train runs only through a speed switch
    text = overlap.read_text()
    overlap.write_text(text + "# edited\n")
    status = sh("dvc", "status", "train", cwd=p).stdout
    assert "train:" in status and "modified:           src/llmft" in status, status
    overlap.write_text(text)
    assert "up to date" in sh("dvc", "status", cwd=p).stdout
    sh("git", "add", "-A", cwd=p)
    sh("git", "commit", "-qm", "baseline", cwd=p)  # metrics are committed, so the baseline has them too
    sh("dvc", "exp", "run", "-S", "train.lora.r=8", "-n", "rank8", cwd=p)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=p).stdout)
    rows = {}
    for commit in shown:
        if commit["rev"] == "workspace":  # `dvc exp run` leaves the last experiment applied to the workspace
            continue
        rows["baseline"] = commit["data"]
        for exp in commit.get("experiments") or []:
            rows[exp["name"]] = exp["revs"][0]["data"]
    assert {"rank8", "baseline"} <= set(rows), rows.keys()
    for name in ("rank8", "baseline"):
        data = rows[name]
        metrics = {f: v["data"] for f, v in data["metrics"].items()}
        params = data["params"]["params.yaml"]["data"]
        assert params["train"]["lora"]["r"] == {"rank8": 8}.get(name, 16)
        assert metrics["metrics/train.json"]["eval_loss"] > 0 and metrics["metrics/train.json"]["train_loss"] > 0
        assert set(metrics["metrics/eval.json"]["test_loss"]) == {"base", "tuned", "delta", "ci95_lo", "ci95_hi"}
        assert metrics["metrics/register.json"]["decision"] in ("promoted", "not_promoted")
        assert all("/" not in k for k in metrics["metrics/eval.json"]), "headline numbers only"
    assert rows["baseline"]["metrics"]["metrics/train.json"]["data"]["eval_loss"] != \
        rows["rank8"]["metrics"]["metrics/train.json"]["data"]["eval_loss"]
    diff = sh("dvc", "metrics", "diff", "HEAD", "rank8", "--json", cwd=p).stdout
    assert "eval_loss" in diff
    plots = sh("dvc", "plots", "diff", "HEAD", "rank8", "-o", str(p / "plots_diff"), cwd=p).stdout
    assert (p / "plots_diff" / "index.html").exists(), plots
    template = ROOT / ".dvc" / "plots" / "offline.html"  # made by `make setup` (tools/offline_plots.py)
    if template.exists():
        sh("dvc", "plots", "show", "--html-template", str(template), "-o", str(p / "offline"), cwd=p)
        page = (p / "offline" / "index.html").read_text()
        assert "cdn.jsdelivr" not in page and "vegaEmbed(" in page and "eval_loss.csv" in page
    client = MlflowClient(f"sqlite:///{p / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llmft").experiment_id], "tags.`dvc.exp_name` = 'rank8'")
    assert len(runs) == 1 and runs[0].info.run_name.startswith("rank8 train r8")
