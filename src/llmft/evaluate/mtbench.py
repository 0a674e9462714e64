"""MT-Bench: 80 two-turn questions, single-answer grading 1-10 with FastChat's judge prompts and parse rules.

FastChat's own judge loop (`gen_judgment`) calls the pre-1.0 openai API, so the call is ours (judges.py);
the prompts (judge_prompts.jsonl), the choice of prompt (reference-guided for math/reasoning/coding, the
multi-turn variants for turn 2), the message layout and the rating regexes are FastChat's.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

from . import candidates as cands
from . import judges, sources, stats
from ..io import write_jsonl
from .report import outputs_dir
from .saved import same_file


def parse_rating(judgment: str) -> float:
    """FastChat's run_judge_single rule: `[[x]]`, else `[x]`, else -1 (a parse failure)."""
    from fastchat.llm_judge.common import one_score_pattern, one_score_pattern_backup

    match = re.search(one_score_pattern, judgment) or re.search(one_score_pattern_backup, judgment)
    return ast.literal_eval(match.groups()[0]) if match else -1


def judge_request(q: dict, answers: list[str], turn: int, prompts: dict, ref: dict | None, max_tokens: int):
    """(messages, params) exactly as FastChat builds them for single-answer grading of one turn."""
    from fastchat.llm_judge.common import NEED_REF_CATS

    ref = ref if q["category"] in NEED_REF_CATS else None
    kwargs = {}
    if ref is not None:
        kwargs["ref_answer_1"] = ref["choices"][0]["turns"][0]
        if turn == 2:
            kwargs["ref_answer_2"] = ref["choices"][0]["turns"][1]
    name = ("single-math-v1" if ref is not None else "single-v1") + ("-multi-turn" if turn == 2 else "")
    template = prompts[name]
    if turn == 2:
        user = template["prompt_template"].format(question_1=q["turns"][0], question_2=q["turns"][1],
                                                  answer_1=answers[0], answer_2=answers[1], **kwargs)
    else:
        user = template["prompt_template"].format(question=q["turns"][0], answer=answers[0], **kwargs)
    system = template["system_prompt"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return messages, {"temperature": 0, "max_tokens": max_tokens, "n": 1}


def answer_two_turns(c: cands.Candidates, side: str, questions: list[dict]) -> list[list[str]]:
    """Turn 1 for every question, then turn 2 with turn 1 as chat history, as FastChat's gen_model_answer."""
    first = cands.generate(c, side, [([(q["turns"][0], None)], "") for q in questions], "MT-Bench turn 1")
    second = cands.generate(c, side, [([(q["turns"][0], a), (q["turns"][1], None)], "")
                                      for q, a in zip(questions, first)], "MT-Bench turn 2")
    return [[a, b] for a, b in zip(first, second)]


def run(c: cands.Candidates, judge: judges.Judge) -> dict:
    e = c.cfg.evaluate
    mt, why = sources.mt_bench(e.mt_bench_data, e.mt_bench_rows)
    if mt is None:
        return {"mt_bench": stats.skipped(why)}
    questions = mt["questions"]
    answers = {}
    for side in cands.SIDES:
        saved = c.saved.get(("mt_bench", side))
        answers[side] = ([saved[q["question_id"]] for q in questions] if saved is not None
                         else answer_two_turns(c, side, questions))
        path = outputs_dir(c.cfg) / f"mt_bench_{side}.jsonl"
        source = getattr(e.outputs, side).mt_bench
        if source is None or not same_file(Path(source), path):  # judging a file in place must not rewrite it
            write_jsonl(path, [{"question_id": q["question_id"], "model_id": side, "category": q["category"],
                                "choices": [{"index": 0, "turns": a}]} for q, a in zip(questions, answers[side])])

    keys = [(side, i, turn) for side in cands.SIDES for i in range(len(questions)) for turn in (1, 2)]
    requests = [judge_request(questions[i], answers[side][i], turn, mt["prompts"],
                              mt["references"].get(questions[i]["question_id"]), judge.cfg.max_tokens)
                for side, i, turn in keys]
    ratings, judgments = [], []
    for repeat in range(judge.cfg.repeats):  # one after another: repeat k sees the judge after repeat k-1
        choices = judges.chat_many(judge, requests, "MT-Bench judging", repeat=repeat)
        ratings.append({k: parse_rating(judges.content(ch)) for k, ch in zip(keys, choices)})
        # FastChat's model_judgment fields that show_result reads (model, turn, score), plus the repeat
        judgments += [{"question_id": questions[i]["question_id"], "model": side, "turn": turn, "repeat": repeat,
                       "score": ratings[-1][(side, i, turn)], "judgment": judges.content(ch)}
                      for (side, i, turn), ch in zip(keys, choices)]
    write_jsonl(outputs_dir(c.cfg) / "mt_bench_judgments.jsonl", judgments)
    return scores(questions, ratings, e.bootstrap_samples, e.seed, judge.name)


def scores(questions: list[dict], ratings: list[dict], samples: int, seed: int, judge: str) -> dict:
    """The mt_bench_score rows from one {(side, question index, turn): rating} per repeat (-1: unparsed).

    Each side's score is its FastChat score: show_result drops the score -1 rows per model and averages the rest
    (turn 1, turn 2, and both turns together for the overall score). The delta's CI pairs the (question, turn)s
    parsed on both sides. Over several repeats, base and tuned are the median of the repeats' scores, and the CI
    pairs each judgment's median over the repeats that parsed it."""
    per_repeat = [_rows(questions, r, samples, seed, judge) for r in ratings]
    if len(ratings) == 1:
        return per_repeat[0]
    median = {}
    for k in ratings[0]:
        parsed = [r[k] for r in ratings if r[k] != -1]
        median[k] = float(np.median(parsed)) if parsed else -1
    pooled = _rows(questions, median, samples, seed, judge)
    if "status" in pooled.get("mt_bench", {}):
        return pooled
    return stats.over_repeats(pooled, per_repeat)


def _rows(questions: list[dict], ratings: dict, samples: int, seed: int, judge: str) -> dict:
    failures = {side: sum(v == -1 for (s, _, _), v in ratings.items() if s == side) for side in cands.SIDES}
    scored = {side: [(i, t) for (s, i, t), v in ratings.items() if s == side and v != -1] for side in cands.SIDES}
    # (question, turn) pairs parsed on both sides: what the paired CI resamples
    tuned_scored = set(scored["tuned"])
    pairs = [k for k in scored["base"] if k in tuned_scored]
    if not pairs:
        unparsed = [side for side in cands.SIDES if not scored[side]] or ["any (question, turn) on both sides"]
        return {"mt_bench": stats.error(f"no judgment could be parsed for {' or '.join(unparsed)} "
                                        f"(parse failures: {failures})", judge=judge, parse_failures=failures)}

    def row(keep, **extra) -> dict:
        paired = [k for k in pairs if keep(*k)]
        base = np.array([ratings[("base", *k)] for k in paired], dtype=float)
        tuned = np.array([ratings[("tuned", *k)] for k in paired], dtype=float)
        own = {side: [ratings[(side, *k)] for k in scored[side] if keep(*k)] for side in cands.SIDES}
        return stats.own_scores(stats.row(base, tuned, True, samples, seed, **extra), own["base"], own["tuned"],
                                samples, seed)

    out = {"mt_bench_score": row(lambda i, t: True, judge=judge, parse_failures=failures,
                                 description="MT-Bench single-answer grade 1-10, both turns (FastChat's score per "
                                             "side; the CI pairs the judgments parsed on both)")}
    groups = {f"turn_{t}": (lambda i, t, want=t: t == want) for t in (1, 2)}
    groups.update({cat: (lambda i, t, want=cat: questions[i]["category"] == want)
                   for cat in sorted({q["category"] for q in questions})})
    for name, keep in groups.items():
        if any(keep(*k) for k in pairs):  # as before: a group with no paired judgment has no CI, so no row
            out[f"mt_bench_score/{name}"] = row(keep)
    return out
