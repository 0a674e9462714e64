"""lm-eval's official tasks on local data (evaluate.lm_eval_data): the overrides, their errors, and the truth test:
llmft's base numbers equal what lm-eval's own CLI prints for the same model, data, shots, limit and seed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, child_env, make_adapter, project_config

from llmft.errors import LlmftError
from llmft.evaluate import lmeval, lmeval_data

TASKS = ["mmlu", "gsm8k", "bbh_fewshot", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2"]


def test_missing_file_names_task_split_and_path(tmp_path):
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    with pytest.raises(LlmftError, match=r"task gsm8k needs its 'train' split \(openai/gsm8k main\) at "
                                         + str(data / "gsm8k" / "train.jsonl")):
        lmeval_data.write_tasks(["gsm8k"], str(data), tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()  # nothing half-written


def test_overrides_replace_only_the_source(tmp_path):
    data = tmp_path / "data"
    for split in ("test", "train"):
        (data / "gsm8k").mkdir(parents=True, exist_ok=True)
        (data / "gsm8k" / f"{split}.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    out = lmeval_data.write_tasks(["gsm8k"], str(data), tmp_path / "tasks")
    tm = lmeval_data.task_manager([str(out)])
    cfg = tm.task_index["gsm8k"].cfg
    assert cfg["dataset_path"] == "json" and cfg["dataset_kwargs"]["data_files"]["train"].endswith("gsm8k/train.jsonl")
    official = lmeval_data.task_manager([]).task_index["gsm8k"].cfg
    same = {k for k in official if k not in ("dataset_path", "dataset_name", "dataset_kwargs", "tag")}
    assert {k: cfg[k] for k in same} == {k: official[k] for k in same}


def test_folders_of_the_five_tasks():
    assert lmeval_data.folder("cais/mmlu", "anatomy") == "mmlu/anatomy"
    assert lmeval_data.folder("allenai/ai2_arc", "ARC-Challenge") == "arc_challenge"
    assert lmeval_data.folder("truthfulqa/truthful_qa", "multiple_choice") == "truthfulqa"
    assert lmeval_data.folder("SaylorTwift/bbh", "snarks") == "bbh/snarks"
    assert lmeval_data.folder("someone/else", "cfg") == "someone/else/cfg"


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory, tiny_model_dir, shared_data):
    """llmft's lm_eval benchmark on the real files, 1 document per subtask, base vs a random adapter."""
    from llmft.evaluate import candidates

    tmp = tmp_path_factory.mktemp("lmeval_truth")
    adapter = make_adapter(tiny_model_dir, tmp / "adapter", seed=3)
    cfg = project_config(tmp, "evaluate.benchmarks=[lm_eval]", f"evaluate.lm_eval_tasks=[{','.join(TASKS)}]",
                         f"evaluate.lm_eval_data={shared_data / 'lm_eval'}", "evaluate.lm_eval_limit=1",
                         "evaluate.lm_eval_num_fewshot={mmlu: 5, arc_challenge: 3}", "evaluate.bootstrap_samples=200",
                         "evaluate.generation.batch_size=8",
                         "register.metric=lm_eval_mmlu_acc.tuned", model=tiny_model_dir, adapter=adapter)
    c = candidates.load(cfg)
    return lmeval.run(c), tmp


def test_base_numbers_equal_lm_eval_cli(slice_run):
    """tools/lm_eval_truth.py runs each task's recorded `cli` (lm-eval's own CLI) and compares every row's base."""
    table, tmp = slice_run
    tops = {n: r for n, r in table.items() if "/" not in n}
    assert all("status" not in r for r in tops.values()), tops
    (tmp / "eval").mkdir(exist_ok=True)
    (tmp / "eval" / "table.json").write_text(json.dumps(table))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "lm_eval_truth.py"), "--table",
                           str(tmp / "eval" / "table.json"), "--jobs", "2"], cwd=tmp, capture_output=True, text=True,
                          timeout=1200, env=child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    record = json.loads((tmp / "lm_eval_cli" / "comparison.json").read_text())
    assert set(record["tasks"]) == set(TASKS)
    compared = {row for t in record["tasks"].values() for row in t["rows"]}
    assert compared == {n for n in table if n.startswith("lm_eval_")}  # every row, subtasks included
    assert record["max_abs_diff"] < 5e-5, record


def test_rows_have_subtasks_cis_and_chance(slice_run, shared_data):
    table, _ = slice_run
    mmlu = table["lm_eval_mmlu_acc"]
    subjects = [n for n in table if n.startswith("lm_eval_mmlu_acc/")]
    assert len(subjects) == 57 + 4  # every subject and the four subgroups (stem, humanities, ...)
    assert mmlu["n"] == 57 and mmlu["fewshot"] == 5 and mmlu["chance"] == pytest.approx(0.25)
    lo, hi = mmlu["ci95"]
    assert lo <= mmlu["delta"] <= hi  # one document a subject: the stratified bootstrap has no spread to draw on
    assert table["lm_eval_bbh_fewshot_exact_match"]["n"] == 27
    assert len([n for n in table if n.startswith("lm_eval_bbh_fewshot_exact_match/")]) == 27
    mc1 = [json.loads(x) for x in (shared_data / "lm_eval" / "truthfulqa" / "validation.jsonl").open()][:1]
    assert table["lm_eval_truthfulqa_mc1_acc"]["chance"] == pytest.approx(1 / len(mc1[0]["mc1_targets"]["choices"]))
    assert table["lm_eval_truthfulqa_mc2_acc"]["chance"] == pytest.approx(np.mean(mc1[0]["mc2_targets"]["labels"]))
    assert {"lm_eval_gsm8k_exact_match_strict-match", "lm_eval_gsm8k_exact_match_flexible-extract"} <= set(table)


def test_a_rerun_reads_finished_tasks_back(tmp_path, tiny_model_dir, capsys):
    """Each task and side is kept under a key of what decides its scores: a killed evaluate resumes, and a new adapter
    or setting scores again."""
    import shutil

    from llmft.evaluate import candidates

    tasks = shutil.copytree(ROOT / "tests" / "data" / "lm_eval", tmp_path / "tasks")

    def table(adapter, *extra):
        cfg = project_config(tmp_path, "evaluate.benchmarks=[lm_eval]", "evaluate.lm_eval_tasks=[llmft_tiny_qa]",
                             f"evaluate.lm_eval_include_path={tasks}",
                             "evaluate.lm_eval_limit=4", "evaluate.bootstrap_samples=100",
                             "register.metric=lm_eval_llmft_tiny_qa_acc.tuned", *extra, model=tiny_model_dir,
                             adapter=adapter)
        out = lmeval.run(candidates.load(cfg))
        return out, capsys.readouterr().out

    first, log = table(make_adapter(tiny_model_dir, tmp_path / "a1", seed=1))
    assert "read back" not in log
    again, log = table(tmp_path / "a1")
    assert log.count("read back") == 2 and again == first
    other, log = table(make_adapter(tiny_model_dir, tmp_path / "a2", seed=2))
    assert "llmft_tiny_qa [base] read back" in log and "llmft_tiny_qa [tuned] read back" not in log
    assert other["lm_eval_llmft_tiny_qa_acc"]["base"] == first["lm_eval_llmft_tiny_qa_acc"]["base"]
    _, log = table(tmp_path / "a2", "evaluate.lm_eval_limit=3")
    assert "read back" not in log
    yaml_file = next(tasks.rglob("*.yaml"))
    yaml_file.write_text(yaml_file.read_text() + "\n# edited\n")  # a task YAML of lm_eval_include_path changed
    _, log = table(tmp_path / "a2", "evaluate.lm_eval_limit=3")
    assert "read back" not in log


def _leaf(scores: list[float]) -> dict:
    return {"samples": [{"doc_id": i, "filter": "none", "exact_match": v} for i, v in enumerate(scores)],
            "results": {"exact_match,none": float(np.mean(scores)), "alias": "x"}}


def _group(leaves: dict[str, list[float]], value: float) -> dict:
    """A compacted lm-eval result of the real group bbh_fewshot with two of its subtasks."""
    out = {"results": {"bbh_fewshot": {"exact_match,none": value, "alias": "bbh_fewshot"}},
           "group_subtasks": {"bbh_fewshot": list(leaves)}, "higher_is_better": {}, "samples": {},
           "chance": {leaf: {"exact_match,none": 0.5} for leaf in leaves}}
    for leaf, scores in leaves.items():
        one = _leaf(scores)
        out["samples"][leaf], out["results"][leaf] = one["samples"], {**one["results"], "alias": leaf}
    return out


def test_group_rows_are_lm_evals_aggregate_with_a_stratified_ci():
    tm = lmeval_data.task_manager([])
    a, b = "bbh_fewshot_snarks", "bbh_fewshot_navigate"
    base = {a: [1, 0, 1, 1, 0, 1, 0, 1], b: [0, 0, 1, 0]}
    tuned = {a: [1, 1, 1, 1, 0, 1, 1, 1], b: [0, 0, 0, 0]}
    size_weighted = {k: sum(sum(v) for v in d.values()) / 12 for k, d in (("base", base), ("tuned", tuned))}
    rows = lmeval.task_rows("bbh_fewshot", _group(base, size_weighted["base"]), _group(tuned, size_weighted["tuned"]),
                            tm, 500, 0)
    top = rows["lm_eval_bbh_fewshot_exact_match"]
    assert top["n"] == 12 and top["base"] == size_weighted["base"] and top["chance"] == pytest.approx(0.5)
    assert top["ci95"][0] < top["delta"] < top["ci95"][1]
    assert set(rows) == {"lm_eval_bbh_fewshot_exact_match", "lm_eval_bbh_fewshot_exact_match/snarks",
                         "lm_eval_bbh_fewshot_exact_match/navigate"}
    assert rows["lm_eval_bbh_fewshot_exact_match/navigate"]["delta"] == -0.25
    # a number the documents do not give (here 7/12): the CI would be of another number, so the row is an error
    wrong = lmeval.task_rows("bbh_fewshot", _group(base, 7 / 12), _group(tuned, 0.5), tm, 100, 0)
    assert wrong["lm_eval_bbh_fewshot_exact_match"]["status"] == "error"
    assert "is 0.583333; its documents' scores give 0.500000" in wrong["lm_eval_bbh_fewshot_exact_match"]["reason"]


def test_a_nested_group_is_the_mean_over_all_its_subtasks():
    """mmlu -> mmlu_stem -> subjects: lm-eval weighs every subject by its documents, at any depth."""
    tm = lmeval_data.task_manager([])
    subjects = {"mmlu_anatomy": [1, 0, 1], "mmlu_astronomy": [0, 0, 0, 0, 1], "mmlu_marketing": [1, 1]}
    tree = {"mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": ["mmlu_anatomy", "mmlu_astronomy"],
            "mmlu_other": ["mmlu_marketing"]}

    def result(shift):
        scores = {k: [min(1, v + shift) for v in vals] for k, vals in subjects.items()}
        out = {"results": {}, "group_subtasks": tree, "higher_is_better": {}, "samples": {}, "chance": {}}
        for leaf, vals in scores.items():
            out["samples"][leaf] = [{"doc_id": i, "filter": "none", "acc": float(v)} for i, v in enumerate(vals)]
            out["results"][leaf] = {"acc,none": float(np.mean(vals)), "alias": leaf}
            out["chance"][leaf] = {"acc,none": 0.25}
        for group in tree:
            docs = [v for leaf in lmeval._below(group, tree) if leaf in scores for v in scores[leaf]]
            out["results"][group] = {"acc,none": float(np.mean(docs)), "alias": group}
        return out

    rows = lmeval.task_rows("mmlu", result(0), result(1), tm, 200, 0)
    assert rows["lm_eval_mmlu_acc"]["base"] == pytest.approx(5 / 10) and rows["lm_eval_mmlu_acc"]["n"] == 10
    assert rows["lm_eval_mmlu_acc/stem"]["group"] and rows["lm_eval_mmlu_acc/stem"]["n"] == 8
    assert "group" not in rows["lm_eval_mmlu_acc/anatomy"] and rows["lm_eval_mmlu_acc/anatomy"]["n"] == 3


def test_worker_processes_score_what_one_process_scores(tmp_path, tiny_model_dir, capfd):
    """evaluate.lm_eval_jobs=2: each task x side runs in a worker process of its own, which leaves its result in the
    cache; the rows evaluate builds from them equal those of one process. A task whose worker fails is said so, and
    scored again by evaluate, where its failure becomes the task's error row."""
    import shutil

    from llmft.evaluate import candidates

    tasks = shutil.copytree(ROOT / "tests" / "data" / "lm_eval", tmp_path / "tasks")
    qa = (tasks / "tiny_qa.yaml").read_text()
    (tasks / "tiny_broken.yaml").write_text(qa.replace("task: llmft_tiny_qa", "task: llmft_tiny_broken")
                                            .replace("tiny_qa.jsonl", "no_such_file.jsonl"))
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=5)

    def table(root, jobs):
        cfg = project_config(root, "evaluate.benchmarks=[lm_eval]",
                             "evaluate.lm_eval_tasks=[llmft_tiny_qa,llmft_tiny_broken]",
                             f"evaluate.lm_eval_include_path={tasks}", "evaluate.lm_eval_limit=4",
                             "evaluate.bootstrap_samples=100", f"evaluate.lm_eval_jobs={jobs}",
                             "register.metric=lm_eval_llmft_tiny_qa_acc.tuned", model=tiny_model_dir, adapter=adapter)
        out = lmeval.run(candidates.load(cfg))
        return out, capfd.readouterr().out

    one, log = table(tmp_path / "one", 1)
    assert "at a time" not in log and "read back" not in log
    two, log = table(tmp_path / "two", 2)
    assert "4 task x side runs, 2 at a time" in log
    assert log.count("llmft_tiny_qa [base] 4 documents") == 1 and log.count("llmft_tiny_qa [tuned] 4 documents") == 1
    assert log.count("read back") == 2  # evaluate itself scored neither side of llmft_tiny_qa: the workers did
    assert "llmft_tiny_broken [base] worker exited with status 1; evaluate scores it itself" in log
    assert two["lm_eval_llmft_tiny_broken"]["status"] == "error" and two == one


def test_evaluate_records_lm_evals_own_cli_numbers(tmp_path, tiny_model_dir, capfd):
    """evaluate.lm_eval_truth: lm-eval's own CLI runs each task's `cli` beside the scoring (here beside two worker
    processes), every row carries its number, a rerun reads it back, and a row that differs becomes an error row."""
    import shutil

    from llmft.evaluate import candidates, lmeval_truth

    tasks = shutil.copytree(ROOT / "tests" / "data" / "lm_eval", tmp_path / "tasks")
    cfg = project_config(tmp_path, "evaluate.benchmarks=[lm_eval]", "evaluate.lm_eval_tasks=[llmft_tiny_qa]",
                         f"evaluate.lm_eval_include_path={tasks}", "evaluate.lm_eval_limit=4",
                         "evaluate.bootstrap_samples=100", "evaluate.lm_eval_jobs=2", "evaluate.lm_eval_truth=true",
                         "register.metric=lm_eval_llmft_tiny_qa_acc.tuned", model=tiny_model_dir,
                         adapter=make_adapter(tiny_model_dir, tmp_path / "adapter", seed=6))
    table = lmeval.run(candidates.load(cfg))
    log = capfd.readouterr().out
    rows = {n: r for n, r in table.items() if n.startswith("lm_eval_")}
    assert rows and all("status" not in r for r in rows.values()), rows
    assert all(abs(r["base"] - r["lm_eval_cli"]) < lmeval_truth.TOLERANCE for r in rows.values()), rows
    assert "llmft_tiny_qa base vs lm-eval's CLI: " in log
    cli_dir = Path(cfg.paths.eval_dir) / "lm_eval_cli"
    outputs = sorted(cli_dir.rglob("results_*.json"))
    assert len(outputs) == 1
    again = lmeval.run(candidates.load(cfg))
    assert again == table and sorted(cli_dir.rglob("results_*.json")) == outputs

    theirs = json.loads(outputs[0].read_text())["results"]
    name = next(iter(rows))
    theirs["llmft_tiny_qa"][lmeval.metric_key("llmft_tiny_qa", name, theirs["llmft_tiny_qa"])] += 1e-4
    assert lmeval_truth.check("llmft_tiny_qa", dict(table), theirs, 0)["lm_eval_llmft_tiny_qa_cli"]["status"] == "error"
