"""prepare: load → clean → format → split → write, atomically.

Sources: the embedded sample, a local JSONL/JSON/CSV/parquet file, or a hub dataset id. Output:
`paths.data/{train,validation,test}.jsonl` (Dolly's columns plus templated `prompt`/`completion`),
`paths.data/stats.json` (provenance, drops by reason, rows per split and category, token lengths) and a
flat summary for DVC in `paths.data_metrics`.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import time
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

from .config import MIN_ROWS, Config, DataConfig
from .errors import LlmftError
from .io import atomic_dir, write_json
from . import models
from .templates import TEMPLATES, format_example

COLUMNS = ("instruction", "context", "response", "category")
REQUIRED = ("instruction", "response")
SPLITS = ("train", "validation", "test")
STATS = "stats.json"


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


def _decode(path: Path) -> str:
    """The file as text: UTF-8, a leading BOM dropped; undecodable bytes name their line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise LlmftError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                         "re-save the file as UTF-8") from None


def _read_file(path: Path, columns: dict[str, str]) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.exists():
        raise LlmftError(f"data.source: {path} does not exist")
    if path.stat().st_size == 0:
        raise LlmftError(f"{path}: file is empty")
    rows = []
    if suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(_decode(path).splitlines(), 1):  # splitlines: CRLF too
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmftError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            rows.append(_check_row(obj, f"{path}:{n}", columns))
    elif suffix == ".json":
        try:
            data = json.loads(_decode(path))
        except json.JSONDecodeError as e:
            raise LlmftError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise LlmftError(f"{path}: expected a JSON list of objects")
        rows = [_check_row(obj, f"{path}: record {i}", columns) for i, obj in enumerate(data, 1)]
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            if suffix == ".csv":
                df = pd.read_csv(io.StringIO(_decode(path)), dtype=str, keep_default_na=False)
            else:
                df = pd.read_parquet(path)
        except LlmftError:
            raise
        except Exception as e:  # pandas/pyarrow raise many types for a malformed file
            raise LlmftError(f"{path}: not a readable {suffix[1:].upper()} file ({type(e).__name__}: "
                             f"{str(e).strip()[:200]})") from None
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
        raise LlmftError(f"data.source: could not load hub dataset '{src}' split '{cfg.hub_split}' "
                         f"({type(e).__name__}: {str(e)[:200]}); offline, point data.source at a local file") from None
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
def allocate(total: int, weights: dict) -> dict:
    """Largest-remainder apportionment: integer shares of `total` proportional to `weights`, summing to
    `total` exactly (Hamilton's method; ties broken by key order, so it is deterministic)."""
    wsum = sum(weights.values())
    quotas = {k: total * w / wsum for k, w in weights.items()}
    shares = {k: int(q) for k, q in quotas.items()}
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - shares[k]), str(k)))[:total - sum(shares.values())]:
        shares[k] += 1
    return shares


def split(rows: list[dict], fractions: list[float], seed: int, max_rows: int | None = None) -> dict[str, list[dict]]:
    """Split sizes follow the global fractions; each split's categories follow the data's (stratified);
    rows sharing (instruction, context) stay in one split, so no prompt leaks.

    Units are prompt groups. Sizes per split come from the fractions (largest remainder, at least one
    group for each non-zero fraction); each split's share of every category comes from a second
    largest-remainder pass, so a category of 5 rows still lands 4/1/0 or 3/1/1, not 5/0/0 by rounding
    every category on its own.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["instruction"], row["context"])].append(row)
    rng = random.Random(seed)
    keys = sorted(groups)
    rng.shuffle(keys)
    by_cat: dict[str, list[tuple]] = defaultdict(list)
    for key in keys:
        by_cat[groups[key][0]["category"]].append(key)
    if max_rows and max_rows < len(keys):
        keep = allocate(max_rows, {c: len(v) for c, v in by_cat.items()})
        by_cat = {c: v[:keep[c]] for c, v in by_cat.items() if keep[c]}
    n = sum(len(v) for v in by_cat.values())
    if n < MIN_ROWS:
        raise LlmftError(f"data.source: {n} distinct prompts after cleaning ({len(rows)} rows); "
                         f"at least {MIN_ROWS} are needed for train/validation/test splits")
    sizes = allocate(n, dict(zip(SPLITS, fractions)))
    for s, frac in zip(SPLITS, fractions):  # a requested split never rounds to nothing
        if frac > 0 and sizes[s] == 0:
            donor = max(sizes, key=sizes.get)
            sizes[donor] -= 1
            sizes[s] = 1
    # per split, how many groups of each category: proportional to the category's size
    remaining = {c: len(v) for c, v in by_cat.items()}
    take: dict[str, dict[str, int]] = {}
    for s in ("validation", "test"):
        # quota size * r_c / R <= r_c, so no category is asked for more groups than it has left
        want = allocate(sizes[s], remaining) if sizes[s] else {c: 0 for c in remaining}
        take[s] = want
        remaining = {c: remaining[c] - want[c] for c in remaining}
    out = {s: [] for s in SPLITS}
    for cat, ks in sorted(by_cat.items()):
        n_val, n_test = take["validation"][cat], take["test"][cat]
        parts = {"validation": ks[:n_val], "test": ks[n_val:n_val + n_test], "train": ks[n_val + n_test:]}
        for s, part in parts.items():
            out[s] += [r for k in part for r in groups[k]]
    for s in SPLITS:
        rng.shuffle(out[s])
    return out


# ------------------------------------------------------------------------------------------ stage
def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    v = sorted(values)
    return {f"p{p}": v[min(len(v) - 1, int(len(v) * p / 100))] for p in (50, 90, 99)} | {"max": v[-1], "mean": round(sum(v) / len(v))}


def prepare(cfg: Config) -> None:
    dc, paths = cfg.data, cfg.paths
    start = time.time()
    raw, provenance = load_rows(dc)
    rows, dropped = clean(raw)
    if not rows:
        raise LlmftError(f"data.source: {dc.source}: no usable rows after cleaning (dropped {dropped})")
    splits = split(rows, dc.splits, dc.seed, dc.max_rows)

    tok = None
    if TEMPLATES[dc.template].needs_tokenizer or dc.stats_tokenizer:
        tok = models.tokenizer(cfg)
    stats = {"provenance": provenance, "template": dc.template, "rows_in": len(raw), "dropped": dropped, "splits": {}}
    with atomic_dir(Path(paths.data)) as tmp:
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
        stats["runtime_s"] = round(time.time() - start, 1)
        write_json(tmp / STATS, stats)
    write_json(paths.data_metrics, summary(stats))
    s = stats["splits"]
    print(f"prepare: {len(raw)} rows from {dc.source} -> train {s['train']['rows']} / validation "
          f"{s['validation']['rows']} / test {s['test']['rows']} (dropped {sum(dropped.values())}: {dropped}); "
          f"template {dc.template}; wrote {paths.data}/")


def summary(stats: dict) -> dict:
    """The few numbers worth a column in `dvc exp show`: rows per split, drops, token lengths."""
    out = {"rows_in": stats["rows_in"], "dropped": sum(stats["dropped"].values())}
    for name, s in stats["splits"].items():
        out[f"{name}_rows"] = s["rows"]
    tokens = stats["splits"]["train"]["tokens"]
    out.update({f"train_tokens_{k}": tokens[k] for k in ("p50", "p90", "max") if k in tokens})
    return out
