"""lm-eval's official tasks on local data (evaluate.lm_eval_data): the overrides, their errors, and the truth test:
llmft's base numbers equal what lm-eval's own CLI prints for the same model, data, shots, limit and seed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_rows_have_subtasks_cis_and_chance(slice_run):
    table, _ = slice_run
    mmlu = table["lm_eval_mmlu_acc"]
    subjects = [n for n in table if n.startswith("lm_eval_mmlu_acc/")]
    assert len(subjects) == 57 + 4  # every subject and the four subgroups (stem, humanities, ...)
    assert mmlu["n"] == 57 and mmlu["fewshot"] == 5 and mmlu["chance"] == pytest.approx(0.25)
    lo, hi = mmlu["ci95"]
    assert lo <= mmlu["delta"] <= hi and lo < hi
    assert table["lm_eval_bbh_fewshot_exact_match"]["n"] == 27
    assert len([n for n in table if n.startswith("lm_eval_bbh_fewshot_exact_match/")]) == 27
    assert 0 < table["lm_eval_truthfulqa_mc2_acc"]["chance"] < 0.5
    assert {"lm_eval_gsm8k_exact_match_strict-match", "lm_eval_gsm8k_exact_match_flexible-extract"} <= set(table)
