"""`evaluate(cfg)` end to end on the tiny model with a perturbed LoRA adapter, a real MLflow store, lm-eval
on local task YAMLs, and the judge stand-in on 127.0.0.1 filling every judge row."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import make_adapter, model_server, project_config, show_result
from judge_server import JudgeServer
from llmft import templates, tracking
from llmft.errors import LlmftError
from llmft.evaluate import candidates, evaluate

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("open_qa", "brainstorming", "summarization")
SECRET = "sk-e2e-secret-7777"
ROW_KEYS = {"base", "tuned", "delta", "ci95", "n", "higher_is_better"}
pytestmark = pytest.mark.slow  # every benchmark end to end, a served model: not in make test-fast


def write_split(out_dir: Path, n: int = 6) -> None:
    rows = []
    for i in range(n):
        ins, ctx = f"Question {i}: name a colour you like.", "Colours are nice." if i % 3 == 2 else ""
        resp = f"I like blue, number {i}."
        rows.append({"instruction": ins, "context": ctx, "response": resp, "category": CATEGORIES[i % 3],
                     **templates.format_example("alpaca", ins, ctx, resp)})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval_project")
    write_split(root / "processed")
    adapter = make_adapter(tiny_model_dir, root / "adapter", seed=3)
    return root, adapter


@pytest.fixture
def at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the local lm-eval task YAMLs name their data relative to the repository root
    monkeypatch.setenv("LLMFT_E2E_JUDGE_KEY", SECRET)


def make_cfg(root: Path, model: Path, adapter: Path, bench: dict, *overrides: str):
    cfg = project_config(
        root, "train.max_length=128", f"paths.data={root / 'processed'}", "tracking.experiment=eval-e2e",
        f"evaluate.mt_bench_data={bench['mt_bench']}", f"evaluate.alpaca_eval_data={bench['alpaca_eval']}",
        "evaluate.test_rows=6", "evaluate.rouge_rows=3", "evaluate.reference_rows=2", "evaluate.alpaca_eval_rows=4",
        "evaluate.mt_bench_rows=4", "evaluate.generation.max_new_tokens=6", "evaluate.bootstrap_samples=200",
        "evaluate.judge.api_key_env=LLMFT_E2E_JUDGE_KEY", f"paths.judge_cache={root / 'judge_cache'}",
        "register.metric=train.eval_loss",  # any benchmark subset may run here
        *overrides, model=model, adapter=adapter, store=root)
    return cfg


def elsewhere(d: Path) -> list[str]:
    """Overrides sending one evaluate run's outputs to their own folder."""
    return [f"paths.eval_dir={d / 'eval'}", f"paths.eval_metrics={d / 'eval.json'}", f"paths.eval_plots={d / 'plots'}"]


@pytest.fixture(scope="module")
def full_run(project, judge, tiny_model_dir, bench_data, tmp_path_factory):
    """Every benchmark, judged by the stand-in."""
    root, adapter = project
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)
    mp.setenv("LLMFT_E2E_JUDGE_KEY", SECRET)
    try:
        cfg = make_cfg(root, tiny_model_dir, adapter, bench_data,
                       "evaluate.benchmarks=[test_loss,reference_nll,rouge,alpaca_eval,mt_bench,lm_eval]",
                       "evaluate.judge.model=stand-in", f"evaluate.judge.base_url={judge.base_url}",
                       "evaluate.lm_eval_tasks=[llmft_tiny_qa,llmft_tiny_arith,arc_challenge]",
                       "evaluate.lm_eval_include_path=tests/data/lm_eval", "evaluate.lm_eval_limit=4",
                       "evaluate.lm_eval_num_fewshot={llmft_tiny_qa: 1}")
        with tracking.start_run(cfg, new=True):
            pass  # what `train` does: open the pipeline's run for later stages
        table = evaluate(cfg)
        return cfg, table, judge.requests
    finally:
        mp.undo()


def test_every_row_filled_in_the_contract_format(full_run):
    cfg, table, _ = full_run
    expected = ["test_loss", "test_perplexity", "reference_nll_alpaca_eval", "reference_nll_mt_bench", "rouge_l",
                "alpaca_eval_win_rate", "alpaca_eval_tuned_vs_base", "mt_bench_score", "mt_bench_score/turn_1",
                "mt_bench_score/turn_2", "lm_eval_llmft_tiny_qa_acc", "lm_eval_llmft_tiny_arith_exact_match_first-number"]
    expected += [f"test_loss/{c}" for c in CATEGORIES] + [f"rouge_l/{c}" for c in CATEGORIES]
    expected += [f"mt_bench_score/{c}" for c in ("writing", "roleplay", "reasoning", "math")]
    missing = [k for k in expected if k not in table]
    assert not missing, f"missing rows {missing}; table has {sorted(table)}"
    for name, row in table.items():
        if "status" in row:
            continue
        assert ROW_KEYS <= set(row), name
        assert row["delta"] == pytest.approx(row["tuned"] - row["base"]), name
        assert row["ci95"][0] <= row["ci95"][1] and row["n"] >= 1, name
    assert table["test_loss"]["higher_is_better"] is False and table["mt_bench_score"]["higher_is_better"] is True
    assert table["test_loss"]["tuned"] != table["test_loss"]["base"]  # the adapter changes the model
    assert table["test_perplexity"]["tuned"] == pytest.approx(np.exp(table["test_loss"]["tuned"]))
    assert table["mt_bench_score"]["n"] == 8 and table["mt_bench_score"]["parse_failures"] == {"base": 0, "tuned": 0}
    assert table["alpaca_eval_win_rate"]["n"] == 4 and table["alpaca_eval_tuned_vs_base"]["base"] == 50.0
    # what cannot be computed says why instead of disappearing
    assert table["alpaca_eval_lc_win_rate"]["status"] == "skipped" and "805" in table["alpaca_eval_lc_win_rate"]["reason"]
    arc = table["lm_eval_arc_challenge"]  # a hub task offline: skipped, saying how to run it locally
    assert arc["status"] == "skipped" and "arc_challenge" in arc["reason"] and "lm_eval_include_path" in arc["reason"]
    on_disk = json.loads((Path(cfg.paths.eval_dir) / "table.json").read_text())
    assert on_disk == json.loads(json.dumps(table))
    # the DVC metrics file holds the headline numbers only: no categories or skip reasons
    flat = json.loads(Path(cfg.paths.eval_metrics).read_text())
    assert set(flat) == {k for k, r in table.items() if "status" not in r and "/" not in k}
    assert flat["test_loss"] == {**{k: table["test_loss"][k] for k in ("base", "tuned", "delta")},
                                 "ci95_lo": table["test_loss"]["ci95"][0], "ci95_hi": table["test_loss"]["ci95"][1]}


def test_test_loss_matches_the_models_own_loss(full_run, tiny_model_dir):
    """The scorer agrees with transformers' loss on completion tokens (prompt masked), example by example."""
    import torch

    cfg = full_run[0]
    c = candidates.load(cfg)
    rows = [json.loads(line) for line in (Path(cfg.paths.data) / "test.jsonl").read_text().splitlines()]
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    for side in ("base", "tuned"):
        scores = candidates.score(c, side, pairs, "check", max_length=cfg.train.max_length)
        for (p, comp), (nll, ntok) in zip(pairs, scores):
            p_ids = c.tok(p)["input_ids"]
            ids = c.tok(p + comp + c.tok.eos_token)["input_ids"]
            labels = torch.tensor([[-100] * len(p_ids) + ids[len(p_ids):]])
            with torch.no_grad(), candidates.as_side(c, side) as model:
                loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
            assert ntok == len(ids) - len(p_ids)
            assert nll / ntok == pytest.approx(loss, rel=1e-4)
        total = scores.sum(axis=0)
        assert full_run[1]["test_loss"][side] == pytest.approx(total[0] / total[1], rel=1e-6)


def test_outputs_report_plots_and_mlflow(full_run):
    from mlflow import MlflowClient

    cfg, table, _ = full_run
    p = cfg.paths
    outputs_dir = Path(p.eval_dir) / "outputs"
    md = (Path(p.eval_dir) / "table.md").read_text()
    assert "| test_loss |" in md and "alpaca_eval_lc_win_rate | skipped" in md
    for png in ("base_vs_tuned.png", "deltas.png", "mt_bench_radar.png"):
        assert (Path(p.eval_plots) / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = json.loads((outputs_dir / "alpaca_eval_tuned.json").read_text())
    assert len(outputs) == 4 and set(outputs[0]) >= {"instruction", "output", "generator"}
    mt = [json.loads(x) for x in (outputs_dir / "mt_bench_tuned.jsonl").read_text().splitlines()]
    assert len(mt) == 4 and all(len(a["choices"][0]["turns"]) == 2 for a in mt)

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(Path(p.run_id).read_text().strip())
    m = run.data.metrics
    assert m["eval/test_loss.tuned"] == pytest.approx(table["test_loss"]["tuned"])
    assert m["eval/test_loss.delta"] == pytest.approx(table["test_loss"]["delta"])
    # per-category rows are not one-point charts in the metrics tab: they are in the logged table
    assert not any(k.count("/") > 1 for k in m) and "eval/mt_bench_score.base" in m
    assert {k.rsplit(".", 1)[1] for k in m if k.startswith("eval/")} == {"base", "tuned", "delta", "ci95_lo", "ci95_hi"}
    assert run.data.tags["eval.lm_eval_arc_challenge.status"].startswith("skipped")
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/table.json", "eval/table.md", "eval/mt_bench_radar.png", "eval/table_rows.json"} <= arts
    rows = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/table_rows.json")).read_text())
    assert "mt_bench_score/writing" in json.dumps(rows)
    # the judge's API key went to the judge and nowhere else
    logged = json.dumps([run.data.params, run.data.tags])
    files = [f for d in (Path(p.eval_dir), Path(p.eval_metrics).parent, Path(p.judge_cache)) for f in d.rglob("*")]
    assert SECRET not in logged and not any(SECRET in f.read_text() for f in files if f.is_file() and f.suffix != ".png")


def test_rerun_pays_no_judge_calls(full_run, project, judge, tiny_model_dir, bench_data, at_repo_root):
    cfg, table, requests_after_first = full_run
    root, adapter = project
    again = make_cfg(root, tiny_model_dir, adapter, bench_data, "evaluate.benchmarks=[alpaca_eval,mt_bench]",
                     "evaluate.judge.model=stand-in", f"evaluate.judge.base_url={judge.base_url}",
                     *elsewhere(root / "rerun"))
    table2 = evaluate(again)
    assert judge.requests == requests_after_first > 0
    for k in ("alpaca_eval_win_rate", "alpaca_eval_tuned_vs_base", "mt_bench_score"):
        assert table2[k] == table[k]


def test_no_judge_and_missing_data_are_skipped_with_reasons(project, tiny_model_dir, bench_data, tmp_path, at_repo_root):
    root, adapter = project
    cfg = make_cfg(root, tiny_model_dir, adapter, bench_data, "evaluate.benchmarks=[test_loss,reference_nll,alpaca_eval]",
                   f"evaluate.mt_bench_data={tmp_path / 'nowhere'}", *elsewhere(tmp_path),
                   f"paths.run_id={tmp_path / 'no_run.txt'}")
    table = evaluate(cfg)
    assert table["alpaca_eval"] == {"status": "skipped", "reason": "no judge configured (evaluate.judge.model is null)"}
    why = table["reference_nll_mt_bench"]["reason"]
    assert table["reference_nll_mt_bench"]["status"] == "skipped" and str(tmp_path / "nowhere") in why
    assert "evaluate.mt_bench_data" in why  # the key to set
    assert "base" in table["test_loss"] and "base" in table["reference_nll_alpaca_eval"]
    assert json.loads((tmp_path / "eval" / "table.json").read_text())["alpaca_eval"]["status"] == "skipped"


def test_hub_defaults_offline_skip_naming_the_key(project, tiny_model_dir, bench_data, tmp_path, at_repo_root,
                                                  monkeypatch):
    """The defaults are the public hub sources alpaca_eval and FastChat read; offline they skip, and the reason
    names the key that takes a local copy."""
    from llmft.config import EvaluateConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, adapter = project
    d = EvaluateConfig()
    cfg = make_cfg(root, tiny_model_dir, adapter, bench_data, "evaluate.benchmarks=[reference_nll]",
                   f"evaluate.mt_bench_data={d.mt_bench_data}", f"evaluate.alpaca_eval_data={d.alpaca_eval_data}",
                   *elsewhere(tmp_path), f"paths.run_id={tmp_path / 'no_run.txt'}")
    table = evaluate(cfg)
    for name, key, source in (("reference_nll_alpaca_eval", "evaluate.alpaca_eval_data", "tatsu-lab/alpaca_eval"),
                              ("reference_nll_mt_bench", "evaluate.mt_bench_data", "lmsys/mt-bench")):
        assert table[name]["status"] == "skipped" and key in table[name]["reason"] and source in table[name]["reason"]


def test_parse_failures_are_counted(project, tiny_model_dir, bench_data, tmp_path, at_repo_root):
    root, adapter = project
    with JudgeServer() as s:
        s.malformed = lambda prompt: "### Assistant A:" in prompt  # every turn-2 judgment is unreadable
        cfg = make_cfg(root, tiny_model_dir, adapter, bench_data, "evaluate.benchmarks=[mt_bench]",
                       "evaluate.mt_bench_rows=3", "evaluate.judge.model=stand-in", f"evaluate.judge.base_url={s.base_url}",
                       f"paths.judge_cache={tmp_path / 'cache'}", *elsewhere(tmp_path))
        table = evaluate(cfg)
    row = table["mt_bench_score"]
    assert row["parse_failures"] == {"base": 3, "tuned": 3}
    assert row["n"] == 3 and "mt_bench_score/turn_2" not in table and "mt_bench_score/turn_1" in table
    # the judgments file is FastChat's model_judgment format: its show_result gives the table's scores
    fastchat = show_result(tmp_path / "eval" / "outputs" / "mt_bench_judgments.jsonl")
    assert fastchat[("base", "all")] == pytest.approx(row["base"]) and fastchat[("tuned", 1)] == pytest.approx(row["tuned"])


def test_a_finished_runs_outputs_judged_again_by_another_judge_without_a_model(full_run, project, bench_data,
                                                                              tmp_path, at_repo_root):
    """The answers a run wrote (alpaca_eval model_outputs JSON, FastChat model_answer JSONL) judged again by
    another judge: the model and adapter named do not exist, so nothing is loaded or generated; the new judge
    is asked every judgment, and the same judging logic gives the same rows."""
    cfg, table, _ = full_run
    root, _ = project
    out = Path(cfg.paths.eval_dir) / "outputs"
    files = [f"evaluate.outputs.{side}.{b}={out / name}" for side in ("base", "tuned")
             for b, name in (("alpaca_eval", f"alpaca_eval_{side}.json"), ("mt_bench", f"mt_bench_{side}.jsonl"))]
    with JudgeServer() as other:
        again = make_cfg(root, "nobody/no-such-model", tmp_path / "no_adapter", bench_data,
                         "evaluate.benchmarks=[alpaca_eval,mt_bench]", "evaluate.judge.model=another-judge",
                         f"evaluate.judge.base_url={other.base_url}", *files, *elsewhere(tmp_path))
        rejudged = evaluate(again)
    assert other.requests == 4 * 3 + 4 * 2 * 2
    for name in ("alpaca_eval_win_rate", "alpaca_eval_tuned_vs_base", "mt_bench_score", "mt_bench_score/turn_2"):
        assert {k: rejudged[name][k] for k in ROW_KEYS} == {k: table[name][k] for k in ROW_KEYS}, name
    assert rejudged["mt_bench_score"]["judge"] == f"another-judge at {other.base_url}"
    # round trip: the answers judged are the files read, written again in the same formats
    new = tmp_path / "eval" / "outputs"
    for side in ("base", "tuned"):
        name = f"alpaca_eval_{side}.json"
        assert json.loads((new / name).read_text()) == json.loads((out / name).read_text())
        assert (new / f"mt_bench_{side}.jsonl").read_text() == (out / f"mt_bench_{side}.jsonl").read_text()


def test_unreachable_judge_is_an_error_row_naming_the_url(project, tiny_model_dir, bench_data, tmp_path, at_repo_root):
    root, adapter = project
    with JudgeServer() as s:
        url = s.base_url  # stopped on exit: nothing listens there any more
    cfg = make_cfg(root, tiny_model_dir, adapter, bench_data, "evaluate.benchmarks=[test_loss,mt_bench]",
                   "evaluate.mt_bench_rows=1", "evaluate.judge.model=stand-in", f"evaluate.judge.base_url={url}",
                   "evaluate.judge.max_retries=1", "evaluate.judge.timeout_s=5",
                   f"paths.judge_cache={tmp_path / 'cache'}", *elsewhere(tmp_path))
    with pytest.raises(LlmftError, match="unreachable") as e:
        evaluate(cfg)
    assert url in str(e.value)
    written = json.loads((tmp_path / "eval" / "table.json").read_text())
    assert written["mt_bench"]["status"] == "error" and url in written["mt_bench"]["reason"]
    assert "base" in written["test_loss"]  # the rest of the table is still written


@pytest.fixture(scope="module")
def served(project, tiny_model_dir, bench_data, tmp_path_factory):
    """The tuned model logged as llmft's pyfunc and served by a real `mlflow models serve` on 127.0.0.1."""
    from llmft import registry

    root, adapter = project
    work = tmp_path_factory.mktemp("served")
    cfg = make_cfg(work, tiny_model_dir, adapter, bench_data)
    with tracking.start_run(cfg, new=True):
        info = registry.log_model(cfg, str(tiny_model_dir), work)
    with model_server(info.model_uri, cfg.tracking.uri, work) as (url, _):
        yield url


def test_endpoint_candidate_answers_like_the_in_process_adapter(full_run, served, project, judge, tiny_model_dir,
                                                                bench_data, tmp_path, at_repo_root):
    """With evaluate.candidate_endpoint the tuned side is the served model: same prompts, template and greedy
    settings, so its answers (MT-Bench turn 2 included, sent as history) equal the in-process tuned answers."""
    cfg, table, _ = full_run
    root, adapter = project
    ecfg = make_cfg(root, tiny_model_dir, adapter, bench_data, "evaluate.benchmarks=[test_loss,rouge,mt_bench]",
                    f"evaluate.candidate_endpoint={served}", "evaluate.judge.model=stand-in",
                    f"evaluate.judge.base_url={judge.base_url}", *elsewhere(tmp_path))
    etable = evaluate(ecfg)

    def answers(d: Path, name: str):
        return [json.loads(x) for x in (d / name).read_text().splitlines()]

    local, remote = Path(cfg.paths.eval_dir) / "outputs", tmp_path / "eval" / "outputs"
    assert [r["output"] for r in answers(remote, "rouge_tuned.jsonl")] == [r["output"] for r in answers(local, "rouge_tuned.jsonl")]
    assert [a["choices"] for a in answers(remote, "mt_bench_tuned.jsonl")] == \
        [a["choices"] for a in answers(local, "mt_bench_tuned.jsonl")]
    assert etable["rouge_l"] == table["rouge_l"] and etable["mt_bench_score"] == table["mt_bench_score"]
    assert etable["test_loss"] == table["test_loss"]  # likelihoods still come from the adapter's weights
