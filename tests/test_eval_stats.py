"""Paired bootstrap CIs: coverage of a known shift, degenerate cases, seeding, ratio statistics."""
from __future__ import annotations

import numpy as np
import pytest

from llmft.evaluate import stats


def test_known_shift_gives_ci_excluding_zero_and_containing_the_shift():
    rng = np.random.default_rng(0)
    base = rng.normal(5.0, 1.0, size=200)
    tuned = base + 0.5 + rng.normal(0, 0.2, size=200)  # paired: the per-example noise is small
    r = stats.paired_bootstrap(base, tuned, samples=2000, seed=1)
    lo, hi = r["ci95"]
    assert 0 < lo < 0.5 < hi
    assert r["delta"] == pytest.approx(tuned.mean() - base.mean())
    assert r["n"] == 200
    # the per-side CIs are much wider than the paired CI of the difference: pairing is what buys power
    assert (r["ci95_base"][1] - r["ci95_base"][0]) > 3 * (hi - lo)


def test_no_shift_gives_ci_spanning_zero():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, size=300)
    tuned = base + rng.normal(0, 1, size=300)
    lo, hi = stats.paired_bootstrap(base, tuned, samples=1000, seed=3)["ci95"]
    assert lo < 0 < hi


def test_identical_arrays_give_zero_ci():
    x = np.arange(50, dtype=float)
    r = stats.paired_bootstrap(x, x.copy(), samples=500, seed=0)
    assert r["delta"] == 0 and r["ci95"] == [0.0, 0.0]


def test_seeded_and_seed_sensitive():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=40), rng.normal(size=40)
    r1 = stats.paired_bootstrap(a, b, samples=300, seed=7)
    r2 = stats.paired_bootstrap(a, b, samples=300, seed=7)
    r3 = stats.paired_bootstrap(a, b, samples=300, seed=8)
    assert r1 == r2
    assert r1["ci95"] != r3["ci95"]


def test_ratio_statistic_is_token_weighted_and_transform_applies():
    # (summed NLL, tokens): a long example dominates the token-weighted mean
    base = np.array([[10.0, 10], [1.0, 1]])
    tuned = np.array([[5.0, 10], [3.0, 1]])
    r = stats.paired_bootstrap(base, tuned, stat=stats.ratio, samples=200, seed=0)
    assert r["base"] == pytest.approx(1.0) and r["tuned"] == pytest.approx(8 / 11)
    p = stats.paired_bootstrap(base, tuned, stat=stats.ratio, transform=np.exp, samples=200, seed=0)
    assert p["tuned"] == pytest.approx(np.exp(8 / 11))


def test_rows_and_per_category():
    cats = ["a"] * 30 + ["b"] * 30
    base = np.zeros(60)
    tuned = np.r_[np.ones(30), np.zeros(30)]
    rows = stats.per_category(cats, base, tuned, True, 200, 0, "m")
    assert set(rows) == {"m/a", "m/b"}
    assert rows["m/a"]["ci95"] == [1.0, 1.0] and rows["m/b"]["ci95"] == [0.0, 0.0]
    assert rows["m/a"]["higher_is_better"] is True and rows["m/a"]["n"] == 30


def test_mismatched_or_empty_pairs_raise():
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([], [])
