"""Benchmark inputs: the test split, AlpacaEval's instructions + GPT-4-turbo references, MT-Bench's files.

Each loader returns (rows, None) or (None, reason): a missing file skips its benchmark with the reason in
the table instead of failing the stage, so the defaults work without ../shared.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..config import Config, LlmftError

Loaded = tuple[Optional[list[dict]], Optional[str]]

MT_BENCH_FILES = ("question.jsonl", "judge_prompts.jsonl", "reference_answer_gpt-4.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LlmftError(f"{path}:{n}: invalid JSON: {e.msg}") from None
    return rows


def sample(rows: list, n: Optional[int], seed: int) -> list:
    """A seeded subset of n rows, in their original order; all rows when n is null or too large."""
    if n is None or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def round_robin(rows: list[dict], n: Optional[int], key: str = "category") -> list[dict]:
    """The first n rows taking one per category in turn, so a small subset still covers every category."""
    if n is None or n >= len(rows):
        return list(rows)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    out: list[dict] = []
    while len(out) < n:
        for g in groups.values():
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def test_split(cfg: Config, n: Optional[int]) -> Loaded:
    path = Path(cfg.data.output_dir) / "test.jsonl"
    if not path.exists():
        return None, f"{path} not found (run `llmft prepare`)"
    rows = read_jsonl(path)
    if not rows:
        return None, f"{path} is empty"
    missing = [k for k in ("prompt", "completion", "response") if k not in rows[0]]
    if missing:
        raise LlmftError(f"{path}: rows lack {', '.join(missing)}: rerun `llmft prepare`")
    return sample(rows, n, cfg.evaluate.seed), None


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/")) and not Path(path).suffix


def alpaca_eval(path: str, n: Optional[int], seed: int) -> Loaded:
    """Rows with instruction, output (the reference answer), generator, dataset, category, index."""
    p = Path(path)
    if p.exists():
        rows = read_jsonl(p) if p.suffix == ".jsonl" else json.loads(p.read_text(encoding="utf-8"))
    elif _looks_like_hub_id(path):
        try:
            import datasets

            # AlpacaEval 2's reference set (GPT-4-turbo outputs) is this config of the hub dataset
            rows = list(datasets.load_dataset(path, "alpaca_eval_gpt4_baseline")["eval"])
        except Exception as e:  # offline, gated, renamed: the benchmark is skipped, not the stage
            return None, f"AlpacaEval data {path} could not be loaded from the hub: {type(e).__name__}: {str(e)[:200]}"
    else:
        return None, f"AlpacaEval reference file {path} not found (evaluate.alpaca_eval_path)"
    if not isinstance(rows, list) or not rows or "instruction" not in rows[0] or "output" not in rows[0]:
        raise LlmftError(f"{path}: expected a list of AlpacaEval rows with 'instruction' and 'output'")
    for i, r in enumerate(rows):
        r["index"] = i  # AlpacaEval's instruction index (length-controlled win rate needs it)
        r["category"] = r.get("dataset", "all")
    return sample(rows, n, seed), None


def mt_bench(directory: Path, n: Optional[int]) -> tuple[Optional[dict], Optional[str]]:
    """{questions, prompts (judge prompts by name), references (by question_id)}."""
    missing = [f for f in MT_BENCH_FILES if not (directory / f).exists()]
    if missing:
        return None, f"MT-Bench files missing in {directory} (evaluate.mt_bench_dir): {', '.join(missing)}"
    questions = round_robin(read_jsonl(directory / "question.jsonl"), n)
    prompts = {p["name"]: p for p in read_jsonl(directory / "judge_prompts.jsonl")}
    refs = {r["question_id"]: r for r in read_jsonl(directory / "reference_answer_gpt-4.jsonl")}
    return {"questions": questions, "prompts": prompts, "references": refs}, None


def mt_bench_references(directory: Path, n: Optional[int]) -> Loaded:
    """Turn-1 questions with GPT-4's reference answer (FastChat has them for math, reasoning, coding)."""
    mt, why = mt_bench(directory, None)
    if mt is None:
        return None, why
    rows = [{"instruction": q["turns"][0], "output": mt["references"][q["question_id"]]["choices"][0]["turns"][0],
             "category": q["category"], "question_id": q["question_id"]}
            for q in mt["questions"] if q["question_id"] in mt["references"]]
    return round_robin(rows, n), None
