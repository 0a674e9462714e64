"""Paired bootstrap: base and tuned are scored on the same examples, so resample examples, not models.

Resampling the pairs keeps the correlation between the two models' scores on each example, which is
what makes a small delta distinguishable from noise on a few hundred examples.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def mean(x: np.ndarray) -> np.ndarray:
    """Mean of per-example scores; x: (resamples, n)."""
    return x.mean(axis=1)


def ratio(x: np.ndarray) -> np.ndarray:
    """Token-weighted mean; x: (resamples, n, 2) rows of (summed NLL, token count)."""
    return x[..., 0].sum(axis=1) / x[..., 1].sum(axis=1)


def paired_bootstrap(base, tuned, stat: Callable = mean, samples: int = 1000, seed: int = 42,
                     transform: Optional[Callable] = None, chunk: int = 200) -> dict:
    """Point estimates, delta (tuned - base) and percentile 95% CIs of delta and of each side.

    base, tuned: per-example scores aligned on the same examples, shape (n,) or (n, k) for `ratio`.
    transform: applied to the statistic before differencing (e.g. exp for perplexity from mean NLL).
    """
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if base.shape != tuned.shape:
        raise ValueError(f"paired samples differ in shape: {base.shape} vs {tuned.shape}")
    n = len(base)
    if n == 0:
        raise ValueError("no paired examples to compare")
    f = transform or (lambda v: v)
    point_b, point_t = float(f(stat(base[None])[0])), float(f(stat(tuned[None])[0]))
    rng = np.random.default_rng(seed)
    bs, ts = [], []
    for start in range(0, samples, chunk):  # chunks bound memory on big benchmarks (MMLU: 14k examples)
        idx = rng.integers(0, n, size=(min(chunk, samples - start), n))
        bs.append(f(stat(base[idx])))  # base[idx]: (resamples, n) or (resamples, n, k)
        ts.append(f(stat(tuned[idx])))
    b, t = np.concatenate(bs), np.concatenate(ts)

    def ci(v):
        lo, hi = np.percentile(v, [2.5, 97.5])
        return [float(lo), float(hi)]

    return {"base": point_b, "tuned": point_t, "delta": point_t - point_b, "ci95": ci(t - b),
            "ci95_base": ci(b), "ci95_tuned": ci(t), "n": int(n)}


def row(base, tuned, higher_is_better: bool, cfg_samples: int, seed: int, stat: Callable = mean,
        transform: Optional[Callable] = None, **extra) -> dict:
    """One table row in the eval.json contract: base, tuned, delta, ci95, n, higher_is_better (+ extras)."""
    out = paired_bootstrap(base, tuned, stat=stat, samples=cfg_samples, seed=seed, transform=transform)
    out["higher_is_better"] = higher_is_better
    out.update(extra)
    return out


def mean_ci(x, samples: int = 1000, seed: int = 42) -> tuple[float, list[float]]:
    """The mean of one side's scores and its percentile bootstrap 95% CI."""
    x = np.asarray(x, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return float(x.mean()), [float(lo), float(hi)]


def own_scores(row: dict, base_own, tuned_own, samples: int, seed: int) -> dict:
    """A paired row whose base and tuned are each side's own score, the mean over every example that side has a
    score for, as the benchmark's own tool reports it (FastChat's show_result drops a model's unparsed ratings,
    not its rival's). The CI stays the paired one, of `delta_paired` over the `n_paired` (= n) examples both
    sides have; `n_scored` is how many examples each side's own score averages."""
    (b, ci_b), (t, ci_t) = mean_ci(base_own, samples, seed), mean_ci(tuned_own, samples, seed)
    return {**row, "base": b, "tuned": t, "delta": t - b, "ci95_base": ci_b, "ci95_tuned": ci_t,
            "delta_paired": row["delta"], "n_paired": row["n"],
            "n_scored": {"base": len(base_own), "tuned": len(tuned_own)}}


def over_repeats(pooled: dict[str, dict], per_repeat: list[dict[str, dict]]) -> dict[str, dict]:
    """Rows of a benchmark judged len(per_repeat) times. Each result row's base and tuned become the median over
    the repeats of that repeat's own score (MT-Bench's maintainers advise the median of several runs), and
    `repeats` holds every repeat's base, tuned and delta with their min and max. The CI, n and per-side CIs are
    the pooled row's: the paired bootstrap over per-example medians across the repeats."""
    out = {}
    for name, row in pooled.items():
        runs = [rows[name] for rows in per_repeat if "status" not in rows.get(name, {"status": None})]
        if "status" in row or not runs:
            out[name] = row
            continue
        values = {k: [float(r[k]) for r in runs] for k in ("base", "tuned", "delta")}
        base, tuned = float(np.median(values["base"])), float(np.median(values["tuned"]))
        out[name] = {**row, "base": base, "tuned": tuned, "delta": tuned - base,
                     "repeats": {"n": len(per_repeat), "with_result": len(runs),
                                 **{k: {"values": v, "min": min(v), "max": max(v)} for k, v in values.items()}}}
    return out


def skipped(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


def error(reason: str, **extra) -> dict:
    return {"status": "error", "reason": reason, **extra}


def per_category(categories, base, tuned, higher_is_better: bool, samples: int, seed: int, prefix: str,
                 stat: Callable = mean, transform: Optional[Callable] = None, min_n: int = 1) -> dict:
    """`<prefix>/<category>` rows, one paired bootstrap per category."""
    cats = np.asarray(categories, dtype=object)
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    rows = {}
    for c in sorted(set(cats.tolist())):
        m = cats == c
        if m.sum() >= min_n:
            rows[f"{prefix}/{c}"] = row(base[m], tuned[m], higher_is_better, samples, seed, stat=stat,
                                        transform=transform)
    return rows
