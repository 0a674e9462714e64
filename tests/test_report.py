"""report stage: the PDF from a run's records. The records are written in the stages' formats (stats.json,
train.json, the loss CSVs, the eval table from the real paired bootstrap, register.json) beside a real MLflow
run on a SQLite store; the PDF is rendered to images with pypdfium2 and read back with pypdf."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from llmft import io, pdf, report, tracking
from llmft.config import flatten, load_config, rebased_paths, to_dict
from llmft.errors import LlmftError
from llmft.evaluate import stats
from llmft.evaluate import NO_JUDGE
from llmft.report_rules import num, signed, span

CATS = ("brainstorming", "classification", "closed_qa", "creative_writing", "general_qa", "information_extraction",
        "open_qa", "summarization")


def _eval_table(rng) -> dict:
    """A table as evaluate writes it, from the real paired bootstrap on synthetic per-example scores."""
    n = 40
    cats = [CATS[i % len(CATS)] for i in range(n)]
    base_nll = rng.uniform(1.8, 2.6, n)
    tuned_nll = base_nll - rng.uniform(0.1, 0.5, n)  # every example improves: the CI excludes 0
    tokens = rng.integers(20, 120, n)
    b, t = np.stack([base_nll * tokens, tokens], 1), np.stack([tuned_nll * tokens, tokens], 1)
    table = {"test_loss": stats.row(b, t, False, 200, 0, stat=stats.ratio, tokens=int(tokens.sum()),
                                    description="mean NLL per completion token on the test split")}
    table["test_perplexity"] = stats.row(b, t, False, 200, 0, stat=stats.ratio, transform=np.exp)
    table.update(stats.per_category(cats, b, t, False, 200, 0, "test_loss", stat=stats.ratio))
    base_r = rng.uniform(0.1, 0.4, 16)
    tuned_r = base_r + rng.normal(0, 0.05, 16)  # no real change: the CI should contain 0
    table["rouge_l"] = stats.row(base_r, tuned_r, True, 200, 0,
                                 description="ROUGE-L F1 vs the test split's reference responses")
    table.update(stats.per_category(cats[:16], base_r, tuned_r, True, 200, 0, "rouge_l"))  # n = 2 each
    table["reference_nll_alpaca_eval"] = stats.row(rng.uniform(1, 2, 3), rng.uniform(1, 2, 3), False, 200, 0)
    table["reference_nll_mt_bench"] = stats.skipped("../shared/data/mt_bench/question.jsonl not found")
    table["alpaca_eval"] = stats.skipped(NO_JUDGE)
    table["mt_bench"] = stats.skipped(NO_JUDGE)
    return table


def full_run(records: dict) -> dict:
    """The real job's table: a judge, AlpacaEval and MT-Bench per category, lm-eval tasks; and a study."""
    r = copy.deepcopy(records)
    rng = np.random.default_rng(3)
    mt_cats = ("coding", "extraction", "humanities", "math", "reasoning", "roleplay", "stem", "writing")
    cats = [mt_cats[i % 8] for i in range(160)]
    base, tuned = rng.integers(1, 11, 160).astype(float), rng.integers(2, 11, 160).astype(float)
    r["eval"]["mt_bench_score"] = stats.row(base, tuned, True, 200, 0, judge="gpt-4-1106-preview", parse_failures=3,
                                            description="MT-Bench single-answer grade 1-10, both turns")
    r["eval"].update(stats.per_category(cats, base, tuned, True, 200, 0, "mt_bench_score"))
    r["eval"].update(stats.per_category([f"turn_{1 + i % 2}" for i in range(160)], base, tuned, True, 200, 0,
                                        "mt_bench_score"))
    a_cats = [("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")[i % 5] for i in range(805)]
    wb, wt = np.full(805, 50.0), rng.choice([0.0, 100.0], 805, p=[0.45, 0.55])
    r["eval"]["alpaca_eval_win_rate"] = stats.row(wb, wt, True, 200, 0, judge="gpt-4-1106-preview",
                                                  description="win rate (%) vs GPT-4-turbo reference outputs")
    r["eval"].update(stats.per_category(a_cats, wb, wt, True, 200, 0, "alpaca_eval_win_rate"))
    r["eval"]["alpaca_eval_lc_win_rate"] = stats.skipped("alpaca_eval's length-controlled GLM could not run offline")
    del r["eval"]["alpaca_eval"], r["eval"]["mt_bench"]
    for task, metric in (("mmlu", "acc"), ("gsm8k", "exact_match_strict-match"), ("gsm8k", "exact_match_flexible-extract"),
                         ("bbh", "exact_match"), ("arc_challenge", "acc"), ("arc_challenge", "acc_norm"),
                         ("truthfulqa_mc2", "acc")):
        b = rng.integers(0, 2, 300).astype(float)
        r["eval"][f"lm_eval_{task}_{metric}"] = stats.row(b, np.where(rng.random(300) < 0.1, 1 - b, b), True, 200, 0)
    r["evaluate"] |= {"judge": "gpt-4-1106-preview", "benchmarks": ["test_loss", "reference_nll", "rouge",
                                                                  "alpaca_eval", "mt_bench", "lm_eval"]}
    r["study"] = [{"number": i, "state": "PRUNED" if i % 4 == 3 else "COMPLETE", "value": 1.6 + 0.05 * ((i * 7) % 12),
                   "params": {"train.learning_rate": 10 ** -(3 + i % 3), "train.lora.r": 8 * (1 + i % 4)},
                   "mlflow_run_id": f"{i:02d}" + "f" * 30} for i in range(12)]
    return r


def write_records(root: Path, store: str):
    """A run's records in the stages' formats; returns the config."""
    cfg = load_config(root / "missing.yaml", [f"tracking.uri={store}", f"tracking.artifact_location={root / 'art'}",
                                               *rebased_paths(root)])
    rng = np.random.default_rng(7)
    split_rows = {"train": 128, "validation": 16, "test": 16}
    split = {s: {"rows": n, "categories": {c: n // len(CATS) for c in CATS},
                 "tokens": {"p50": 100 + i, "p90": 190 + i, "p99": 240 + i, "max": 251 + i, "mean": 112 + i}}
             for i, (s, n) in enumerate(split_rows.items())}
    io.write_json(Path(cfg.paths.data) / "stats.json", {
        "provenance": {"source": "embedded", "path": "/x/assets/sample.jsonl", "sha256": "ab" * 32},
        "template": "alpaca", "rows_in": 163, "dropped": {"empty_response": 1, "empty_instruction": 0, "duplicate": 2},
        "splits": split})
    train_pts = [(s, 2.4 - 0.04 * s + 0.03 * rng.standard_normal()) for s in range(2, 21, 2)]
    val_pts = [(0, 2.45), (10, 2.1), (20, 2.0)]  # still falling at the end
    plots_dir = Path(cfg.paths.train_plots)
    from llmft.plots import loss_curves

    loss_curves(train_pts, val_pts, plots_dir)
    io.write_json(cfg.paths.train_metrics, {
        "train_loss": train_pts[-1][1], "eval_loss": val_pts[-1][1], "best_eval_loss": min(v for _, v in val_pts),
        "steps": 20, "epochs": 0.625, "tokens_seen": 41234, "runtime_s": 212.4, "tokens_per_s": 194.1,
        "steady_tokens_per_s": 201.7, "resumed_from": "", "peak_rss_gib": 3.21})
    eval_dir = Path(cfg.paths.eval_dir)
    io.write_json(eval_dir / "table.json", _eval_table(rng))
    io.write_json(eval_dir / "meta.json", {"runtime_s": 95.0})

    import mlflow

    with tracking.start_run(cfg, new=True):  # what train does
        params = tracking.scrub(flatten(to_dict(cfg)))
        params.update({"resolved.precision": "fp32", "resolved.trainable_params": 4884480,
                       "resolved.total_params": 139399488, "resolved.train_rows": 128, "resolved.eval_rows": 16})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items() if not k.startswith("paths")})
        mlflow.set_tags({"git.commit": "0123456789abcdef0123456789abcdef01234567", "git.dirty": "false",
                         "dvc.md5.data/processed": "d41d8cd98f00b204e9800998ecf8427e.dir", "cpu": "Test CPU 9000",
                         "cpu_count": "2", "ram_gb": "7.8", "gpu": "none", "python": "3.11.7",
                         "platform": "Linux-6.1-x86_64", "version.torch": "2.13.0", "version.peft": "0.21.2"})
        mlflow.log_metric("final/train_loss", train_pts[-1][1])
    io.write_json(cfg.paths.register_metrics, {
        "model_name": "llmft", "version": 3, "alias": "champion", "promoted": True, "decision": "promoted",
        "reason": "better", "metric": "test_loss.tuned", "direction": "minimize", "candidate": 1.7, "champion": 1.9,
        "champion_version": 2})
    return cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds); each test opens its own run."""
    import mlflow

    yield f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    mlflow.set_tracking_uri(None)  # later modules must not inherit this store


def text_of(path) -> str:
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(str(path)).pages)


def flat(text: str) -> str:
    """pypdf's text with one space between words (lines wrap anywhere)."""
    return re.sub(r"\s+", " ", text)


def render(path: Path, out_dir: Path) -> list[Path]:
    """Each page as a PNG at 100 dpi (pypdfium2: PDFium in a wheel, no system libraries)."""
    import pypdfium2

    doc = pypdfium2.PdfDocument(str(path))
    pngs = []
    for i in range(len(doc)):
        png = out_dir / f"page{i + 1}.png"
        doc[i].render(scale=100 / 72).to_pil().save(png)
        pngs.append(png)
    doc.close()
    return pngs


# ------------------------------------------------------------------------------------------ tests
def test_report_prints_the_records(tmp_path, store):
    cfg = write_records(tmp_path, store)
    out = report.report(cfg)

    pages = render(out, tmp_path)
    assert 2 <= len(pages) <= 4
    from PIL import Image

    for png in pages:  # every page has content: not blank, not a single line
        ink = np.asarray(Image.open(png).convert("L")) < 128
        assert ink.mean() > 0.01 and ink.any(axis=1).sum() > 100, png

    text = flat(text_of(out))
    for n, title in enumerate(("Dataset", "Implementation", "Evaluation", "Hardware", "Results", "Discussion"), 1):
        assert f"{n} {title}" in text

    table = json.loads((Path(cfg.paths.eval_dir) / "table.json").read_text())
    for name, row in table.items():
        if "status" in row:  # skipped benchmarks appear with their reasons
            assert re.search(rf"{name} skipped {re.escape(row['reason'])}", text), name
        elif "/" not in name:  # each result row, as printed: base, tuned, delta, CI, n
            cells = rf"{name} [↑↓] {re.escape(num(row['base']))} {re.escape(num(row['tuned']))} " \
                    rf"{re.escape(signed(row['delta']))} {re.escape(span(row['ci95']))} {row['n']} "
            m = re.search(cells, text)
            assert m, name
            # ... and the printed numbers read back as the file's, to the 4 significant digits printed
            numbers = re.findall(r"[+−]?\d+\.?\d*(?:e[+−]\d+)?", m.group(0)[len(name):])
            printed = [float(x.replace("−", "-")) for x in numbers]
            want_all = [row["base"], row["tuned"], row["delta"], *row["ci95"], row["n"]]
            assert len(printed) == len(want_all), (name, printed)
            for got, want in zip(printed, want_all):
                assert got == pytest.approx(want, rel=5e-4, abs=1e-12), (name, got, want)

    stats_ = json.loads((Path(cfg.paths.data) / "stats.json").read_text())
    sp = stats_["splits"]
    assert f"total {sp['train']['rows']} {sp['validation']['rows']} {sp['test']['rows']} " in text
    for s in sp:
        t = sp[s]["tokens"]
        assert f"{s} {t['p50']} {t['p90']} {t['p99']} {t['max']} {t['mean']}" in text
    assert stats_["provenance"]["sha256"] in text.replace(" ", "")
    train = json.loads(Path(cfg.paths.train_metrics).read_text())
    assert f"Final: {num(train['train_loss'])} (train), {num(train['eval_loss'])} (validation)" in text
    assert f"{train['runtime_s']:,.1f} s" in text and f"{num(train['tokens_per_s'])} tokens/s" in text
    assert "95.0 s" in text  # evaluate's runtime from meta.json; prepare and register did not record one
    assert "prepare not recorded" in text and "register not recorded" in text
    assert "Test CPU 9000, 2 cores" in text and "none (CPU only)" in text and "torch 2.13.0" in text
    reg = json.loads(Path(cfg.paths.register_metrics).read_text())
    assert (f"Registered as {reg['model_name']} v{reg['version']}: promoted to the alias @{reg['alias']} "
            f"({reg['reason']}; {reg['metric']} minimized, candidate {num(reg['candidate'])} against champion "
            f"v{reg['champion_version']} ({num(reg['champion'])}))") in text

    # logged to the pipeline's run
    from mlflow import MlflowClient

    run_id = Path(cfg.paths.run_id).read_text().strip()
    assert [a.path for a in MlflowClient(store).list_artifacts(run_id, "report")] == ["report/report.pdf"]


def test_discussion_follows_the_numbers(tmp_path, store):
    cfg = write_records(tmp_path / "a", store)
    records = report.collect(cfg)

    def build(records, name):
        report.build(records, tmp_path / name)
        return flat(text_of(tmp_path / name))

    text = build(records, "a.pdf")
    # test_loss: every example improves -> its CI excludes 0; rouge_l: no shift -> its CI contains 0 (checked
    # against the table itself, so the fixture cannot drift from the claim)
    tl, rl = records["eval"]["test_loss"], records["eval"]["rouge_l"]
    assert tl["ci95"][1] < 0 and rl["ci95"][0] < 0 < rl["ci95"][1]
    assert "What improved. The tuned model is better on test_loss" in text
    assert f"there is no significant difference, on rouge_l {span(rl['ci95'])} at n = {rl['n']}." in text
    assert "Too few examples for a verdict (n < 5): reference_nll_alpaca_eval at n = 3." in text
    assert "No judge was configured, so the judged benchmarks (alpaca_eval, mt_bench) are not shown" in text
    assert "still falling at the end" in text  # the last validation point is 5% below the one before

    moved = copy.deepcopy(records)
    moved["eval"]["rouge_l"] |= {"delta": 0.08, "ci95": [0.05, 0.11]}  # now it excludes 0, in tuned's favour
    moved["loss"]["validation"][-1] = [20, 2.3]  # and validation loss rose after step 10
    moved["evaluate"]["judge"] = "gpt-4"
    text2 = build(moved, "b.pdf")
    assert "better on test_loss" in text2 and "rouge_l 0." in text2.split("What got worse")[0]
    assert "no significant difference, on rouge_l" not in text2
    assert "bottomed at 2.1 (step 10) and ended at 2.3" in text2 and "still falling" not in text2
    assert "No judge was configured" not in text2 and "alpaca_eval was skipped" in text2

    worse = copy.deepcopy(records)
    worse["eval"]["test_loss"] |= {"delta": 0.3, "ci95": [0.1, 0.5]}
    assert "The tuned model is worse on test_loss" in build(worse, "c.pdf")


def test_rerun_is_identical_and_a_crash_keeps_the_previous_pdf(tmp_path, store, monkeypatch):
    cfg = write_records(tmp_path, store)
    records = report.collect(cfg)
    out = tmp_path / "r.pdf"
    report.build(records, out)
    first = out.read_bytes()
    report.build(report.collect(cfg), out)
    assert text_of(out) == text_of(tmp_path / "r.pdf") and out.read_bytes() == first  # same records, same bytes

    changed = copy.deepcopy(records)
    changed["train"]["runtime_s"] = 999.0

    def crash(canvas, doc):
        if canvas.getPageNumber() == 2:  # the first page is already laid out: a crash mid-document
            raise RuntimeError("killed mid-build")

    monkeypatch.setattr(pdf, "_footer", crash)
    with pytest.raises(RuntimeError):
        report.build(changed, out)
    assert out.read_bytes() == first
    assert [p.name for p in tmp_path.glob(".r.pdf*")] == []  # no temp file left behind


def test_missing_records_and_secrets(tmp_path, store):
    cfg = write_records(tmp_path, store)
    table_path = Path(cfg.paths.eval_dir) / "table.json"
    table = json.loads(table_path.read_text())
    table["mt_bench"]["reason"] = "judge failed: 401 for key sk-abcdef1234567890 at https://user:pw@judge.example/v1"
    io.write_json(table_path, table)
    text = flat(text_of(report.report(cfg)))
    assert "sk-abcdef" not in text and "user:pw" not in text and "judge.example/v1" in text

    Path(cfg.paths.train_metrics).unlink()
    with pytest.raises(LlmftError, match=re.escape(cfg.paths.train_metrics)):
        report.collect(cfg)


def test_a_skip_reason_reads_as_a_short_sentence_not_an_exception(tmp_path, store):
    # The reasons as evaluate records them offline (sources' own message around the exception datasets and
    # huggingface_hub raise; lm-eval's); the report names the cause, table.json keeps the whole text.
    from llmft.evaluate import sources

    cfg = write_records(tmp_path, store)
    table_path = Path(cfg.paths.eval_dir) / "table.json"
    table = json.loads(table_path.read_text())
    offline = ConnectionError("Couldn't reach 'tatsu-lab/alpaca_eval' on the Hub (OfflineModeIsEnabled)")
    table["alpaca_eval"] = stats.skipped(sources._hub_failure(
        "AlpacaEval data", "tatsu-lab/alpaca_eval", "evaluate.alpaca_eval_data", offline, "a local copy"))
    table["mt_bench"] = stats.skipped(
        "MT-Bench data lmsys/mt-bench could not be loaded from the hub (LocalEntryNotFoundError: An error happened "
        "while trying to locate the file on the Hub and we cannot find the requested files in the local cache.); "
        "offline, set evaluate.mt_bench_data to a directory holding question.jsonl")
    table["lm_eval_mmlu"] = stats.skipped("lm-eval could not run task mmlu: ConnectionError: Couldn't reach "
                                          "'cais/mmlu' on the Hub (OfflineModeIsEnabled); offline, use a local "
                                          "task YAML (evaluate.lm_eval_include_path)")
    table["lm_eval_gsm8k"] = stats.error("lm-eval could not run task gsm8k: KeyError: 'doc_to_text'")
    io.write_json(table_path, table)
    records = report.collect(cfg)
    records["evaluate"]["judge"] = "gpt-4"  # the judged benchmarks were skipped for their data, not for no judge
    report.build(records, tmp_path / "r.pdf")
    text = flat(text_of(tmp_path / "r.pdf"))
    discussion = text.split("6 Discussion")[1]
    assert ("alpaca_eval was skipped, so the run says nothing about it: its data is not available offline "
            "(tatsu-lab/alpaca_eval; evaluate.alpaca_eval_data can name a local copy).") in discussion
    assert ("mt_bench was skipped, so the run says nothing about it: its data is not available offline "
            "(lmsys/mt-bench; evaluate.mt_bench_data can name a local copy).") in discussion
    assert ("lm_eval_mmlu was skipped, so the run says nothing about it: its data is not available offline "
            "(lm-eval task mmlu; evaluate.lm_eval_include_path can name a local copy).") in discussion
    for exception_text in ("ConnectionError", "Couldn't reach", "OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        assert exception_text not in text
    # a failure keeps its whole reason: it is what has to be fixed
    assert "lm_eval_gsm8k failed, so the run says nothing about it: lm-eval could not run task gsm8k: KeyError" in text
    # the whole text stays in the records
    assert json.loads(table_path.read_text())["alpaca_eval"]["reason"].startswith(
        "AlpacaEval data tatsu-lab/alpaca_eval could not be loaded from the hub (ConnectionError: Couldn't reach")


def test_a_full_run_fits_and_shows_the_study(tmp_path, store):
    from pypdf import PdfReader

    records = full_run(report.collect(write_records(tmp_path, store)))
    out = tmp_path / "full.pdf"
    pages = report.build(records, out)
    assert 2 <= pages <= 4 and len(PdfReader(str(out)).pages) == pages
    text = flat(text_of(out))
    assert "Judged metrics use gpt-4-1106-preview" in text and "No judge was configured" not in text
    assert "could not be parsed for 3 answers on mt_bench_score" in text
    assert "The Optuna study ran 12 trials (9 complete, 3 pruned)" in text

    def listed(text):
        return [int(n) for n in re.findall(r"#(\d+) [\d.]+ train\.learning_rate", text)]

    done = sorted((t for t in records["study"] if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    assert listed(text) == [t["number"] for t in done[:5]]
    report.build(records | {"study_direction": "maximize"}, out)
    assert listed(flat(text_of(out))) == [t["number"] for t in done[::-1][:5]]


def test_benchmarks_are_grouped_and_ordered_by_evaluates_table(monkeypatch):
    """The report reads evaluate.benchmarks.BENCHMARKS: a benchmark added there is grouped and ordered, no other edit."""
    from llmft import report_rules
    from llmft.evaluate.benchmarks import BENCHMARKS, Benchmark

    monkeypatch.setitem(BENCHMARKS, "toxicity", Benchmark("toxicity:run", judged=False,
                                                          rows={"toxicity_rate": False}))
    assert report_rules.benchmark_of("toxicity_rate/open_qa") == "toxicity"
    assert report_rules.benchmark_of("test_perplexity") == "test_loss"
    assert report_rules.benchmark_of("mt_bench") == "mt_bench"  # a skipped benchmark's row
    names = ["toxicity_rate", "zz_unknown", "lm_eval_arc_acc", "mt_bench", "test_perplexity", "rouge_l", "test_loss",
             "reference_nll_mt_bench", "alpaca_eval_win_rate", "alpaca_eval_lc_win_rate", "lm_eval"]
    assert sorted(names, key=report_rules._order) == [
        "test_loss", "test_perplexity", "reference_nll_mt_bench", "rouge_l", "alpaca_eval_lc_win_rate",
        "alpaca_eval_win_rate", "mt_bench", "lm_eval", "lm_eval_arc_acc", "toxicity_rate", "zz_unknown"]


def test_reasoning_paragraph_names_degraded_tasks_chance_and_subtasks():
    """The Discussion's lm-eval paragraph, from the rows alone: which task degraded (CI on the worse side), which
    did not, which sits at chance, and how many subtasks moved (subgroup rows not counted)."""
    from llmft import report_rules

    def row(base, tuned, ci, n=500, chance=None, group=False, **extra):
        out = {"base": base, "tuned": tuned, "delta": tuned - base, "ci95": ci, "n": n, "higher_is_better": True,
               "ci95_base": [base - 0.02, base + 0.02], "ci95_tuned": [tuned - 0.02, tuned + 0.02], **extra}
        return {**out, **({"chance": chance} if chance is not None else {}), **({"group": True} if group else {})}

    r = {"eval": {"test_loss": {**row(2.0, 1.8, [-0.3, -0.1]), "higher_is_better": False},
                  "lm_eval_mmlu_acc": row(0.40, 0.37, [-0.05, -0.01], chance=0.25),
                  "lm_eval_mmlu_acc/stem": row(0.3, 0.2, [-0.2, -0.05], group=True),
                  "lm_eval_mmlu_acc/anatomy": row(0.5, 0.3, [-0.3, -0.1]),
                  "lm_eval_mmlu_acc/marketing": row(0.5, 0.5, [-0.1, 0.1]),
                  "lm_eval_truthfulqa_mc2_acc": row(0.45, 0.44, [-0.02, 0.01], chance=0.448)}}
    text = " ".join(report_rules._reasoning(r))
    assert "significantly worse on <i>lm_eval_mmlu_acc</i> 0.4 → 0.37" in text
    assert "No significant change on <i>lm_eval_truthfulqa_mc2_acc</i>" in text
    assert ("On <i>lm_eval_truthfulqa_mc2_acc</i> (chance 0.448) both models score at or below chance level (within "
            "the 95% CI): the task is not solved") in text
    assert "lm_eval_mmlu_acc</i> at or below" not in text  # 0.40 ± 0.02 is clear of 0.25
    assert "significantly worse in 1 of 2 (anatomy)" in text  # stem, a subgroup, is not a subtask
    assert "test_loss" not in text  # the other benchmarks have their own paragraphs
    r["eval"] = {k: v for k, v in r["eval"].items() if not k.startswith("lm_eval_mmlu")}
    assert "No task's metric degraded significantly" in " ".join(report_rules._reasoning(r))
    r["eval"]["lm_eval_arc_challenge_acc"] = row(0.26, 0.25, [-0.03, 0.01], chance=0.25)  # one sentence for both
    assert ("On <i>lm_eval_arc_challenge_acc</i> (chance 0.25); <i>lm_eval_truthfulqa_mc2_acc</i> (chance 0.448) both "
            "models score at or below chance level (within the 95% CI): these tasks are not solved, so their Δ says "
            "little") in " ".join(report_rules._reasoning(r))


def test_extended_evaluation_says_how_far_lm_evals_cli_agrees():
    """The Extended evaluation's caption: how many lm-eval rows were run through lm-eval's own CLI, and the largest
    difference; or that none were."""
    from llmft import report, report_rules

    def row(base, cli=None):
        out = {"base": base, "tuned": base, "delta": 0.0, "ci95": [-0.01, 0.01], "n": 100, "higher_is_better": True}
        return {**out, **({"lm_eval_cli": cli} if cli is not None else {})}

    r = {"eval": {"test_loss": row(2.0, 9.0), "lm_eval_arc_challenge_acc": row(0.30, 0.30002),
                  "lm_eval_mmlu_acc": row(0.40, 0.40), "lm_eval_mmlu_acc/anatomy": row(0.5, 0.50001),
                  "lm_eval_gsm8k_cli": {"status": "error", "reason": "differs"}}}
    assert report_rules.truth(r) == (3, 3, pytest.approx(2e-5))  # test_loss is not lm-eval's
    assert "the base numbers of all 3 rows (subtasks included) agree with what it prints to within 2.0e-05" in \
        report._truth(r)
    del r["eval"]["lm_eval_mmlu_acc"]["lm_eval_cli"]
    assert "of 2 of 3 rows" in report._truth(r)
    r["eval"] = {k: {x: y for x, y in v.items() if x != "lm_eval_cli"} for k, v in r["eval"].items()}
    assert report._truth(r) == "These commands were not run here (evaluate.lm_eval_truth)."
    r["eval"]["lm_eval_mmlu_acc"]["lm_eval_cli"] = 0.40
    assert report._truth(r).endswith("the base numbers of 1 of 3 rows (subtasks included) agree with what it prints "
                                     "exactly.")
