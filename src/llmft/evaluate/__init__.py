r"""evaluate: base vs tuned on every configured benchmark, each metric with a paired bootstrap 95% CI.

    python -m llmft evaluate
    python -m llmft evaluate evaluate.judge.model=gpt-4-1106-preview evaluate.alpaca_eval_rows=null
    # judge a finished run's MT-Bench answers again, three times, with another judge: no model is loaded
    python -m llmft evaluate evaluate.benchmarks=[mt_bench] register.metric=mt_bench_score.tuned \
        evaluate.judge.model=gpt-4o evaluate.judge.repeats=3 \
        evaluate.outputs.base.mt_bench=results/eval/outputs/mt_bench_base.jsonl \
        evaluate.outputs.tuned.mt_bench=results/eval/outputs/mt_bench_tuned.jsonl

Writes the full table to `paths.eval_dir`/table.json ({"<metric>": {base, tuned, delta, ci95, n,
higher_is_better}, "<metric>/<category>": ..., "<benchmark>": {status: skipped|error, reason}}) and
table.md, generated answers and judgments under `paths.eval_dir`/outputs (in alpaca_eval's and FastChat's
formats, which evaluate.outputs reads back), meta.json (runtime, where each side's answers came from, the
adapter checks, the judge's requests, retries, failures by kind and cache hits), the headline numbers (base,
tuned, delta and its 95% CI of each top-level metric) to `paths.eval_metrics` for DVC, charts under
`paths.eval_plots`, and logs it all to the pipeline's MLflow run. Which benchmarks exist, and how each runs, is the table in benchmarks.py.
Judge-based benchmarks without a judge are recorded as skipped; a benchmark that fails or yields no result (an
unreachable judge, no parsable judgment) is recorded as an error, the summary line starts with FAILED and
names it, and the stage exits non-zero after writing everything (finished judgments are cached: a rerun
resumes). Before any benchmark runs, checks.py makes sure that the tuned side is the adapter (its logits differ
from the base's; merged, served and in process, it answers alike), or stops the stage.
"""
from __future__ import annotations

import importlib
import math
import time
from pathlib import Path

from ..config import Config
from ..errors import LlmftError
from ..io import write_atomic, write_json
from . import judges, report
from .benchmarks import BENCHMARKS

NO_JUDGE = "no judge configured (evaluate.judge.model is null)"


def evaluate(cfg: Config) -> dict:
    from . import candidates, checks

    e, paths = cfg.evaluate, cfg.paths
    start = time.time()
    judge = judges.make(e.judge, paths.judge_cache)  # fails now, not after an hour of generation, if the key is missing
    if "lm_eval" in e.benchmarks and e.lm_eval_data:  # a missing data file fails now, naming task, split and path
        from . import lmeval

        lmeval.include_paths(cfg)
    c = candidates.load(cfg)
    print(f"evaluate: base = {candidates.describe(c, 'base')}, tuned = {candidates.describe(c, 'tuned')}, "
          f"judge: {judge.name if judge else 'none'}", flush=True)
    adapter_checks = checks.run(c)  # the tuned side is the adapter, or the stage stops before any benchmark runs
    table: dict = {}
    failed = []
    judge_calls: dict = {}  # per benchmark: what the judge cost and suffered
    for name in (n for n in BENCHMARKS if n in e.benchmarks):  # all on the one copy of the weights candidates loaded
        bench = BENCHMARKS[name]
        t = time.time()
        if bench.judged and judge is None:
            rows = {name: _skipped(NO_JUDGE)}
        else:
            module, func = bench.run.split(":")
            before = judges.summary(judge) if bench.judged else None
            try:
                rows = getattr(importlib.import_module(f"{__name__}.{module}"), func)(c, judge)
            except LlmftError as ex:  # the judge or the candidate endpoint failed: record it, finish the table
                rows = {name: _error(str(ex), judge)}
            if before is not None:
                judge_calls[name] = _minus(judges.summary(judge), before)
        errors = [f"{n}: {r['reason']}" for n, r in rows.items() if r.get("status") == "error"]
        failed += errors
        table.update(rows)
        print(f"evaluate: {name} {'FAILED' if errors else 'done'} in {time.time() - t:.0f}s", flush=True)

    table = _finite(table)
    runtime = round(time.time() - start, 1)
    _write(cfg, table, c, judge, judge_calls, runtime, adapter_checks)
    print(summary_line(table, f"{paths.eval_dir}/table.md", runtime, judges.summary(judge) if judge else None),
          flush=True)
    if failed:
        raise LlmftError(f"{len(failed)} benchmark(s) yielded no result (table written with error rows; a rerun "
                         "resumes from the judge cache):\n  " + "\n  ".join(failed))
    return table


def summary_line(table: dict, where: str, runtime: float, judge_calls: dict | None) -> str:
    """One line that cannot read like a success when a benchmark yielded nothing: it starts with FAILED and
    names each failed benchmark with its reason."""
    done = {n: r for n, r in table.items() if report.is_result(r)}
    failed = {n: r["reason"] for n, r in table.items() if r.get("status") == "error"}
    skipped = [n for n, r in table.items() if r.get("status") == "skipped"]
    key = "test_loss" if "test_loss" in done else next(iter(done), None)
    parts = [f"{len(done)} metrics"
             + (f", {key} {report.fmt(done[key]['base'])} -> {report.fmt(done[key]['tuned'])}" if key else "")]
    parts += [f"{n} FAILED: {_short(why)}" for n, why in failed.items()]
    parts.append(f"skipped: {', '.join(skipped)}" if skipped else "nothing skipped")
    parts.append(f"{where} in {runtime:.0f}s")
    if judge_calls:
        parts.append(f"judge: {judges.describe_summary(judge_calls)}")
    head = f"evaluate: FAILED ({len(failed)} benchmark(s) yielded no result): " if failed else "evaluate: "
    return head + "; ".join(parts)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _minus(after: dict, before: dict) -> dict:
    """One benchmark's share of the judge's counts."""
    out = {k: v - before[k] for k, v in after.items() if k != "failures"}
    out["failures"] = {k: v - before["failures"].get(k, 0) for k, v in after["failures"].items()
                       if v - before["failures"].get(k, 0)}
    return out


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
    """The DVC metrics file: base, tuned, delta and the delta's 95% CI (ci95_lo, ci95_hi) of each top-level metric,
    nothing else (categories and skip reasons stay in table.json), so `dvc exp show` has a readable number of
    columns."""
    return {n: {**{k: r[k] for k in ("base", "tuned", "delta")}, "ci95_lo": r["ci95"][0], "ci95_hi": r["ci95"][1]}
            for n, r in table.items() if report.is_result(r) and "/" not in n}


def _write(cfg: Config, table: dict, c, judge, judge_calls: dict, runtime: float, adapter_checks: dict) -> None:
    from . import candidates

    e, paths = cfg.evaluate, cfg.paths
    out = Path(paths.eval_dir)
    write_json(out / "table.json", table)
    repeats = f", each judgment asked {e.judge.repeats} times (median)" if judge and e.judge.repeats > 1 else ""
    header = (f"# Evaluation: base vs tuned\n\nbase `{candidates.describe(c, 'base')}`, tuned "
              f"`{candidates.describe(c, 'tuned')}`, judge `{judge.name if judge else 'none'}`{repeats}; 95% CIs "
              f"from a paired bootstrap ({e.bootstrap_samples} resamples, seed {e.seed}); delta = tuned − base.")
    footer = [f"Judge calls, {n}: {judges.describe_summary(s)}" for n, s in judge_calls.items()]
    write_atomic(out / "table.md", report.markdown(table, header, footer))
    calls = judges.summary(judge) if judge else None
    write_json(out / "meta.json", {"runtime_s": runtime, "judge": judge.name if judge else None,
                                  "judge_repeats": e.judge.repeats if judge else None,
                                  "judge_requests": calls["requests"] if calls else 0,
                                  "judge_cached": calls["cached"] if calls else 0,
                                  "judge_calls": {"total": calls, **judge_calls} if calls else {},
                                  "base": candidates.describe(c, "base"), "tuned": candidates.describe(c, "tuned"),
                                  "adapter_checks": adapter_checks})
    write_json(paths.eval_metrics, headline(table))
    pngs = report.plots(table, Path(paths.eval_plots))
    report.log_mlflow(cfg, table, [out / "table.json", out / "table.md", out / "meta.json", *pngs, out / "outputs"])
