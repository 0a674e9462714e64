"""Small benchmark files the tests write themselves, in the real formats, so the suite needs nothing beside
the checkout: FastChat's MT-Bench question / judge-prompt / reference-answer JSONL, alpaca_eval's
model_outputs JSON, Dolly's JSONL. The texts are ours; the fields, file names, prompt placeholders and the
delimiters FastChat's judge prompts use (which judge_server.py reads) are the real ones. Tests that also need
the real files use the `shared_data` fixture and are marked `shared_data`.
"""
from __future__ import annotations

import json
from pathlib import Path

MT_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
NEED_REF = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS (reference-guided grading)

_SINGLE = ("[Instruction]\nPlease act as an impartial judge and rate the response. {extra}Begin with a short "
           "explanation, then give your rating strictly as \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n")


def _judge_prompts() -> list[dict]:
    def row(name, system, template):
        return {"name": name, "type": "single", "system_prompt": system, "prompt_template": template,
                "description": f"fixture {name}", "category": "math" if "math" in name else "general",
                "output_format": "[[rating]]"}

    ref_note = "Compare the answer with the reference answer. "
    single = _SINGLE.format(extra="") + ("[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
                                         "[The End of Assistant's Answer]")
    math = _SINGLE.format(extra=ref_note) + ("[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n"
                                             "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
                                             "[The End of Assistant's Answer]")
    convo = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
             "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
             "<|The End of Assistant A's Conversation with User|>")
    ref_convo = ("<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}"
                 "\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n")
    multi_sys = ("Please act as an impartial judge. You evaluate the second user question; focus on the assistant's "
                 "answer to the second user question. Rate it as \"[[rating]]\".")
    return [row("single-v1", "You are a helpful assistant.", single),
            row("single-math-v1", "You are a helpful assistant.", math),
            row("single-v1-multi-turn", multi_sys, convo),
            row("single-math-v1-multi-turn", multi_sys + " " + ref_note, ref_convo + convo)]


def write_mt_bench(directory: Path, per_category: int = 2) -> Path:
    """question.jsonl, judge_prompts.jsonl and reference_answer_gpt-4.jsonl (FastChat's layout, flattened)."""
    directory.mkdir(parents=True, exist_ok=True)
    questions, refs = [], []
    qid = 81
    for k in range(per_category):
        for cat in MT_CATEGORIES:
            questions.append({"question_id": qid, "category": cat,
                              "turns": [f"{cat} question {k}: describe a {cat} task.", f"Now shorten it ({cat} {k})."]})
            if cat in NEED_REF:
                refs.append({"question_id": qid, "answer_id": f"ref{qid}", "model_id": "gpt-4",
                             "choices": [{"index": 0, "turns": [f"Reference one for {qid}.", f"Reference two for {qid}."]}],
                             "tstamp": 1687221890.0})
            qid += 1
    # FastChat's file order: the categories interleave as in the real question.jsonl (writing first)
    questions.sort(key=lambda q: (MT_CATEGORIES.index(q["category"]), q["question_id"]))
    for name, rows in (("question.jsonl", questions), ("judge_prompts.jsonl", _judge_prompts()),
                       ("reference_answer_gpt-4.jsonl", refs)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def write_alpaca_eval(path: Path, n: int = 12) -> Path:
    """alpaca_eval's model_outputs JSON of the reference model (dataset, instruction, output, generator)."""
    datasets = ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")
    rows = [{"dataset": datasets[i % len(datasets)], "instruction": f"Explain idea number {i} in two sentences.",
             "output": f"Idea {i} is simple. " + "It has a reason. " * (1 + i % 4), "generator": "gpt4_1106_preview"}
            for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    return path


def write_dolly(path: Path, n: int = 48) -> Path:
    """databricks-dolly-15k's JSONL (instruction, context, response, category), all 8 categories."""
    cats = ("open_qa", "general_qa", "classification", "closed_qa", "brainstorming", "information_extraction",
            "summarization", "creative_writing")
    rows = [{"instruction": f"Task {i}: say something about topic {i}.",
             "context": f"Topic {i} is a topic." if cats[i % 8] in ("closed_qa", "summarization") else "",
             "response": f"Topic {i} is interesting because of reason {i % 5}.", "category": cats[i % 8]}
            for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
