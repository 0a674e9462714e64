"""register stage: logging, registration and the promotion rule, on a local SQLite store (the default setup).

test_serving.py does the same against a real `mlflow server` and serves the champion.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmft import io, metrics, registry, tracking
from llmft.config import Config, load_config, rebased_paths
from llmft.errors import LlmftError


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
             metric: str = "test_loss.tuned") -> Config:
    uri, artifacts = store
    cfg = load_config("/nonexistent.yaml", [
        *rebased_paths(root), f"model.base={base}", f"paths.adapter={adapter}", f"tracking.uri={uri}",
        *([f"tracking.artifact_location={artifacts}"] if artifacts else []), f"tracking.experiment=test-{name}",
        "evaluate.generation.max_new_tokens=8", f"register.model_name={name}", f"register.metric={metric}"])
    with tracking.start_run(cfg, new=True):
        pass  # what `train` does: open the pipeline's run and write its id for later stages
    return cfg


def write_eval(cfg: Config, tuned) -> None:
    ref = metrics.parse(cfg.register.metric)
    row = {"base": 3.0, "tuned": tuned, "delta": None, "ci95": [0, 1], "n": 4,
           "higher_is_better": bool(metrics.known_higher_is_better(ref))}
    io.write_json(Path(cfg.paths.eval_dir) / "table.json",
                        {ref.row: row, "mt_bench": {"status": "skipped", "reason": "no judge"}})


def register_with(cfg: Config, tuned=None, adapter: Path | None = None) -> dict:
    if tuned is not None:
        write_eval(cfg, tuned)
    if adapter is not None:
        cfg.paths.adapter = str(adapter)
    result = registry.register(cfg)
    assert json.loads(Path(cfg.paths.register_metrics).read_text()) == json.loads(json.dumps(result))
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
    cfg = make_cfg(tmp_path, store, tiny_model_dir, tmp_path / "no_adapter", "no-adapter")
    write_eval(cfg, 1.0)
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
    cfg = make_cfg(tmp_path, store, tiny_model_dir, adapters[0], name, metric="mt_bench_score.tuned")
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
    cfg = make_cfg(tmp_path, store, base, adapters[1], "self-contained")
    cfg.register.log_base_weights = True
    register_with(cfg, 1.0)
    expected_model, tok = models.load_with_tokenizer(models.config_for(str(base)), str(adapters[1]))
    prompt = templates.render_prompt(cfg.data.template, [("Say hi", None)])
    expected = generate.generate(expected_model, tok, [prompt], cfg.evaluate.generation, progress=False)
    shutil.rmtree(base)

    model = mlflow.pyfunc.load_model("models:/self-contained@champion")
    assert model.predict(pd.DataFrame([{"instruction": "Say hi"}])) == expected
