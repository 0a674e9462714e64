"""evaluate: base vs tuned on every configured benchmark, each metric with a paired bootstrap 95% CI.

    python -m llmft evaluate
    python -m llmft evaluate evaluate.judge.model=gpt-4-1106-preview evaluate.alpaca_eval_rows=null

Writes `evaluate.output_file` (metrics/eval.json: {"<metric>": {base, tuned, delta, ci95, n,
higher_is_better}, "<metric>/<category>": ..., "<benchmark>": {status: skipped|error, reason}}), a markdown
table beside it, generated answers and judgments under `evaluate.outputs_dir`, charts under
`evaluate.plots_dir`, and logs it all to the pipeline's MLflow run. Judge-based benchmarks without a
judge are recorded as skipped; a judge that fails is recorded as an error and the stage exits non-zero
after writing everything (its finished judgments are cached: a rerun resumes).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from ..config import Config, LlmftError
from ..tracking import write_atomic, write_json
from . import judges, report

BENCHMARKS = ("test_loss", "reference_nll", "rouge", "alpaca_eval", "mt_bench", "lm_eval")
JUDGED = ("alpaca_eval", "mt_bench")


def _check(cfg: Config) -> None:
    e = cfg.evaluate
    unknown = [b for b in e.benchmarks if b not in BENCHMARKS]
    if unknown:
        raise LlmftError(f"evaluate.benchmarks: unknown {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)})")
    for key in ("test_rows", "rouge_rows", "reference_rows", "alpaca_eval_rows", "mt_bench_rows", "lm_eval_limit"):
        v = getattr(e, key)
        if v is not None and v < 1:
            raise LlmftError(f"evaluate.{key} must be >= 1 or null (all), got {v}")
    if e.judge.max_concurrency < 1 or e.judge.max_retries < 0 or e.judge.timeout_s <= 0:
        raise LlmftError("evaluate.judge: max_concurrency must be >= 1, max_retries >= 0, timeout_s > 0")


def _finite(obj):
    """NaN/inf -> null: they are not JSON, and DVC's metrics parser rejects them."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _run(name: str, c, judge) -> dict:
    from . import alpacaeval, likelihood, mtbench, rouge

    if name == "test_loss":
        return likelihood.test_loss(c)
    if name == "reference_nll":
        return likelihood.reference_nll(c)
    if name == "rouge":
        return rouge.run(c)
    if name == "alpaca_eval":
        return alpacaeval.run(c, judge)
    return mtbench.run(c, judge)


def evaluate(cfg: Config) -> dict:
    from . import candidates, lmeval, stats

    _check(cfg)
    e = cfg.evaluate
    start = time.time()
    judge = judges.make(e.judge)  # fails now, not after an hour of generation, if the API key is missing
    c = candidates.load(cfg)
    tuned = f"endpoint {c.endpoint}" if c.endpoint else f"adapter {c.adapter}"
    print(f"evaluate: base {c.base_path}, tuned = {tuned}, judge: {judge.name if judge else 'none'}", flush=True)
    table: dict = {}
    failed = []
    for name in [b for b in BENCHMARKS if b in e.benchmarks and b != "lm_eval"]:
        t = time.time()
        try:
            rows = _run(name, c, judge)
        except LlmftError as ex:  # the judge (or the candidate endpoint) failed: record it, finish the table
            if name not in JUDGED:
                raise
            rows = {name: stats.error(str(ex), **({"judge": judge.name} if judge else {}))}
            failed.append(f"{name}: {ex}")
        table.update(rows)
        print(f"evaluate: {name} done in {time.time() - t:.0f}s", flush=True)
    candidates.unload(c)  # lm-eval loads its own copies
    if "lm_eval" in e.benchmarks:
        table.update(lmeval.run(c))

    table = _finite(table)
    out = Path(e.output_file)
    write_json(out, table)
    header = (f"# Evaluation: base vs tuned\n\nbase `{c.base_path}`, tuned "
              f"`{c.endpoint or c.adapter}`, judge `{judge.name if judge else 'none'}`; 95% CIs from a paired "
              f"bootstrap ({e.bootstrap_samples} resamples, seed {e.seed}); delta = tuned − base.")
    md = out.with_suffix(".md")
    write_atomic(md, report.markdown(table, header))
    pngs = report.plots(table, Path(e.plots_dir))
    report.log_mlflow(cfg.tracking, table, [out, md, *pngs, Path(e.outputs_dir)])

    done = {n: r for n, r in table.items() if report.is_result(r)}
    other = {n: r["status"] for n, r in table.items() if not report.is_result(r)}
    key = "test_loss" if "test_loss" in done else next(iter(done), None)
    headline = f"{key} {report.fmt(done[key]['base'])} -> {report.fmt(done[key]['tuned'])}; " if key else ""
    print(f"evaluate: {len(done)} metrics, {headline}"
          f"{', '.join(f'{n} {s}' for n, s in other.items()) or 'nothing skipped'}; "
          f"{out} in {time.time() - start:.0f}s"
          + (f"; judge: {judge.counts['requests']} requests, {judge.counts['cached']} cached" if judge else ""))
    if failed:
        raise LlmftError("benchmarks failed (table written with error rows; a rerun resumes from the judge cache):\n  "
                         + "\n  ".join(failed))
    return table
