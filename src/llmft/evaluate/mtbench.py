"""MT-Bench: 80 two-turn questions, single-answer grading 1-10 with FastChat's judge prompts and parse rules.

FastChat's own judge loop (`gen_judgment`) calls the pre-1.0 openai API, so the call is ours (judges.py);
the prompts (judge_prompts.jsonl), the choice of prompt (reference-guided for math/reasoning/coding, the
multi-turn variants for turn 2), the message layout and the rating regexes are FastChat's.
"""
from __future__ import annotations

import ast
import re

import numpy as np

from . import candidates as cands
from . import judges, sources, stats
from .report import outputs_dir, write_jsonl



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
    answers = {side: answer_two_turns(c, side, questions) for side in cands.SIDES}
    for side in cands.SIDES:
        write_jsonl(outputs_dir(c.cfg) / f"mt_bench_{side}.jsonl",
                    [{"question_id": q["question_id"], "model_id": side, "category": q["category"],
                      "choices": [{"index": 0, "turns": a}]} for q, a in zip(questions, answers[side])])

    keys = [(side, i, turn) for side in cands.SIDES for i in range(len(questions)) for turn in (1, 2)]
    requests = [judge_request(questions[i], answers[side][i], turn, mt["prompts"],
                              mt["references"].get(questions[i]["question_id"]), judge.cfg.max_tokens)
                for side, i, turn in keys]
    choices = judges.chat_many(judge, requests, "MT-Bench judging")
    ratings = {k: parse_rating(judges.content(ch)) for k, ch in zip(keys, choices)}
    write_jsonl(outputs_dir(c.cfg) / "mt_bench_judgments.jsonl",
                [{"question_id": questions[i]["question_id"], "model": side, "turn": turn,
                  "score": ratings[(side, i, turn)], "judgment": judges.content(ch)}
                 for (side, i, turn), ch in zip(keys, choices)])
    failures = {side: sum(ratings[k] == -1 for k in keys if k[0] == side) for side in cands.SIDES}

    # pairs (question, turn) that both sides' judgments could be parsed for
    pairs = [(i, t) for i in range(len(questions)) for t in (1, 2)
             if ratings[("base", i, t)] != -1 and ratings[("tuned", i, t)] != -1]
    if not pairs:
        return {"mt_bench": stats.error(f"no judgment could be parsed (parse failures: {failures})",
                                        judge=judge.name, parse_failures=failures)}
    base = np.array([ratings[("base", i, t)] for i, t in pairs], dtype=float)
    tuned = np.array([ratings[("tuned", i, t)] for i, t in pairs], dtype=float)
    turns = np.array([f"turn_{t}" for _, t in pairs], dtype=object)
    cats = np.array([questions[i]["category"] for i, _ in pairs], dtype=object)
    b, s = e.bootstrap_samples, e.seed
    out = {"mt_bench_score": stats.row(base, tuned, True, b, s, judge=judge.name, parse_failures=failures,
                                       description="MT-Bench single-answer grade 1-10, both turns")}
    out.update(stats.per_category(turns, base, tuned, True, b, s, "mt_bench_score"))
    out.update(stats.per_category(cats, base, tuned, True, b, s, "mt_bench_score"))
    return out
