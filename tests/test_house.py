"""House rules of the test suite: shared helpers live in helpers.py, shared fixtures in conftest.py, so no test
module imports another (an import would also register that module's fixtures twice and couple their scopes)."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every import of a test_* module, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else [node.module or "", *(a.name for a in node.names)]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0].startswith("test_")]
    return sorted(found)


def test_no_test_module_imports_another():
    bad = [f"{f.name}:{line}: imports {mod}" for f in sorted(TESTS.glob("*.py"))
           for line, mod in imported_test_modules(f.read_text())]
    assert not bad, "move what is shared to tests/helpers.py (functions) or tests/conftest.py (fixtures):\n" + "\n".join(bad)


def test_the_check_sees_every_form_of_import():
    src = ("import test_a\nfrom test_b import x\nimport os, test_c.sub\nfrom helpers import sh\n"
           "def f():\n    from test_d import y\nfrom . import test_e\n")
    assert [m for _, m in imported_test_modules(src)] == ["test_a", "test_b", "test_c.sub", "test_d", "test_e"]
