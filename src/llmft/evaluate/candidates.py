"""The two candidates, base and tuned, behind one interface: generate answers and score completions.

In process, the base model is loaded once and the adapter is loaded on top of it; the base answers with
the adapter disabled (peft's `disable_adapter()`), so both sides share one copy of the weights, one
tokenizer, one prompt template and one set of generation settings. With `evaluate.candidate_endpoint`
the tuned side's answers come from an `mlflow models serve` endpoint, which applies the template itself.
With `evaluate.outputs`, a judged benchmark's side comes from answers on disk (saved.py); when nothing left
to run needs the weights, none are loaded.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import Config
from ..errors import LlmftError
from ..templates import format_example, render_prompt

SIDES = ("base", "tuned")

# A conversation to answer: ([(user, answer), ..., (user, None)], context of the first turn)
Conversation = tuple[list[tuple[str, Optional[str]]], str]


@dataclass
class Candidates:
    cfg: Config
    model: Any  # PeftModel (adapter on), the plain base model, or None when no benchmark needs weights
    tok: Any
    base_path: Optional[str]  # None: not loaded
    adapter: Optional[str]  # None: no adapter on disk, only the base can be scored in process
    endpoint: Optional[str]
    saved: dict = field(default_factory=dict)
    """{(benchmark, side): answers} read from evaluate.outputs (saved.load)."""


def adapter_dir(cfg: Config) -> Optional[str]:
    d = Path(cfg.paths.adapter)
    return str(d) if (d / "adapter_config.json").exists() else None


def _in_process(cfg: Config, saved: dict, side: str) -> bool:
    """Whether some configured benchmark needs this side's model here (not its saved answers, not the endpoint)."""
    from .saved import BENCHMARKS as FROM_FILES

    e = cfg.evaluate
    served = side == "tuned" and e.candidate_endpoint is not None
    return any(b not in FROM_FILES or ((b, side) not in saved and not served) for b in e.benchmarks)


def load(cfg: Config) -> Candidates:
    from .. import models
    from . import saved as saved_outputs

    saved = saved_outputs.load(cfg)  # a bad file fails now, before a model is loaded or an answer generated
    adapter = adapter_dir(cfg)
    endpoint = cfg.evaluate.candidate_endpoint
    base_needed, tuned_needed = (_in_process(cfg, saved, side) for side in SIDES)
    if tuned_needed and adapter is None and endpoint is None:
        raise LlmftError(f"no adapter at {cfg.paths.adapter} (paths.adapter): run `llmft train` first, "
                         "or set evaluate.candidate_endpoint to evaluate a served model")
    if not (base_needed or tuned_needed):  # every side of every benchmark is answered by a file
        return Candidates(cfg=cfg, model=None, tok=None, base_path=None, adapter=adapter, endpoint=endpoint, saved=saved)
    model, tok = models.load_with_tokenizer(cfg, adapter)
    return Candidates(cfg=cfg, model=model, tok=tok, base_path=models.resolve_base(cfg), adapter=adapter,
                      endpoint=endpoint, saved=saved)


def describe(c: Candidates, side: str) -> str:
    """Where this side's answers come from, for the log, table.md and meta.json."""
    from .saved import configured

    if side == "base":
        model = c.base_path or "not loaded"
    else:
        model = f"endpoint {c.endpoint}" if c.endpoint else f"adapter {c.adapter}" if c.adapter else "no adapter"
    files = [f"{b} answers from {p}" for (b, s), p in configured(c.cfg).items() if s == side]
    return "; ".join([model, *files])


def can_score(c: Candidates, side: str) -> bool:
    """Whether log-likelihoods are available for this side (the tuned side needs the adapter's weights)."""
    return side == "base" or c.adapter is not None


@contextlib.contextmanager
def as_side(c: Candidates, side: str):
    """The loaded model as `side` for the block: the base with the adapter off, the tuned with it on."""
    if side == "base" and c.adapter is not None:
        with c.model.disable_adapter():
            yield c.model
    elif side == "tuned" and c.adapter is None:
        raise LlmftError(f"no adapter at {c.cfg.paths.adapter} to score the tuned model in process")
    else:
        yield c.model


def prompt(c: Candidates, conv: Conversation) -> str:
    turns, context = conv
    d = c.cfg.data
    return render_prompt(d.template, turns, context, d.system_prompt, c.tok)


def generate(c: Candidates, side: str, convs: list[Conversation], desc: str) -> list[str]:
    """One answer per conversation (to its last, unanswered turn), same settings for both sides."""
    from .. import generate as gen

    g = c.cfg.evaluate.generation
    if side == "tuned" and c.endpoint:
        from .. import serving

        rows = []
        for turns, context in convs:
            row = {"instruction": turns[-1][0], "context": context or None}
            if len(turns) > 1:
                row["history"] = json.dumps([[u, a] for u, a in turns[:-1]])
            rows.append(row)
        params = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                  "repetition_penalty": g.repetition_penalty}
        return serving.query(c.endpoint, rows, params, batch_size=g.batch_size)
    prompts = [prompt(c, conv) for conv in convs]
    with as_side(c, side) as model, _merged(model, side):
        return gen.generate(model, c.tok, prompts, g, desc=f"{desc} [{side}]", seed=c.cfg.evaluate.seed)


def merges(model) -> bool:
    """Whether the tuned side generates with its adapter merged: on a GPU (unmerged, the tuned 7B answer set took
    1.9x the base's time on an H200). On a CPU it stays unmerged, as the served model runs it."""
    return next(model.parameters()).device.type == "cuda"


def _merged(model, side: str):
    """generate.merged for the tuned side where `merges` says so (it puts the base weights back exactly), else
    nothing."""
    from .. import generate as gen

    return gen.merged(model) if side == "tuned" and merges(model) else contextlib.nullcontext()


def score(c: Candidates, side: str, pairs: list[tuple[str, str]], desc: str, max_length: Optional[int] = None):
    """Per-example (summed NLL, token count) of each completion given its prompt: an (n, 2) array.

    Tokenised as TRL's SFTTrainer does for prompt/completion data (prompt + completion + EOS text, the
    completion starting where the prompt's tokens stop matching), so the loss matches training's eval loss.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    tok = c.tok
    seqs = []
    for p, comp in pairs:
        comp = comp if comp.endswith(tok.eos_token) else comp + tok.eos_token
        p_ids = tok(p)["input_ids"]
        ids = tok(p + comp)["input_ids"]
        start = next((i for i, (a, b) in enumerate(zip(p_ids, ids)) if a != b), min(len(p_ids), len(ids)))
        ids = ids[:max_length] if max_length else ids
        seqs.append((ids, min(start, len(ids))))
    out = np.zeros((len(seqs), 2))
    # longest first, batches capped in rows and padded tokens: logits are (rows x tokens x vocab) floats
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    rows_cap, token_cap = c.cfg.evaluate.generation.batch_size, 4096
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1 > rows_cap or (len(cur) + 1) * len(seqs[cur[0]][0]) > token_cap):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with as_side(c, side) as model, torch.inference_mode():
        device = next(model.parameters()).device
        for batch in tqdm(batches, desc=f"{desc} [{side}]", unit="batch"):
            width = max(len(seqs[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, i in enumerate(batch):
                s, start = seqs[i]
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
                labels[r, start:len(s)] = torch.tensor(s[start:])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift_labels = labels[:, 1:].to(device)
            # flattened (rows*tokens, vocab): cross_entropy on a transposed (rows, vocab, tokens) view is ~3x slower
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])
            nll = torch.nn.functional.cross_entropy(flat, shift_labels.reshape(-1), ignore_index=-100,
                                                    reduction="none").view(shift_labels.shape)
            valid = shift_labels != -100
            for r, i in enumerate(batch):
                out[i] = (nll[r][valid[r]].sum().item(), valid[r].sum().item())
    return out


def example_pair(c: Candidates, instruction: str, context: str, response: str) -> tuple[str, str]:
    """(prompt, completion) exactly as training formats a row."""
    d = c.cfg.data
    ex = format_example(d.template, instruction, context, response, d.system_prompt, c.tok)
    return ex["prompt"], ex["completion"]
