"""lm-eval's own CLI beside llmft's numbers: run a task's recorded `cli` command, read the results lm-eval writes, and
compare every row and subtask row's base number with lm-eval's.

evaluate runs it with evaluate.lm_eval_truth (each compared row then carries `lm_eval_cli`, and a task whose rows
disagree in the 4th decimal gets an error row); tools/lm_eval_truth.py runs it on a finished table.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ..errors import LlmftError
from ..io import write_json
from . import stats

TOLERANCE = 5e-5
"""Agreement to the 4th decimal."""


def commands(table: dict) -> dict[str, str]:
    """{task: lm-eval command} from the top-level lm_eval rows of a table."""
    out = {}
    for name, row in table.items():
        if "/" not in name and "cli" in row:
            args = shlex.split(row["cli"])
            out[args[args.index("--tasks") + 1]] = row["cli"]
    return out


def run_cli(command: str, out_dir: Path) -> tuple[dict, float]:
    """lm-eval's results ({task or group: {metric,filter: value}}) for one command, and its runtime."""
    args = shlex.split(command)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "lm_eval", *args[1:], "--output_path", str(out_dir)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise LlmftError(f"lm-eval's CLI failed ({command}):\n{proc.stderr[-3000:]}")
    found = sorted(Path(out_dir).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())["results"], time.time() - start


def cli_results(cfg, task: str, command: str, key: str) -> tuple[dict, float]:
    """run_cli for evaluate, its output under paths.eval_dir/lm_eval_cli/<task>, kept in paths.lm_eval_cache under
    the base side's key (the command, lm-eval's version, the data) as `<task>.cli.json`: a rerun does not run it
    again."""
    from .lmeval import cache_file, cached

    if (done := cached(cfg, task, "cli", key)) is not None:
        return done["results"], done["runtime_s"]
    results, seconds = run_cli(command, Path(cfg.paths.eval_dir) / "lm_eval_cli" / task)
    write_json(cache_file(cfg, task, "cli"),
               {"key": key, "result": {"results": results, "runtime_s": round(seconds, 1)}})
    return results, seconds


def compare(task: str, table: dict, theirs: dict) -> dict[str, dict]:
    """{row: {llmft, lm_eval, abs_diff}} for every row (top and per subtask) of one task."""
    from .lmeval import alias_of, metric_key

    subs = {alias_of(task, s, theirs[s]): s for s in theirs if s != task}
    out = {}
    for name, row in table.items():
        top, _, sub = name.partition("/")
        if "base" not in row or not top.startswith(f"lm_eval_{task}_"):
            continue
        key = metric_key(task, top, theirs[task])
        if key is None:
            continue
        where = theirs[subs[sub]] if sub else theirs[task]
        out[name] = {"llmft": row["base"], "lm_eval": where[key], "abs_diff": abs(row["base"] - where[key])}
    return out


def check(task: str, table: dict, theirs: dict, seconds: float) -> dict:
    """`lm_eval_cli` on each of the task's rows in `table` (in place); returns an error row for the task when its
    rows disagree with lm-eval's CLI or none could be compared, else nothing."""
    rows = compare(task, table, theirs)
    for name, r in rows.items():
        table[name]["lm_eval_cli"] = r["lm_eval"]
    off = {n: r for n, r in rows.items() if r["abs_diff"] >= TOLERANCE}
    worst = max((r["abs_diff"] for r in rows.values()), default=None)
    print(f"evaluate: lm_eval {task} base vs lm-eval's CLI: {len(rows)} rows, largest difference "
          f"{'none compared' if worst is None else f'{worst:.1e}'} ({seconds:.0f}s)", flush=True)
    if not rows:
        return {f"lm_eval_{task}_cli": stats.error(f"no row of task {task} could be compared with lm-eval's CLI")}
    if off:
        listed = "; ".join(f"{n}: llmft {r['llmft']:.6f}, lm-eval {r['lm_eval']:.6f}" for n, r in list(off.items())[:5])
        return {f"lm_eval_{task}_cli": stats.error(f"{len(off)} of {len(rows)} rows differ from lm-eval's CLI by "
                                                   f">= {TOLERANCE}: {listed}")}
    return {}
