"""prepare: sources, cleaning, stratified leak-free split, atomic outputs, and every bad-input error."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from llmft import data
from llmft.config import LlmftError, load_config


def _cfg(tmp_path, **over):
    ov = [f"data.output_dir={tmp_path / 'processed'}", "data.stats_tokenizer=false"]
    ov += [f"{k}={v}" for k, v in over.items()]
    return load_config(tmp_path / "none.yaml", ov)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # metrics/data.json lands in the test's folder


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_embedded_sample_covers_all_dolly_categories():
    rows, prov = data.load_rows(load_config("none.yaml").data)
    cats = Counter(r["category"] for r in rows)
    assert len(rows) >= 120 and len(cats) == 8 and min(cats.values()) >= 10
    assert prov["source"] == "embedded" and len(prov["sha256"]) == 64


def test_prepare_splits_stratified_deterministic_and_leak_free(tmp_path):
    cfg = _cfg(tmp_path)
    data.prepare(cfg)
    out = tmp_path / "processed"
    splits = {s: _rows(out / f"{s}.jsonl") for s in data.SPLITS}
    n = sum(len(v) for v in splits.values())
    assert n == 160
    assert abs(len(splits["train"]) - 0.8 * n) <= 8 and abs(len(splits["validation"]) - 0.1 * n) <= 8
    # Stratified: every category appears in every split, in about the same proportion.
    for s, rows in splits.items():
        cats = Counter(r["category"] for r in rows)
        assert len(cats) == 8, (s, cats)
    keys = {s: {(r["instruction"], r["context"]) for r in rows} for s, rows in splits.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]
    first = (out / "train.jsonl").read_bytes()
    data.prepare(cfg)
    assert (out / "train.jsonl").read_bytes() == first, "same seed must give the same split"
    data.prepare(_cfg(tmp_path, **{"data.seed": 7}))
    assert (out / "train.jsonl").read_bytes() != first, "another seed must give another split"
    stats = json.loads((tmp_path / data.STATS_FILE).read_text())
    assert stats["splits"]["train"]["rows"] == len(splits["train"]) and stats["provenance"]["source"] == "embedded"


def test_same_prompt_with_two_responses_stays_in_one_split(tmp_path):
    rows = [{"instruction": f"q{i}", "context": "", "response": "a", "category": "open_qa"} for i in range(40)]
    rows += [{"instruction": "q0", "context": "", "response": "another answer", "category": "open_qa"}]
    src = _write_jsonl(tmp_path / "d.jsonl", rows)
    data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))
    where = [s for s in data.SPLITS for r in _rows(tmp_path / "processed" / f"{s}.jsonl") if r["instruction"] == "q0"]
    assert len(where) == 2 and len(set(where)) == 1


def test_cleaning_counts_drops_and_normalises_whitespace():
    rows = [
        {"instruction": "  Say   hi\r\n", "context": "", "response": " hi  there ", "category": "open_qa"},
        {"instruction": "Say hi", "context": "", "response": "hi there", "category": "open_qa"},  # duplicate after normalising
        {"instruction": "Empty", "context": "", "response": " \n\t ", "category": "open_qa"},
        {"instruction": "x", "context": "a\n\n\n\nb", "response": "ok", "category": ""},
    ]
    kept, dropped = data.clean(rows)
    assert dropped == {"empty_response": 1, "empty_instruction": 0, "duplicate": 1}
    assert kept[0] == {"instruction": "Say hi", "context": "", "response": "hi there", "category": "open_qa"}
    assert kept[1]["context"] == "a\n\nb" and kept[1]["category"] == "uncategorised"


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_local_file_formats(tmp_path, fmt):
    import pandas as pd

    rows = [{"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "open_qa"} for i in range(30)]
    path = tmp_path / f"d.{fmt}"
    df = pd.DataFrame(rows)
    {"json": lambda: path.write_text(json.dumps(rows)), "csv": lambda: df.to_csv(path, index=False),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    data.prepare(_cfg(tmp_path, **{"data.source": str(path)}))
    assert sum(len(_rows(tmp_path / "processed" / f"{s}.jsonl")) for s in data.SPLITS) == 30


def test_column_mapping(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "category": "c"} for i in range(20)]
    src = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    data.prepare(_cfg(tmp_path, **{"data.source": str(src), "data.columns": "{output: response, input: context}"}))
    assert _rows(tmp_path / "processed" / "train.jsonl")[0]["response"].startswith("a")


GOOD = {"instruction": "q", "context": "", "response": "a", "category": "open_qa"}


@pytest.mark.parametrize("lines, expected", [
    ([GOOD, '{"instruction": "q2", "response": ', GOOD], r"bad\.jsonl:2: malformed JSON"),
    ([GOOD, {"instruction": "q2", "category": "x"}], r"bad\.jsonl:2: missing column 'response'"),
    ([GOOD, GOOD | {"response": 42}], r"bad\.jsonl:2: field 'response' must be a string"),
    ([GOOD, ["not", "an", "object"]], r"bad\.jsonl:2: expected a JSON object"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, lines, expected):
    src = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(LlmftError, match=expected):
        data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))


def test_bad_csv_names_line(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("instruction,context,category\nq,,open_qa\n")
    with pytest.raises(LlmftError, match=r"bad\.csv:line 2: missing column 'response'"):
        data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))


def test_empty_file_and_all_empty_responses(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LlmftError, match=r"empty\.jsonl: file is empty"):
        data.prepare(_cfg(tmp_path, **{"data.source": str(empty)}))
    src = _write_jsonl(tmp_path / "blank.jsonl", [GOOD | {"response": "  "}] * 3)
    with pytest.raises(LlmftError, match="no usable rows after cleaning"):
        data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))


def test_split_rounding_to_zero_is_an_error(tmp_path):
    src = _write_jsonl(tmp_path / "few.jsonl", [GOOD | {"instruction": f"q{i}"} for i in range(4)])
    with pytest.raises(LlmftError, match="validation split rounds to zero rows"):
        data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))


def test_failed_prepare_keeps_previous_outputs_intact(tmp_path):
    cfg = _cfg(tmp_path)
    data.prepare(cfg)
    out = tmp_path / "processed"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, "{oops"])
    with pytest.raises(LlmftError):
        data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".processed.")], "no temp dirs left behind"


def test_real_dolly_sample(tmp_path, shared_data):
    cfg = _cfg(tmp_path, **{"data.source": str(shared_data / "dolly" / "dolly_sample.jsonl")})
    data.prepare(cfg)
    stats = json.loads((tmp_path / data.STATS_FILE).read_text())
    assert stats["rows_in"] == 813
    assert sum(s["rows"] for s in stats["splits"].values()) == 813 - sum(stats["dropped"].values())
    assert set(stats["splits"]["test"]["categories"]) == set(stats["splits"]["train"]["categories"])


def test_crash_while_writing_leaves_previous_outputs(tmp_path, monkeypatch):
    data.prepare(_cfg(tmp_path))
    out = tmp_path / "processed"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 50:
            raise RuntimeError("disk on fire")
        return {"prompt": "p", "completion": "c"}

    monkeypatch.setattr(data, "format_example", boom)
    with pytest.raises(RuntimeError):
        data.prepare(_cfg(tmp_path, **{"data.seed": 3}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".processed.")]
