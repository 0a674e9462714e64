"""lm-evaluation-harness tasks (MMLU, GSM8K, BBH, ARC-Challenge, TruthfulQA, or local task YAMLs), base vs tuned.

lm-eval's `hf` model wraps the weights the candidates loaded (models.load: model.revision and the trust rules apply
as everywhere): the tuned side with its adapter on, the base side with it off, one copy of the weights. Tasks run
one at a time so a task that cannot load (a hub dataset offline) becomes a skipped or error row instead of failing
the others. With evaluate.lm_eval_data the official tasks read local copies of their datasets (lmeval_data.py).

Each metric of a task gets one row whose base and tuned are lm-eval's own numbers (a group such as mmlu aggregated
as lm-eval aggregates it), and `<row>/<subtask>` rows for each subgroup and subtask. The 95% CI of the delta is a
paired bootstrap over documents from `log_samples`, stratified by subtask and aggregated with the group's own
weights, so the interval is of the number lm-eval reports. `cli` in each row is lm-eval's own command for the base
side's numbers: with evaluate.lm_eval_truth, evaluate runs them beside its own scoring and records lm-eval's number
in each row (lmeval_truth.py); tools/lm_eval_truth.py does the same for a finished table. Each task's scores per side
are kept in paths.lm_eval_cache under a key of what decides them, so a killed evaluate resumes at the first
unfinished task. With evaluate.lm_eval_jobs > 1 the task x side runs not yet cached are scored that many at a time in
worker processes (lmeval_worker.py), which leave their results in that cache; the rows are then built from it.
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import LlmftError
from ..io import write_json
from . import candidates as cands
from . import lmeval_truth, stats

OFFLINE = ("OfflineModeIsEnabled", "ConnectionError", "LocalEntryNotFound")
COMMANDS = "lm_eval_commands.json"
"""{task: lm-eval's own command for the base side}, in paths.eval_dir, written before the tasks run."""


def _fewshot(setting, task: str) -> Optional[int]:
    return setting.get(task) if isinstance(setting, dict) else setting


def _hflm(c: cands.Candidates, batch_size: int | str):
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


def tasks_dir(cfg) -> Path:
    """Where the override YAMLs for evaluate.lm_eval_data are written (lm-eval's --include_path)."""
    return Path(cfg.paths.eval_dir) / "lm_eval_tasks"


def include_paths(cfg) -> list[str]:
    from . import lmeval_data

    e = cfg.evaluate
    paths = [e.lm_eval_include_path] if e.lm_eval_include_path else []
    if e.lm_eval_data:
        paths.append(str(lmeval_data.write_tasks(e.lm_eval_tasks, e.lm_eval_data, tasks_dir(cfg),
                                                 e.lm_eval_include_path)))
    return paths


def cli(cfg, task: str, model: str, dtype: str, device: str, batch_size: int | str, include: list[str]) -> str:
    """lm-eval's own command that computes the base side's numbers of `task` as run here."""
    e, m = cfg.evaluate, cfg.model
    args = f"pretrained={model},dtype={dtype}" + (f",revision={m.revision}" if m.revision else "") + \
        (",trust_remote_code=True" if m.trust_remote_code else "")
    parts = ["lm_eval run --model hf", f"--model_args {args}", f"--tasks {task}",
             f"--device {device}", f"--batch_size {batch_size}", f"--seed {e.seed}"]
    shots = _fewshot(e.lm_eval_num_fewshot, task)
    parts += [f"--num_fewshot {shots}"] if shots is not None else []
    parts += [f"--limit {e.lm_eval_limit}"] if e.lm_eval_limit else []
    parts += [f"--include_path {p}" for p in include]
    return " ".join(parts)


def cache_file(cfg, task: str, side: str) -> Path:
    """Where lm_eval_cache keeps `task` scored for `side` (base, tuned; cli: lm-eval's own CLI, lmeval_truth.py)."""
    return Path(cfg.paths.lm_eval_cache) / f"{task}.{side}.json"


def cached(cfg, task: str, side: str, key: str) -> Optional[dict]:
    """The result kept for `task` and `side` under `key`, or None."""
    path = cache_file(cfg, task, side)
    done = json.loads(path.read_text()) if path.exists() else {}
    return done["result"] if done.get("key") == key else None


def _run_tasks(c: cands.Candidates, tm, lm, side: str, tasks: list[str], keys: dict, results: dict,
               errors: dict) -> None:
    """`tasks` for one side, one at a time: a task that cannot load becomes an error, the others still run; a
    task already scored under the same key (lm_eval_cache) is read back."""
    import logging
    import time

    import lm_eval

    e = c.cfg.evaluate
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # a warning per subtask ("Overwriting default num_fewshot ...") and per long prompt
    try:
        for task in tasks:
            if task in errors:
                continue
            cache = cache_file(c.cfg, task, side)
            if (done := cached(c.cfg, task, side, keys[task, side])) is not None:
                results[task][side] = done
                print(f"evaluate: lm_eval {task} [{side}] read back from {cache}", flush=True)
                continue
            start = time.time()
            try:
                r = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=tm, num_fewshot=_fewshot(e.lm_eval_num_fewshot, task),
                    limit=e.lm_eval_limit, log_samples=True, bootstrap_iters=0, random_seed=e.seed,
                    numpy_random_seed=e.seed, torch_random_seed=e.seed, fewshot_random_seed=e.seed)
            except Exception as ex:  # unknown task, dataset not downloadable offline, ...
                errors[task] = f"{type(ex).__name__}: {str(ex)[:300]}"
                print(f"evaluate: lm_eval {task} [{side}] could not run: {errors[task][:200]}", flush=True)
                continue
            results[task][side] = compact(r)
            write_json(cache, {"key": keys[task, side], "result": results[task][side]})
            docs = sum(len({s["doc_id"] for s in v}) for v in r["samples"].values())
            print(f"evaluate: lm_eval {task} [{side}] {docs:,} documents in {time.time() - start:.0f}s", flush=True)
    finally:
        log.setLevel(level)


def compact(r: dict) -> dict:
    """What the rows need of simple_evaluate's output, small enough to keep: lm-eval's results and group tree, and per
    subtask each document's scores and the chance level of each `metric,filter`."""
    samples, chances = {}, {}
    for leaf, rows in r["samples"].items():
        samples[leaf] = [{"doc_id": int(s["doc_id"]), "filter": s.get("filter", "none"),
                          **{m: float(s[m]) for m in s.get("metrics", []) if isinstance(s.get(m), (int, float))}}
                         for s in rows]
        cfg = r["configs"].get(leaf, {})
        chances[leaf] = {}
        for key in r["results"].get(leaf, {}):
            metric, _, filt = key.partition(",")
            if filt and not metric.endswith("_stderr"):
                chances[leaf][key] = chance([s for s in rows if s.get("filter", "none") == filt], cfg, metric)
    return {"results": r["results"], "group_subtasks": r.get("group_subtasks", {}),
            "higher_is_better": r.get("higher_is_better", {}), "samples": samples, "chance": chances}


def _keys(c: cands.Candidates, commands: dict[str, str]) -> dict[tuple[str, str], str]:
    """{(task, side): key} of what decides the scores: lm-eval's command (model, revision, dtype, shots, limit, seed,
    task folders), lm-eval's version, the data files, the task YAMLs of evaluate.lm_eval_include_path, the tokenizer
    (saved with the adapter) and, for the tuned side, the adapter's weights."""
    import hashlib
    from importlib.metadata import version

    def digest(folder, pattern="*") -> str:
        h = hashlib.sha256()
        for f in sorted(p for p in Path(folder).rglob(pattern) if p.is_file()) if folder else []:
            h.update(f"{f.relative_to(folder)}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        return h.hexdigest()

    e = c.cfg.evaluate
    shared = [version("lm_eval"), digest(e.lm_eval_data), digest(e.lm_eval_include_path),
              digest(c.adapter, "*token*")]
    adapter = digest(c.adapter)
    return {(task, side): hashlib.sha256(json.dumps([cmd, side, *shared, adapter if side == "tuned" else None])
                                         .encode()).hexdigest()
            for task, cmd in commands.items() for side in cands.SIDES}


def run(c: cands.Candidates, judge=None) -> dict:
    from . import lmeval_data

    cfg, e = c.cfg, c.cfg.evaluate
    if c.adapter is None:
        return {"lm_eval": stats.skipped("needs the tuned weights: no adapter in paths.adapter")}
    include = include_paths(cfg)
    tm = lmeval_data.task_manager(include)
    results: dict[str, dict] = {t: {} for t in e.lm_eval_tasks}
    errors: dict[str, str] = {}
    batch = batch_size(cfg)
    weight = next(c.model.parameters())
    dtype, device = str(weight.dtype).removeprefix("torch."), str(weight.device)
    commands = {task: cli(cfg, task, c.base_path, dtype, device, batch, include) for task in e.lm_eval_tasks}
    write_json(Path(cfg.paths.eval_dir) / COMMANDS, commands)  # tools/lm_eval_truth.py --wait starts on this
    keys = _keys(c, commands)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(e.lm_eval_jobs) as pool:
        truth: dict = {}

        def cli_of(task: str) -> None:  # lm-eval's own CLI on the base, in the same pool
            if e.lm_eval_truth:
                truth[task] = pool.submit(lmeval_truth.cli_results, cfg, task, commands[task], keys[task, "base"])

        scoring = _in_workers(cfg, keys, include, pool, Path(tmp), cli_of)
        for f in scoring:
            f.result()
        lm = _hflm(c, batch)
        for side in cands.SIDES:
            with cands.as_side(c, side):
                _run_tasks(c, tm, lm, side, e.lm_eval_tasks, keys, results, errors)
        out = _rows(cfg, tm, commands, results, errors)
        for task, f in truth.items():
            if task in errors:
                continue
            try:
                out.update(lmeval_truth.check(task, out, *f.result()))
            except LlmftError as ex:
                out[f"lm_eval_{task}_cli"] = stats.error(str(ex))
    return out


def _rows(cfg, tm, commands: dict, results: dict, errors: dict) -> dict:
    e = cfg.evaluate
    out = {}
    for task in e.lm_eval_tasks:
        if task in errors:
            why = f"lm-eval could not run task {task}: {errors[task]}"
            # a hub dataset that cannot be fetched offline is unavailable data, as for AlpacaEval and MT-Bench
            if any(s in errors[task] for s in OFFLINE):
                out[f"lm_eval_{task}"] = stats.skipped(f"{why}; offline, point evaluate.lm_eval_data at local copies "
                                                       "of the task's data (or evaluate.lm_eval_include_path at a "
                                                       "local task YAML)")
            else:
                out[f"lm_eval_{task}"] = stats.error(why)
            continue
        extra = {"fewshot": _fewshot(e.lm_eval_num_fewshot, task), "data": e.lm_eval_data or "hub",
                 "cli": commands[task]}
        out.update(task_rows(task, results[task]["base"], results[task]["tuned"], tm, e.bootstrap_samples, e.seed,
                             **extra))
    return out


def batch_size(cfg) -> int | str:
    return cfg.evaluate.lm_eval_batch_size or cfg.evaluate.generation.batch_size


def _in_workers(cfg, keys: dict, include: list[str], pool, tmp: Path, then) -> list:
    """With evaluate.lm_eval_jobs > 1 and two or more runs to do, submit the task x side runs missing from
    lm_eval_cache to `pool`, one worker process each (lmeval_worker.py),
    in the order of evaluate.lm_eval_tasks (the largest first, as the defaults are listed), calling `then(task)`
    after each task's runs (lm-eval's CLI for it joins the queue there, so the longest runs start first); returns
    their futures. A run a worker could not finish is left uncached: evaluate scores it again itself, and its
    failure becomes the task's error row."""
    import subprocess
    import sys

    import yaml

    from ..config import to_dict

    e = cfg.evaluate
    todo = [(t, s) for t in e.lm_eval_tasks for s in cands.SIDES if cached(cfg, t, s, keys[t, s]) is None]
    if e.lm_eval_jobs < 2 or len(todo) < 2:  # scored in this process; `then` is still called for every task
        todo = []
    params = tmp / "params.yaml"  # the config in effect, overrides applied
    if todo:
        print(f"evaluate: lm_eval {len(todo)} task x side runs, {min(e.lm_eval_jobs, len(todo))} at a time", flush=True)
        params.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def one(run: tuple[str, str]) -> None:
        task, side = run
        code = subprocess.run([sys.executable, "-m", "llmft.evaluate.lmeval_worker", str(params), task, side,
                               keys[run], json.dumps(include)], check=False).returncode
        if code:  # its own error line is above; a kill (-9: out of memory, most often) leaves none
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            print(f"evaluate: lm_eval {task} [{side}] worker {how}; evaluate scores it itself", flush=True)

    futures = []
    for task in e.lm_eval_tasks:
        futures += [pool.submit(one, run) for run in todo if run[0] == task]
        then(task)
    return futures


# ------------------------------------------------------------------------------------------ rows
def _name(task: str, metric: str, filt: str) -> str:
    name = f"lm_eval_{task}_{metric}" + ("" if filt == "none" else f"_{filt}")
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def _docs(samples: list[dict], metric: str, filt: str) -> dict[int, float]:
    return {int(s["doc_id"]): float(s[metric]) for s in samples if s.get("filter", "none") == filt and metric in s}


def chance(samples: list[dict], config: dict, metric: str) -> Optional[float]:
    """What a model without knowledge scores on one subtask (lm-eval's samples and task config): a uniform guess for
    multiple choice (1/choices; for TruthfulQA's MC2 metric the share of true answers, the probability mass a
    uniform model puts on them), for generated answers the share of the most common reference as exact_match compares
    it (a constant answer's score: a majority baseline). None where neither applies."""
    if not samples:
        return None
    custom = bool(config.get("process_results"))  # the task scores documents its own way
    if config.get("output_type") == "multiple_choice":
        if custom and "mc2_targets" in samples[0].get("doc", {}):
            return float(np.mean([np.mean(s["doc"]["mc2_targets"]["labels"]) for s in samples]))
        if not custom and metric in ("acc", "acc_norm"):
            return float(np.mean([1 / len(s["arguments"]) for s in samples]))
        return None
    if config.get("output_type") == "generate_until" and metric == "exact_match" and not custom:
        spec = next((m for m in config.get("metric_list") or [] if m.get("metric") == metric), {})
        targets = Counter(_normalise(str(s["target"]), spec) for s in samples)
        return targets.most_common(1)[0][1] / len(samples)
    return None


def _normalise(text: str, spec: dict) -> str:
    """A reference as lm-eval's exact_match compares it (its metric_list options), e.g. GSM8K's final number."""
    import string

    for rx in spec.get("regexes_to_ignore") or []:
        text = re.sub(rx, "", text)
    text = text.lower() if spec.get("ignore_case") else text
    text = text.translate(str.maketrans("", "", string.punctuation)) if spec.get("ignore_punctuation") else text
    return (text.translate(str.maketrans("", "", string.digits)) if spec.get("ignore_numbers") else text).strip()


class _Node:
    """One task or group of one metric: its bootstrap replicates of both sides, point estimates, size, chance."""

    def __init__(self, b, t, point, size, chance_level):
        self.b, self.t, self.point, self.size, self.chance = b, t, point, size, chance_level


def task_rows(task: str, rb: dict, rt: dict, tm, samples: int, seed: int, **extra) -> dict:
    """The rows of one task (or group) from lm-eval's results for base (rb) and tuned (rt), each `compact`ed.

    A group's number is lm-eval's: the mean over all its subtasks (at any depth) of their means, weighted by their
    documents where the group's aggregate_metric_list says weight_by_size. The bootstrap resamples each subtask's
    documents (the same ones for both sides) and aggregates them the same way, so its CI is of that number; a row
    whose recomputation disagrees with lm-eval's number becomes an error row instead."""
    tree = rb.get("group_subtasks", {})
    hib = {n: h for per in rb.get("higher_is_better", {}).values() for n, h in per.items()}
    if task not in rb["results"]:
        return {f"lm_eval_{task}": stats.error(f"lm-eval reported no number for {task} (a tag? name a task or group)")}
    out = {}
    for key, value in rb["results"][task].items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        row_name, higher = _name(task, metric, filt), bool(hib.get(metric, True))
        leaves = {}
        rng = np.random.default_rng(seed)
        for leaf in [task] if task in rb["samples"] else [n for n in _below(task, tree) if n in rb["samples"]]:
            db, dt = _docs(rb["samples"][leaf], metric, filt), _docs(rt["samples"][leaf], metric, filt)
            ids = sorted(set(db) & set(dt))
            if ids:
                b, t = np.array([db[i] for i in ids]), np.array([dt[i] for i in ids])
                idx = rng.integers(0, len(ids), size=(samples, len(ids)))
                leaves[leaf] = _Node(b[idx].mean(axis=1), t[idx].mean(axis=1), (b.mean(), t.mean()), len(ids),
                                     rb["chance"][leaf].get(key))

        if not leaves:  # e.g. a corpus-level metric (BLEU, F1) whose documents carry no score of their own
            out[row_name] = stats.error(f"lm-eval's {key} of {task} has no per-document scores to pair")
            continue

        def node(name: str) -> Optional[_Node]:
            if name in leaves:
                return leaves[name]
            kids = [leaves[n] for n in _below(name, tree) if n in leaves]
            if not kids:
                return None
            w = np.array([k.size if _by_size(tm, name, metric) else 1.0 for k in kids], dtype=float)

            def mix(values):
                return sum(wi * v for wi, v in zip(w, values)) / w.sum()

            levels = [k.chance for k in kids]
            return _Node(mix([k.b for k in kids]), mix([k.t for k in kids]), tuple(mix([k.point[i] for k in kids])
                                                                                 for i in (0, 1)),
                         sum(k.size for k in kids), None if None in levels else float(mix(levels)))

        for name in [task, *_below(task, tree)]:
            n, mine = node(name), rb["results"].get(name, {})
            if n is None or key not in mine:
                continue
            label = row_name if name == task else f"{row_name}/{alias_of(task, name, mine)}"
            if abs(n.point[0] - mine[key]) > 1e-6:  # the bootstrap must be of the number lm-eval reports
                out[label] = stats.error(f"lm-eval's {key} of {name} is {mine[key]:.6f}; its documents' scores give "
                                         f"{n.point[0]:.6f} (a metric that is not a mean over documents?)")
                continue
            out[label] = _row(n, float(mine[key]), float(rt["results"][name][key]), higher,
                              **(extra if name == task else {"group": True} if name in tree and tree[name] else {}))
    return out


def _row(n: _Node, base: float, tuned: float, higher: bool, **extra) -> dict:
    def ci(v):
        lo, hi = np.percentile(v, [2.5, 97.5])
        return [float(lo), float(hi)]

    row = {"base": base, "tuned": tuned, "delta": tuned - base, "ci95": ci(n.t - n.b), "ci95_base": ci(n.b),
           "ci95_tuned": ci(n.t), "n": int(n.size), "higher_is_better": higher}
    if n.chance is not None:
        row["chance"] = n.chance
    return {**row, **extra}


def _by_size(tm, group: str, metric: str) -> bool:
    """Whether lm-eval weights this group's children by their number of documents (its aggregate_metric_list)."""
    entry = tm.task_index.get(group)
    for spec in ((entry.cfg or {}).get("aggregate_metric_list") or []) if entry else []:
        if spec.get("metric") == metric:
            return bool(spec.get("weight_by_size", True))
    return True


def _below(task: str, tree: dict) -> list[str]:
    out = []
    for child in tree.get(task, []):
        out += [child, *_below(child, tree)]
    return out


def alias_of(task: str, sub: str, result: dict) -> str:
    """A subtask's name in its row (`lm_eval_mmlu_acc/anatomy`): lm-eval's alias, without the task's prefix."""
    alias = str(result.get("alias", sub)).strip().lstrip("- ").strip()
    return alias[len(task) + 1:] if alias.startswith(task + "_") else alias


def metric_key(task: str, row: str, result: dict) -> Optional[str]:
    """The `metric,filter` key of lm-eval's results that top-level row `row` of `task` holds."""
    return next((k for k in result if "," in k and _name(task, *k.split(",", 1)) == row), None)
