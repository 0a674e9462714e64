"""Judge-free likelihood signals: test-split loss/perplexity, and the NLL of GPT-4 reference answers.

Both score completion tokens only, per example, so base and tuned pair up example by example.
"""
from __future__ import annotations

import numpy as np

from . import candidates as cands
from . import sources, stats


def _rows(side_scores: dict, cats, cfg, name: str, desc: str, with_ppl: bool) -> dict:
    e = cfg.evaluate
    base, tuned = side_scores["base"], side_scores["tuned"]
    keep = (base[:, 1] > 0) & (tuned[:, 1] > 0)  # a prompt longer than max_length leaves nothing to score
    base, tuned, cats = base[keep], tuned[keep], np.asarray(cats, dtype=object)[keep]
    tokens = int(base[:, 1].sum())
    out = {name: stats.row(base, tuned, False, e.bootstrap_samples, e.seed, stat=stats.ratio, tokens=tokens,
                           description=desc)}
    if with_ppl:
        out[name.replace("loss", "perplexity")] = stats.row(base, tuned, False, e.bootstrap_samples, e.seed,
                                                            stat=stats.ratio, transform=np.exp, tokens=tokens)
    out.update(stats.per_category(cats, base, tuned, False, e.bootstrap_samples, e.seed, name, stat=stats.ratio))
    return out


def _score_both(c, pairs, desc) -> dict | None:
    if not cands.can_score(c, "tuned"):
        return None
    return {side: cands.score(c, side, pairs, desc, max_length=c.cfg.train.max_length) for side in cands.SIDES}


NO_ADAPTER = "needs the tuned weights: no adapter in paths.adapter (an endpoint gives no log-likelihoods)"


def test_loss(c: cands.Candidates, judge=None) -> dict:
    cfg = c.cfg
    rows, why = sources.test_split(cfg, cfg.evaluate.test_rows)
    if rows is None:
        return {"test_loss": stats.skipped(why)}
    scores = _score_both(c, [(r["prompt"], r["completion"]) for r in rows], "test loss")
    if scores is None:
        return {"test_loss": stats.skipped(NO_ADAPTER)}
    return _rows(scores, [r.get("category", "all") for r in rows], cfg, "test_loss",
                 "mean NLL per completion token on the test split (as training's eval loss)", with_ppl=True)


def reference_nll(c: cands.Candidates, judge=None) -> dict:
    """Mean per-token NLL of GPT-4's answers (AlpacaEval's reference outputs, MT-Bench turn-1 references)."""
    cfg, e = c.cfg, c.cfg.evaluate
    out = {}
    loaded = {
        "reference_nll_alpaca_eval": sources.alpaca_eval(e.alpaca_eval_data, e.reference_rows, e.seed),
        "reference_nll_mt_bench": sources.mt_bench_references(e.mt_bench_data, e.reference_rows),
    }
    for name, (rows, why) in loaded.items():
        if rows is None:
            out[name] = stats.skipped(why)
            continue
        pairs = [cands.example_pair(c, r["instruction"], "", r["output"]) for r in rows]
        scores = _score_both(c, pairs, name)
        if scores is None:
            out[name] = stats.skipped(NO_ADAPTER)
            continue
        out.update(_rows(scores, [r["category"] for r in rows], cfg, name,
                         "mean NLL per token of GPT-4's reference answers", with_ppl=False))
    return out
