"""Atomic writes: every file and folder llmft writes goes through a temporary name and one rename.

A kill -9 at any moment leaves either the previous output or the new one, never half of one. Every temporary
name contains TMP, which .gitignore and .dvcignore list: what a kill leaves behind is never committed or hashed
(DVC may restore an output from its run cache without running the stage, so the cleanup below does not always
come), and the next write to the same place removes it."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

TMP = "llmft-tmp"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling path for a writer that takes a file name (savefig, a PDF builder, a CSV writer);
    it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one name per process and thread: the judge's worker threads may write the same cache entry at once. The suffix
    # last: writers that go by it (savefig)
    tmp = path.with_name(f".{path.name}.{TMP}{os.getpid()}-{threading.get_ident()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> None:
    """`text` into `path` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    """`obj` as indented, key-sorted JSON: the same object gives the same bytes (DVC hashes them)."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary sibling directory that replaces `final` only if the block succeeds: a crash
    leaves the previous `final` intact and no half-written files (stale temp dirs are removed next time)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.{TMP}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{TMP}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # renamed aside, not deleted first: a kill then leaves no moment with neither folder whole
        old = final.with_name(f".{final.name}.{TMP}-old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
