"""Answers already on disk (evaluate.outputs), read and checked before any work, judged instead of generated.

The formats are the ones the benchmarks' own tools write, and the ones evaluate writes to
paths.eval_dir/outputs: alpaca_eval's model_outputs JSON (a list of {instruction, output, generator, dataset})
and FastChat's model_answer JSONL ({question_id, model_id, choices: [{index, turns: [...]}]}). Each is
matched to the benchmark's sampled rows (by instruction, by question_id), so a file of all 805 or all 80
answers serves any evaluate.*_rows subset. A record the benchmark does not have, a sampled row the file does
not answer, or a wrong turn count is an error naming the file and the record (JSON: `file[index]`, JSONL:
`file:line`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

from ..config import Config, SavedOutputs
from ..errors import LlmftError
from . import sources

SIDES = ("base", "tuned")
BENCHMARKS = tuple(f.name for f in dataclasses.fields(SavedOutputs))  # the benchmarks whose answers can come from files


def configured(cfg: Config) -> dict[tuple[str, str], Path]:
    """{(benchmark, side): file} for the saved outputs set in evaluate.outputs."""
    out = {}
    for side in SIDES:
        for bench in BENCHMARKS:
            path = getattr(getattr(cfg.evaluate.outputs, side), bench)
            if path is not None:
                out[(bench, side)] = Path(path)
    return out


def load(cfg: Config) -> dict[tuple[str, str], list]:
    """{(benchmark, side): answers to the benchmark's sampled rows}: {instruction: {output, generator}} for
    AlpacaEval, {question_id: [turn answers]} for MT-Bench. A benchmark whose data is unavailable is skipped
    later with its reason, so its files are only checked for format."""
    e = cfg.evaluate
    out = {}
    for (bench, side), path in configured(cfg).items():
        key = f"evaluate.outputs.{side}.{bench}"
        if not path.is_file():
            raise LlmftError(f"{key}: {path} not found")
        if bench == "alpaca_eval":
            records = read_alpaca_eval(path)
            rows, _ = sources.alpaca_eval(e.alpaca_eval_data, None, e.seed)
            if rows is not None:
                sample = sources.sample(rows, e.alpaca_eval_rows, e.seed)
                out[(bench, side)] = match_alpaca_eval(records, rows, sample, path, key)
        else:
            answers = read_mt_bench(path)
            mt, _ = sources.mt_bench(e.mt_bench_data, None)
            if mt is not None:
                sample = sources.round_robin(mt["questions"], e.mt_bench_rows)
                out[(bench, side)] = match_mt_bench(answers, mt["questions"], sample, path, key)
    return out


def _load_json_records(path: Path) -> tuple[list, Callable[[int], str]]:
    """(records, where(i)): a JSON list, or JSONL (one record per line)."""
    if path.suffix == ".jsonl":
        records, lines = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as ex:
                    raise LlmftError(f"{path}:{n}: invalid JSON: {ex.msg}") from None
                lines.append(n)
        return records, lambda i: f"{path}:{lines[i]}"
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as ex:
        raise LlmftError(f"{path}:{ex.lineno}: invalid JSON: {ex.msg}") from None
    return records, lambda i: f"{path}[{i}]"


def read_alpaca_eval(path: Path) -> dict[str, tuple[str, dict]]:
    """{instruction: (where, record)} of alpaca_eval model_outputs."""
    records, where = _load_json_records(path)
    if not isinstance(records, list):
        raise LlmftError(f"{path}: expected alpaca_eval model_outputs, a JSON list of "
                         "{instruction, output, generator, dataset} records")
    out: dict[str, tuple[str, dict]] = {}
    for i, r in enumerate(records):
        for field in ("instruction", "output"):
            if not isinstance(r, dict) or not isinstance(r.get(field), str):
                raise LlmftError(f"{where(i)}: record has no '{field}' string (alpaca_eval model_outputs need "
                                 "instruction and output)")
        if not r["instruction"].strip():
            raise LlmftError(f"{where(i)}: empty 'instruction'")
        if r["instruction"] in out:
            raise LlmftError(f"{where(i)}: instruction repeats {out[r['instruction']][0]}: {r['instruction'][:80]!r}")
        out[r["instruction"]] = (where(i), r)
    return out


def match_alpaca_eval(records: dict, rows: list[dict], sample: list[dict], path: Path, key: str) -> dict[str, dict]:
    known = {r["instruction"] for r in rows}
    for instruction, (where, _) in records.items():
        if instruction not in known:
            raise LlmftError(f"{where}: instruction is not in the AlpacaEval set (evaluate.alpaca_eval_data): "
                             f"{instruction[:80]!r}")
    missing = [r["instruction"] for r in sample if r["instruction"] not in records]
    if missing:
        raise LlmftError(f"{key}: {path} answers {len(sample) - len(missing)} of the {len(sample)} sampled AlpacaEval "
                         f"instructions; first missing: {missing[0][:80]!r} (evaluate.alpaca_eval_rows and "
                         "evaluate.seed choose the sample)")
    return {r["instruction"]: {"output": records[r["instruction"]][1]["output"],
                               "generator": records[r["instruction"]][1].get("generator") or f"saved-{path.stem}"}
            for r in sample}


def read_mt_bench(path: Path) -> dict[int, tuple[str, list]]:
    """{question_id: (where, turns)} of a FastChat model_answer file; a later line for the same question wins
    (FastChat's load_model_answers does the same: reruns append)."""
    records, where = _load_json_records(path)
    if not isinstance(records, list):
        raise LlmftError(f"{path}: expected FastChat model_answer JSONL, one "
                         "{question_id, model_id, choices: [{index, turns}]} record per line")
    out: dict[int, tuple[str, list]] = {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "question_id" not in r:
            raise LlmftError(f"{where(i)}: record has no 'question_id' (FastChat model_answer format)")
        choices = r.get("choices")
        turns = choices[0].get("turns") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise LlmftError(f"{where(i)}: question {r['question_id']} has no choices[0].turns list of answers "
                             "(FastChat model_answer format)")
        out[r["question_id"]] = (where(i), turns)
    return out


def match_mt_bench(answers: dict, questions: list[dict], sample: list[dict], path: Path, key: str) -> dict[int, list]:
    by_id = {q["question_id"]: q for q in questions}
    for qid, (where, turns) in answers.items():
        if qid not in by_id:
            raise LlmftError(f"{where}: question_id {qid!r} is not an MT-Bench question (evaluate.mt_bench_data)")
        want = len(by_id[qid]["turns"])
        if len(turns) != want:
            raise LlmftError(f"{where}: question {qid} has {len(turns)} answer turn(s), MT-Bench asks {want}")
    missing = [q["question_id"] for q in sample if q["question_id"] not in answers]
    if missing:
        raise LlmftError(f"{key}: {path} answers {len(sample) - len(missing)} of the {len(sample)} sampled MT-Bench "
                         f"questions; missing question_id {', '.join(map(str, missing[:5]))} "
                         "(evaluate.mt_bench_rows chooses the sample)")
    return {q["question_id"]: answers[q["question_id"]][1] for q in sample}


def same_file(a: Path, b: Optional[Path]) -> bool:
    """Whether writing b would overwrite the saved file a (re-judging in place must not shrink it to a subset)."""
    try:
        return b is not None and b.exists() and a.samefile(b)
    except OSError:
        return False
