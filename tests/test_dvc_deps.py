"""dvc.yaml's code dependencies cannot drift from the code: each stage's deps are derived here from the imports of
the verb it runs, and DVC ignores what running the code leaves beside it (__pycache__)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    """The file of module `llmft.a.b` (a package's __init__.py), or None when there is none."""
    base = SRC / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The llmft modules `path` imports anywhere in its body (function-level imports too). A module that imports its
    own package's modules by a computed name (evaluate's benchmark table) imports all of them."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "llmft"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "llmft":
                mod = node.module
            else:
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names if _module_file(f"{mod}.{a.name}")}  # `from . import x`
    if re.search(r"import_module\(f\"\{__name__\}", path.read_text()):
        found |= {_module_name(p) for p in (SRC / Path(*package.split("."))).glob("*.py")}
    return {m for m in found if _module_file(m)}


def closure(module: str) -> set[Path]:
    """Every source file `module` runs: its imports, theirs, and the packages' __init__ files on the way."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            f = _module_file(".".join(parts[:i]))
            if f and f not in seen:
                seen.add(f)
                todo += sorted(_imports(f))
    return seen


def stage_modules() -> dict[str, str]:
    """dvc.yaml stage -> the module of the verb its command runs (`python -m llmft <verb>`)."""
    from llmft.__main__ import VERBS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: VERBS[s["cmd"].split()[3]][0] for name, s in stages.items()}


def test_every_stage_depends_on_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing, stale = {}, {}
    for name, module in stage_modules().items():
        deps = [ROOT / d for d in stages[name]["deps"] if d.startswith("src/")]
        files = closure("llmft.__main__") | closure(module)
        missing[name] = sorted(str(f.relative_to(ROOT)) for f in files
                               if not any(f == d or d in f.parents for d in deps))
        stale[name] = sorted(str(d.relative_to(ROOT)) for d in deps if d.suffix == ".py" and d not in files)
    assert not any(missing.values()), f"dvc.yaml misses code its stages run: { {k: v for k, v in missing.items() if v} }"
    assert not any(stale.values()), f"dvc.yaml names code its stages do not run: { {k: v for k, v in stale.items() if v} }"


def test_the_closure_follows_lazy_and_computed_imports():
    """The walk sees what a stage runs only inside a function (train -> speed.fp8) or by a computed name (evaluate's
    benchmarks): the misses DVC once had."""
    train = {str(p.relative_to(SRC)) for p in closure("llmft.train")}
    assert {"llmft/speed/overlap.py", "llmft/speed/fp8.py", "llmft/models.py", "llmft/io.py"} <= train
    evaluate = {str(p.relative_to(SRC)) for p in closure("llmft.evaluate")}
    assert {"llmft/evaluate/lmeval.py", "llmft/evaluate/mtbench.py", "llmft/serving.py"} <= evaluate


def test_dvc_ignores_build_debris():
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored
