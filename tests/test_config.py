"""Config: a wrong key or value fails at load, naming the file, line and key; the CLI prints it cleanly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import llmft
from llmft.config import Config, describe, load_config
from llmft.errors import LlmftError
from llmft.templates import TEMPLATES

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_and_every_key_is_documented():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config) and cfg.data.template in TEMPLATES
    undocumented = [key for key, _, doc in describe() if not doc]
    assert not undocumented


@pytest.mark.parametrize("text, expected", [
    ("data:\n  seed: 1\ntrain:\n  lora:\n    rr: 8\n", r"p\.yaml:5: unknown key 'train\.lora\.rr'"),
    ("train:\n  learning_rate: fast\n", r"p\.yaml:2: 'train\.learning_rate' = 'fast' is not float"),
    ("data:\n  template: chatml\n",
     r"p\.yaml:2: 'data\.template' unknown template 'chatml' \(choose from alpaca, llama2_chat, model_chat\)"),
    ("data:\n  template: llama2\n", r"p\.yaml:2: 'data\.template' unknown template 'llama2' \(did you mean 'llama2_chat'\?\)"),
    ("data:\n  splits: [0.5, 0.1, 0.1]\n", r"p\.yaml:2: 'data\.splits' must be three fractions"),
    ("train:\n  batch_size: 0\n", r"p\.yaml:2: 'train\.batch_size' must be >= 1"),
    ("trian:\n  epochs: 1\n", r"p\.yaml:1: unknown key 'trian'"),
    ("train: [1, 2]\n", r"p\.yaml:1: 'train' must be a mapping"),
    ("train:\n  epochs: [\n", r"p\.yaml:\d+: invalid YAML"),
    # the fused LoRA layer has no dropout path: asked with PEFT's default dropout, the file's line says so
    ("train:\n  fused_lora: true\n  lora:\n    dropout: 0.05\n",
     r"p\.yaml:2: 'train\.fused_lora' needs train\.lora\.dropout=0 \(it is 0\.05\)"),
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


def test_cli_help_and_clean_errors(tmp_path):
    res = llmft("--help", cwd=ROOT)
    assert res.returncode == 0 and all(v in res.stdout for v in ("prepare", "train", "evaluate", "register"))
    res = llmft("train", "--help", cwd=ROOT)
    assert res.returncode == 0 and "key=value" in res.stdout
    res = llmft("params", cwd=ROOT)
    assert res.returncode == 0 and "train.lora.r = 16" in res.stdout
    (tmp_path / "params.yaml").write_text("train:\n  bogus: 1\n")
    res = llmft("prepare", cwd=tmp_path)
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


def test_every_problem_is_reported_at_once_with_suggestions(tmp_path):
    (tmp_path / "p.yaml").write_text("train:\n  lr: 0.1\n  lora:\n    r: 0\n  lr_scheduler: cosyne\n"
                                     "evaluate:\n  benchmarks: [test_loss, bogus]\n  test_rows: 0\n"
                                     "data:\n  output_dir: x\n")
    with pytest.raises(LlmftError) as e:
        load_config(tmp_path / "p.yaml")
    lines = str(e.value).splitlines()
    assert lines == [
        "p.yaml:2: unknown key 'train.lr' (did you mean 'train.learning_rate'?)".replace("p.yaml", str(tmp_path / "p.yaml")),
        f"{tmp_path / 'p.yaml'}:10: unknown key 'data.output_dir' (moved to 'paths.data')",
        f"{tmp_path / 'p.yaml'}:4: 'train.lora.r' must be >= 1",
        f"{tmp_path / 'p.yaml'}:5: 'train.lr_scheduler' unknown scheduler 'cosyne' (did you mean 'cosine'?)",
        f"{tmp_path / 'p.yaml'}:7: 'evaluate.benchmarks' unknown benchmark 'bogus' (choose from test_loss, "
        "reference_nll, rouge, alpaca_eval, mt_bench, lm_eval)",
        f"{tmp_path / 'p.yaml'}:8: 'evaluate.test_rows' must be >= 1 or null (all)",
    ]


@pytest.mark.parametrize("override, message", [
    # rules that once lived inside a stage, and surfaced only after training under `dvc repro`
    ("evaluate.benchmarks=[test_loss,mt_bnech]", "'evaluate.benchmarks' unknown benchmark 'mt_bnech' (did you mean 'mt_bench'?)"),
    ("evaluate.rouge_rows=0", "'evaluate.rouge_rows' must be >= 1 or null"),
    ("evaluate.judge.max_concurrency=0", "'evaluate.judge.max_concurrency' must be >= 1"),
    ("register.max_request_rows=0", "'register.max_request_rows' must be >= 1"),
    ("register.max_new_tokens_limit=64", "below evaluate.generation.max_new_tokens (128)"),
    ("train.optim=adamw_torchh", "'train.optim' unknown optimizer 'adamw_torchh' (did you mean 'adamw_torch'"),
    ("train.qlora.enabled=true model.random_init=true", "cannot be combined with model.random_init"),
    ("train.lora.target_modules=[]", "'train.lora.target_modules' must be 'all-linear' or a non-empty list"),
    ("train.lora.target_modules=q_proj", "'train.lora.target_modules' must be 'all-linear' or a non-empty list"),
    ("register.metric=test_loss", "'register.metric' 'test_loss' is not <row>.<base|tuned|delta>"),
    ("register.metric=rouge_l.tuned register.direction=minimize", "'rouge_l.tuned' is higher is better"),
    ("train.learning_rate=-0.001", "'train.learning_rate' must be > 0"),
    # switches that were measured slower and removed: the key's answer says so and what to do
    ("train.static_shapes=true", "unknown key 'train.static_shapes' (removed: it padded batches for the CUDA-graph"),
    ("train.compile_mode=reduce-overhead", "unknown key 'train.compile_mode' (removed: torch.compile's CUDA-graph modes"),
    # the speed switches' own rules (llmft/speed), reported with every other load error
    ("train.fp8=true train.qlora.enabled=true", "'train.fp8' cannot be combined with train.qlora.enabled=true"),
    ("train.fused_lora=true", "'train.fused_lora' needs train.lora.dropout=0 (it is 0.05)"),
    ("train.compile_regions=true", "'train.compile_regions' needs train.torch_compile=true"),
    ("train.attn_implementation=varlen", "'train.attn_implementation' varlen needs train.packing=true"),
    ("train.attn_implementation=varlen_fa4", "'train.attn_implementation' varlen_fa4 needs train.packing=true"),
    ('train.liger_kernels={"swiglu":false}', "'train.liger_kernels' needs train.use_liger_kernel=true"),
    ('train.use_liger_kernel=true train.liger_kernels={"rms_nrom":false}',
     "'train.liger_kernels' unknown Liger kernel 'rms_nrom' (did you mean 'rms_norm'?)"),
    ("data.splits=[0.8,0.3,0.1]", "'data.splits' must be three fractions"),
    ("data.source=notes.txt", "'data.source' 'notes.txt' is neither 'embedded', a .jsonl/.ndjson/.json/.csv/.parquet"),
    ("model.base=/no/such/model/dir", "'model.base' '/no/such/model/dir' is neither 'embedded', a model directory"),
    ("paths.adapter=data/processed", "'paths.adapter' is the same path as paths.data"),
    ("train.attn_implementation=flash", "did you mean 'flash_attention_2' or 'flash_attention_3'"),
    ("train.max_steps=0", "'train.max_steps' must be -1 (run epochs) or >= 1"),
])
def test_cross_stage_rules_fail_at_load(tmp_path, override, message):
    with pytest.raises(LlmftError) as e:
        load_config(tmp_path / "none.yaml", override.split())
    assert message in str(e.value) and str(e.value).startswith("command-line override")


def test_scheduler_and_optimizer_names_are_transformers_own():
    """config.py keeps the names so loading needs no transformers import; this catches drift on upgrades."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from llmft.config import LR_SCHEDULERS, OPTIMIZERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}


PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_and_show_their_command(preset):
    import yaml

    cfg = load_config(preset)
    text = preset.read_text()
    assert f"cp configs/{preset.name} params.yaml && dvc repro" in text.split("\n\n")[0]
    assert cfg.model.base == "meta-llama/Llama-2-7b-hf" and cfg.train.max_length == 2048
    # the paths block is the project's: dvc.yaml's ${paths.*} must resolve the same with a preset in place
    assert yaml.safe_load(text)["paths"] == yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]


def test_three_presets_exist():
    assert {p.stem for p in PRESETS} >= {"llama2-7b-lora", "llama2-7b-lean", "llama2-7b-qlora-24gb"}


def test_params_prints_values_in_effect_and_survives_a_closed_pipe(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  max_steps: 20\n")
    res = llmft("params", "train.lora.r=4", 'train.liger_kernels={"swiglu":false}', "train.use_liger_kernel=true",
                cwd=tmp_path)
    assert res.returncode == 0
    assert "train.max_steps = 20   (default: -1)" in res.stdout and "train.lora.r = 4   (default: 16)" in res.stdout
    assert "train.liger_kernels = {'swiglu': False}   (default: {})" in res.stdout  # a dict-valued key, whole
    assert "\ntrain.epochs = 1.0\n" in res.stdout  # unchanged keys show no default
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    piped = subprocess.run(f"{sys.executable} -m llmft params | head -2", shell=True, capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=120)
    assert len(piped.stdout.splitlines()) == 2 and piped.stderr == "", piped.stderr
