"""Adapter checks: before any benchmark runs, `evaluate` makes sure that the tuned side is the adapter.

Silent base-model evaluation (an adapter not applied or one that changes nothing, a merge that drops it, an
endpoint serving another model) is the failure most reported against lm-eval, vLLM and oumi: the table then
compares the base model with itself and still looks plausible. On the first PROMPTS rows of the test split
(built-in prompts where there is none), rendered with the training template:

    logits    the logits with the adapter on differ from those with it off
    merge     where the tuned side answers merged (on a GPU, candidates.merges): greedy answers merged equal
              those unmerged, and the weights after the merge equal those before
    endpoint  with evaluate.candidate_endpoint: the served model's greedy answers equal the adapter's in process

Each check's result goes to meta.json ("adapter_checks"), or why it did not run; a failed one stops the stage
with AdapterCheckError before any benchmark runs. `merge_agrees` takes the merge to check as an argument, so a
test runs it on a CPU with a broken one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import Config, GenerationConfig
from ..errors import AdapterCheckError
from . import candidates as cands
from .sources import read_jsonl

PROMPTS = 4
"""Test rows checked, the first ones: a few answers, cheap next to any benchmark."""
LOGIT_TOKENS = 64
"""The last tokens of each prompt (instruction and answer cue) whose logits are compared."""
MIN_LOGIT_DIFF = 1e-6
"""A larger max |logit difference| means the adapter changes the model. An adapter that is not applied, or whose
LoRA B is zero (untrained), leaves every logit bit for bit equal; the margin only allows for kernel noise. (One
training step of the tiny test model at learning rate 2e-4 moves them by 0.02.)"""
ANSWER_TOKENS = 32
"""Most new tokens of a check's greedy answers (fewer where evaluate.generation.max_new_tokens is smaller)."""
MIN_AGREEMENT = 0.5
"""Least share of greedy answers, merged or served, that must equal the unmerged adapter's. Rounding a LoRA delta
into bf16 weights can flip a near tie within a long answer; a wrong merge or another model parts on nearly every
prompt."""
FALLBACK = ("Name three primary colours.", "Explain what a neural network is in two sentences.",
            "Write a short poem about the sea.", "What is the capital of France, and why is it famous?")
"""Prompts checked when there is no test split."""
NOT_MERGED = "the tuned side is not merged on CPU"


def run(c: cands.Candidates) -> dict:
    """Every check that applies to `c`, in turn, each printed on one line; raises AdapterCheckError on a failure."""
    convs, source = conversations(c.cfg)
    out: dict = {"prompts": len(convs), "prompts_from": source}

    def record(name: str, result: dict) -> None:
        out[name] = result
        print(f"evaluate: adapter check: {_line(name, result, c, len(convs))}", flush=True)

    if c.model is None:
        for name in ("logits", "merge", "endpoint"):
            record(name, _not_run("no model loaded: every answer comes from evaluate.outputs"))
        return out
    prompts = [cands.prompt(c, conv) for conv in convs]
    no_adapter = _not_run(f"no adapter in process ({c.cfg.paths.adapter} holds none)")
    merged = c.adapter is not None and cands.merges(c.model)
    record("logits", logits_differ(c, prompts) if c.adapter else no_adapter)
    answers = reference_answers(c, prompts) if merged or c.endpoint else None
    record("merge", merge_agrees(c, prompts, answers=answers) if merged
           else no_adapter if not c.adapter else _not_run(NOT_MERGED))
    record("endpoint", endpoint_agrees(c, convs, answers) if c.endpoint else _not_run("no evaluate.candidate_endpoint"))
    return out


def _line(name: str, r: dict, c: cands.Candidates, n: int) -> str:
    if r["status"] != "passed":
        return f"{name} {r['status']}: {r['reason']}"
    if name == "logits":
        return f"logits differ (max |Δ| {r['max_abs_diff']:.2g} on {n} prompts)"
    if name == "merge":
        return f"merged answers as unmerged ({_agreed(r, n)} agree; the weights put back exactly)"
    if r["agreement"] is None:
        return f"endpoint {c.endpoint} does not answer as the base ({n - r['same_as_base']}/{n} differ)"
    return f"endpoint {c.endpoint} answers as the adapter ({_agreed(r, n)} agree)"


def conversations(cfg: Config) -> tuple[list[cands.Conversation], str]:
    """The conversations checked (the first PROMPTS rows of the test split) and where they come from."""
    path = Path(cfg.paths.data) / "test.jsonl"
    rows = [r for r in read_jsonl(path) if r.get("instruction")][:PROMPTS] if path.exists() else []
    if not rows:
        return [([(p, None)], "") for p in FALLBACK], f"built-in prompts (no rows in {path})"
    return [([(r["instruction"], None)], r.get("context") or "") for r in rows], f"the first {len(rows)} rows of {path}"


def logits_differ(c: cands.Candidates, prompts: list[str]) -> dict:
    """The max |logit difference| between the adapter on and off over the last LOGIT_TOKENS of each prompt."""
    import torch
    from peft import PeftModel

    if not isinstance(c.model, PeftModel):
        raise AdapterCheckError(f"the adapter at {c.adapter} was not applied: the model loaded for evaluation is the "
                                "plain base model, and every benchmark would compare it with itself")
    device, diff = next(c.model.parameters()).device, 0.0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([c.tok(p)["input_ids"][-LOGIT_TOKENS:]], device=device)
            with cands.as_side(c, "base") as model:
                base = model(input_ids=ids).logits.float()
            with cands.as_side(c, "tuned") as model:
                tuned = model(input_ids=ids).logits.float()
            diff = max(diff, (tuned - base).abs().max().item())
    if not diff > MIN_LOGIT_DIFF:
        raise AdapterCheckError(
            f"the adapter at {c.adapter} changes nothing: with it the logits equal the base model's (max |Δ| "
            f"{diff:.2g} on {len(prompts)} prompts, at most {MIN_LOGIT_DIFF:g}). It was not applied, or it is "
            "untrained (LoRA B = 0); every benchmark would compare the base model with itself")
    return {"status": "passed", "max_abs_diff": float(f"{diff:.4g}")}


def reference_answers(c: cands.Candidates, prompts: list[str]) -> dict[str, list[str]]:
    """Greedy answers in process of the base and, where there is an adapter, of the tuned model unmerged."""
    return {side: _answers(c, side, prompts) for side in cands.SIDES if side == "base" or c.adapter}


def merge_agrees(c: cands.Candidates, prompts: list[str], merge=None, answers: dict | None = None) -> dict:
    """The tuned side merged by `merge` (a context manager factory; generate.merged, which candidates._merged runs
    on a GPU, by default): its greedy answers against the unmerged adapter's and the base's, and every weight
    after the block against before it (the base side shares these weights)."""
    from peft.tuners.lora import LoraLayer

    from .. import generate as gen

    merge = merge or gen.merged
    answers = answers or reference_answers(c, prompts)
    before = _fingerprint(c.model)
    with cands.as_side(c, "tuned") as model, merge(model) as m:
        merged = any(layer.merged for layer in m.modules() if isinstance(layer, LoraLayer))
        got = _generate(c, m, prompts, "merged")
    if not _fingerprint(c.model).equal(before):
        raise AdapterCheckError(f"merging the adapter at {c.adapter} did not put the weights back exactly: the base "
                                "side, which shares them, would be evaluated with the adapter (partly) in its weights "
                                "(generate.merged)")
    if not merged:
        return _not_run("generate.merged left the model unmerged (4-bit base layers, or too little host memory)")
    r = _compare(c, got, answers)
    if _disagrees(r):
        raise AdapterCheckError(f"merging the adapter at {c.adapter} changes its answers: {_agreed(r, len(got))} "
                                f"greedy answers merged equal the unmerged ones (at least {MIN_AGREEMENT:.0%} must)"
                                f"{_as_base(r, 'the merged model')}; the tuned side, which answers merged on a GPU, "
                                "would not be the adapter (generate.merged)")
    return _unless_vacuous({"status": "passed", **r}, len(got))


def endpoint_agrees(c: cands.Candidates, convs: list[cands.Conversation], answers: dict | None = None) -> dict:
    """The endpoint's greedy answers against the adapter's in process (or, with no adapter here, the base's)."""
    answers = answers or reference_answers(c, [cands.prompt(c, conv) for conv in convs])
    cfg = c.cfg
    greedy = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, generation=_greedy(cfg)))
    got = cands.generate(dataclasses.replace(c, cfg=greedy), "tuned", convs, "adapter check [endpoint]")
    if "tuned" not in answers:  # nothing to agree with: it must at least not be the base
        same = sum(g == b for g, b in zip(got, answers["base"]))
        if same == len(got):
            raise AdapterCheckError(f"the endpoint {c.endpoint} answers exactly as the base model {c.base_path} on "
                                    f"all {same} prompts: it serves the base model, or an adapter that changes nothing")
        return {"status": "passed", "endpoint": c.endpoint, "agreement": None, "same_as_base": same,
                "note": f"no adapter in process to compare with ({c.cfg.paths.adapter} holds none)"}
    r = _compare(c, got, answers)
    if _disagrees(r):
        raise AdapterCheckError(f"the endpoint {c.endpoint} does not serve the adapter at {c.adapter}: "
                                f"{_agreed(r, len(got))} of its greedy answers equal the adapter's in process (at "
                                f"least {MIN_AGREEMENT:.0%} must){_as_base(r, 'it')}. It serves the base model or "
                                "another one, or another template (data.template, data.system_prompt)")
    return _unless_vacuous({"status": "passed", "endpoint": c.endpoint, **r}, len(got))


def _disagrees(r: dict) -> bool:
    """The one rule for merged and served answers: too few equal the adapter's, or more are the base's."""
    return r["agreement"] < MIN_AGREEMENT or r["as_base"] > r["as_tuned"]


def _unless_vacuous(result: dict, n: int) -> dict:
    """A passed agreement check is inconclusive where the adapter changes none of the greedy answers: agreeing with
    it is then agreeing with the base model too."""
    if result.get("tuned_differs_from_base") == 0:
        return {**result, "status": "inconclusive",
                "reason": f"the adapter changes none of the {n} greedy answers, so agreeing with it does not tell it "
                          "from the base model"}
    return result


def _greedy(cfg: Config) -> GenerationConfig:
    """evaluate.generation, greedy and short, on the plain path (no compile for a few short answers)."""
    g = cfg.evaluate.generation
    return dataclasses.replace(g, temperature=0.0, max_new_tokens=min(g.max_new_tokens, ANSWER_TOKENS), fast=False)


def _answers(c: cands.Candidates, side: str, prompts: list[str]) -> list[str]:
    with cands.as_side(c, side) as model:
        return _generate(c, model, prompts, side)


def _generate(c: cands.Candidates, model, prompts: list[str], what: str) -> list[str]:
    from .. import generate as gen

    return gen.generate(model, c.tok, prompts, _greedy(c.cfg), desc=f"adapter check [{what}]", progress=False,
                        seed=c.cfg.evaluate.seed)


def _compare(c: cands.Candidates, got: list[str], answers: dict) -> dict:
    """How `got` agrees with the unmerged adapter's answers: exact answers, shared leading tokens, and, on the
    prompts where the adapter changes the answer, how many are the base's and how many the adapter's."""
    tuned, base = answers["tuned"], answers["base"]
    n = len(got)

    def shared(a: str, b: str) -> float:
        x, y = (c.tok(s, add_special_tokens=False)["input_ids"] for s in (a, b))
        same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        return same / max(len(x), len(y)) if x or y else 1.0

    return {"agreement": sum(g == t for g, t in zip(got, tuned)) / n,
            "token_agreement": round(sum(shared(g, t) for g, t in zip(got, tuned)) / n, 4),
            "tuned_differs_from_base": sum(t != b for t, b in zip(tuned, base)),
            "as_base": sum(g == b != t for g, b, t in zip(got, base, tuned)),
            "as_tuned": sum(g == t != b for g, b, t in zip(got, base, tuned))}


def _fingerprint(model):
    """Each parameter's sum: a weight left changed, even by a rounding, shows in it. 16-bit weights are summed in
    float32 (on a GPU without a float32 copy of them; a float64 sum would copy a 7B's embedding into 1 GB), the rest
    in float64."""
    import torch

    half = (torch.float16, torch.bfloat16)
    with torch.no_grad():
        return torch.stack([p.detach().sum(dtype=torch.float32 if p.dtype in half else torch.float64).double()
                            for p in model.parameters()]).cpu()


def _agreed(r: dict, n: int) -> str:
    return f"{round(r['agreement'] * n)}/{n}"


def _as_base(r: dict, who: str) -> str:
    if not r["as_base"]:
        return ""
    return (f"; on {r['as_base']} of the {r['tuned_differs_from_base']} prompts where the adapter changes the answer, "
            f"{who} answers as the base model")


def _not_run(reason: str) -> dict:
    return {"status": "not run", "reason": reason}
