"""Config: a wrong key or value fails at load, naming the file, line and key; the CLI prints it cleanly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmft.config import Config, LlmftError, describe, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_and_every_key_is_documented():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config) and cfg.data.template in ("alpaca", "llama2_chat", "model_chat")
    undocumented = [key for key, _, doc in describe() if not doc]
    assert not undocumented


@pytest.mark.parametrize("text, expected", [
    ("data:\n  seed: 1\ntrain:\n  lora:\n    rr: 8\n", r"p\.yaml:5: unknown key 'train\.lora\.rr'"),
    ("train:\n  learning_rate: fast\n", r"p\.yaml:2: 'train\.learning_rate' = 'fast' is not float"),
    ("data:\n  template: chatml\n", r"p\.yaml:2: 'data\.template' = 'chatml' is not one of 'alpaca'"),
    ("data:\n  splits: [0.5, 0.1, 0.1]\n", r"p\.yaml:2: 'data\.splits' must be three fractions"),
    ("train:\n  batch_size: 0\n", r"p\.yaml:2: 'train\.batch_size' must be >= 1"),
    ("trian:\n  epochs: 1\n", r"p\.yaml:1: unknown key 'trian'"),
    ("train: [1, 2]\n", r"p\.yaml:1: 'train' must be a mapping"),
    ("train:\n  epochs: [\n", r"p\.yaml:\d+: invalid YAML"),
])
def test_bad_params_name_file_line_and_key(tmp_path, text, expected):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(LlmftError, match=expected):
        load_config(tmp_path / "p.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(tmp_path / "missing.yaml", ["train.lora.r=8", "train.learning_rate=1e-4", "data.max_rows=null"])
    assert cfg.train.lora.r == 8 and cfg.train.learning_rate == 1e-4 and cfg.data.max_rows is None
    with pytest.raises(LlmftError, match="command-line override: unknown key 'train.lr'"):
        load_config(tmp_path / "missing.yaml", ["train.lr=1"])
    with pytest.raises(LlmftError, match="not of the form key=value"):
        load_config(tmp_path / "missing.yaml", ["train.lr"])


def _cli(*args, cwd=ROOT):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "llmft", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_cli_help_and_clean_errors(tmp_path):
    res = _cli("--help")
    assert res.returncode == 0 and all(v in res.stdout for v in ("prepare", "train", "evaluate", "register"))
    res = _cli("train", "--help")
    assert res.returncode == 0 and "key=value" in res.stdout
    res = _cli("params")
    assert res.returncode == 0 and "train.lora.r = 16" in res.stdout
    (tmp_path / "params.yaml").write_text("train:\n  bogus: 1\n")
    res = _cli("prepare", cwd=tmp_path)
    assert res.returncode == 2 and "params.yaml:2: unknown key 'train.bogus'" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_override_value_and_template_are_clean_errors(tmp_path):
    from llmft.templates import render_prompt

    with pytest.raises(LlmftError, match=r"override 'train.lora.r=\[': value is not valid YAML"):
        load_config(tmp_path / "missing.yaml", ["train.lora.r=["])
    with pytest.raises(LlmftError, match="unknown template 'chatml'"):
        render_prompt("chatml", [("hi", None)])


def test_secrets_and_url_credentials_never_reach_params():
    from llmft.tracking import scrub

    flat = {"evaluate.judge.api_key_env": "OPENAI_API_KEY", "evaluate.judge.api_key": "sk-123",
            "evaluate.generation.max_new_tokens": 128, "tracking.uri": "https://bob:hunter2@mlflow.example/",
            "evaluate.judge.base_url": "http://127.0.0.1:8000/v1"}
    out = scrub(flat)
    assert "evaluate.judge.api_key" not in out and out["evaluate.judge.api_key_env"] == "OPENAI_API_KEY"
    assert out["evaluate.generation.max_new_tokens"] == 128, "ordinary keys that contain 'token' are kept"
    assert out["tracking.uri"] == "https://mlflow.example/" and "hunter2" not in str(out)
    assert out["evaluate.judge.base_url"] == "http://127.0.0.1:8000/v1"
