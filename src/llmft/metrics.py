"""Metric references, as `register.metric` (and `tune.objective`) spell them.

    test_loss.tuned        row `test_loss` of the evaluate table, field tuned (or base, delta)
    rouge_l/open_qa.delta  a per-category row
    train.best_eval_loss   a key of the train metrics (train_loss, eval_loss, best_eval_loss)

One grammar, one reader and one direction rule for every verb that ranks models.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

FIELDS = ("base", "tuned", "delta")
TRAIN_KEYS = ("train_loss", "eval_loss", "best_eval_loss")  # all losses: lower is better


@dataclass(frozen=True)
class MetricRef:
    text: str
    source: str  # "train" or "eval"
    row: str     # train key, or evaluate table row
    field: str   # "" for train keys


def parse(text: str) -> MetricRef:
    """The reference, or ValueError saying what is wrong with it."""
    if text.startswith("train."):
        key = text.removeprefix("train.")
        if key not in TRAIN_KEYS:
            raise ValueError(f"'{text}': train metrics are {', '.join('train.' + k for k in TRAIN_KEYS)}")
        return MetricRef(text, "train", key, "")
    row, _, fld = text.rpartition(".")
    if not row or fld not in FIELDS:
        raise ValueError(f"'{text}' is not <row>.<{'|'.join(FIELDS)}> (e.g. test_loss.tuned) or train.<key>")
    return MetricRef(text, "eval", row, fld)


def known_higher_is_better(ref: MetricRef) -> Optional[bool]:
    """From the benchmark table where it says; None where only the evaluate output knows (lm-eval)."""
    from .evaluate.benchmarks import producer

    if ref.source == "train":
        return False
    found = producer(ref.row)
    return found[1] if found else None


def to_direction(higher_is_better: bool) -> str:
    return "maximize" if higher_is_better else "minimize"


def problems(text: str, direction: Optional[str], benchmarks: list[str]) -> Iterator[tuple[str, str]]:
    """(key, message) for a reference that cannot work with these benchmarks, for config validation."""
    from .evaluate.benchmarks import producer

    try:
        ref = parse(text)
    except ValueError as e:
        yield "metric", str(e)
        return
    if ref.source == "eval":
        found = producer(ref.row)
        if found is None:
            yield "metric", f"'{text}': no benchmark writes a row '{ref.row}'"
            return
        if found[0] not in benchmarks:
            yield "metric", f"'{text}' is written by benchmark {found[0]}, which is not in evaluate.benchmarks"
    hib = known_higher_is_better(ref)
    if direction is not None and hib is not None and direction != to_direction(hib):
        yield "direction", (f"= {direction}, but '{text}' is {'higher' if hib else 'lower'} is better: "
                            f"set {to_direction(hib)} (or null to take it from the metric)")


def _load(path: Path) -> tuple[Optional[dict], str]:
    if not path.exists():
        return None, f"{path} not found"
    try:
        return json.loads(path.read_text()), ""
    except json.JSONDecodeError as e:
        from .errors import LlmftError

        raise LlmftError(f"{path}: not valid JSON ({e})") from None


def read(ref: MetricRef, train_metrics: Path, eval_table: Path) -> tuple[Optional[float], str, Optional[bool]]:
    """(value, why it is missing, higher_is_better as the file marks it) from a run's outputs."""
    if ref.source == "train":
        data, why = _load(train_metrics)
        node, hib = (data or {}).get(ref.row), False
    else:
        from .evaluate.benchmarks import producer

        data, why = _load(eval_table)
        row = (data or {}).get(ref.row)
        if row is None and data is not None:  # a benchmark that did not run writes its own status row instead
            bench = (producer(ref.row) or ("",))[0]
            row = data.get(bench) if isinstance(data.get(bench), dict) else None
            if row is None:
                return None, f"no row '{ref.row}' in {eval_table} (is {bench or 'its benchmark'} in evaluate.benchmarks?)", None
        if isinstance(row, dict) and "status" in row:
            return None, f"'{ref.row}' in {eval_table}: benchmark {row['status']}: {row.get('reason')}", None
        node = row.get(ref.field) if isinstance(row, dict) else None
        hib = row.get("higher_is_better") if isinstance(row, dict) else None
    if data is None:
        return None, why, None
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        where = train_metrics if ref.source == "train" else eval_table
        return None, f"'{ref.text}' in {where} is {node!r}, not a finite number", hib
    return float(node), "", hib


def resolve_direction(ref: MetricRef, explicit: Optional[str], marked: Optional[bool]) -> str:
    """The direction to rank by: explicit, else the benchmark table's, else what the output file marks.
    An explicit one that contradicts the file is refused (it would promote worse models)."""
    from .errors import LlmftError

    hib = marked if marked is not None else known_higher_is_better(ref)
    if explicit is not None:
        if hib is not None and explicit != to_direction(hib):
            raise LlmftError(f"direction {explicit} for '{ref.text}', but it is marked "
                             f"{'higher' if hib else 'lower'} is better: use {to_direction(hib)} or null")
        return explicit
    if hib is None:
        raise LlmftError(f"no direction known for '{ref.text}': set register.direction (minimize or maximize)")
    return to_direction(hib)
