"""One lm-eval run, a task for one side, in a process of its own (evaluate.lm_eval_jobs > 1).

    python -m llmft.evaluate.lmeval_worker PARAMS TASK SIDE KEY INCLUDE_PATHS_JSON

Loads the candidates as evaluate does (the same loader, dtype, device and adapter), scores TASK for SIDE with the
same settings, and leaves the result in paths.lm_eval_cache under KEY, where evaluate reads it back. Exit status 1
if the task could not run (evaluate then runs it itself and records the error).
"""
from __future__ import annotations

import json
import sys

from ..config import load_config
from . import candidates, lmeval, lmeval_data


def main(argv: list[str]) -> int:
    params, task, side, key, include = argv
    cfg = load_config(params)
    c = candidates.load(cfg)
    tm = lmeval_data.task_manager(json.loads(include))
    lm = lmeval._hflm(c, lmeval.batch_size(cfg))
    errors: dict[str, str] = {}
    with candidates.as_side(c, side):
        lmeval._run_tasks(c, tm, lm, side, [task], {(task, side): key}, {task: {}}, errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
