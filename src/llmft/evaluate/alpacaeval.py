"""AlpacaEval 2: win rate against GPT-4-turbo's reference outputs, and tuned vs base head to head.

The annotation is alpaca_eval's own PairwiseAnnotator with its annotator config (prompt template, output
order randomisation, logprob parser, preference encoding) and its win-rate metric. Only the completion
function is ours: it sends the same chat messages through judges.py, so the judge is our configured one
(any OpenAI-compatible server) with our retries, concurrency and cache, instead of the package's client.

The annotator is built as `alpaca_eval evaluate` builds it, with the package's default seed (not
evaluate.seed): the seed decides, per instruction, which of the two outputs the judge sees first, and a real
judge has a position bias, so each pair is shown in the order alpaca_eval itself shows it.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np

from . import candidates as cands
from . import judges, sources, stats
from ..io import write_json, write_jsonl
from .report import outputs_dir
from .saved import same_file

REFERENCE = "gpt4_1106_preview"
ALL = 805
# what alpaca_eval's length-controlled GLM downloads (glm_winrate.py), once, into its cache
HUB_FILES = "df_gamed.csv and instruction_difficulty.csv from the hub dataset tatsu-lab/alpaca_eval (network, once)"

# completions_kwargs that steer alpaca_eval's own client, not the chat completion request
_CLIENT_ONLY = {"requires_chatml", "is_chat", "num_procs", "batch_size", "price_per_token", "tokens_to_favor",
                "tokens_to_avoid", "is_skip_multi_tokens_to_avoid", "is_strip", "client_kwargs",
                "client_config_path", "sleep_time", "n_retries"}


def _fn_completions(judge: judges.Judge, repeat: int):
    """A drop-in for alpaca_eval's `openai_completions` that goes through our judge client."""
    from alpaca_eval.utils import prompt_to_chatml

    def fn_completions(prompts, model_name=None, **kwargs):
        if kwargs.get("tokens_to_favor") or kwargs.get("tokens_to_avoid"):
            raise ValueError("annotators with tokens_to_favor/avoid need tiktoken logit biases: not supported")
        params = {k: v for k, v in kwargs.items() if k not in _CLIENT_ONLY}
        requests = []
        for p in prompts:
            p = p.strip()
            messages = prompt_to_chatml(p) if p.startswith("<|im_start|>") else [{"role": "user", "content": p}]
            requests.append((messages, params))
        choices = judges.chat_many(judge, requests, "AlpacaEval judging", repeat=repeat)
        for ch in choices:
            ch["text"] = judges.content(ch) or " "  # as alpaca_eval's client: an empty answer is not parsed
        n = len(choices)
        return {"completions": [ch["text"] for ch in choices], "completions_all": choices,
                "price_per_example": [math.nan] * n, "time_per_example": [math.nan] * n}

    return fn_completions


def annotator(config: str, judge: judges.Judge, repeat: int = 0):
    """alpaca_eval's PairwiseAnnotator for `config`, answering through `judge`.

    No seed is passed, as alpaca_eval.main.evaluate passes none: the annotator keeps alpaca_eval's default
    (0), which seeds the swap of output_1 (the reference) and output_2 on each instruction's text, so the
    judge sees every pair in the order `alpaca_eval evaluate` shows it."""
    level = logging.getLogger().level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # alpaca_eval imports the deprecated pkg_resources
        from alpaca_eval.annotators import PairwiseAnnotator
    logging.getLogger().setLevel(level)  # importing alpaca_eval sets the root logger to INFO

    ann = PairwiseAnnotator(annotators_config=config, caching_path=None)  # our judge client caches
    for single in ann.annotators.values():
        single.fn_completions = _fn_completions(judge, repeat)
    return ann


def _preferences(ann, outputs_1: list[dict], outputs_2: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """{instruction: preference in [1, 2]} (2: outputs_2 wins); unparsable judgments are absent."""
    annotated = ann.annotate_head2head(outputs_1=outputs_1, outputs_2=outputs_2, is_ordered=True)
    parsed = {a["instruction"]: float(a["preference"]) for a in annotated if a.get("preference") is not None}
    return {k: v for k, v in parsed.items() if not math.isnan(v)}, annotated


def _winrate_row(rows, prefs_b: dict, prefs_t: dict, e, judge, failures, **extra) -> tuple[dict, dict]:
    """The win-rate row, each side's number alpaca_eval's own (all its parsed annotations), the CI paired on the
    instructions both sides have; and its per-dataset rows, alike."""
    from alpaca_eval.metrics import get_winrate

    def row(keep, **extra) -> dict:
        both = [r for r in rows if keep(r) and r["instruction"] in prefs_b and r["instruction"] in prefs_t]
        base = np.array([prefs_b[r["instruction"]] - 1 for r in both]) * 100
        tuned = np.array([prefs_t[r["instruction"]] - 1 for r in both]) * 100
        own = {side: [(p[r["instruction"]] - 1) * 100 for r in rows if keep(r) and r["instruction"] in p]
               for side, p in (("base", prefs_b), ("tuned", prefs_t))}
        return stats.own_scores(stats.row(base, tuned, True, e.bootstrap_samples, e.seed, **extra),
                                own["base"], own["tuned"], e.bootstrap_samples, e.seed)

    win = row(lambda r: True, judge=judge.name, parse_failures=failures, **extra)
    # the benchmark's own numbers (the mean preference, as above) and its standard errors
    wb, wt = (get_winrate([{"preference": p} for p in prefs.values()]) for prefs in (prefs_b, prefs_t))
    win.update(base=float(wb["win_rate"]), tuned=float(wt["win_rate"]), delta=float(wt["win_rate"] - wb["win_rate"]),
               standard_error={"base": float(wb["standard_error"]), "tuned": float(wt["standard_error"])})
    paired = {r["category"] for r in rows if r["instruction"] in prefs_b and r["instruction"] in prefs_t}
    return win, {f"alpaca_eval_win_rate/{cat}": row(lambda r, cat=cat: r["category"] == cat) for cat in sorted(paired)}


def _lc_row(rows, annotated: dict[str, list[dict]], e) -> dict:
    """Length-controlled win rate: alpaca_eval's GLM, which needs all 805 instructions and two files from the hub."""
    if len(rows) < ALL:
        return stats.skipped(f"needs all {ALL} instructions (evaluate.alpaca_eval_rows: null; the GLM uses "
                             f"per-instruction difficulties) and {HUB_FILES}")
    import pandas as pd
    from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate

    order = {r["instruction"]: r["index"] for r in rows}
    glm = {}
    try:
        for side in cands.SIDES:
            df = pd.DataFrame(annotated[side])
            df = df.assign(_i=df["instruction"].map(order)).sort_values("_i").drop(columns="_i").reset_index(drop=True)
            if len(df) < ALL:
                return stats.skipped(f"{ALL - len(df)} {side} annotations failed to parse; the GLM needs all {ALL}")
            get_length_controlled_winrate(df, save_weights_dir=None, is_warn_extreme_changes=False)
            glm[side] = df["glm_preference"].to_numpy() * 100
    except Exception as ex:  # the GLM downloads df_gamed.csv + instruction_difficulty.csv from the hub
        return stats.skipped(f"alpaca_eval's length-controlled GLM could not run: it needs {HUB_FILES} "
                             f"({type(ex).__name__}: {str(ex)[:200]})")
    return stats.row(glm["base"], glm["tuned"], True, e.bootstrap_samples, e.seed,
                     description="length-controlled win rate vs GPT-4-turbo (alpaca_eval GLM)")


def run(c: cands.Candidates, judge: judges.Judge) -> dict:
    e = c.cfg.evaluate
    rows, why = sources.alpaca_eval(e.alpaca_eval_data, e.alpaca_eval_rows, e.seed)
    if rows is None:
        return {"alpaca_eval": stats.skipped(why)}
    convs = [([(r["instruction"], None)], "") for r in rows]
    reference = [{"instruction": r["instruction"], "output": r["output"], "generator": r.get("generator", REFERENCE),
                  "dataset": r["category"]} for r in rows]
    outputs = {}
    for side in cands.SIDES:
        saved = c.saved.get(("alpaca_eval", side))
        if saved is not None:
            answers = [saved[r["instruction"]]["output"] for r in rows]
            generators = [saved[r["instruction"]]["generator"] for r in rows]
        else:
            answers = cands.generate(c, side, convs, "AlpacaEval answers")
            generators = [f"llmft-{side}"] * len(rows)
        outputs[side] = [{"instruction": r["instruction"], "output": a, "generator": g, "dataset": r["category"]}
                         for r, a, g in zip(rows, answers, generators)]
        path = outputs_dir(c.cfg) / f"alpaca_eval_{side}.json"
        source = getattr(e.outputs, side).alpaca_eval
        if source is None or not same_file(Path(source), path):  # judging a file in place must not rewrite it
            write_json(path, outputs[side])  # alpaca_eval's model_outputs

    # each repeat is a full annotation (alpaca_eval's seeded output order is the same, the judge is asked again)
    runs = []
    for repeat in range(judge.cfg.repeats):
        ann = annotator(e.alpaca_eval_annotator, judge, repeat)
        prefs, annotated = {}, {}
        for side in cands.SIDES:
            prefs[side], annotated[side] = _preferences(ann, reference, outputs[side])
        prefs["tuned_vs_base"], annotated["tuned_vs_base"] = _preferences(ann, outputs["base"], outputs["tuned"])
        runs.append((prefs, annotated))
        for name, a in annotated.items():
            suffix = f"_repeat{repeat}" if repeat else ""
            write_jsonl(outputs_dir(c.cfg) / f"alpaca_eval_annotations_{name}{suffix}.jsonl", a)

    per_repeat = [_rows(rows, prefs, annotated, e, judge) for prefs, annotated in runs]
    if len(runs) == 1:
        return per_repeat[0]
    # the pooled rows: each instruction's median preference over the repeats that parsed it
    median, annotated = {}, {}
    for name in runs[0][0]:
        parsed = {}
        for prefs, _ in runs:
            for instruction, p in prefs[name].items():
                parsed.setdefault(instruction, []).append(p)
        median[name] = {k: float(np.median(v)) for k, v in parsed.items()}
        annotated[name] = [{**a, "preference": median[name].get(a["instruction"])} for a in runs[0][1][name]]
    pooled = _rows(rows, median, annotated, e, judge)
    return stats.over_repeats(pooled, per_repeat)


def _rows(rows: list[dict], prefs: dict, annotated: dict, e, judge) -> dict:
    """The AlpacaEval rows from {side or tuned_vs_base: {instruction: preference}} of one annotation."""
    failures = {side: len(rows) - len(prefs[side]) for side in cands.SIDES}
    if not prefs["base"] or not prefs["tuned"]:
        return {"alpaca_eval": stats.error(f"no judgment could be parsed (parse failures: {failures})",
                                           judge=judge.name, parse_failures=failures)}
    win, per_dataset = _winrate_row(rows, prefs["base"], prefs["tuned"], e, judge, failures,
                                    description=f"win rate (%) vs {REFERENCE} reference outputs")
    out = {"alpaca_eval_win_rate": win, **per_dataset, "alpaca_eval_lc_win_rate": _lc_row(rows, annotated, e)}

    # tuned vs base directly: 50 is a tie by construction, so the base column is 50
    h2h = prefs["tuned_vs_base"]
    scores = np.array([h2h[r["instruction"]] - 1 for r in rows if r["instruction"] in h2h]) * 100
    if len(scores):
        out["alpaca_eval_tuned_vs_base"] = stats.row(np.full_like(scores, 50.0), scores, True, e.bootstrap_samples,
                                                     e.seed, judge=judge.name, parse_failures=len(rows) - len(scores),
                                                     description="win rate (%) of tuned over base, same judge")
    else:
        out["alpaca_eval_tuned_vs_base"] = stats.error("no tuned-vs-base judgment could be parsed", judge=judge.name)
    return out
