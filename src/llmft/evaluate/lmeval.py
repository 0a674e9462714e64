"""lm-evaluation-harness tasks (MMLU, GSM8K, BBH, ARC-Challenge, TruthfulQA, or local task YAMLs).

lm-eval's `hf` model wraps the weights the candidates loaded (models.load: model.revision and the trust rules apply
as everywhere): the tuned side with its adapter on, the base side with it off, one copy of the weights. Tasks run
one at a time so a task that cannot load (a hub dataset offline) becomes an error row instead of failing the others.
Per-document scores from `log_samples` pair the two sides for the bootstrap.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from . import candidates as cands
from . import stats


def _fewshot(setting, task: str) -> Optional[int]:
    return setting.get(task) if isinstance(setting, dict) else setting


def _hflm(c: cands.Candidates, batch_size: int):
    """lm-eval's `hf` model around the loaded weights (it takes a model instance as `pretrained`)."""
    import logging

    from lm_eval.models.huggingface import HFLM

    quiet = logging.getLogger("lm_eval.models.huggingface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning that other model arguments are ignored: none are given
    try:
        return HFLM(pretrained=c.model, tokenizer=c.tok, batch_size=batch_size)
    finally:
        quiet.setLevel(level)


def _per_doc(samples: dict) -> dict[tuple, dict[str, float]]:
    """{(subtask, filter, doc_id): {metric: value}} from simple_evaluate's samples."""
    out = {}
    for task, rows in samples.items():
        for s in rows:
            out[(task, s.get("filter", "none"), s["doc_id"])] = {m: s[m] for m in s.get("metrics", []) if m in s}
    return out


def _name(task: str, metric: str, filt: str) -> str:
    name = f"lm_eval_{task}_{metric}" + ("" if filt == "none" else f"_{filt}")
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def _run_tasks(e, tm, lm, side: str, results: dict, errors: dict) -> None:
    """Every task for one side, one at a time: a task that cannot load becomes an error, the others still run."""
    import lm_eval

    for task in e.lm_eval_tasks:
        if task in errors:
            continue
        try:
            r = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=tm, num_fewshot=_fewshot(e.lm_eval_num_fewshot, task),
                limit=e.lm_eval_limit, log_samples=True, bootstrap_iters=0, random_seed=e.seed,
                numpy_random_seed=e.seed, torch_random_seed=e.seed, fewshot_random_seed=e.seed)
        except Exception as ex:  # unknown task, dataset not downloadable offline, ...
            errors[task] = f"{type(ex).__name__}: {str(ex)[:300]}"
            continue
        results[task][side] = r


def run(c: cands.Candidates, judge=None) -> dict:
    from lm_eval.tasks import TaskManager

    e = c.cfg.evaluate
    if c.adapter is None:
        return {"lm_eval": stats.skipped("needs the tuned weights: no adapter in paths.adapter")}
    tm = TaskManager(include_path=e.lm_eval_include_path) if e.lm_eval_include_path else TaskManager()
    results: dict[str, dict] = {t: {} for t in e.lm_eval_tasks}
    errors: dict[str, str] = {}
    lm = _hflm(c, e.generation.batch_size)
    for side in ("base", "tuned"):
        with cands.as_side(c, side):
            _run_tasks(e, tm, lm, side, results, errors)
    out = {}
    for task in e.lm_eval_tasks:
        if task in errors:
            why = f"lm-eval could not run task {task}: {errors[task]}"
            # a hub dataset that cannot be fetched offline is unavailable data, as for AlpacaEval and MT-Bench
            if any(s in errors[task] for s in ("OfflineModeIsEnabled", "ConnectionError", "LocalEntryNotFound")):
                out[f"lm_eval_{task}"] = stats.skipped(f"{why}; offline, use a local task YAML "
                                                       "(evaluate.lm_eval_include_path)")
            else:
                out[f"lm_eval_{task}"] = stats.error(why)
            continue
        rb, rt = results[task]["base"], results[task]["tuned"]
        docs_b, docs_t = _per_doc(rb["samples"]), _per_doc(rt["samples"])
        hib = rb.get("higher_is_better", {}).get(task, {})
        for key, value in rb["results"][task].items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            shared = [d for d in docs_b if d[1] == filt and metric in docs_b[d] and metric in docs_t.get(d, {})]
            if not shared:
                continue
            base = np.array([float(docs_b[d][metric]) for d in shared])
            tuned = np.array([float(docs_t[d][metric]) for d in shared])
            row = stats.row(base, tuned, bool(hib.get(metric, True)), e.bootstrap_samples, e.seed,
                            fewshot=_fewshot(e.lm_eval_num_fewshot, task))
            # lm-eval's own aggregate (a group such as mmlu may weight its subtasks differently)
            row.update(base=float(value), tuned=float(rt["results"][task][key]),
                       delta=float(rt["results"][task][key]) - float(value))
            out[_name(task, metric, filt)] = row
    return out
