"""register stage: logging, registration and the promotion rule, on a local SQLite store (the default setup).

test_serving.py does the same against a real `mlflow server` and serves the champion.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import champion_version, make_adapter, register_with, registry_config, version_tags, write_eval
from llmft import io, metrics, registry
from llmft.config import load_config
from llmft.errors import LlmftError


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"adapter{i}", seed=i) for i in range(2)]


# ------------------------------------------------------------------------------------ unit, no server
def test_metric_references_read_and_explain(tmp_path):
    table, train = tmp_path / "table.json", tmp_path / "train.json"
    io.write_json(table, {"test_loss": {"tuned": 1.25, "higher_is_better": False},
                                "lm_eval_mmlu_acc": {"tuned": 0.5, "higher_is_better": True},
                                "rouge_l/open_qa": {"tuned": 0.3}, "rouge_l": {"tuned": True},
                                "test_perplexity": {"tuned": float("nan")},
                                "mt_bench": {"status": "skipped", "reason": "no judge"}})
    io.write_json(train, {"best_eval_loss": 1.1, "eval_loss": None})

    def read(text):
        return metrics.read(metrics.parse(text), train, table)

    assert read("test_loss.tuned") == (1.25, "", False)
    assert read("lm_eval_mmlu_acc.tuned") == (0.5, "", True)
    assert read("rouge_l/open_qa.tuned")[0] == 0.3
    assert read("train.best_eval_loss") == (1.1, "", False)
    for text, why in [("test_loss.base", "not a finite number"), ("rouge_l.tuned", "not a finite number"),
                      ("test_perplexity.tuned", "not a finite number"), ("train.eval_loss", "not a finite number"),
                      ("mt_bench_score.tuned", "benchmark skipped: no judge"),
                      ("alpaca_eval_win_rate.tuned", "is alpaca_eval in evaluate.benchmarks")]:
        value, reason, _ = read(text)
        assert value is None and why in reason, (text, reason)
    assert metrics.read(metrics.parse("test_loss.tuned"), train, tmp_path / "missing.json")[0] is None
    for bad in ("test_loss", "test_loss.median", "train.steps", ".tuned"):
        with pytest.raises(ValueError):
            metrics.parse(bad)


def test_direction_comes_from_the_metric_and_contradictions_fail():
    rouge, loss, lm = (metrics.parse(t) for t in ("rouge_l.tuned", "test_loss.delta", "lm_eval_x_acc.tuned"))
    assert metrics.resolve_direction(rouge, None, None) == "maximize"
    assert metrics.resolve_direction(loss, None, None) == "minimize"
    assert metrics.resolve_direction(lm, None, True) == "maximize"  # lm-eval: what the table marks
    assert metrics.resolve_direction(lm, "minimize", None) == "minimize"
    with pytest.raises(LlmftError, match="use maximize"):
        metrics.resolve_direction(rouge, "minimize", None)
    with pytest.raises(LlmftError, match="use minimize"):
        metrics.resolve_direction(lm, "maximize", False)
    with pytest.raises(LlmftError, match="set register.direction"):
        metrics.resolve_direction(lm, None, None)
    # the same rules at load, before any stage runs
    with pytest.raises(LlmftError, match="register.direction' = minimize, but 'rouge_l.tuned' is higher is better"):
        load_config("/nonexistent.yaml", ["register.metric=rouge_l.tuned", "register.direction=minimize"])
    with pytest.raises(LlmftError, match="written by benchmark lm_eval, which is not in evaluate.benchmarks"):
        load_config("/nonexistent.yaml", ["register.metric=lm_eval_mmlu_acc.tuned"])


def test_register_without_adapter_is_a_user_error(tmp_path, tiny_model_dir, store):
    cfg = registry_config(tmp_path, store, tiny_model_dir, tmp_path / "no_adapter", "no-adapter")
    write_eval(cfg, 1.0)
    with pytest.raises(LlmftError, match="no PEFT adapter"):
        registry.register(cfg)


# ------------------------------------------------------------------------------ against the store
def test_promotion_minimize(store, adapters, tiny_model_dir, tmp_path, capsys):
    name = "promo-min"
    cfg = registry_config(tmp_path, store, tiny_model_dir, adapters[0], name)

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
    cfg = registry_config(tmp_path, store, tiny_model_dir, adapters[0], name, metric="mt_bench_score.tuned")
    write_eval(cfg, 0.5)
    table = Path(cfg.paths.eval_dir) / "table.json"
    table.write_text(json.dumps({"mt_bench": {"status": "skipped", "reason": "no judge"}}))
    r1 = register_with(cfg)  # skipped by evaluate: no evidence, so not even a first model wins
    assert (r1["promoted"], r1["reason"]) == (False, "candidate_metric_missing")
    assert "skipped" in r1["missing"] and champion_version(name) is None

    cfg.register.metric = "rouge_l.tuned"
    assert register_with(cfg, 0.5)["reason"] == "no_champion"
    r3 = register_with(cfg, 0.4)
    assert (r3["promoted"], r3["reason"]) == (False, "worse")
    r4 = register_with(cfg, 0.7)
    assert (r4["promoted"], r4["reason"], r4["champion"]) == (True, "better", 0.5)
    assert champion_version(name) == "4"

    # A champion whose metric tag is gone (older pipeline, or a different metric) cannot defend its title.
    MlflowClient().delete_model_version_tag(name, "4", "metric.rouge_l.tuned")
    r5 = register_with(cfg, 0.1)
    assert (r5["promoted"], r5["reason"], r5["champion"], r5["champion_version"]) == \
        (True, "champion_metric_missing", None, 4)
    assert champion_version(name) == "5"
    assert version_tags(name, 5)["promotion.reason"] == "champion_metric_missing"


def test_logged_base_weights_load_without_the_base_dir(store, adapters, tiny_model_dir, tmp_path):
    """With register.log_base_weights the model is self-contained: it loads after the base dir is gone."""
    import mlflow
    import pandas as pd

    from llmft import generate, models, templates

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    cfg = registry_config(tmp_path, store, base, adapters[1], "self-contained")
    cfg.register.log_base_weights = True
    register_with(cfg, 1.0)
    expected_model, tok = models.load_with_tokenizer(models.config_for(str(base)), str(adapters[1]))
    prompt = templates.render_prompt(cfg.data.template, [("Say hi", None)])
    expected = generate.generate(expected_model, tok, [prompt], cfg.evaluate.generation, progress=False)
    shutil.rmtree(base)

    model = mlflow.pyfunc.load_model("models:/self-contained@champion")
    assert model.predict(pd.DataFrame([{"instruction": "Say hi"}])) == expected
