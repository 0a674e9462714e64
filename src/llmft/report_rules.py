"""The report's words, written from the numbers by rules: number formats, the abstract, the discussion.

Each rule reads the records `report.collect` returns and says only what they show: a side wins when the 95% CI
of its delta excludes 0 on at least MIN_N_VERDICT examples (evaluate.report.verdict, the eval table's own
rule); a metric with fewer examples gets no verdict; what did not run is named with its reason.
"""
from __future__ import annotations

import re
from xml.sax.saxutils import escape

from .evaluate.benchmarks import BENCHMARKS, producer
from .evaluate.report import MIN_N_VERDICT, fmt, is_result, verdict
from .models import EMBEDDED, EMBEDDED_NAME

# a loss gap or change smaller than this share of the loss reads as noise of the last logged batches
LOSS_TOLERANCE = 0.02
OVERFIT_GAP = 0.10  # validation loss this much (relative) above train loss: the adapter fits train better
DETAIL_MAX = 3  # metrics listed with their numbers in one sentence; more are named only


# ---------------------------------------------------------------------------------------- formats
def num(x) -> str:
    """The eval table's 4 significant digits (evaluate.report.fmt), with a typographic minus."""
    return fmt(x).replace("-", "−")


def signed(x) -> str:
    return ("+" if isinstance(x, (int, float)) and x > 0 else "") + num(x)


def span(ci) -> str:
    lo, hi = ci or (None, None)
    return f"[{num(lo)}, {num(hi)}]"


def count(n) -> str:
    if n is None:
        return "–"
    return f"{n:,}" if isinstance(n, int) else num(n)


_KEY = re.compile(r"\b(sk-[A-Za-z0-9_-]{6,}|hf_[A-Za-z0-9]{6,}|Bearer\s+\S+|(?:api[_-]?key|token|password)=\S+)", re.I)
_URL_CREDENTIALS = re.compile(r"(\w+://)[^/\s@]+@")


def redact(text) -> str:
    """Free text from the records (error reasons, params) without API keys or URL credentials."""
    return _URL_CREDENTIALS.sub(r"\1", _KEY.sub("[redacted]", str(text)))


def _e(text) -> str:
    return escape(str(text))


# A skip reason's exception text (`ConnectionError: Couldn't reach 'tatsu-lab/alpaca_eval' ...`) stays in table.json
# and the run's eval.<benchmark>.status tag in MLflow; the report names the cause in a few words instead.
_EXCEPTION = re.compile(r"\(?\b[A-Z]\w*(?:Error|Exception|Enabled)\b:")
_OFFLINE = ("OfflineModeIsEnabled", "LocalEntryNotFound", "ConnectionError", "Couldn't reach", "ConnectTimeout",
            "outgoing traffic has been disabled", "Max retries exceeded", "Failed to resolve", "Network is unreachable",
            "Name or service not known", "Temporary failure in name resolution")
_HUB_ID = re.compile(r"(?<![\w./:-])([A-Za-z0-9][\w.-]*/[\w.-]*\w)(?![\w/])")
_REFUSED = ("GatedRepoError", "401 Client Error", "403 Client Error", "Unauthorized")
SHORT_REASON_MAX = 200


def short_reason(row: dict) -> str:
    """Why a benchmark did not run, for the report's sentences: a skipped benchmark's reason without the text of
    the exception behind it (`its data is not available offline (tatsu-lab/alpaca_eval; evaluate.alpaca_eval_data
    can name a local copy)`). A failed benchmark's reason is kept whole: it is what has to be fixed."""
    text = " ".join(redact(row.get("reason", "")).split())
    m = _EXCEPTION.search(text) if row.get("status") == "skipped" else None
    if m:
        head, tail = text[:m.start()].rstrip(" :;,("), text[m.start():]
        hub, task = _HUB_ID.search(head), re.search(r"\btask (\S+)$", head)
        what = hub.group(1) if hub else f"lm-eval task {task.group(1)}" if task else None
        key = re.search(r"\bevaluate\.\w+", tail)  # the key the full reason says to set
        hint = f"{key.group(0)} can name a local copy" if key else None
        if what and any(s in tail for s in _REFUSED):
            text = f"the hub refused access to its data ({what}): accept its terms there and set HF_TOKEN"
        elif any(s in tail for s in _OFFLINE):
            text = f"its data is not available offline ({'; '.join(x for x in (what, hint) if x)})" if what else \
                f"{head}, not available offline" + (f" ({hint})" if hint else "")
        else:
            text = head + (f" ({hint})" if hint else "")
    return text if len(text) <= SHORT_REASON_MAX else text[:SHORT_REASON_MAX - 1].rsplit(" ", 1)[0] + "…"


# ---------------------------------------------------------------------------------------- queries
def benchmark_of(name: str) -> str:
    """The benchmark that writes metric row `name` (evaluate.benchmarks' table); a skipped or failed benchmark's
    row carries the benchmark's own name."""
    top = name.split("/", 1)[0]
    found = None if top in BENCHMARKS else producer(top)
    return found[0] if found else top


def _order(name: str) -> tuple[int, str]:
    """Evaluate's benchmark order (BENCHMARKS'), then the name (table.json's keys are sorted)."""
    order = list(BENCHMARKS)
    bench = benchmark_of(name)
    return (order.index(bench) if bench in BENCHMARKS else len(order)), name


def results(r: dict) -> list[tuple[str, dict]]:
    """Top-level metric rows (no per-category rows), in evaluate's benchmark order."""
    rows = ((n, row) for n, row in r["eval"].items() if is_result(row) and "/" not in n)
    return sorted(rows, key=lambda x: _order(x[0]))


def core(r: dict) -> list[tuple[str, dict]]:
    """Result rows of every benchmark but lm-eval's, which the report shows in its own table and paragraph."""
    return [(n, row) for n, row in results(r) if benchmark_of(n) != "lm_eval"]


def extended(r: dict) -> list[tuple[str, dict]]:
    """lm-eval's top-level rows (one per task and metric)."""
    return [(n, row) for n, row in results(r) if benchmark_of(n) == "lm_eval"]


def truth(r: dict) -> tuple[int, int, float | None]:
    """Of lm-eval's result rows (subtasks included): how many there are, how many carry the number lm-eval's own CLI
    printed for the base (evaluate.lm_eval_truth), and the largest difference from it."""
    rows = [row for n, row in r["eval"].items() if benchmark_of(n) == "lm_eval" and is_result(row)]
    diffs = [abs(row["base"] - row["lm_eval_cli"]) for row in rows if row.get("lm_eval_cli") is not None]
    return len(rows), len(diffs), max(diffs, default=None)


def at_chance(row: dict) -> list[str]:
    """The sides whose 95% CI reaches down to the task's chance level (a uniform guess, or a constant answer's
    score) or below it: scores that do not show the model solving the task."""
    c = row.get("chance")
    if c is None:
        return []
    return [side for side in ("base", "tuned") if row.get(f"ci95_{side}") and row[f"ci95_{side}"][0] <= c]


def subtasks(cats: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The per-subtask rows of an lm-eval metric, without its subgroups' rows (MMLU's stem, humanities, ...)."""
    return [(c, row) for c, row in cats if not row.get("group")]


def not_run(r: dict) -> list[tuple[str, dict]]:
    """Skipped and failed benchmarks, in evaluate's benchmark order."""
    return sorted(((n, row) for n, row in r["eval"].items() if not is_result(row)), key=lambda x: _order(x[0]))


def model_name(params: dict) -> str:
    base = params.get("model.base", "not recorded")
    return f"{EMBEDDED_NAME} (embedded)" if base == EMBEDDED else base


def source_name(provenance: dict) -> str:
    src = provenance.get("source", "an unrecorded source")
    return "the embedded sample" if src == "embedded" else src


def categories(r: dict) -> dict[str, list[tuple[str, dict]]]:
    """metric -> [(category, row)] from the `<metric>/<category>` rows."""
    out: dict[str, list] = {}
    for n, row in sorted(r["eval"].items(), key=lambda x: _order(x[0])):
        if is_result(row) and "/" in n:
            metric, cat = n.split("/", 1)
            out.setdefault(metric, []).append((cat, row))
    return out


def headline(r: dict) -> tuple[str, dict] | None:
    """The metric register promotes on, else test_loss, else the first one."""
    done = dict(results(r))
    reg = (r.get("register") or {}).get("metric", "")
    for name in (reg.rsplit(".", 1)[0], "test_loss"):
        if name in done:
            return name, done[name]
    return next(iter(done.items()), None)


def _row_text(name: str, row: dict) -> str:
    return (f"<i>{_e(name)}</i> {num(row['base'])} → {num(row['tuned'])} (Δ {signed(row['delta'])}, "
            f"95% CI {span(row['ci95'])}, n = {count(row['n'])})")


# --------------------------------------------------------------------------------------- abstract
def abstract(r: dict) -> str:
    p, t, d = r["run"]["params"], r["train"], r["data"]
    source = source_name(d.get("provenance", {}))
    out = (f"We fine-tune {_e(model_name(p))} with LoRA (r = {_e(p.get('train.lora.r', '?'))}, "
           f"α = {_e(p.get('train.lora.alpha', '?'))}) on {count(d['splits']['train']['rows'])} instruction examples "
           f"from {_e(source)} for {count(t.get('steps'))} optimizer steps ({num(t.get('epochs'))} epochs, "
           f"{count(t.get('tokens_seen'))} tokens).")
    head = headline(r)
    if head:
        name, row = head
        out += f" On held-out data, {_row_text(name, row)}: {_verdict_words(row)}."
    tally = {k: sum(verdict(row) == k for _, row in results(r)) for k in ("better", "worse")}
    total = len(results(r))
    out += (f" Over all {total} metrics the tuned model is significantly better on {tally['better']}, worse on "
            f"{tally['worse']}, and inconclusive on {total - tally['better'] - tally['worse']} (the CI contains 0, or "
            "too few examples).")
    notes = [n for n, _ in not_run(r)]
    if notes:
        out += f" Not run: {_e(', '.join(notes))} (Section 3)."
    return out


def _verdict_words(row: dict) -> str:
    return {"better": "the tuned model is better (the CI excludes 0)",
            "worse": "the tuned model is worse (the CI excludes 0)",
            "ns": "no significant difference (the CI contains 0)",
            "few": f"too few examples for a verdict (n &lt; {MIN_N_VERDICT})",
            "none": "no estimate"}[verdict(row)]


# ------------------------------------------------------------------------------------- discussion
def discussion(r: dict) -> list[tuple[str, list[str]]]:
    """(heading, sentences) per paragraph; a paragraph with nothing to say is left out."""
    return [(title, s) for title, rule in RULES if (s := rule(r))]


def _by_verdict(r: dict, key: str, word: str) -> list[str]:
    rows = [(n, row) for n, row in core(r) if verdict(row) == key]
    out = [f"The tuned model is {word} on " + "; ".join(_row_text(n, row) for n, row in rows)
           + ": the 95% CI of Δ excludes 0." if rows else
           f"No metric is significantly {word}: no 95% CI of Δ excludes 0 in that direction."]
    for metric, cats in categories(r).items():
        if benchmark_of(metric) == "lm_eval":
            continue
        hits = [c for c, row in cats if verdict(row) == key]
        if hits:
            out.append(f"By category, <i>{_e(metric)}</i> is {word} in {len(hits)} of {len(cats)}: {_e(', '.join(hits))}.")
    return out


def _improved(r: dict) -> list[str]:
    return _by_verdict(r, "better", "better")


def _worse(r: dict) -> list[str]:
    return _by_verdict(r, "worse", "worse")


def _inconclusive(r: dict) -> list[str]:
    by = {k: [(n, row) for n, row in core(r) if verdict(row) == k] for k in ("ns", "few", "none")}
    out = []
    if len(by["ns"]) > DETAIL_MAX:  # the results table has their numbers; a long list of them reads as a dump
        out.append(f"The 95% CI of Δ contains 0, so there is no significant difference, on {len(by['ns'])} metrics: "
                   + ", ".join(f"<i>{_e(n)}</i>" for n, _ in by["ns"]) + ".")
    elif by["ns"]:
        out.append("The 95% CI of Δ contains 0, so there is no significant difference, on "
                   + "; ".join(f"<i>{_e(n)}</i> {span(row['ci95'])} at n = {count(row['n'])}" for n, row in by["ns"]) + ".")
    if by["few"]:
        out.append(f"Too few examples for a verdict (n &lt; {MIN_N_VERDICT}): "
                   + "; ".join(f"<i>{_e(n)}</i> at n = {count(row['n'])}" for n, row in by["few"]) + ".")
    if by["none"]:
        out.append("No estimate (not a finite number): " + ", ".join(f"<i>{_e(n)}</i>" for n, _ in by["none"]) + ".")
    few = sum(verdict(row) == "few" for m, cats in categories(r).items() for _, row in cats
              if benchmark_of(m) != "lm_eval")
    if few:
        out.append(f"{few} per-category rows have fewer than {MIN_N_VERDICT} examples and get no verdict.")
    return out


def _reasoning(r: dict) -> list[str]:
    """lm-eval's tasks: which degraded significantly and which did not, where a score sits at chance, and how
    many subtasks moved."""
    rows = extended(r)
    if not rows:
        return []
    by = {k: [(n, row) for n, row in rows if verdict(row) == k] for k in ("worse", "better", "ns", "few", "none")}
    ns = sorted(row["n"] for _, row in rows)
    span_n = count(ns[0]) if ns[0] == ns[-1] else f"{count(ns[0])}–{count(ns[-1])}"
    out = [f"lm-eval's own task definitions give {len(rows)} metrics on {span_n} documents each (Section 5.1)."]
    if by["worse"]:
        out.append("The tuned model is significantly worse on " + "; ".join(_row_text(n, row) for n, row in by["worse"])
                   + ": the 95% CI of Δ excludes 0 on the worse side.")
    elif by["ns"] or by["better"]:
        out.append("No task's metric degraded significantly: no 95% CI of Δ excludes 0 on the worse side.")
    if by["ns"]:
        out.append("No significant change on " + "; ".join(f"<i>{_e(n)}</i> (Δ {signed(row['delta'])}, "
                                                          f"{span(row['ci95'])})" for n, row in by["ns"]) + ".")
    if by["better"]:
        out.append("Significantly better on " + "; ".join(_row_text(n, row) for n, row in by["better"]) + ".")
    if by["few"] + by["none"]:
        out.append("No verdict (too few documents or no estimate): "
                   + ", ".join(f"<i>{_e(n)}</i>" for n, _ in by["few"] + by["none"]) + ".")
    chance = [(n, row, sides) for n, row in rows if (sides := at_chance(row))]
    for who, group in (("both models score", [c for c in chance if len(c[2]) == 2]),
                       ("the base model scores", [c for c in chance if c[2] == ["base"]]),
                       ("the tuned model scores", [c for c in chance if c[2] == ["tuned"]])):
        if group:
            listed = "; ".join(f"<i>{_e(n)}</i> (chance {num(row['chance'])})" for n, row, _ in group)
            one = len(group) == 1
            out.append(f"On {listed} {who} at or below chance level (within the 95% CI): "
                       f"{'the task is' if one else 'these tasks are'} not solved, so "
                       f"{'its' if one else 'their'} Δ says little about lost reasoning or knowledge.")
    for metric, cats in categories(r).items():
        cats = subtasks(cats)
        if benchmark_of(metric) != "lm_eval" or len(cats) < 2:
            continue
        moved = {k: [c for c, row in cats if verdict(row) == k] for k in ("worse", "better")}
        if moved["worse"] or moved["better"]:
            names = ", ".join(moved["worse"][:DETAIL_MAX * 2]) + (" …" if len(moved["worse"]) > DETAIL_MAX * 2 else "")
            out.append(f"By subtask, <i>{_e(metric)}</i> is significantly worse in {len(moved['worse'])} of {len(cats)}"
                       + (f" ({_e(names)})" if moved["worse"] else "")
                       + f" and better in {len(moved['better'])}; with {len(cats)} intervals, about "
                       f"{len(cats) / 20:.1g} would exclude 0 by chance alone.")
    return out


def _dynamics(r: dict) -> list[str]:
    train, val, t = r["loss"]["train"], r["loss"]["validation"], r["train"]
    if not train or not val:
        return ["The loss curves were not recorded, so the training dynamics cannot be judged."]
    tr, va = train[-1][1], val[-1][1]
    gap = va - tr
    if gap > OVERFIT_GAP * va:
        out = [f"The final validation loss ({num(va)}) is {num(gap)} ({100 * gap / va:.0f}%) above the final train "
               f"loss ({num(tr)}): the adapter fits its training batches better than held-out data."]
    else:
        out = [f"The final train ({num(tr)}) and validation ({num(va)}) losses are within {100 * OVERFIT_GAP:.0f}% "
               "of each other: no sign of overfitting."]
    if len(val) < 2:
        out.append("Validation loss was measured once, so its trend cannot be judged.")
    else:
        (s0, v0), (s1, v1) = val[-2], val[-1]
        best_step, best = min(val, key=lambda x: x[1])
        if v1 < v0 * (1 - LOSS_TOLERANCE):
            out.append(f"Validation loss was still falling at the end ({num(v0)} at step {s0} → {num(v1)} at step "
                       f"{s1}): the run looks undertrained, and more steps would likely lower it further.")
        elif v1 > best * (1 + LOSS_TOLERANCE):
            out.append(f"Validation loss bottomed at {num(best)} (step {best_step}) and ended at {num(v1)}: the last "
                       "steps overfit, and an earlier checkpoint would generalise better.")
        else:
            out.append(f"Validation loss had levelled off by the end ({num(v0)} → {num(v1)} over the last "
                       f"{s1 - s0} steps).")
    epochs = t.get("epochs")
    if isinstance(epochs, (int, float)) and 0 < epochs < 1:
        out.append(f"Training stopped after {100 * epochs:.0f}% of one epoch ({count(t.get('steps'))} steps): part of "
                   "the training split was never seen.")
    return out


def _limits(r: dict) -> list[str]:
    out, e = [], r["evaluate"]
    skipped = dict(not_run(r))
    judged = [n for n, b in BENCHMARKS.items() if b.judged and n in skipped]
    if not e.get("judge") and judged:
        out.append(f"No judge was configured, so the judged benchmarks ({_e(', '.join(judged))}) are not shown: "
                   "nothing here measures answer quality as a judge would rate it.")
    for n, row in skipped.items():
        if n in judged and not e.get("judge"):
            continue
        what = "failed" if row["status"] == "error" else "was skipped"
        out.append(f"<i>{_e(n)}</i> {what}, so the run says nothing about it: {_e(short_reason(row).rstrip('.'))}.")
    for n, row in results(r):
        if row.get("parse_failures"):
            out.append(f"The judge's verdict could not be parsed for {count(row['parse_failures'])} answers on "
                       f"<i>{_e(n)}</i>; they are left out of its n.")
    ns = [row["n"] for _, row in results(r)]
    head = headline(r)
    if ns and head and head[1].get("ci95") and None not in head[1]["ci95"]:
        lo, hi = head[1]["ci95"]
        out.append(f"With {count(min(ns))}–{count(max(ns))} examples per metric, a change in <i>{_e(head[0])}</i> "
                   f"smaller than about {num((hi - lo) / 2)} (half its CI width) cannot be told from noise.")
    study = [t for t in r.get("study") or [] if t.get("state") == "COMPLETE"]
    if len(study) < 2:
        out.append("This is one training run with one seed: the CIs cover the sampling of test examples, not the "
                   "variation between training runs.")
    else:
        vals = [t["value"] for t in study if t.get("value") is not None]
        out.append(f"The study's {len(study)} complete trials range from {num(min(vals))} to {num(max(vals))}; the "
                   "CIs above still cover only test-example sampling of the reported run, not training variation.")
    return out


RULES = (("What improved", _improved), ("What got worse", _worse), ("Inconclusive", _inconclusive),
         ("Reasoning and factual consistency", _reasoning), ("Training dynamics", _dynamics),
         ("What this run cannot show", _limits))
