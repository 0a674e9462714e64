"""ask: base and tuned answers to your own prompts, side by side, with the generation settings in params.

    python -m llmft ask "Name three primary colours."
    python -m llmft ask --file prompts.jsonl                 # rows with instruction (and context)
    python -m llmft ask "..." --tuned models:/llmft@champion # the registry's champion
    python -m llmft ask "..." --tuned http://127.0.0.1:5001  # a served model (mlflow models serve)
    python -m llmft ask "..." evaluate.generation.max_new_tokens=64

The tuned side is the adapter in paths.adapter unless --tuned names a registered model or an endpoint; the
base side is model.base in process. Both use the training template (data.template) and
evaluate.generation, so the answers are what evaluate would see.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Optional

from .config import Config
from .errors import LlmftError

SIDES = ("base", "tuned")


def read_prompts(texts: list[str], file: Optional[str]) -> list[dict]:
    """[{instruction, context}] from the command line and/or a JSONL file."""
    rows = [{"instruction": t, "context": ""} for t in texts]
    if file:
        path = Path(file)
        if not path.exists():
            raise LlmftError(f"--file {path}: not found")
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmftError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                raise LlmftError(f"{path}:{n}: each row needs a non-empty string 'instruction'")
            rows.append({"instruction": row["instruction"], "context": row.get("context") or ""})
    if not rows:
        raise LlmftError("ask: give a prompt (llmft ask \"...\") or --file prompts.jsonl")
    return rows


def ask(cfg: Config, prompts: list[str] = (), file: Optional[str] = None, tuned: Optional[str] = None) -> list[dict]:
    """Answers of both sides for every prompt; printed side by side. Returns [{instruction, base, tuned}]."""
    from . import models
    from .evaluate import candidates

    rows = read_prompts(list(prompts), file)
    source = tuned or cfg.paths.adapter
    adapter = None if _remote(source) else source
    if adapter and not (Path(adapter) / "adapter_config.json").exists():
        raise LlmftError(f"no adapter at {adapter} (paths.adapter): run `llmft train`, or pass --tuned "
                         "models:/<name>@champion or an endpoint URL")
    # the candidates evaluate compares, loaded the same way: one copy of the weights, the base with the adapter off
    c = candidates.Candidates(cfg=cfg, model=models.load(cfg, adapter), tok=models.tokenizer(cfg, adapter),
                              base_path=models.resolve_base(cfg), adapter=adapter, endpoint=None)
    convs = [([(r["instruction"], None)], r["context"]) for r in rows]
    answers = {"base": candidates.generate(c, "base", convs, "ask")}
    answers["tuned"] = (_remote_answers(cfg, source, rows) if adapter is None
                        else candidates.generate(c, "tuned", convs, "ask"))
    out = [{"instruction": r["instruction"], "context": r["context"], "base": b, "tuned": t}
           for r, b, t in zip(rows, answers["base"], answers["tuned"])]
    print(side_by_side(out, f"base: {c.base_path}", f"tuned: {source}"))
    return out


def _remote(source: str) -> bool:
    return source.startswith(("models:/", "runs:/", "http://", "https://"))


def _remote_answers(cfg: Config, source: str, rows: list[dict]) -> list[str]:
    g = cfg.evaluate.generation
    params = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
              "repetition_penalty": g.repetition_penalty}
    if source.startswith(("http://", "https://")):
        from .serving import query

        return query(source, [{"instruction": r["instruction"], "context": r["context"] or None} for r in rows],
                     params, batch_size=g.batch_size, progress=False)
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from . import tracking

    tracking.setup(cfg.tracking)
    try:
        model = mlflow.pyfunc.load_model(source)
    except MlflowException as e:
        raise LlmftError(f"--tuned {source}: {e.message.splitlines()[0]} (tracking.uri {cfg.tracking.uri})") from None
    return [str(a) for a in model.predict(pd.DataFrame(rows), params=params)]


def side_by_side(rows: list[dict], left: str, right: str, width: Optional[int] = None) -> str:
    """Each prompt, then its two answers in two columns that fit the terminal. Column titles too long for their
    column (a model's path) are printed whole above the table, never cut."""
    width = width or shutil.get_terminal_size((120, 40)).columns
    col = max(20, (width - 3) // 2)
    rule = "─" * (2 * col + 3)
    if len(left) <= col and len(right) <= col:
        lines = [rule, f"{left:<{col}} │ {right}", rule]
    else:
        names = [t.split(":", 1)[0] for t in (left, right)]
        lines = [left, right, rule, f"{names[0]:<{col}} │ {names[1]}", rule]
    for i, r in enumerate(rows, 1):
        lines += textwrap.wrap(f"[{i}] {r['instruction']}", 2 * col + 3) or [""]
        a = _wrap(r["base"], col)
        b = _wrap(r["tuned"], col)
        for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b))):
            lines.append(f"{x:<{col}} │ {y}")
        lines.append(rule)
    return "\n".join(lines)


def _wrap(text: str, col: int) -> list[str]:
    out = []
    for para in (text or "(empty answer)").splitlines() or [""]:
        out += textwrap.wrap(para, col) or [""]
    return out
