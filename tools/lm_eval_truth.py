"""Check evaluate's lm-eval numbers against lm-eval's own CLI: run each task's recorded command, compare the base side.

    python tools/lm_eval_truth.py                       # the params.yaml run's paths.eval_dir/table.json
    python tools/lm_eval_truth.py --params P --jobs 6   # several tasks at once (one GPU holds several small models)
    python tools/lm_eval_truth.py --wait --jobs 6 &     # started with evaluate: runs lm-eval's commands while
                                                        # evaluate runs its own, then compares once table.json is new

Every lm_eval row of table.json carries `cli`, lm-eval's own command for that task as evaluate ran it (model, dtype,
device, batch size, seed, shots, limit, include path); evaluate.lm_eval_truth runs them inside evaluate instead.
This runs each command once, reads the results lm-eval writes, and compares every row and subtask row's base number
with lm-eval's. Writes lm_eval_cli/ beside the eval folder
(lm-eval's own output per task, and comparison.json: {tasks: {task: {command, runtime_s, rows: {row: {llmft,
lm_eval, abs_diff}}}}, max_abs_diff}) and prints one line per task.
Exit status 1 if a number differs in the 4th decimal.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from llmft.config import load_config  # noqa: E402
from llmft.errors import LlmftError  # noqa: E402
from llmft.evaluate.lmeval import COMMANDS  # noqa: E402
from llmft.evaluate.lmeval_truth import TOLERANCE, commands, compare, run_cli  # noqa: E402
from llmft.io import write_json  # noqa: E402


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

    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            ran = dict(pool.map(run, todo))
    except LlmftError as e:
        raise SystemExit(str(e)) from None
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
    return 0 if worst is not None and worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
