"""`evaluate` judging answers already on disk (evaluate.outputs), against the judge stand-in on 127.0.0.1, with no
model: repeats and their spread, a judge failing 30% of calls in every way a real one does, bad files, and a
benchmark without result failing the stage through the CLI.

Every config here names a model and an adapter that do not exist: when every judged side comes from files,
evaluate must load no model and generate nothing, or these tests fail at load.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import llmft, project_config, project_overrides
from judge_server import FAULT_KINDS, JudgeServer
from llmft.errors import LlmftError
from llmft.evaluate import evaluate, saved

NO_MODEL = ["model.base=nobody/no-such-model", "register.metric=train.eval_loss"]


def write_answers(d: Path, bench_data: dict, side: str, extra: int) -> dict[str, Path]:
    """Answers in alpaca_eval's model_outputs JSON and FastChat's model_answer JSONL; `extra` characters make one
    side's answers longer (the stand-in prefers, and rates higher, longer answers)."""
    d.mkdir(parents=True, exist_ok=True)
    ref = json.loads(bench_data["alpaca_eval"].read_text())
    alpaca = [{"instruction": r["instruction"], "output": f"Answer {i}. " + "more " * ((i * 7 + extra) % 13),
               "generator": f"model-{side}", "dataset": r["dataset"]} for i, r in enumerate(ref)]
    questions = [json.loads(x) for x in (bench_data["mt_bench"] / "question.jsonl").read_text().splitlines()]
    mt = [{"question_id": q["question_id"], "answer_id": f"{side}{q['question_id']}", "model_id": f"model-{side}",
           "choices": [{"index": 0, "turns": [f"First {q['question_id']}. " + "x" * ((q["question_id"] * 5 + extra) % 60),
                                              "Second. " + "y" * ((q["question_id"] * 3 + extra) % 50)]}],
           "tstamp": 0.0} for q in questions]
    (d / "model_outputs.json").write_text(json.dumps(alpaca, indent=2))
    (d / "model_answer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mt))
    return {"alpaca_eval": d / "model_outputs.json", "mt_bench": d / "model_answer.jsonl"}


@pytest.fixture(scope="module")
def answers(tmp_path_factory, bench_data):
    root = tmp_path_factory.mktemp("answers")
    return {"base": write_answers(root / "base", bench_data, "base", 0),
            "tuned": write_answers(root / "tuned", bench_data, "tuned", 17)}


def config(tmp: Path, bench_data: dict, answers: dict, judge_url: str, *overrides: str):
    files = [f"evaluate.outputs.{side}.{b}={p}" for side, bs in answers.items() for b, p in bs.items()]
    return project_config(
        tmp, *NO_MODEL, f"paths.judge_cache={tmp / 'cache'}",
        "evaluate.benchmarks=[alpaca_eval,mt_bench]", f"evaluate.mt_bench_data={bench_data['mt_bench']}",
        f"evaluate.alpaca_eval_data={bench_data['alpaca_eval']}", "evaluate.alpaca_eval_rows=6",
        "evaluate.mt_bench_rows=6", "evaluate.bootstrap_samples=200", "evaluate.judge.model=stand-in",
        f"evaluate.judge.base_url={judge_url}", *files, *overrides)


# ------------------------------------------------------------------------------------------ bad files
def _bad(tmp_path, bench_data, answers, bench: str, edit) -> str:
    src = answers["tuned"][bench]
    bad = tmp_path / f"bad{src.suffix}"
    bad.write_text(edit(src.read_text()))
    files = {"base": answers["base"], "tuned": {**answers["tuned"], bench: bad}}
    with pytest.raises(LlmftError) as e:
        saved.load(config(tmp_path, bench_data, files, "http://127.0.0.1:9/v1"))
    return str(e.value)


def _json_edit(f):
    return lambda text: json.dumps(f(json.loads(text)))


def _jsonl_edit(line_no: int, f):
    def edit(text):
        lines = text.splitlines()
        lines[line_no - 1] = json.dumps(f(json.loads(lines[line_no - 1])))
        return "\n".join(lines) + "\n"
    return edit


@pytest.mark.parametrize("bench, edit, expect", [
    ("alpaca_eval", _json_edit(lambda rows: rows[:2] + [{"output": "no instruction"}] + rows[2:]),
     r"bad.json\[2\]: record has no 'instruction'"),
    ("alpaca_eval", _json_edit(lambda rows: rows + [{"instruction": "Not an AlpacaEval question?", "output": "x"}]),
     r"bad.json\[12\]: instruction is not in the AlpacaEval set"),
    ("alpaca_eval", _json_edit(lambda rows: rows + [rows[3]]), r"bad.json\[12\]: instruction repeats .*bad.json\[3\]"),
    ("alpaca_eval", _json_edit(lambda rows: rows[1:]), r"evaluate.outputs.tuned.alpaca_eval: .* answers 5 of the 6"),
    ("alpaca_eval", lambda text: text[:-30], r"bad.json:\d+: invalid JSON"),
    ("mt_bench", _jsonl_edit(3, lambda r: {**r, "question_id": 9999}), r"bad.jsonl:3: question_id 9999 is not an MT-Bench"),
    ("mt_bench", _jsonl_edit(2, lambda r: {**r, "choices": [{"index": 0, "turns": ["only one"]}]}),
     r"bad.jsonl:2: question \d+ has 1 answer turn\(s\), MT-Bench asks 2"),
    ("mt_bench", _jsonl_edit(4, lambda r: {k: v for k, v in r.items() if k != "question_id"}),
     r"bad.jsonl:4: record has no 'question_id'"),
    ("mt_bench", _jsonl_edit(5, lambda r: {**r, "choices": []}), r"bad.jsonl:5: question \d+ has no choices\[0\].turns"),
    ("mt_bench", lambda text: "\n".join(text.splitlines()[1:]) + "\n",
     r"evaluate.outputs.tuned.mt_bench: .* answers 5 of the 6 sampled MT-Bench questions; missing question_id 81"),
])
def test_bad_files_name_the_file_and_record(tmp_path, bench_data, answers, bench, edit, expect):
    import re

    msg = _bad(tmp_path, bench_data, answers, bench, edit)
    assert re.search(expect, msg), msg


def test_missing_file_and_benchmark_not_run_fail_at_load(tmp_path, bench_data, answers):
    files = {"base": answers["base"], "tuned": {**answers["tuned"], "mt_bench": tmp_path / "nowhere.jsonl"}}
    with pytest.raises(LlmftError, match=r"evaluate.outputs.tuned.mt_bench: .*nowhere.jsonl not found"):
        evaluate(config(tmp_path, bench_data, files, "http://127.0.0.1:9/v1"))
    with pytest.raises(LlmftError, match=r"'evaluate.outputs.base.mt_bench' is set but mt_bench is not in evaluate.benchmarks"):
        config(tmp_path, bench_data, answers, "http://127.0.0.1:9/v1", "evaluate.benchmarks=[alpaca_eval]")


def test_saved_outputs_are_keyed_by_judged_benchmarks_of_the_table():
    """evaluate.outputs' keys (config.SavedOutputs) are the one list of benchmarks answerable from files."""
    from llmft.evaluate.benchmarks import BENCHMARKS

    assert saved.BENCHMARKS and all(b in BENCHMARKS and BENCHMARKS[b].judged for b in saved.BENCHMARKS)

def test_a_later_line_for_the_same_question_wins_as_in_fastchat(tmp_path, answers):
    text = answers["tuned"]["mt_bench"].read_text()
    first = json.loads(text.splitlines()[0])
    again = {**first, "choices": [{"index": 0, "turns": ["rerun one", "rerun two"]}]}
    (tmp_path / "a.jsonl").write_text(text + json.dumps(again) + "\n")
    assert saved.read_mt_bench(tmp_path / "a.jsonl")[first["question_id"]][1] == ["rerun one", "rerun two"]


# ------------------------------------------------------------------------------------------ judging files
@pytest.fixture(scope="module")
def judged(tmp_path_factory, bench_data, answers):
    """Both benchmarks, every side from files, judged once by a well-behaved stand-in."""
    tmp = tmp_path_factory.mktemp("judged")
    with JudgeServer() as s:
        cfg = config(tmp, bench_data, answers, s.base_url)
        table = evaluate(cfg)
        yield cfg, table, s


def test_files_are_judged_without_a_model(judged, answers):
    cfg, table, s = judged
    assert s.requests == 6 * 3 + 6 * 2 * 2  # AlpacaEval: base, tuned, head to head; MT-Bench: 2 turns x 2 sides
    for name in ("alpaca_eval_win_rate", "alpaca_eval_tuned_vs_base", "mt_bench_score"):
        assert "status" not in table[name] and table[name]["n"] >= 1, table[name]
    assert table["mt_bench_score"]["n_paired"] == 12 and table["mt_bench_score"]["n_scored"] == {"base": 12, "tuned": 12}
    # what was judged is written where evaluate writes its own answers, in the same formats
    out = Path(cfg.paths.eval_dir) / "outputs"
    tuned = json.loads((out / "alpaca_eval_tuned.json").read_text())
    assert len(tuned) == 6 and {r["generator"] for r in tuned} == {"model-tuned"}
    by_id = {json.loads(x)["question_id"]: json.loads(x) for x in answers["tuned"]["mt_bench"].read_text().splitlines()}
    for line in (out / "mt_bench_tuned.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["choices"][0]["turns"] == by_id[r["question_id"]]["choices"][0]["turns"]
    meta = json.loads((Path(cfg.paths.eval_dir) / "meta.json").read_text())
    assert "model_outputs.json" in meta["tuned"] and "model_answer.jsonl" in meta["base"]


def test_judging_in_place_keeps_the_file_whole(judged, bench_data, tmp_path):
    """Re-judging a finished run's outputs where they lie, on a smaller sample: the file is not cut to the sample."""
    import shutil

    cfg, table, s = judged
    eval_dir = tmp_path / "results" / "eval"
    shutil.copytree(Path(cfg.paths.eval_dir) / "outputs", eval_dir / "outputs")
    files = {side: {"alpaca_eval": eval_dir / "outputs" / f"alpaca_eval_{side}.json",
                    "mt_bench": eval_dir / "outputs" / f"mt_bench_{side}.jsonl"} for side in ("base", "tuned")}
    before = {p: p.read_text() for bs in files.values() for p in bs.values()}
    with JudgeServer() as again:
        table2 = evaluate(config(tmp_path, bench_data, files, again.base_url, "evaluate.alpaca_eval_rows=3",
                                 "evaluate.mt_bench_rows=3", f"paths.eval_dir={eval_dir}"))
    assert {p: p.read_text() for p in before} == before
    assert table2["mt_bench_score"]["n_paired"] == 6 and table2["alpaca_eval_win_rate"]["n"] == 3


# ------------------------------------------------------------------------------------------ repeats
def test_repeats_report_the_median_and_the_spread(bench_data, answers, tmp_path):
    """repeats=3 with a judge whose k-th answer to the same request moves (MT-Bench ratings +k): repeat 0 comes
    from the cache of a repeats=1 run, repeats 1 and 2 are asked anew; the row's score is the median repeat's,
    the spread every repeat's."""
    with JudgeServer() as s:
        s.vary = True
        cache = f"paths.judge_cache={tmp_path / 'cache'}"
        once = config(tmp_path / "once", bench_data, answers, s.base_url, cache)
        table1 = evaluate(once)
        first = s.requests
        cfg = config(tmp_path / "thrice", bench_data, answers, s.base_url, cache, "evaluate.judge.repeats=3")
        table = evaluate(cfg)
        assert s.requests == 3 * first  # repeats 1 and 2, as many judgments each as repeat 0
        again = s.requests
        evaluate(cfg)
        assert s.requests == again  # every repeat is cached under its own key
    judgments = [json.loads(x) for x in (Path(once.paths.eval_dir) / "outputs" / "mt_bench_judgments.jsonl")
                 .read_text().splitlines()]
    row, rep = table["mt_bench_score"], table["mt_bench_score"]["repeats"]
    assert rep["n"] == 3
    for side in ("base", "tuned"):
        ratings = [r["score"] for r in judgments if r["model"] == side]
        assert max(ratings) <= 8  # no rating is clipped at 10 below
        expected = [sum(k + r for k in ratings) / len(ratings) for r in range(3)]
        assert rep[side]["values"] == pytest.approx(expected)
        assert row[side] == pytest.approx(expected[1]) == pytest.approx(table1["mt_bench_score"][side] + 1)
        assert (rep[side]["min"], rep[side]["max"]) == pytest.approx((expected[0], expected[2]))
    assert row["delta"] == pytest.approx(row["tuned"] - row["base"])
    # AlpacaEval: the judge grows less sure with each repeat, so the win rates move towards 50
    win = table["alpaca_eval_win_rate"]
    values = win["repeats"]["tuned"]["values"]
    assert values[0] == pytest.approx(table1["alpaca_eval_win_rate"]["tuned"]) and len(set(values)) == 3
    assert win["tuned"] == pytest.approx(sorted(values)[1])
    lines = [json.loads(x) for x in (Path(cfg.paths.eval_dir) / "outputs" / "mt_bench_judgments.jsonl").read_text().splitlines()]
    assert sorted({r["repeat"] for r in lines}) == [0, 1, 2]
    md = (Path(cfg.paths.eval_dir) / "table.md").read_text()
    assert "Judge repeats (base / tuned are medians)" in md and "mt_bench_score: 3 repeats" in md


# ------------------------------------------------------------------------------------------ judge faults
KIND = {"timeout": "timeout", "429": "http_429", "500": "http_500", "503": "http_503",
        "malformed_body": "malformed_body", "empty_message": "empty_message"}


def test_a_judge_failing_30_percent_of_calls_in_every_way(bench_data, answers, tmp_path, capsys):
    """Timeouts past timeout_s, 429 with Retry-After, 500, 503, a truncated JSON body, an empty message: the run
    completes with every judgment parsed, counts each failure by kind and each retry in meta.json, table.md and
    the summary line, and a rerun asks for nothing again."""
    with JudgeServer() as s:
        # a client timeout well above a loaded 2-core machine's slowest real answer: only the stalls time out
        s.fault_rate, s.fault_seed, s.fault_delay = 0.3, 7, 5.0
        cfg = config(tmp_path, bench_data, answers, s.base_url, "evaluate.judge.timeout_s=3.5",
                     "evaluate.judge.max_retries=8", "evaluate.alpaca_eval_rows=12", "evaluate.mt_bench_rows=10")
        table = evaluate(cfg)
        line = capsys.readouterr().out.strip().splitlines()[-1]
        judgments = 12 * 3 + 10 * 2 * 2
        assert set(s.injected) == set(FAULT_KINDS)  # the seed gives every kind at least once
        assert sum(s.injected.values()) / s.requests == pytest.approx(0.3, abs=0.1)
        meta = json.loads((Path(cfg.paths.eval_dir) / "meta.json").read_text())
        calls = meta["judge_calls"]["total"]
        assert calls["failures"] == {KIND[k]: n for k, n in s.injected.items()}
        assert calls["requests"] == s.requests and calls["retries"] == s.requests - judgments
        assert calls["judgments"] == judgments and calls["given_up"] == 0
        assert sum(meta["judge_calls"][b]["requests"] for b in ("alpaca_eval", "mt_bench")) == s.requests
        for name in ("alpaca_eval_win_rate", "mt_bench_score"):
            assert table[name]["parse_failures"] == {"base": 0, "tuned": 0}, name
        assert table["alpaca_eval_tuned_vs_base"]["parse_failures"] == 0
        assert f"{calls['requests']} requests ({calls['retries']} retries; failures: " in line
        assert f"timeout {calls['failures']['timeout']}" in line and f"http_429 {calls['failures']['http_429']}" in line
        md = (Path(cfg.paths.eval_dir) / "table.md").read_text()
        assert "Judge calls, mt_bench: " in md and "malformed_body" in md

        asked = s.requests
        rerun = evaluate(config(tmp_path / "rerun", bench_data, answers, s.base_url,
                                f"paths.judge_cache={tmp_path / 'cache'}", "evaluate.alpaca_eval_rows=12",
                                "evaluate.mt_bench_rows=10"))
        assert s.requests == asked  # no judgment that succeeded is asked for again
        assert rerun["mt_bench_score"] == table["mt_bench_score"]
        assert rerun["alpaca_eval_win_rate"] == table["alpaca_eval_win_rate"]


# ------------------------------------------------------------------------------------------ no result, via the CLI
def test_no_parsable_judgment_fails_the_stage_through_the_cli(bench_data, answers, tmp_path):
    """A benchmark that yields no result: exit code 2, the table still written, the summary line says FAILED."""
    with JudgeServer() as s:
        s.malformed = True  # answers no parser can read ("I cannot grade this.")
        files = [f"evaluate.outputs.{side}.mt_bench={answers[side]['mt_bench']}" for side in ("base", "tuned")]
        args = [*project_overrides(tmp_path), *NO_MODEL, f"paths.judge_cache={tmp_path / 'cache'}",
                "evaluate.benchmarks=[mt_bench]", f"evaluate.mt_bench_data={bench_data['mt_bench']}",
                "evaluate.mt_bench_rows=2", "evaluate.judge.model=stand-in", f"evaluate.judge.base_url={s.base_url}",
                *files]
        res = llmft("evaluate", "--params", str(tmp_path / "none.yaml"), *args, cwd=tmp_path, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    table = json.loads((tmp_path / "results" / "eval" / "table.json").read_text())
    assert table["mt_bench"]["status"] == "error"
    assert table["mt_bench"]["parse_failures"] == {"base": 4, "tuned": 4}
    summary = [x for x in res.stdout.splitlines() if x.startswith("evaluate: ") and "table.md" in x][-1]
    assert summary.startswith("evaluate: FAILED (1 benchmark(s) yielded no result)")
    assert "mt_bench FAILED: no judgment could be parsed" in summary
    assert "llmft evaluate: error: 1 benchmark(s) yielded no result" in res.stderr
    assert (tmp_path / "results" / "eval" / "table.md").exists() and s.requests == 8
