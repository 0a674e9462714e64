"""evaluate: base vs tuned on every configured benchmark, each metric with a paired bootstrap 95% CI.

    python -m llmft evaluate
    python -m llmft evaluate evaluate.judge.model=gpt-4-1106-preview evaluate.alpaca_eval_rows=null

Writes the full table to `paths.eval_dir`/table.json ({"<metric>": {base, tuned, delta, ci95, n,
higher_is_better}, "<metric>/<category>": ..., "<benchmark>": {status: skipped|error, reason}}) and
table.md, generated answers and judgments under `paths.eval_dir`/outputs, the headline numbers (base,
tuned, delta of each top-level metric) to `paths.eval_metrics` for DVC, charts under `paths.eval_plots`,
and logs it all to the pipeline's MLflow run. Which benchmarks exist, and how each runs, is the table in
benchmarks.py. Judge-based benchmarks without a judge are recorded as skipped; a benchmark that fails or
yields no result (an unreachable judge, no parsable judgment) is recorded as an error and the stage exits
non-zero after writing everything (finished judgments are cached: a rerun resumes).
"""
from __future__ import annotations

import importlib
import math
import time
from pathlib import Path

from ..config import Config, LlmftError
from ..tracking import write_atomic, write_json
from . import judges, report
from .benchmarks import BENCHMARKS

NO_JUDGE = "no judge configured (evaluate.judge.model is null)"


def evaluate(cfg: Config) -> dict:
    from . import candidates

    e, paths = cfg.evaluate, cfg.paths
    start = time.time()
    judge = judges.make(e.judge, paths.judge_cache)  # fails now, not after an hour of generation, if the key is missing
    c = candidates.load(cfg)
    tuned = f"endpoint {c.endpoint}" if c.endpoint else f"adapter {c.adapter}"
    print(f"evaluate: base {c.base_path}, tuned = {tuned}, judge: {judge.name if judge else 'none'}", flush=True)
    table: dict = {}
    failed = []
    # in-process benchmarks share the loaded weights; those that load their own copies (lm-eval) run after
    # the shared weights are freed
    order = sorted((n for n in BENCHMARKS if n in e.benchmarks), key=lambda n: BENCHMARKS[n].own_weights)
    for name in order:
        bench = BENCHMARKS[name]
        if bench.own_weights and c.model is not None:
            candidates.unload(c)
        t = time.time()
        if bench.judged and judge is None:
            rows = {name: _skipped(NO_JUDGE)}
        else:
            module, func = bench.run.split(":")
            try:
                rows = getattr(importlib.import_module(f"{__name__}.{module}"), func)(c, judge)
            except LlmftError as ex:  # the judge or the candidate endpoint failed: record it, finish the table
                rows = {name: _error(str(ex), judge)}
        errors = [f"{n}: {r['reason']}" for n, r in rows.items() if r.get("status") == "error"]
        failed += errors
        table.update(rows)
        print(f"evaluate: {name} {'FAILED' if errors else 'done'} in {time.time() - t:.0f}s", flush=True)

    table = _finite(table)
    runtime = round(time.time() - start, 1)
    _write(cfg, table, c, judge, runtime)
    done = {n: r for n, r in table.items() if report.is_result(r)}
    other = {n: r["status"] for n, r in table.items() if not report.is_result(r)}
    key = "test_loss" if "test_loss" in done else next(iter(done), None)
    headline = f"{key} {report.fmt(done[key]['base'])} -> {report.fmt(done[key]['tuned'])}; " if key else ""
    print(f"evaluate: {len(done)} metrics, {headline}"
          f"{', '.join(f'{n} {s}' for n, s in other.items()) or 'nothing skipped'}; "
          f"{paths.eval_dir}/table.md in {runtime:.0f}s"
          + (f"; judge: {judge.counts['requests']} requests, {judge.counts['cached']} cached" if judge else ""))
    if failed:
        raise LlmftError(f"{len(failed)} benchmark(s) yielded no result (table written with error rows; a rerun "
                         "resumes from the judge cache):\n  " + "\n  ".join(failed))
    return table


def _skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def _error(reason: str, judge) -> dict:
    return {"status": "error", "reason": reason, **({"judge": judge.name} if judge else {})}


def _finite(obj):
    """NaN/inf -> null: they are not JSON, and DVC's metrics parser rejects them."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def headline(table: dict) -> dict:
    """The DVC metrics file: base/tuned/delta of each top-level metric, nothing else (categories, CIs and
    skip reasons stay in table.json), so `dvc exp show` has a readable number of columns."""
    return {n: {k: r[k] for k in ("base", "tuned", "delta")} for n, r in table.items()
            if report.is_result(r) and "/" not in n}


def _write(cfg: Config, table: dict, c, judge, runtime: float) -> None:
    e, paths = cfg.evaluate, cfg.paths
    out = Path(paths.eval_dir)
    write_json(out / "table.json", table)
    header = (f"# Evaluation: base vs tuned\n\nbase `{c.base_path}`, tuned "
              f"`{c.endpoint or c.adapter}`, judge `{judge.name if judge else 'none'}`; 95% CIs from a paired "
              f"bootstrap ({e.bootstrap_samples} resamples, seed {e.seed}); delta = tuned − base.")
    write_atomic(out / "table.md", report.markdown(table, header))
    write_json(out / "meta.json", {"runtime_s": runtime, "judge": judge.name if judge else None,
                                  "judge_requests": judge.counts["requests"] if judge else 0,
                                  "judge_cached": judge.counts["cached"] if judge else 0,
                                  "base": c.base_path, "tuned": c.endpoint or c.adapter})
    write_json(paths.eval_metrics, headline(table))
    pngs = report.plots(table, Path(paths.eval_plots))
    report.log_mlflow(cfg, table, [out / "table.json", out / "table.md", *pngs, out / "outputs"])
