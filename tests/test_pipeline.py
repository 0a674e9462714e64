"""The real DVC pipeline: repro runs a stage once, a second repro skips it, and a param change marks
only the stages that read it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sh(*cmd, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(cwd / "src"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res.stdout


@pytest.fixture
def project(tmp_path) -> Path:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = tmp_path / "params.yaml"
    # The token-length stats need the embedded model; this test is about DVC, not tokenizers.
    params.write_text(params.read_text().replace("  max_rows: null\n", "  max_rows: null\n  stats_tokenizer: false\n", 1))
    sh("git", "init", "-q", cwd=tmp_path)
    sh("dvc", "init", "-q", cwd=tmp_path)
    sh("git", "add", "-A", cwd=tmp_path)
    sh("git", "commit", "-qm", "init", cwd=tmp_path)
    return tmp_path


def test_repro_is_incremental(project):
    out = sh("dvc", "repro", "prepare", cwd=project)
    assert "Running stage 'prepare'" in out and (project / "data/processed/train.jsonl").exists()
    assert "didn't change, skipping" in sh("dvc", "repro", "prepare", cwd=project)
    assert "up to date" in sh("dvc", "status", "prepare", cwd=project)

    params = project / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("learning_rate: 0.0003", "learning_rate: 0.0001"))
    assert "up to date" in sh("dvc", "status", "prepare", cwd=project), "a train param must not dirty prepare"
    params.write_text(text.replace("  seed: 42\n", "  seed: 7\n", 1))
    status = sh("dvc", "status", "prepare", cwd=project)
    assert "params.yaml" in status and "modified:           data" in status
    before = (project / "data/processed/train.jsonl").read_bytes()
    assert "Running stage 'prepare'" in sh("dvc", "repro", "prepare", cwd=project)
    assert (project / "data/processed/train.jsonl").read_bytes() != before
