"""register stage: logging, registration and the promotion rule, on a local SQLite store (the default setup).

test_serving.py does the same against a real `mlflow server` and serves the champion.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmft import registry, tracking
from llmft.config import Config, LlmftError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The default kind of store: a local SQLite file with artifacts in a folder (no server process)."""
    import mlflow

    root = tmp_path_factory.mktemp("store")
    yield f"sqlite:///{root}/mlflow.db", str(root / "mlartifacts")
    mlflow.set_tracking_uri(None)  # later modules must not inherit this store


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random non-zero B matrices (B=0 at init would make it a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"adapter{i}", seed=i) for i in range(2)]


def make_cfg(root: Path, store: tuple[str, str], base: Path, adapter: Path, name: str,
             direction: str = "minimize") -> Config:
    cfg = Config()
    cfg.model.base = str(base)
    cfg.train.output_dir = str(adapter)
    cfg.tracking.uri, cfg.tracking.artifact_location = store
    cfg.tracking.run_id_file = str(root / "run_id.txt")
    cfg.tracking.experiment = f"test-{name}"
    cfg.evaluate.output_file = str(root / "eval.json")
    cfg.evaluate.generation.max_new_tokens = 8
    cfg.register.model_name = name
    cfg.register.direction = direction
    cfg.register.output_file = str(root / "register.json")
    with tracking.start_run(cfg.tracking, new=True):
        pass  # what `train` does: open the pipeline's run and write its id for later stages
    return cfg


def write_eval(cfg: Config, tuned) -> None:
    row = {"base": 3.0, "tuned": tuned, "delta": None, "ci95": [0, 1], "n": 4, "higher_is_better": cfg.register.direction == "maximize"}
    tracking.write_json(cfg.evaluate.output_file, {"test_loss": row, "mt_bench": {"status": "skipped", "reason": "no judge"}})


def register_with(cfg: Config, tuned=None, adapter: Path | None = None) -> dict:
    if tuned is not None:
        write_eval(cfg, tuned)
    if adapter is not None:
        cfg.train.output_dir = str(adapter)
    result = registry.register(cfg)
    assert json.loads(Path(cfg.register.output_file).read_text()) == json.loads(json.dumps(result))
    return result


def champion_version(name: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def version_tags(name: str, version: int) -> dict:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, str(version)).tags


# ------------------------------------------------------------------------------------ unit, no server
def test_read_metric_dotted_paths(tmp_path):
    path = tmp_path / "eval.json"
    tracking.write_json(path, {"test_loss": {"tuned": 1.25}, "lm_eval.mmlu": {"tuned": 0.5},
                               "rouge_l/open_qa": {"tuned": 0.3}, "flag": {"tuned": True},
                               "nan": {"tuned": float("nan")}, "mt_bench": {"status": "skipped", "reason": "no judge"}})
    assert registry.read_metric(path, "test_loss.tuned") == (1.25, "")
    assert registry.read_metric(path, "lm_eval.mmlu.tuned") == (0.5, "")  # a metric name with a dot in it
    assert registry.read_metric(path, "rouge_l/open_qa.tuned") == (0.3, "")
    for key, why in [("test_loss.base", "not found"), ("flag.tuned", "not a finite number"),
                     ("nan.tuned", "not a finite number"), ("mt_bench.tuned", "skipped: no judge"),
                     ("test_loss", "not a finite number")]:
        value, reason = registry.read_metric(path, key)
        assert value is None and why in reason, (key, reason)
    assert registry.read_metric(tmp_path / "missing.json", "test_loss.tuned")[0] is None


def test_register_without_adapter_is_a_user_error(tmp_path, tiny_model_dir):
    cfg = Config()
    cfg.model.base = str(tiny_model_dir)
    cfg.train.output_dir = str(tmp_path / "no_adapter")
    with pytest.raises(LlmftError, match="no PEFT adapter"):
        registry.register(cfg)


# ------------------------------------------------------------------------------ against the store
def test_promotion_minimize(store, adapters, tiny_model_dir, tmp_path, capsys):
    name = "promo-min"
    cfg = make_cfg(tmp_path, store, tiny_model_dir, adapters[0], name)

    r1 = register_with(cfg, 2.0)
    assert (r1["version"], r1["promoted"], r1["reason"]) == (1, True, "no_champion")
    assert champion_version(name) == "1"
    assert "promoted" in capsys.readouterr().out

    r2 = register_with(cfg, 1.5, adapters[1])
    assert (r2["version"], r2["promoted"], r2["reason"], r2["candidate"], r2["champion"], r2["champion_version"]) == \
        (2, True, "better", 1.5, 2.0, 1)
    assert champion_version(name) == "2"

    r3 = register_with(cfg, 1.8)
    assert (r3["promoted"], r3["reason"], r3["champion"]) == (False, "worse", 1.5)
    assert champion_version(name) == "2"
    tags = version_tags(name, 3)
    assert tags["promotion.decision"] == "not_promoted"
    assert (float(tags["promotion.candidate"]), float(tags["promotion.champion"])) == (1.8, 1.5)
    assert tags["promotion.metric"] == "test_loss.tuned" and tags["metric.test_loss.tuned"] == "1.8"

    r4 = register_with(cfg, 1.5)
    assert (r4["promoted"], r4["reason"], r4["decision"]) == (False, "tie", "not_promoted")
    assert champion_version(name) == "2"

    r5 = register_with(cfg, "n/a")
    assert (r5["promoted"], r5["reason"], r5["candidate"], r5["champion"]) == (False, "candidate_metric_missing", None, 1.5)
    assert "not a finite number" in r5["missing"]
    assert "metric.test_loss.tuned" not in version_tags(name, 5)
    assert champion_version(name) == "2"


def test_promotion_maximize_and_missing_metrics(store, adapters, tiny_model_dir, tmp_path):
    from mlflow import MlflowClient

    name = "promo-max"
    cfg = make_cfg(tmp_path, store, tiny_model_dir, adapters[0], name, direction="maximize")
    cfg.register.metric = "mt_bench.tuned"  # skipped by evaluate: no evidence, so not even a first model wins
    r1 = register_with(cfg, 0.5)
    assert (r1["promoted"], r1["reason"]) == (False, "candidate_metric_missing")
    assert "skipped" in r1["missing"] and champion_version(name) is None

    cfg.register.metric = "test_loss.tuned"
    assert register_with(cfg, 0.5)["reason"] == "no_champion"
    r3 = register_with(cfg, 0.4)
    assert (r3["promoted"], r3["reason"]) == (False, "worse")
    r4 = register_with(cfg, 0.7)
    assert (r4["promoted"], r4["reason"], r4["champion"]) == (True, "better", 0.5)
    assert champion_version(name) == "4"

    # A champion whose metric tag is gone (older pipeline, or a different metric) cannot defend its title.
    MlflowClient().delete_model_version_tag(name, "4", "metric.test_loss.tuned")
    r5 = register_with(cfg, 0.1)
    assert (r5["promoted"], r5["reason"], r5["champion"], r5["champion_version"]) == \
        (True, "champion_metric_missing", None, 4)
    assert champion_version(name) == "5"
    assert version_tags(name, 5)["promotion.reason"] == "champion_metric_missing"


def test_logged_base_weights_load_without_the_base_dir(store, adapters, tiny_model_dir, tmp_path):
    """With register.log_base_weights the model is self-contained: it loads after the base dir is gone."""
    import mlflow
    import pandas as pd

    from llmft import generate, templates

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    cfg = make_cfg(tmp_path, store, base, adapters[1], "self-contained")
    cfg.register.log_base_weights = True
    register_with(cfg, 1.0)
    expected_model, tok = generate.load(str(base), str(adapters[1]))
    prompt = templates.render_prompt(cfg.data.template, [("Say hi", None)])
    expected = generate.generate(expected_model, tok, [prompt], cfg.evaluate.generation, progress=False)
    shutil.rmtree(base)

    model = mlflow.pyfunc.load_model("models:/self-contained@champion")
    assert model.predict(pd.DataFrame([{"instruction": "Say hi"}])) == expected


def test_direction_must_agree_with_the_metric(tmp_path):
    import json as _json

    from llmft.config import LlmftError as _E
    from llmft.registry import _check_direction

    path = tmp_path / "eval.json"
    path.write_text(_json.dumps({"rouge_l": {"base": 0.2, "tuned": 0.3, "higher_is_better": True},
                                 "test_loss": {"base": 2.0, "tuned": 1.9, "higher_is_better": False}}))
    with pytest.raises(_E, match="set register.direction=maximize"):
        _check_direction(path, "rouge_l.tuned", "minimize")
    _check_direction(path, "rouge_l.tuned", "maximize")
    _check_direction(path, "test_loss.tuned", "minimize")
    with pytest.raises(_E, match="set register.direction=minimize"):
        _check_direction(path, "test_loss.tuned", "maximize")
