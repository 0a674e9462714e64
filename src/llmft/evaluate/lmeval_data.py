"""lm-eval's official tasks on local copies of their datasets (evaluate.lm_eval_data).

For every leaf task under the requested names (mmlu's 57 subjects, bbh_fewshot's 27 subtasks, ...), one override
YAML `include:`s lm-eval's own YAML and replaces only the data source: `dataset_path: json` with one file per split
the task names. Prompts, few-shot pools, filters and metrics stay lm-eval's. The folder of overrides is written
to paths.eval_dir/lm_eval_tasks, so lm-eval's own CLI runs the same tasks:

    lm_eval run --model hf --model_args pretrained=MODEL --tasks mmlu --include_path results/eval/lm_eval_tasks

Where each hub dataset's files are expected under the data folder (DIR/<folder>/<split>.jsonl):

    cais/mmlu <subject>                 mmlu/<subject>/{test,dev}.jsonl
    SaylorTwift/bbh <subtask>           bbh/<subtask>/test.jsonl
    openai/gsm8k main                   gsm8k/{test,train}.jsonl
    allenai/ai2_arc ARC-Challenge       arc_challenge/{test,validation,train}.jsonl
    truthfulqa/truthful_qa multiple_choice   truthfulqa/validation.jsonl
    any other <path> <name>             <path>/<name>/<split>.jsonl

Each file holds the hub dataset's own fields, one row per line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import yaml

from ..errors import LlmftError
from ..io import atomic_dir

SPLITS = ("test_split", "validation_split", "training_split", "fewshot_split")

FOLDERS = {
    "cais/mmlu": "mmlu/{name}",
    "hails/mmlu_no_train": "mmlu/{name}",
    "SaylorTwift/bbh": "bbh/{name}",
    "lukaemon/bbh": "bbh/{name}",
    "openai/gsm8k": "gsm8k",
    "gsm8k": "gsm8k",
    "allenai/ai2_arc": "{snake}",
    "truthfulqa/truthful_qa": "truthfulqa",
    "truthful_qa": "truthfulqa",
}


def folder(dataset_path: str, dataset_name: Optional[str]) -> str:
    """The data folder's subfolder for one hub dataset (and config)."""
    pattern = FOLDERS.get(dataset_path)
    if pattern is None:
        return f"{dataset_path}/{dataset_name}" if dataset_name else dataset_path
    name = dataset_name or ""
    return pattern.format(name=name, snake=name.lower().replace("-", "_"))


def leaves(tm, name: str) -> list[str]:
    """The leaf tasks under a task, group or tag name, in lm-eval's order."""
    from lm_eval.tasks._index import Kind

    entry = tm.task_index.get(name)
    if entry is None:
        raise LlmftError(f"evaluate.lm_eval_tasks: lm-eval {_version()} has no task, group or tag {name!r}")
    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    if entry.kind == Kind.GROUP:
        out = []
        for child in entry.cfg["task"]:  # a name, or a task or group defined inline (left as it is)
            out += leaves(tm, child) if isinstance(child, str) else [child["task"]] if isinstance(child.get("task"), str) \
                else []
        return out
    return [name]


def write_tasks(tasks: list[str], data_dir: str, out_dir: str | Path, include_path: Optional[str] = None) -> Path:
    """Write one override YAML per leaf task of `tasks` into out_dir (replaced whole); returns out_dir.

    A leaf whose dataset is not on the hub (a local task, `dataset_path: json`) or that a group defines inline is
    left as it is."""
    from lm_eval.tasks import TaskManager

    tm = _quiet(lambda: TaskManager(include_path=include_path) if include_path else TaskManager())
    data = Path(data_dir).resolve()
    if not data.is_dir():
        raise LlmftError(f"evaluate.lm_eval_data: {data_dir} is not a directory")
    overrides = {}
    for task in tasks:
        for leaf in leaves(tm, task):
            entry = tm.task_index.get(leaf)
            cfg = (entry.cfg if entry else None) or {}
            source = cfg.get("dataset_path")
            if not source or source in ("json", "csv", "parquet", "text") or entry is None or entry.yaml_path is None:
                continue
            files = {}
            for key in SPLITS:
                split = cfg.get(key)
                if split and split not in files:
                    path = data / folder(source, cfg.get("dataset_name")) / f"{split}.jsonl"
                    if not path.is_file():
                        raise LlmftError(f"evaluate.lm_eval_data: task {leaf} needs its {split!r} split "
                                         f"({source} {cfg.get('dataset_name') or ''}) at {path}: no such file")
                    files[split] = str(path)
            overrides[leaf] = {"include": str(entry.yaml_path), "task": leaf, "tag": [], "dataset_path": "json",
                               "dataset_name": None, "dataset_kwargs": {"data_files": files}}
    with atomic_dir(out_dir) as tmp:
        for leaf, cfg in overrides.items():
            (Path(tmp) / f"{leaf}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Path(out_dir)


def task_manager(include_paths: list[str]):
    """lm-eval's TaskManager with extra task folders (later ones override earlier and the built-in tasks), without
    its warning per overridden task."""
    from lm_eval.tasks import TaskManager

    return _quiet(lambda: TaskManager(include_path=include_paths) if include_paths else TaskManager())


def _quiet(make):
    log = logging.getLogger("lm_eval.tasks._index")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return make()
    finally:
        log.setLevel(level)


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
