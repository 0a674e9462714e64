"""Check evaluate's lm-eval numbers against lm-eval's own CLI: run each task's recorded command, compare the base side.

    python tools/lm_eval_truth.py                       # the params.yaml run's paths.eval_dir/table.json
    python tools/lm_eval_truth.py --params P --jobs 6   # several tasks at once (one GPU holds several small models)
    python tools/lm_eval_truth.py --wait --jobs 6 &     # started with evaluate: runs lm-eval's commands while
                                                        # evaluate runs its own, then compares once table.json is new

Every lm_eval row of table.json carries `cli`, lm-eval's own command for that task as evaluate ran it (model, dtype,
device, batch size, seed, shots, limit, include path). This runs each command once, reads the results lm-eval writes,
and compares every row and subtask row's base number with lm-eval's. Writes lm_eval_cli/ beside the eval folder
(lm-eval's own output per task, and comparison.json: {tasks: {task: {command, runtime_s, rows: {row: {llmft,
lm_eval, abs_diff}}}}, max_abs_diff}) and prints one line per task.
Exit status 1 if a number differs in the 4th decimal.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from llmft.config import load_config  # noqa: E402
from llmft.evaluate.lmeval import COMMANDS, alias_of, metric_key  # noqa: E402
from llmft.io import write_json  # noqa: E402


def commands(table: dict) -> dict[str, str]:
    """{task: lm-eval command} from the top-level lm_eval rows."""
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
        raise SystemExit(f"lm-eval failed ({command}):\n{proc.stderr[-3000:]}")
    found = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())["results"], time.time() - start


def compare(task: str, table: dict, theirs: dict) -> dict[str, dict]:
    """{row: {llmft, lm_eval, abs_diff}} for every row (top and per subtask) of one task."""
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


def _fresh(path: Path, since: float, every: float = 5) -> Path:
    """`path` once it has been written after `since` (by an evaluate running beside this)."""
    while not (path.exists() and path.stat().st_mtime >= since):
        time.sleep(every)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--table", help="table.json to check (default: paths.eval_dir/table.json); lm_eval_cli/ is "
                                    "written beside its folder")
    ap.add_argument("--jobs", type=int, default=1, help="tasks run at once")
    ap.add_argument("--wait", action="store_true", help="wait for evaluate to write lm_eval_commands.json (run "
                    "them at once), then for its table.json")
    args = ap.parse_args()
    path = Path(args.table or Path(load_config(args.params, []).paths.eval_dir) / "table.json")
    eval_dir, started = path.parent, time.time()
    if args.wait:
        todo = json.loads(_fresh(eval_dir / COMMANDS, started).read_text())
    else:
        todo = commands(json.loads(path.read_text()))
    if not todo:
        raise SystemExit("no lm_eval rows with a `cli` command in the table: run evaluate with lm_eval first")
    out_root = eval_dir.parent / "lm_eval_cli"  # beside evaluate's outputs, not in them (a DVC output)

    def run(task):
        return task, run_cli(todo[task], out_root / task)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        ran = dict(pool.map(run, todo))
    table = json.loads((_fresh(path, started) if args.wait else path).read_text())

    def one(task):
        theirs, seconds = ran[task]
        rows = compare(task, table, theirs)
        worst = max((r["abs_diff"] for r in rows.values()), default=None)  # None: nothing to compare, a failure
        print(f"lm_eval_truth: {task}: {len(rows)} rows, largest |llmft - lm-eval| "
              f"{'none compared' if worst is None else f'{worst:.2e}'} ({seconds:.0f}s)", flush=True)
        return task, {"command": todo[task], "runtime_s": round(seconds, 1), "rows": rows, "max_abs_diff": worst}

    record = dict(map(one, todo))
    diffs = [r["max_abs_diff"] for r in record.values()]
    worst = None if None in diffs else max(diffs)
    write_json(out_root / "comparison.json", {"tasks": record, "max_abs_diff": worst})
    print(f"lm_eval_truth: {sum(len(r['rows']) for r in record.values())} rows of {len(record)} tasks, largest "
          f"difference {'(a task had none to compare)' if worst is None else f'{worst:.2e}'}; "
          f"{out_root / 'comparison.json'}")
    return 0 if worst is not None and worst < 5e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
