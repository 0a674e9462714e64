"""The benchmarks `evaluate` can run: name -> how to run it and what it writes.

Kept free of heavy imports: config validation reads this table on every load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Benchmark:
    run: str
    """`module:function` in llmft.evaluate, called as function(candidates, judge) -> table rows."""
    judged: bool
    """Needs evaluate.judge; without one it is recorded as skipped."""
    rows: dict[str, Optional[bool]]
    """Rows it writes -> higher_is_better (None: known only at run time). `x*` matches every row starting with x;
    each row may also have `<row>/<category>` rows."""


BENCHMARKS: dict[str, Benchmark] = {
    "test_loss": Benchmark("likelihood:test_loss", judged=False,
                           rows={"test_loss": False, "test_perplexity": False}),
    "reference_nll": Benchmark("likelihood:reference_nll", judged=False,
                               rows={"reference_nll_alpaca_eval": False, "reference_nll_mt_bench": False}),
    "rouge": Benchmark("rouge:run", judged=False, rows={"rouge_l": True}),
    "alpaca_eval": Benchmark("alpacaeval:run", judged=True,
                             rows={"alpaca_eval_win_rate": True, "alpaca_eval_lc_win_rate": True,
                                   "alpaca_eval_tuned_vs_base": True}),
    "mt_bench": Benchmark("mtbench:run", judged=True, rows={"mt_bench_score": True}),
    "lm_eval": Benchmark("lmeval:run", judged=False, rows={"lm_eval_*": None}),
}


def producer(row: str) -> Optional[tuple[str, Optional[bool]]]:
    """(benchmark name, higher_is_better) of the benchmark that writes `row`, or None."""
    top = row.split("/", 1)[0]
    for name, b in BENCHMARKS.items():
        for pattern, hib in b.rows.items():
            if top == pattern or (pattern.endswith("*") and top.startswith(pattern[:-1])):
                return name, hib
    return None
