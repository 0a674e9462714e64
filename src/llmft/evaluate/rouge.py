"""ROUGE-L F1 of generated answers against the Dolly test references (judge-free, per category)."""
from __future__ import annotations

from . import candidates as cands
from . import sources, stats
from ..io import write_jsonl
from .report import outputs_dir


def run(c: cands.Candidates, judge=None) -> dict:
    from rouge_score import rouge_scorer

    e = c.cfg.evaluate
    rows, why = sources.test_split(c.cfg, e.rouge_rows)
    if rows is None:
        return {"rouge_l": stats.skipped(why)}
    convs = [([(r["instruction"], None)], r.get("context", "")) for r in rows]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = {}
    for side in cands.SIDES:
        answers = cands.generate(c, side, convs, "ROUGE answers")
        scores[side] = [scorer.score(r["response"], a)["rougeL"].fmeasure for r, a in zip(rows, answers)]
        write_jsonl(outputs_dir(c.cfg) / f"rouge_{side}.jsonl",
                    [{"instruction": r["instruction"], "category": r.get("category", ""), "reference": r["response"],
                      "output": a, "rouge_l": s} for r, a, s in zip(rows, answers, scores[side])])
    cats = [r.get("category", "all") for r in rows]
    out = {"rouge_l": stats.row(scores["base"], scores["tuned"], True, e.bootstrap_samples, e.seed,
                                description="ROUGE-L F1 vs the test split's reference responses")}
    out.update(stats.per_category(cats, scores["base"], scores["tuned"], True, e.bootstrap_samples, e.seed, "rouge_l"))
    return out
