"""Benchmark inputs: the test split, AlpacaEval's instructions + GPT-4-turbo references, MT-Bench's files.

Defaults are the public sources alpaca_eval and FastChat themselves read (the hub dataset
`tatsu-lab/alpaca_eval`, the hub Space `lmsys/mt-bench`); a local path overrides. Each loader returns
(rows, None) or (None, reason): data that cannot be had (offline, a missing file) skips its benchmark with a
reason naming the key to set, instead of failing the stage.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..config import Config
from ..errors import LlmftError

Loaded = tuple[Optional[list[dict]], Optional[str]]

# FastChat's file names, and where they sit in its repository and in the hub Space it downloads from
MT_BENCH_FILES = {"question.jsonl": "data/mt_bench/question.jsonl",
                  "judge_prompts.jsonl": "data/judge_prompts.jsonl",
                  "reference_answer_gpt-4.jsonl": "data/mt_bench/reference_answer/gpt-4.jsonl"}


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
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
    path = Path(cfg.paths.data) / "test.jsonl"
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


def _hub_failure(what: str, source: str, key: str, e: Exception, local: str) -> str:
    return (f"{what} {source} could not be loaded from the hub ({type(e).__name__}: {str(e)[:160]}); offline, set "
            f"{key} to {local}")


def alpaca_eval(source: str, n: Optional[int], seed: int) -> Loaded:
    """Rows with instruction, output (the reference answer), generator, dataset, category, index."""
    p = Path(source)
    if p.exists():
        rows = read_jsonl(p) if p.suffix == ".jsonl" else json.loads(p.read_text(encoding="utf-8-sig"))
    elif _looks_like_hub_id(source):
        try:
            import datasets

            # AlpacaEval 2's reference set (GPT-4-turbo outputs) is this config of the hub dataset
            rows = list(datasets.load_dataset(source, "alpaca_eval_gpt4_baseline")["eval"])
        except Exception as e:  # offline, gated, renamed: the benchmark is skipped, not the stage
            return None, _hub_failure("AlpacaEval data", source, "evaluate.alpaca_eval_data", e,
                                      "a local copy of alpaca_eval's gpt4_1106_preview model_outputs.json")
    else:
        return None, f"AlpacaEval reference file {source} not found (evaluate.alpaca_eval_data)"
    if not isinstance(rows, list) or not rows or "instruction" not in rows[0] or "output" not in rows[0]:
        raise LlmftError(f"{source}: expected a list of AlpacaEval rows with 'instruction' and 'output'")
    for i, r in enumerate(rows):
        r["index"] = i  # AlpacaEval's instruction index (length-controlled win rate needs it)
        r["category"] = r.get("dataset", "all")
    return sample(rows, n, seed), None


def _mt_bench_files(source: str) -> tuple[Optional[dict[str, Path]], Optional[str]]:
    """{FastChat file name: local path} from a local directory or the hub Space."""
    local = "a directory holding " + ", ".join(MT_BENCH_FILES)
    d = Path(source)
    if d.is_dir():
        found = {}
        for name, repo_path in MT_BENCH_FILES.items():
            # flat (name) or as laid out in FastChat's repository (question.jsonl, reference_answer/gpt-4.jsonl)
            cands = [d / name, d / repo_path.split("mt_bench/", 1)[-1], d / Path(repo_path).name]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                return None, f"MT-Bench file {name} missing in {d} (evaluate.mt_bench_data must be {local})"
            found[name] = hit
        return found, None
    if not _looks_like_hub_id(source):
        return None, f"MT-Bench data {source} not found (evaluate.mt_bench_data: {local}, or a hub Space id)"
    try:
        from huggingface_hub import hf_hub_download

        return {name: Path(hf_hub_download(source, repo_path, repo_type="space"))
                for name, repo_path in MT_BENCH_FILES.items()}, None
    except Exception as e:
        return None, _hub_failure("MT-Bench data", source, "evaluate.mt_bench_data", e, local)


def mt_bench(source: str, n: Optional[int]) -> tuple[Optional[dict], Optional[str]]:
    """{questions, prompts (judge prompts by name), references (by question_id)}."""
    files, why = _mt_bench_files(source)
    if files is None:
        return None, why
    questions = round_robin(read_jsonl(files["question.jsonl"]), n)
    prompts = {p["name"]: p for p in read_jsonl(files["judge_prompts.jsonl"])}
    refs = {r["question_id"]: r for r in read_jsonl(files["reference_answer_gpt-4.jsonl"])}
    return {"questions": questions, "prompts": prompts, "references": refs}, None


def mt_bench_references(source: str, n: Optional[int]) -> Loaded:
    """Turn-1 questions with GPT-4's reference answer (FastChat has them for math, reasoning, coding)."""
    mt, why = mt_bench(source, None)
    if mt is None:
        return None, why
    rows = [{"instruction": q["turns"][0], "output": mt["references"][q["question_id"]]["choices"][0]["turns"][0],
             "category": q["category"], "question_id": q["question_id"]}
            for q in mt["questions"] if q["question_id"] in mt["references"]]
    return round_robin(rows, n), None
