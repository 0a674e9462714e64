"""prepare: sources, cleaning, stratified leak-free split, atomic outputs, and every bad-input error."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from llmft import data
from llmft.config import load_config
from llmft.errors import LlmftError


def _cfg(tmp_path, **over):
    ov = [f"paths.data={tmp_path / 'processed'}", "data.stats_tokenizer=false"]
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
    stats = json.loads((out / data.STATS).read_text())
    assert stats["splits"]["train"]["rows"] == len(splits["train"]) and stats["provenance"]["source"] == "embedded"
    flat = json.loads((tmp_path / "metrics" / "data.json").read_text())  # the DVC metrics: a few flat numbers
    assert flat["train_rows"] == len(splits["train"]) and all(isinstance(v, int) for v in flat.values())


def test_repeated_prompts_never_cross_splits(tmp_path):
    """60 prompts with 3 different responses each: grouping rows by anything finer than (instruction, context)
    (e.g. with the response) would put some prompt into two splits, almost surely with this many."""
    rows = [{"instruction": f"q{i}", "context": "ctx" if i % 2 else "", "response": f"answer {j} to {i}",
             "category": f"c{i % 4}"} for i in range(60) for j in range(3)]
    src = _write_jsonl(tmp_path / "d.jsonl", rows)
    data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))
    seen: dict[tuple, set] = {}
    for s in data.SPLITS:
        for r in _rows(tmp_path / "processed" / f"{s}.jsonl"):
            seen.setdefault((r["instruction"], r["context"]), set()).add(s)
    assert len(seen) == 60 and all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    sizes = {s: len(_rows(tmp_path / "processed" / f"{s}.jsonl")) for s in data.SPLITS}
    assert sizes == {"train": 144, "validation": 18, "test": 18}  # 48/6/6 prompts x 3 responses


@pytest.mark.parametrize("n, cats", [(10, 1), (11, 3), (17, 5), (40, 8), (97, 7), (160, 8)])
def test_split_sizes_meet_the_global_fractions(tmp_path, n, cats):
    """Largest remainder across categories: 40 rows in 8 categories of 5 give 32/4/4 (rounding each category
    on its own gave 0 validation rows), and every split of every size >= 10 is non-empty and within one row."""
    rows = [{"instruction": f"q{i}", "context": "", "response": "a", "category": f"c{i % cats}"} for i in range(n)]
    out = data.split(rows, [0.8, 0.1, 0.1], seed=1)
    sizes = {s: len(v) for s, v in out.items()}
    assert sum(sizes.values()) == n and min(sizes.values()) >= 1
    for s, f in zip(data.SPLITS, (0.8, 0.1, 0.1)):
        assert abs(sizes[s] - n * f) < 1 or (sizes[s] == 1 and n * f < 1), (s, sizes)
    # stratified where the data allows: a split big enough to hold every category holds every category
    for s, part in out.items():
        if sizes[s] >= cats * 2:
            assert len({r["category"] for r in part}) == cats, (s, Counter(r["category"] for r in part))


def test_too_little_data_names_the_minimum(tmp_path):
    src = _write_jsonl(tmp_path / "few.jsonl", [GOOD | {"instruction": f"q{i}"} for i in range(9)])
    with pytest.raises(LlmftError, match="9 distinct prompts .* at least 10 are needed"):
        data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_bom_and_crlf_are_accepted(tmp_path, fmt):
    rows = [GOOD | {"instruction": f"q{i}", "response": f"line one\r\nline two {i}"} for i in range(12)]
    text = {"jsonl": "\r\n".join(json.dumps(r) for r in rows) + "\r\n", "json": json.dumps(rows),
            "csv": "instruction,context,response,category\r\n" + "".join(
                f'{r["instruction"]},,"{r["response"]}",open_qa\r\n' for r in rows)}[fmt]
    src = tmp_path / f"bom.{fmt}"
    src.write_bytes(b"\xef\xbb\xbf" + text.encode())
    data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))
    out = [r for s in data.SPLITS for r in _rows(tmp_path / "processed" / f"{s}.jsonl")]
    assert len(out) == 12 and all(r["response"].startswith("line one\nline two") for r in out)
    assert {r["instruction"] for r in out} == {f"q{i}" for i in range(12)}  # the BOM did not stick to a key


@pytest.mark.parametrize("fmt, line", [("jsonl", 3), ("json", 2), ("csv", 3)])
def test_undecodable_bytes_name_file_and_line(tmp_path, fmt, line):
    good = json.dumps(GOOD).encode()
    body = {"jsonl": good + b"\n" + good + b"\n" + b'{"instruction": "caf\xe9", "response": "x"}\n',
            "json": b"[\n" + b'{"instruction": "caf\xe9", "response": "x"}]',
            "csv": b"instruction,response\nq,a\ncaf\xe9,b\n"}[fmt]
    src = tmp_path / f"latin1.{fmt}"
    src.write_bytes(body)
    with pytest.raises(LlmftError, match=rf"latin1\.{fmt}:{line}: not UTF-8 \(byte 0xe9"):
        data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))


@pytest.mark.parametrize("fmt, body", [("csv", b'instruction,response\n"unclosed,quote\nq,a\n'),
                                       ("parquet", b"PAR1 this is not parquet at all")])
def test_malformed_csv_and_parquet_are_named_errors(tmp_path, fmt, body):
    src = tmp_path / f"bad.{fmt}"
    src.write_bytes(body)
    with pytest.raises(LlmftError, match=rf"bad\.{fmt}: not a readable {fmt.upper()} file"):
        data.prepare(_cfg(tmp_path, **{"data.source": str(src)}))


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


@pytest.mark.shared_data
def test_real_dolly_sample(tmp_path, shared_data):
    cfg = _cfg(tmp_path, **{"data.source": str(shared_data / "dolly" / "dolly_sample.jsonl")})
    data.prepare(cfg)
    stats = json.loads((tmp_path / "processed" / data.STATS).read_text())
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
