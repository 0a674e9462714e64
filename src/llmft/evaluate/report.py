"""The results table as JSON (DVC metrics), markdown and PNG charts, and its logging to the MLflow run."""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..io import atomic_path


# below this many paired examples a bootstrap CI says little (n = 1 gives a zero-width interval)
MIN_N_VERDICT = 5


def outputs_dir(cfg) -> Path:
    """Generated answers and judgments, in the formats alpaca_eval and FastChat read."""
    return Path(cfg.paths.eval_dir) / "outputs"


def is_result(row: dict) -> bool:
    return "status" not in row


def fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


VERDICTS = {"better": "tuned better", "worse": "base better", "ns": "no significant difference",
            "few": f"too few examples (n < {MIN_N_VERDICT})", "none": "no estimate"}


def verdict(r: dict) -> str:
    """A key of VERDICTS for one result row. One rule for the markdown table and the PDF report: a side wins
    only when the 95% CI of the delta excludes 0, and only on at least MIN_N_VERDICT paired examples."""
    if r.get("delta") is None or None in (r.get("ci95") or [None]):  # NaN in the table is written as null
        return "none"
    if r["n"] < MIN_N_VERDICT:
        return "few"
    lo, hi = r["ci95"]
    if lo <= 0 <= hi:
        return "ns"
    d = r.get("delta_paired", r["delta"])  # the delta the CI is of (judged rows: the examples both sides have)
    better = d > 0 if r["higher_is_better"] else d < 0
    return "better" if better else "worse"


def markdown(table: dict, header: str = "", footer: list[str] = ()) -> str:
    lines = [header, "", "| metric | base | tuned | delta | 95% CI of delta | n | verdict |",
             "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        if not is_result(r):
            continue
        lo, hi = r.get("ci95") or (None, None)
        lines.append(f"| {name} | {fmt(r['base'])} | {fmt(r['tuned'])} | {fmt(r['delta'])} | "
                     f"[{fmt(lo)}, {fmt(hi)}] | {r['n']} | {VERDICTS[verdict(r)]} |")
    notes = [(n, r) for n, r in table.items() if not is_result(r)]
    if notes:
        lines += ["", "| benchmark | status | reason |", "|---|---|---|"]
        lines += [f"| {n} | {r['status']} | {r['reason'].replace('|', '/')} |" for n, r in notes]
    failures = [(n, r["parse_failures"]) for n, r in table.items() if is_result(r) and "parse_failures" in r]
    if failures:
        lines += ["", "Judge parse failures: " + "; ".join(f"{n}: {f}" for n, f in failures)]
    spread = [(n, r["repeats"]) for n, r in table.items() if is_result(r) and "repeats" in r and "/" not in n]
    if spread:
        lines += ["", "Judge repeats (base / tuned are medians): " + "; ".join(
            f"{n}: {s['n']} repeats, base {fmt(s['base']['min'])}–{fmt(s['base']['max'])}, tuned "
            f"{fmt(s['tuned']['min'])}–{fmt(s['tuned']['max'])}" for n, s in spread)]
    for line in footer:
        lines += ["", line]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def plots(table: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    top = [(n, r) for n, r in table.items() if is_result(r) and "/" not in n
           and all(isinstance(r[k], (int, float)) for k in ("base", "tuned", "delta"))]
    if top:
        cols = min(4, len(top))
        nrows = math.ceil(len(top) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), dpi=110, squeeze=False)
        for ax, (name, r) in zip(axes.flat, top):
            vals = [r["base"], r["tuned"]]
            # clamped: a median over judge repeats may sit just outside the pooled CI
            err = [[max(0.0, v - ci[0]) for v, ci in zip(vals, (r["ci95_base"], r["ci95_tuned"]))],
                   [max(0.0, ci[1] - v) for v, ci in zip(vals, (r["ci95_base"], r["ci95_tuned"]))]]
            ax.bar(["base", "tuned"], vals, yerr=err, capsize=4, color=["tab:gray", "tab:blue"])
            arrow = "↑" if r["higher_is_better"] else "↓"
            ax.set_title(f"{name} {arrow}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        for ax in list(axes.flat)[len(top):]:
            ax.axis("off")
        fig.suptitle("Base vs tuned (bootstrap 95% CI)", fontsize=10)
        fig.tight_layout()
        made.append(_save(fig, out_dir / "base_vs_tuned.png"))

        # one axis per metric, centred on 0: the metrics' scales differ by orders of magnitude
        fig, axes = plt.subplots(len(top), 1, figsize=(7, 0.55 * len(top) + 0.8), dpi=110, squeeze=False)
        for ax, (name, r) in zip(axes[:, 0], top):
            lo, hi = r["ci95"]
            # the CI is of the paired delta (judged rows: the examples both sides have), so that is the point
            d = r.get("delta_paired", r["delta"])
            good = (d > 0) == r["higher_is_better"]
            color = "tab:gray" if lo <= 0 <= hi else ("tab:green" if good else "tab:red")
            ax.errorbar([d], [0], xerr=[[max(0.0, d - lo)], [max(0.0, hi - d)]], fmt="o", color=color, capsize=3)
            ax.axvline(0, color="black", lw=0.8)
            span = max(abs(lo), abs(hi), abs(d)) * 1.3 or 1.0
            ax.set_xlim(-span, span)
            ax.set_yticks([0], [name], fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        axes[0, 0].set_title("tuned − base, 95% CI (green: better, red: worse, gray: spans 0)", fontsize=9)
        fig.tight_layout()
        made.append(_save(fig, out_dir / "deltas.png"))

    cats = [(n.split("/", 1)[1], r) for n, r in table.items()
            if n.startswith("mt_bench_score/") and not n.split("/", 1)[1].startswith("turn_")]
    if len(cats) >= 3:
        import numpy as np

        angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False).tolist()
        fig = plt.figure(figsize=(5, 5), dpi=110)
        ax = fig.add_subplot(polar=True)
        for side, color in (("base", "tab:gray"), ("tuned", "tab:blue")):
            vals = [r[side] for _, r in cats]
            ax.plot(angles + angles[:1], vals + vals[:1], color=color, label=side)
            ax.fill(angles + angles[:1], vals + vals[:1], color=color, alpha=0.15)
        ax.set_xticks(angles, [c for c, _ in cats])
        ax.set_ylim(0, 10)
        ax.set_title("MT-Bench score by category")
        ax.legend(loc="lower right", bbox_to_anchor=(1.15, -0.05))
        fig.tight_layout()
        made.append(_save(fig, out_dir / "mt_bench_radar.png"))
    return made


# ------------------------------------------------------------------------------------------ MLflow
def _key(text: str) -> str:
    """MLflow keys allow alphanumerics, `_ - . / space`."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def log_mlflow(cfg, table: dict, artifacts: list[Path]) -> bool:
    """Summary metrics eval/<metric>.{base,tuned,delta,ci95_lo,ci95_hi} for the top-level rows only (the run's
    metrics tab stays readable); per-category rows, skip reasons and files go in as artifacts under eval/
    (table_rows.json is the whole table, sortable in the UI)."""
    from .. import tracking

    if not Path(cfg.paths.run_id).exists():
        print(f"evaluate: {cfg.paths.run_id} not found (no `llmft train` run to log into): MLflow logging skipped")
        return False
    import mlflow

    metrics, tags = {}, {}
    for name, r in table.items():
        if not is_result(r):
            tags[_key(f"eval.{name}.status")] = f"{r['status']}: {r['reason']}"[:4000]
            continue
        if "/" in name:
            continue
        vals = {"base": r["base"], "tuned": r["tuned"], "delta": r["delta"], "ci95_lo": r["ci95"][0],
                "ci95_hi": r["ci95"][1]}  # n and the per-category rows: the logged table
        # "eval/..." : the MLflow UI groups a prefix before "/" into its own section of charts
        metrics.update({_key(f"eval/{name}.{k}"): float(v) for k, v in vals.items()
                        if v is not None and math.isfinite(float(v))})
    with tracking.start_run(cfg, new=False):
        mlflow.log_metrics(metrics)
        if tags:
            mlflow.set_tags(tags)
        mlflow.log_table(_table_frame(table), artifact_file="eval/table_rows.json")
        for path in artifacts:
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=f"eval/{Path(path).name}")
            elif Path(path).exists():
                mlflow.log_artifact(str(path), artifact_path="eval")
    return True


def _table_frame(table: dict):
    """Every row (categories included) as one table, which the MLflow UI shows sortable under Artifacts."""
    import pandas as pd

    rows = []
    for name, r in table.items():
        if is_result(r):
            rows.append({"metric": name, "base": r["base"], "tuned": r["tuned"], "delta": r["delta"],
                         "ci95_lo": r["ci95"][0], "ci95_hi": r["ci95"][1], "n": r["n"],
                         "higher_is_better": r["higher_is_better"], "status": "ok", "reason": ""})
        else:
            rows.append({"metric": name, "status": r["status"], "reason": r["reason"]})
    return pd.DataFrame(rows)
