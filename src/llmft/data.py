"""prepare: load → clean → format → split → write, atomically.

Sources: the embedded sample, a local JSONL/JSON/CSV/parquet file, or a hub dataset id. Output:
`{output_dir}/{train,validation,test}.jsonl` (Dolly's columns plus templated `prompt`/`completion`)
and `metrics/data.json` (rows per split and category, dropped counts, token-length percentiles).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

from .config import Config, DataConfig, LlmftError
from .models import atomic_dir, load_tokenizer, resolve_base
from .templates import format_example
from .tracking import write_json

COLUMNS = ("instruction", "context", "response", "category")
REQUIRED = ("instruction", "response")
SPLITS = ("train", "validation", "test")
STATS_FILE = "metrics/data.json"


def embedded_sample() -> Path:
    return Path(str(resources.files("llmft") / "assets" / "sample.jsonl"))


# ---------------------------------------------------------------------------------------- loading
def _check_row(row, where: str, columns: dict[str, str]) -> dict:
    if not isinstance(row, dict):
        raise LlmftError(f"{where}: expected a JSON object, got {type(row).__name__}")
    row = {columns.get(k, k): v for k, v in row.items()}
    for col in REQUIRED:
        if col not in row:
            raise LlmftError(f"{where}: missing column '{col}' (columns: {', '.join(map(str, row))}; "
                             "rename with data.columns)")
    out = {}
    for col in COLUMNS:
        value = row.get(col, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise LlmftError(f"{where}: field '{col}' must be a string, got {type(value).__name__} {value!r:.60}")
        out[col] = value
    return out


def _read_file(path: Path, columns: dict[str, str]) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.exists():
        raise LlmftError(f"data.source: {path} does not exist")
    if path.stat().st_size == 0:
        raise LlmftError(f"{path}: file is empty")
    rows = []
    if suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LlmftError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
                rows.append(_check_row(obj, f"{path}:{n}", columns))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LlmftError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise LlmftError(f"{path}: expected a JSON list of objects")
        rows = [_check_row(obj, f"{path}: record {i}", columns) for i, obj in enumerate(data, 1)]
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        df = pd.read_csv(path, dtype=str, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(path)
        # CSV line numbers count the header as line 1.
        offset = 2 if suffix == ".csv" else 1
        label = "line" if suffix == ".csv" else "row"
        rows = [_check_row(rec, f"{path}:{label} {i + offset}", columns) for i, rec in enumerate(df.to_dict("records"))]
    else:
        raise LlmftError(f"data.source: {path} has unsupported extension '{suffix}' (use .jsonl, .json, .csv or .parquet)")
    if not rows:
        raise LlmftError(f"{path}: no rows")
    return rows


def load_rows(cfg: DataConfig) -> tuple[list[dict], dict]:
    """Rows with Dolly's columns, plus provenance (source, content hash)."""
    src = cfg.source
    path = embedded_sample() if src == "embedded" else Path(src)
    if src == "embedded" or path.suffix or path.exists():
        rows = _read_file(path, cfg.columns)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return rows, {"source": src, "path": str(path), "sha256": digest}
    # A hub dataset id (e.g. databricks/databricks-dolly-15k). Needs network or a warm HF cache.
    from datasets import load_dataset

    try:
        ds = load_dataset(src, split=cfg.hub_split)
    except Exception as e:  # datasets raises many types for offline / missing
        raise LlmftError(f"data.source: could not load hub dataset '{src}' split '{cfg.hub_split}': {e}") from None
    rows = [_check_row(r, f"{src}[{i}]", cfg.columns) for i, r in enumerate(ds)]
    return rows, {"source": src, "split": cfg.hub_split, "sha256": ds._fingerprint}


# --------------------------------------------------------------------------------------- cleaning
def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    dropped = Counter()
    seen, out = set(), []
    for row in rows:
        row = {k: _normalise(v) for k, v in row.items()}
        row["category"] = row["category"] or "uncategorised"
        if not row["response"]:
            dropped["empty_response"] += 1
        elif not row["instruction"]:
            dropped["empty_instruction"] += 1
        elif (key := tuple(row[c] for c in COLUMNS)) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            out.append(row)
    return out, {k: dropped.get(k, 0) for k in ("empty_response", "empty_instruction", "duplicate")}


# -------------------------------------------------------------------------------------- splitting
def split(rows: list[dict], fractions: list[float], seed: int, max_rows: int | None = None) -> dict[str, list[dict]]:
    """Stratified by category; rows sharing (instruction, context) stay in one split, so no prompt leaks."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["instruction"], row["context"])].append(row)
    by_cat: dict[str, list[tuple]] = defaultdict(list)
    for key, members in groups.items():
        by_cat[members[0]["category"]].append(key)
    rng = random.Random(seed)
    total_groups = len(groups)
    keep = min(max_rows, total_groups) if max_rows else total_groups
    out = {s: [] for s in SPLITS}
    for cat in sorted(by_cat):
        keys = sorted(by_cat[cat])
        rng.shuffle(keys)
        n = round(len(keys) * keep / total_groups) if max_rows else len(keys)
        keys = keys[:n]
        n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
        parts = {"validation": keys[:n_val], "test": keys[n_val:n_val + n_test], "train": keys[n_val + n_test:]}
        for s, ks in parts.items():
            out[s] += [r for k in ks for r in groups[k]]
    for s, frac in zip(SPLITS, fractions):
        if frac > 0 and not out[s]:
            raise LlmftError(f"data.splits: the {s} split rounds to zero rows ({len(rows)} rows, fraction {frac}); "
                             "use more data or a larger fraction")
        rng.shuffle(out[s])
    return out


# ------------------------------------------------------------------------------------------ stage
def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    v = sorted(values)
    return {f"p{p}": v[min(len(v) - 1, int(len(v) * p / 100))] for p in (50, 90, 99)} | {"max": v[-1], "mean": round(sum(v) / len(v))}


def prepare(cfg: Config) -> None:
    dc = cfg.data
    raw, provenance = load_rows(dc)
    rows, dropped = clean(raw)
    if not rows:
        raise LlmftError(f"data.source: {dc.source}: no usable rows after cleaning (dropped {dropped})")
    splits = split(rows, dc.splits, dc.seed, dc.max_rows)

    tok = None
    if dc.template == "model_chat" or dc.stats_tokenizer:
        tok = load_tokenizer(resolve_base(cfg.model), cfg.model.revision)
    stats = {"provenance": provenance, "template": dc.template, "rows_in": len(raw), "dropped": dropped, "splits": {}}
    with atomic_dir(Path(dc.output_dir)) as tmp:
        for name, part in splits.items():
            lengths = []
            with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                for row in part:
                    row = row | format_example(dc.template, row["instruction"], row["context"], row["response"],
                                               dc.system_prompt, tok)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    if tok is not None:
                        lengths.append(len(tok(row["prompt"] + row["completion"]).input_ids) + 1)  # + EOS
            stats["splits"][name] = {"rows": len(part), "categories": dict(sorted(Counter(r["category"] for r in part).items())),
                                     "tokens": _percentiles(lengths)}
    write_json(STATS_FILE, stats)
    s = stats["splits"]
    print(f"prepare: {len(raw)} rows from {dc.source} -> train {s['train']['rows']} / validation "
          f"{s['validation']['rows']} / test {s['test']['rows']} (dropped {sum(dropped.values())}: {dropped}); "
          f"template {dc.template}; wrote {dc.output_dir}/ and {STATS_FILE}")
