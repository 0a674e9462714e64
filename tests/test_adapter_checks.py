"""evaluate's adapter checks (evaluate/checks.py) on the tiny model: each fails on the fault it exists for (the
adapter dropped or untrained, a wrong merge, an endpoint serving the base model) and passes on a normal adapter."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from helpers import make_adapter, model_server, project_config
from llmft import models, templates, tracking
from llmft.errors import AdapterCheckError
from llmft.evaluate import candidates, checks, evaluate


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """A test split of 6 rows, a normal adapter (random non-zero B) and an untrained one (B = 0)."""
    root = tmp_path_factory.mktemp("adapter_checks")
    rows = []
    for i in range(6):
        ins, resp = f"Question {i}: name a colour you like.", f"I like blue, number {i}."
        rows.append({"instruction": ins, "context": "", "response": resp, "category": "open_qa",
                     **templates.format_example("alpaca", ins, "", resp)})
    (root / "processed").mkdir()
    (root / "processed" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = {"trained": make_adapter(tiny_model_dir, root / "trained", seed=3),
                "untrained": make_adapter(tiny_model_dir, root / "untrained", seed=3, untrained=True)}
    return root, adapters


def make_cfg(root: Path, model: Path, adapter: Path, *overrides: str):
    return project_config(root, f"paths.data={root / 'processed'}", "evaluate.benchmarks=[test_loss]",
                          "evaluate.test_rows=4", "evaluate.generation.max_new_tokens=8",
                          "evaluate.bootstrap_samples=100", "register.metric=train.eval_loss", *overrides,
                          model=model, adapter=adapter, store=root)


def elsewhere(d: Path) -> list[str]:
    return [f"paths.eval_dir={d / 'eval'}", f"paths.eval_metrics={d / 'eval.json'}", f"paths.eval_plots={d / 'plots'}",
            f"paths.run_id={d / 'no_run.txt'}"]


@pytest.fixture
def loaded(project, tiny_model_dir):
    """Candidates with the normal adapter, loaded afresh (a broken merge may leave the weights wrong)."""
    root, adapters = project
    c = candidates.load(make_cfg(root, tiny_model_dir, adapters["trained"]))
    convs, _ = checks.conversations(c.cfg)
    return c, [candidates.prompt(c, conv) for conv in convs]


def test_a_normal_adapter_passes_and_meta_json_records_each_check(project, tiny_model_dir, tmp_path, capsys):
    root, adapters = project
    cfg = make_cfg(root, tiny_model_dir, adapters["trained"], *elsewhere(tmp_path))
    evaluate(cfg)
    meta = json.loads((tmp_path / "eval" / "meta.json").read_text())["adapter_checks"]
    assert meta["prompts"] == checks.PROMPTS and "the first 4 rows of" in meta["prompts_from"]
    assert meta["logits"]["status"] == "passed" and meta["logits"]["max_abs_diff"] > 0.01
    assert meta["merge"] == {"status": "not run", "reason": "the tuned side is not merged on CPU"}
    assert meta["endpoint"] == {"status": "not run", "reason": "no evaluate.candidate_endpoint"}
    out = capsys.readouterr().out
    assert f"evaluate: adapter check: logits differ (max |Δ| {meta['logits']['max_abs_diff']:.2g} on 4 prompts)" in out
    assert "evaluate: adapter check: merge not run: the tuned side is not merged on CPU" in out


def test_the_real_merge_agrees_with_unmerged(loaded):
    c, prompts = loaded
    r = checks.merge_agrees(c, prompts)
    assert r["status"] == "passed" and r["agreement"] == 1.0 and r["token_agreement"] == 1.0
    # the check can tell: the adapter changes every answer, so a merge that drops it would show
    assert r["tuned_differs_from_base"] == len(prompts) == r["as_tuned"] and r["as_base"] == 0


def test_an_untrained_adapter_stops_the_stage_before_any_benchmark(project, tiny_model_dir, tmp_path):
    root, adapters = project
    cfg = make_cfg(root, tiny_model_dir, adapters["untrained"], *elsewhere(tmp_path))
    with pytest.raises(AdapterCheckError, match=r"changes nothing: with it the logits equal the base model's "
                                                r"\(max \|Δ\| 0 on 4 prompts") as e:
        evaluate(cfg)
    assert str(adapters["untrained"]) in str(e.value) and "B = 0" in str(e.value)
    assert not (tmp_path / "eval").exists()  # no table comparing the base model with itself


def test_an_adapter_switched_off_or_never_applied_fails(loaded, monkeypatch, tiny_model_dir):
    c, prompts = loaded
    real = candidates.as_side

    @contextlib.contextmanager
    def tuned_without_adapter(c, side):
        with c.model.disable_adapter():
            yield c.model

    monkeypatch.setattr(candidates, "as_side", tuned_without_adapter)
    with pytest.raises(AdapterCheckError, match=f"the adapter at {re.escape(c.adapter)} changes nothing"):
        checks.logits_differ(c, prompts)
    monkeypatch.setattr(candidates, "as_side", real)
    plain = dataclasses.replace(c, model=models.load(c.cfg))  # the base loaded without the adapter
    with pytest.raises(AdapterCheckError, match=f"the adapter at {re.escape(c.adapter)} was not applied"):
        checks.logits_differ(plain, prompts)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def merge_without_delta(model):
    """Marks every layer merged (so it runs its base layer only) but never adds B·A to the weights."""
    layers = _lora_layers(model)
    for m in layers:
        m.merged_adapters.append("default")
    try:
        yield model
    finally:
        for m in layers:
            m.merged_adapters.remove("default")


@contextlib.contextmanager
def merge_twice(model):
    """Adds the LoRA delta twice, then puts the base weights back exactly."""
    layers = _lora_layers(model)
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.base_model.merge_adapter()
    with torch.no_grad():
        for m in layers:
            m.get_base_layer().weight += m.get_delta_weight("default")
    try:
        yield model
    finally:
        model.base_model.unmerge_adapter()
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.get_base_layer().weight.copy_(w)


@contextlib.contextmanager
def merge_unmerge_only(model):
    """Merges right, then only unmerges: (W + BA) - BA, off by rounding, is what the base side would get."""
    model.base_model.merge_adapter()
    try:
        yield model
    finally:
        model.base_model.unmerge_adapter()


@pytest.mark.parametrize("merge, expect", [
    (merge_without_delta, r"changes its answers: 0/4 greedy answers merged equal the unmerged ones \(at least 50% "
                          r"must\); on 4 of the 4 prompts where the adapter changes the answer, the merged model "
                          r"answers as the base model"),
    (merge_twice, r"changes its answers: 0/4 greedy answers merged equal the unmerged ones"),
    (merge_unmerge_only, r"did not put the weights back exactly: the base side, which shares them, would be "
                         r"evaluated with the adapter \(partly\) in its weights"),
], ids=["no_delta", "delta_twice", "not_restored"])
def test_a_wrong_merge_fails(loaded, merge, expect):
    c, prompts = loaded
    with pytest.raises(AdapterCheckError, match=f"merging the adapter at {re.escape(c.adapter)} {expect}"):
        checks.merge_agrees(c, prompts, merge=merge)


@pytest.fixture(scope="module")
def served(project, tiny_model_dir, tmp_path_factory):
    """{adapter kind: URL}: the normal adapter and the untrained one (B = 0, so the base model's answers), each
    logged as llmft's pyfunc and served by a real `mlflow models serve` on 127.0.0.1."""
    from llmft import registry

    root, adapters = project
    with contextlib.ExitStack() as stack:
        urls = {}
        for kind, adapter in adapters.items():
            work = tmp_path_factory.mktemp(f"served_{kind}")
            cfg = make_cfg(work, tiny_model_dir, adapter)
            with tracking.start_run(cfg, new=True):
                info = registry.log_model(cfg, str(tiny_model_dir), work)
            urls[kind] = stack.enter_context(model_server(info.model_uri, cfg.tracking.uri, work))[0]
        yield urls


@pytest.mark.slow  # two served models
def test_an_endpoint_serving_the_adapter_passes(project, served, tiny_model_dir, tmp_path):
    root, adapters = project
    cfg = make_cfg(root, tiny_model_dir, adapters["trained"], f"evaluate.candidate_endpoint={served['trained']}",
                   *elsewhere(tmp_path))
    evaluate(cfg)
    meta = json.loads((tmp_path / "eval" / "meta.json").read_text())["adapter_checks"]["endpoint"]
    assert meta == {"status": "passed", "endpoint": served["trained"], "agreement": 1.0, "token_agreement": 1.0,
                    "tuned_differs_from_base": 4, "as_base": 0, "as_tuned": 4}


@pytest.mark.slow  # two served models
def test_an_endpoint_serving_the_base_model_fails_naming_it(project, served, tiny_model_dir, tmp_path):
    root, adapters = project
    cfg = make_cfg(root, tiny_model_dir, adapters["trained"], f"evaluate.candidate_endpoint={served['untrained']}",
                   *elsewhere(tmp_path))
    with pytest.raises(AdapterCheckError, match=rf"the endpoint {re.escape(served['untrained'])} does not serve the adapter at "
                                                rf"{re.escape(str(adapters['trained']))}: 0/4 of its greedy answers equal the adapter's"
                                                r".*on 4 of the 4 prompts where the adapter changes the answer, it "
                                                r"answers as the base model"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow  # two served models
def test_with_no_adapter_here_the_endpoint_must_not_answer_as_the_base_model(project, served, tiny_model_dir,
                                                                               tmp_path):
    """No adapter in paths.adapter: nothing to agree with, but an endpoint answering exactly as the base model
    still stops the stage."""
    root, _ = project
    nowhere = tmp_path / "no_adapter"
    cfg = make_cfg(root, tiny_model_dir, nowhere, f"evaluate.candidate_endpoint={served['untrained']}",
                   *elsewhere(tmp_path / "base"))
    with pytest.raises(AdapterCheckError, match=rf"the endpoint {re.escape(served['untrained'])} answers exactly as "
                                                r"the base model .* on all 4 prompts: it serves the base model"):
        evaluate(cfg)
    cfg = make_cfg(root, tiny_model_dir, nowhere, f"evaluate.candidate_endpoint={served['trained']}",
                   *elsewhere(tmp_path / "tuned"))
    evaluate(cfg)
    meta = json.loads((tmp_path / "tuned" / "eval" / "meta.json").read_text())["adapter_checks"]
    assert meta["logits"] == meta["merge"] == {"status": "not run", "reason": f"no adapter in process ({nowhere} holds none)"}
    assert meta["endpoint"]["status"] == "passed" and meta["endpoint"]["same_as_base"] == 0
