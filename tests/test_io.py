"""Atomic writes: one helper module, every temporary name carrying the marker .gitignore and .dvcignore list."""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

from llmft import io

ROOT = Path(__file__).resolve().parents[1]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "plot.png"
    io.write_atomic(target, "old")
    seen = []
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            seen.append(tmp)
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    assert seen[0].suffix == ".png", "writers that go by the suffix (savefig) still see it"
    for ignore in (".gitignore", ".dvcignore"):  # what a kill -9 leaves is never committed or hashed
        patterns = [p for p in (ROOT / ignore).read_text().split() if not p.startswith("#")]
        assert any(fnmatch.fnmatch(seen[0].name, p) for p in patterns), ignore


def test_a_failed_directory_write_keeps_the_old_directory(tmp_path):
    out = tmp_path / "adapter"
    with io.atomic_dir(out) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(out) as d:
            (d / "a").write_text("2")
            raise RuntimeError
    assert (out / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_no_module_renames_files_itself():
    """Every write goes through llmft.io: no other module calls os.replace / os.rename / Path.rename."""
    found = []
    for path in (ROOT / "src" / "llmft").rglob("*.py"):
        if path.name == "io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("replace", "rename") and \
                    ast.unparse(node.func).startswith(("os.", "Path(")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
