"""report: a 2–4 page PDF of the run, built only from its own records, laid out like a paper's results.

    python -m llmft report

Reads the prepare stats, train metrics and loss CSVs, the eval table, register's decision and the pipeline's
MLflow run (params, environment and lineage tags); writes `paths.report` atomically and logs it to that run.
Sections: 1 Dataset, 2 Implementation, 3 Evaluation, 4 Hardware, 5 Results, 6 Discussion. The discussion is
written by rules from the numbers (report_rules.py); no sentence is fixed text that ignores them. Figures are
drawn by plots.py, the layout primitives are pdf.py (reportlab).
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from . import pdf, plots
from .config import Config, to_dict
from .errors import LlmftError
from .data import SPLITS
from .evaluate.report import VERDICTS, verdict
from .report_rules import (MIN_N_VERDICT, abstract, at_chance, categories, core, count, discussion, extended,
                           model_name, not_run, num, redact, benchmark_of, results, short_reason, signed, source_name,
                           span, subtasks, truth)


def report(cfg: Config) -> Path:
    records = collect(cfg)
    out = Path(cfg.paths.report)
    pages = build(records, out)
    _log(cfg, out)
    print(f"report: {pages} pages -> {out} (logged to MLflow run {records['run']['id']})")
    return out


# ----------------------------------------------------------------------------------------- collect
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlmftError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _eval_runtime(eval_dir: Path):
    """evaluate's wall-clock time: `runtime_s` in meta.json beside the table (None until evaluate writes it)."""
    path = eval_dir / "meta.json"
    return _json(path).get("runtime_s") if path.exists() else None


def _mlflow_run(cfg: Config, run_id_file: Path) -> dict:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .tracking import scrub

    run_id = run_id_file.read_text().strip()
    try:
        run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(run_id)
    except MlflowException as e:
        raise LlmftError(f"{run_id_file}: MLflow run '{run_id}' not found in {redact(cfg.tracking.uri)} "
                         f"({e.error_code}); rerun `llmft train`") from None
    started = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc)
    return {"id": run_id, "name": run.info.run_name or "unnamed", "started": started.strftime("%Y-%m-%d %H:%M UTC"),
            "params": scrub(dict(run.data.params)),
            "tags": scrub({k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")})}


def collect(cfg: Config) -> dict:
    """Everything the PDF prints, as one JSON-able dict: the run's files plus its MLflow run.

    An optional `study` key (a list of {number, state, value, params, mlflow_run_id}, with `study_direction`)
    is rendered when present: `tune` adds it.
    """
    p = cfg.paths
    need = {"data": Path(p.data) / "stats.json", "train": Path(p.train_metrics),
            "eval": Path(p.eval_dir) / "table.json", "run_id": Path(p.run_id)}
    missing = [str(path) for path in need.values() if not path.exists()]
    if missing:
        raise LlmftError("report needs the earlier stages' records; missing: " + ", ".join(missing)
                         + " (run `dvc repro`, or prepare/train/evaluate)")
    table = _json(need["eval"])
    curves = {"train": Path(p.train_plots) / "train_loss.csv", "validation": Path(p.train_plots) / "eval_loss.csv"}
    e = cfg.evaluate
    return {
        "data": _json(need["data"]),
        "train": _json(need["train"]),
        "loss": {side: plots.read_curve(path) if path.exists() else [] for side, path in curves.items()},
        "eval": {k: v for k, v in table.items() if not k.startswith("_")},  # "_..." keys: metadata, not rows
        "eval_runtime_s": _eval_runtime(Path(p.eval_dir)),
        "register": _json(Path(p.register_metrics)) if Path(p.register_metrics).exists() else None,
        "run": _mlflow_run(cfg, need["run_id"]),
        # evaluate logs no params of its own: its settings are this config's (a DVC dep of both stages)
        "evaluate": {"benchmarks": list(e.benchmarks), "judge": e.judge.model, "generation": to_dict(e.generation),
                     "bootstrap_samples": e.bootstrap_samples, "seed": e.seed},
        **_study_records(cfg),
    }


def _study_records(cfg: Config) -> dict:
    """The Optuna study's trials, when `llmft tune` has run one (its summary names the direction)."""
    from .tune import load_summary

    summary = load_summary(cfg)
    if not summary:
        return {}
    import optuna

    from .tune import trials_table

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name=cfg.tune.study, storage=cfg.tune.storage)
    except Exception:  # the storage moved or is unreachable: the report goes on without the study
        return {}
    return {"study": trials_table(study), "study_direction": summary["direction"]}


def _log(cfg: Config, out: Path) -> None:
    import mlflow

    from . import tracking

    with tracking.start_run(cfg, new=False):  # the run named in paths.run_id, as evaluate and register
        mlflow.log_artifact(str(out), artifact_path="report")


# ------------------------------------------------------------------------------------------- build
def build(records: dict, out_pdf: Path) -> int:
    """Write the PDF (atomically) from `collect`'s records; returns the page count."""
    doc = _Doc(records)
    with tempfile.TemporaryDirectory() as tmp:
        doc.tmp = Path(tmp)
        story = _front(doc)
        for n, (title, section) in enumerate(SECTIONS, 1):
            story += [pdf.p(f"{n}&nbsp;&nbsp;&nbsp;{title}", "h1"), *section(doc)]
        run = records["run"]
        return pdf.write(story, out_pdf, title=_title(records),
                         footer=f"llmft report · MLflow run {run['id']}")


class _Doc:
    """The records plus the running table / figure numbers."""

    def __init__(self, records: dict):
        self.r, self.tables, self.figures, self.tmp = records, 0, 0, None
        self.params, self.tags = records["run"]["params"], records["run"]["tags"]

    def param(self, key: str, default="not recorded") -> str:
        return redact(self.params.get(key, default))

    def table(self, caption: str, *args, **kw):
        self.tables += 1
        return pdf.table(*args, caption=f"<b>Table {self.tables}:</b> {caption}", **kw)

    def figure(self, png: Path, width_in: float, caption: str):
        self.figures += 1
        return pdf.figure(png, width_in, f"<b>Figure {self.figures}:</b> {caption}")


def _title(r: dict) -> str:
    return f"LoRA instruction fine-tuning of {model_name(r['run']['params'])}: run report"


def _front(doc: _Doc) -> list:
    r, tags = doc.r, doc.tags
    commit = tags.get("git.commit", "not recorded")
    dirty = " (uncommitted changes)" if tags.get("git.dirty") == "true" else ""
    byline = (f"MLflow run {pdf.mono(r['run']['id'])} ({pdf.esc(r['run']['name'])}) · started {r['run']['started']}"
              f"<br/>git commit {pdf.mono(commit)}{dirty}")
    return [pdf.p(pdf.esc(_title(r)), "title"), pdf.p(byline, "byline"), pdf.p("Abstract", "abstract_head"),
            pdf.p(abstract(r), "abstract")]


# ------------------------------------------------------------------------------------ 1 Dataset
def _dataset(doc: _Doc) -> list:
    d = doc.r["data"]
    prov, dropped = d.get("provenance", {}), d.get("dropped", {})
    splits = {s: d["splits"][s] for s in SPLITS if s in d["splits"]}  # stats.json's keys are sorted
    kept = sum(s["rows"] for s in splits.values())
    md5 = "".join(f"<br/>DVC md5 of {pdf.esc(k.removeprefix('dvc.md5.'))}: {pdf.mono(v)}"
                  for k, v in doc.tags.items() if k.startswith("dvc.md5."))
    where = f" ({pdf.esc(prov['path'])})" if prov.get("path") and prov["path"] != prov.get("source") else ""
    provenance = (f"source: <b>{pdf.esc(prov.get('source', 'not recorded'))}</b>{where}<br/>"
                  f"content SHA-256: {pdf.mono(prov.get('sha256', 'not recorded'))}{md5}")
    text = (f"The instruction data come from {pdf.esc(source_name(prov))}. Of {count(d.get('rows_in'))} rows read, "
            f"preprocessing dropped {count(dropped.get('empty_response', 0))} with an empty response, "
            f"{count(dropped.get('empty_instruction', 0))} with an empty instruction and "
            f"{count(dropped.get('duplicate', 0))} exact duplicates, leaving {count(kept)}. The split is stratified by "
            f"category, and rows sharing an instruction and context stay in one split, so no prompt leaks into the "
            f"test set (Table {doc.tables + 1}). Examples use the <i>{pdf.esc(d.get('template', '?'))}</i> prompt "
            f"template; Table {doc.tables + 2} gives their length in base-model tokens (prompt + completion + EOS).")
    cats = sorted({c for s in splits.values() for c in s.get("categories", {})})

    def n_of(split, cat):
        return splits[split].get("categories", {}).get(cat, 0)

    rows = [[pdf.esc(c)] + [count(n_of(s, c)) for s in splits] + [count(sum(n_of(s, c) for s in splits))] for c in cats]
    rows.append(["<b>total</b>"] + [f"<b>{count(s['rows'])}</b>" for s in splits.values()] + [f"<b>{count(kept)}</b>"])
    left = doc.table("Rows per split and category.", ["category", *splits, "total"], rows,
                     [3.1 * pdf.cm] + [1.45 * pdf.cm] * (len(splits) + 1),
                     right=set(range(1, len(splits) + 2)), total_rows=1, keep=False)
    keys = ("p50", "p90", "p99", "max", "mean")
    recorded = any(s.get("tokens") for s in splits.values())
    tok_rows = [[pdf.esc(s)] + ([count(splits[s]["tokens"].get(k)) for k in keys] if recorded else
                                ["not recorded"] + [""] * 4) for s in splits]
    right = doc.table("Tokens per example, by split.", ["split", *keys], tok_rows,
                      [1.8 * pdf.cm] + [1.05 * pdf.cm] * len(keys), right=set(range(1, 6)), keep=False)
    w = pdf.TEXT_WIDTH
    return [pdf.p(text), pdf.p(provenance, "meta"), pdf.side_by_side(left, right, widths=[w * 0.57, w * 0.43])]


# ------------------------------------------------------------------------------- 2 Implementation
def _implementation(doc: _Doc) -> list:
    P = doc.param
    total, trainable = doc.params.get("resolved.total_params"), doc.params.get("resolved.trainable_params")
    share = (f"{count(int(trainable))} of {count(int(total))} parameters ({100 * int(trainable) / int(total):.2f}%) "
             "are trained" if total and trainable else "the trainable parameter count was not recorded")
    qlora = (f"4-bit {P('train.qlora.quant_type')} weights, QLoRA with {P('train.qlora.compute_dtype')} compute"
             if P("train.qlora.enabled") == "True" else f"{P('resolved.precision')} weights")
    text = (f"The base model <b>{pdf.esc(model_name(doc.params))}</b> stays frozen ({qlora}); LoRA adapters of rank "
            f"{P('train.lora.r')} on <i>{pdf.esc(P('train.lora.target_modules'))}</i> modules are trained with TRL's "
            f"SFTTrainer, with the loss on completion tokens only (EOS appended), and {share}. Table "
            f"{doc.tables + 1} lists the settings as logged to the MLflow run.")
    steps = P("train.max_steps")
    libs = ", ".join(f"{k.removeprefix('version.')} {v}" for k, v in sorted(doc.tags.items()) if k.startswith("version."))
    items = [
        ("LoRA r / α / dropout", f"{P('train.lora.r')} / {P('train.lora.alpha')} / {P('train.lora.dropout')}"),
        ("LoRA bias / rsLoRA / DoRA",
         f"{P('train.lora.bias')} / {P('train.lora.use_rslora')} / {P('train.lora.use_dora')}"),
        ("optimizer", P("train.optim")), ("learning rate", P("train.learning_rate")),
        ("schedule / warm-up", f"{P('train.lr_scheduler')} / {P('train.warmup_ratio')}"),
        ("weight decay / grad. clip", f"{P('train.weight_decay')} / {P('train.max_grad_norm')}"),
        ("batch × grad. accumulation", f"{P('train.batch_size')} × {P('train.grad_accum')} per device"),
        ("epochs / max steps", f"{P('train.epochs')} / {steps if steps != '-1' else 'none'}"),
        ("max length / packing", f"{P('train.max_length')} / {P('train.packing')}"),
        ("precision / grad. checkpointing", f"{P('resolved.precision')} / {P('train.gradient_checkpointing')}"),
        ("attention", P("train.attn_implementation")), ("seed", P("train.seed")),
        ("template / system prompt",
         f"{P('data.template')} / {'set' if doc.params.get('data.system_prompt') else 'none'}"),
        ("train / validation rows used", f"{P('resolved.train_rows')} / {P('resolved.eval_rows')}"),
    ]
    half = (len(items) + 1) // 2
    pairs = [list(items[i]) + (list(items[i + half]) if i + half < len(items) else ["", ""]) for i in range(half)]
    rows = [[pdf.esc(a), pdf.esc(b), pdf.esc(c), pdf.esc(d)] for a, b, c, d in pairs]
    rows.append(["libraries", f"python {pdf.esc(doc.tags.get('python', '?'))}, {pdf.esc(libs) or 'not recorded'}",
                 "", ""])
    w = pdf.TEXT_WIDTH
    t = doc.table("Training configuration (MLflow params of the run).", ["setting", "value", "setting", "value"], rows,
                  [w * 0.25] * 4, extra=[("SPAN", (1, -1), (3, -1))])  # the library list: one long cell
    return [pdf.p(text), t]


# ----------------------------------------------------------------------------------- 3 Evaluation
def _evaluation(doc: _Doc) -> list:
    r, e = doc.r, doc.r["evaluate"]
    g = e["generation"]
    decoding = ("greedy decoding" if not g.get("temperature") else
                f"sampling at temperature {g['temperature']}, top-p {g.get('top_p')}")
    if g.get("kv_cache") == "fp8":  # answers part from the model-dtype cache's sooner: the reader should know
        decoding += ", keys and values cached in fp8"
    judges = sorted({row["judge"] for row in r["eval"].values() if row.get("judge")})
    judge = (f"Judged metrics use <b>{pdf.esc(', '.join(judges))}</b> as the judge." if judges else
             "No judge was configured, so no judged benchmark ran." if not e["judge"] else
             f"The configured judge {pdf.esc(e['judge'])} produced no result.")
    text = (f"Configured benchmarks: {pdf.esc(', '.join(e['benchmarks']))}. Base and tuned model answer the same "
            f"examples with the same settings ({decoding}, at most {g.get('max_new_tokens')} new tokens). {judge} Each "
            f"metric's 95% confidence interval comes from a paired bootstrap ({count(e['bootstrap_samples'])} "
            f"resamples of the examples, seed {e['seed']}), which keeps each example's base and tuned score together; "
            f"a verdict needs the interval of the difference to exclude 0 and at least {MIN_N_VERDICT} examples. "
            f"Table {doc.tables + 1} lists the metrics computed"
            + (f"; Table {doc.tables + 2}, the benchmarks that produced none, with the reason." if not_run(r) else "."))
    groups: dict[str, list] = {}
    for n, row in results(r):
        groups.setdefault(benchmark_of(n), []).append((n, row))
    rows = []
    for bench, metrics in groups.items():
        ns = sorted({row["n"] for _, row in metrics})
        what = "; ".join(f"<i>{pdf.esc(n)}</i>" + (f": {pdf.esc(row['description'])}" if row.get("description") else "")
                         for n, row in metrics)
        judge = ", ".join(sorted({row["judge"] for _, row in metrics if row.get("judge")})) or "–"
        n_range = count(ns[0]) if len(ns) == 1 else f"{count(ns[0])}–{count(ns[-1])}"
        rows.append([pdf.esc(bench), what, n_range, pdf.esc(judge)])
    w = pdf.TEXT_WIDTH
    out = [pdf.p(text), doc.table("Benchmarks that ran and the metrics they produced (per-category rows: Figure 2).",
                                  ["benchmark", "metrics: what each measures", "n", "judge"], rows,
                                  [w * 0.15, w * 0.6, w * 0.09, w * 0.16], right={2})]
    notes = not_run(r)
    if notes:
        out.append(doc.table("Benchmarks that did not produce a result, and why (the full text: table.json in "
                             "paths.eval_dir, and the run's eval.&lt;benchmark&gt;.status tag in MLflow).",
                             ["benchmark", "status", "reason"],
                             [[pdf.esc(n), pdf.esc(row["status"]), pdf.esc(short_reason(row))]
                              for n, row in notes], [w * 0.22, w * 0.1, w * 0.68]))
    return out


# ------------------------------------------------------------------------------------- 4 Hardware
def _runtime(s) -> str:
    if s is None:
        return "not recorded"
    m, sec = divmod(float(s), 60)
    return f"{float(s):,.1f} s" + (f" ({int(m // 60)} h {int(m % 60):02d} min)" if m >= 60 else
                                    f" ({int(m)} min {sec:02.0f} s)" if m else "")


def _hardware(doc: _Doc) -> list:
    t, tags, reg = doc.r["train"], doc.tags, doc.r["register"] or {}
    gpu = tags.get("gpu", "not recorded")
    gpu_text = {"none": "none (CPU only)", "not recorded": gpu}.get(
        gpu, f"{tags.get('gpu_count', '1')} × {gpu}, {tags.get('gpu_mem_gb', '?')} GB each (CUDA {tags.get('cuda', '?')})")
    peak = ", ".join(f"{label} {t[k]} GiB" for k, label in (("peak_rss_gib", "RAM"), ("peak_gpu_gib", "GPU")) if k in t)
    hw = [("CPU", f"{tags.get('cpu', 'not recorded')}, {tags.get('cpu_count', '?')} cores"),
          ("memory", f"{tags['ram_gb']} GB" if "ram_gb" in tags else "not recorded"), ("GPU", gpu_text),
          ("platform", tags.get("platform", "not recorded")), ("peak in training", peak or "not recorded")]
    stages = [("prepare", doc.r["data"].get("runtime_s")), ("train", t.get("runtime_s")),
              ("evaluate", doc.r["eval_runtime_s"]), ("register", reg.get("runtime_s"))]
    w = pdf.TEXT_WIDTH
    text = (f"Training ran on the machine of Table {doc.tables + 1} (the MLflow run's environment tags). It saw "
            f"{count(t.get('tokens_seen'))} tokens at {num(t.get('tokens_per_s'))} tokens/s overall and "
            f"{num(t.get('steady_tokens_per_s'))} tokens/s in steady optimizer steps (without validation, checkpoint "
            f"saves and the first steps' warm-up). Table {doc.tables + 2} gives each stage's wall-clock time as its "
            "own record states it.")
    left = doc.table("Hardware.", None, [[pdf.esc(k), pdf.esc(v)] for k, v in hw],
                     [2.5 * pdf.cm, w * 0.6 - 2.5 * pdf.cm], keep=False)
    right = doc.table("Runtime per stage.", ["stage", "runtime"], [[s, _runtime(rt)] for s, rt in stages],
                      [1.7 * pdf.cm, w * 0.37 - 1.7 * pdf.cm], keep=False)
    return [pdf.p(text), pdf.side_by_side(left, right, widths=[w * 0.63, w * 0.37])]


# -------------------------------------------------------------------------------------- 5 Results
def _results(doc: _Doc) -> list:
    r = doc.r
    w = pdf.TEXT_WIDTH
    colour = {"better": plots.VERDICT_COLORS["better"], "worse": plots.VERDICT_COLORS["worse"]}
    rows = []
    for name, row in core(r):
        v = verdict(row)
        text = pdf.esc(VERDICTS[v])
        rows.append([pdf.esc(name), "↑" if row["higher_is_better"] else "↓", num(row["base"]), num(row["tuned"]),
                     signed(row["delta"]), span(row.get("ci95")), count(row["n"]),
                     f'<font color="{colour[v]}">{text}</font>' if v in colour else text])
    more = " except lm-eval's (Section 5.1)" if extended(r) else ""
    out = [pdf.p(f"Table {doc.tables + 1} compares base and tuned model on every metric{more} (Δ = tuned − base; ↑: "
                 "higher is better). " + _registry(r["register"]))]
    out.append(doc.table("Base vs tuned with the paired-bootstrap 95% CI of the difference.",
                         ["metric", "", "base", "tuned", "Δ", "95% CI of Δ", "n", "verdict"], rows,
                         [w * 0.26, w * 0.03, w * 0.09, w * 0.09, w * 0.1, w * 0.17, w * 0.05, w * 0.21],
                         right={2, 3, 4, 5, 6}))
    loss = r["loss"]
    if loss["train"] or loss["validation"]:
        png = plots.report_loss(loss["train"], loss["validation"], doc.tmp / "loss.png")
        last = f"{num(loss['train'][-1][1])} (train)" if loss["train"] else ""
        out.append(doc.figure(png, 4.6, "Loss on completion tokens per optimizer step: training batches and the "
                              f"validation split. Final: {last}"
                              + (f", {num(loss['validation'][-1][1])} (validation)." if loss["validation"] else ".")))
    panels = {m: [{"label": c, "delta": row["delta"], "lo": (row.get("ci95") or [None, None])[0],
                   "hi": (row.get("ci95") or [None, None])[1], "verdict": verdict(row)} for c, row in cats]
              for m, cats in categories(r).items() if len(cats) >= 2 and benchmark_of(m) != "lm_eval"}
    if panels:
        png = plots.category_deltas(panels, doc.tmp / "categories.png")
        out.append(doc.figure(png, 6.7, "Tuned − base per category with 95% CIs (green: tuned better, red: worse, "
                              f"grey: the CI contains 0, hollow: n &lt; {MIN_N_VERDICT})."))
    if extended(r):
        out += _extended(doc)
    if r.get("study"):
        out += _study(doc)
    return out


def _extended(doc: _Doc) -> list:
    """lm-eval's tasks, each on its own test set: scores, chance level, the paired CI, and how many subtasks moved."""
    r, w = doc.r, pdf.TEXT_WIDTH
    cats = categories(r)
    colour = {"better": plots.VERDICT_COLORS["better"], "worse": plots.VERDICT_COLORS["worse"]}
    rows = []
    for name, row in extended(r):
        v, subs = verdict(row), subtasks(cats.get(name, []))
        moved = (f"{sum(verdict(x) == 'worse' for _, x in subs)} / {sum(verdict(x) == 'better' for _, x in subs)} "
                 f"of {len(subs)}" if subs else "–")
        chance = num(row.get("chance")) + ("*" if at_chance(row) else "") if row.get("chance") is not None else "–"
        text = pdf.esc(VERDICTS[v])
        rows.append([pdf.esc(name.removeprefix("lm_eval_")), count(row.get("fewshot")) if row.get("fewshot")
                     is not None else "default", count(row["n"]), chance, num(row["base"]), num(row["tuned"]),
                     signed(row["delta"]), span(row.get("ci95")), moved,
                     f'<font color="{colour[v]}">{text}</font>' if v in colour else text])
    data = sorted({str(row.get("data", "hub")) for _, row in extended(r)})
    out = [pdf.p("5.1&nbsp;&nbsp;&nbsp;Extended evaluation", "h2"),
           pdf.p(f"Table {doc.tables + 1} runs lm-eval's own task definitions (prompts, few-shot examples, filters and "
                 f"metrics; data: {pdf.esc(', '.join(data))}) on base and tuned model. Base and tuned are lm-eval's own "
                 "numbers (a group such as MMLU aggregated as lm-eval aggregates it); the CI of Δ is a paired bootstrap "
                 "over documents, stratified by subtask. Chance is a uniform guess over the choices (TruthfulQA MC2: "
                 "the true answers' share), or a constant answer's score for generated answers (the most common "
                 "reference); * marks a score "
                 "whose CI reaches it. Each row's exact lm-eval command is in table.json. " + _truth(r))]
    out.append(doc.table("lm-eval tasks, base vs tuned (subtasks: significantly worse / better of all).",
                         ["task / metric", "shots", "n", "chance", "base", "tuned", "Δ", "95% CI of Δ", "subtasks",
                          "verdict"], rows,
                         [w * 0.20, w * 0.065, w * 0.055, w * 0.075, w * 0.07, w * 0.07, w * 0.09, w * 0.16,
                          w * 0.08, w * 0.135], right={1, 2, 3, 4, 5, 6, 7}))
    panel = [{"label": n.removeprefix("lm_eval_"), "delta": row["delta"], "lo": row["ci95"][0], "hi": row["ci95"][1],
              "verdict": verdict(row)} for n, row in extended(r)]
    png = plots.category_deltas({"lm-eval tasks": panel}, doc.tmp / "extended.png", cols=1)
    out.append(doc.figure(png, 5.2, "Tuned − base on each lm-eval task with its 95% CI (green: tuned better, red: "
                          "worse, grey: the CI contains 0)."))
    return out


def _truth(r: dict) -> str:
    rows, checked, worst = truth(r)
    if not checked:
        return "These commands were not run here (evaluate.lm_eval_truth)."
    some = "all" if checked == rows else f"{checked} of"
    return (f"Run through lm-eval's own CLI, the base numbers of {some} {rows} rows (subtasks included) agree with "
            f"what it prints {'exactly' if worst == 0 else f'to within {worst:.1e}'}.")


def _registry(reg: dict | None) -> str:
    if not reg:
        return "The model was not registered (no register record)."
    champ = (f" against champion v{reg['champion_version']} ({num(reg.get('champion'))})"
             if reg.get("champion_version") else "")
    return (f"Registered as {pdf.esc(reg['model_name'])} v{reg['version']}: "
            f"{'promoted to' if reg['promoted'] else 'not given'} the alias @{pdf.esc(reg['alias'])} "
            f"({pdf.esc(reg['reason'].replace('_', ' '))}; {pdf.esc(reg['metric'])} {reg['direction']}d, candidate "
            f"{num(reg.get('candidate'))}{champ}).")


def _study(doc: _Doc) -> list:
    trials, direction = doc.r["study"], doc.r.get("study_direction", "minimize")
    done = sorted((t for t in trials if t.get("state") == "COMPLETE" and t.get("value") is not None),
                  key=lambda t: t["value"], reverse=direction == "maximize")
    rows = [[f"#{t['number']}", num(t["value"]), pdf.esc(", ".join(f"{k}={v}" for k, v in sorted(t["params"].items()))),
             pdf.mono((t.get("mlflow_run_id") or "–")[:12])] for t in done[:5]]
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(Counter(t.get("state", "?") for t in trials).items()))
    w = pdf.TEXT_WIDTH
    return [pdf.p(f"The Optuna study ran {len(trials)} trials ({states}); Table {doc.tables + 1} lists the best "
                  f"{len(rows)} ({'lowest' if direction == 'minimize' else 'highest'} value first)."),
            doc.table("Best trials of the hyper-parameter study.", ["trial", "value", "params", "MLflow run"], rows,
                      [w * 0.08, w * 0.12, w * 0.6, w * 0.2], right={1})]


# ----------------------------------------------------------------------------------- 6 Discussion
def _discussion(doc: _Doc) -> list:
    return [pdf.p(f"<b>{title}.</b> " + " ".join(sentences)) for title, sentences in discussion(doc.r)]


SECTIONS = (("Dataset", _dataset), ("Implementation", _implementation), ("Evaluation", _evaluation),
            ("Hardware", _hardware), ("Results", _results), ("Discussion", _discussion))
