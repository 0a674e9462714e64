"""Every matplotlib figure: loss curves (CSV for `dvc plots`, PNG for humans) and the report's figures.

The report's figures are drawn at their printed size (inches) in the report's serif font, so 8 pt here
is 8 pt on the page; they are embedded at 300 dpi.
"""
from __future__ import annotations

import csv
import math
from contextlib import contextmanager
from pathlib import Path

from .io import atomic_path

# verdict key (evaluate.report.verdict) -> colour: green better, red worse, grey inconclusive
VERDICT_COLORS = {"better": "#1b7837", "worse": "#b2182b", "ns": "#555555", "few": "#aaaaaa", "none": "#aaaaaa"}


def _write_csv(path: Path, points: list[tuple[int, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows(points)


def read_curve(path: Path) -> list[tuple[int, float]]:
    """The (step, loss) points of a CSV written by loss_curves."""
    with Path(path).open(newline="") as f:
        return [(int(float(r["step"])), float(r["loss"])) for r in csv.DictReader(f)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int | None = None) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        # No Software/date metadata: the same records give the same bytes (and the same PDF).
        fig.savefig(tmp, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return path


def _draw_loss(ax, train, val, marker_size: float = 6) -> None:
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", color="tab:orange", marker="o", markersize=marker_size)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 2.5
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.grid(alpha=0.3)
    ax.legend()


def loss_curves(train: list[tuple[int, float]], val: list[tuple[int, float]], out_dir: Path) -> Path:
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "train_loss.csv", train)
    _write_csv(out_dir / "eval_loss.csv", val)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    _draw_loss(ax, train, val)
    ax.set_title("Training and validation loss")
    fig.tight_layout()
    return _save(fig, out_dir / "loss.png")


# ------------------------------------------------------------------------------------------ report
@contextmanager
def paper_style():
    """Small serif type (STIX, Times-like, as the report's body text), thin lines, no chart junk."""
    plt = _pyplot()
    with plt.rc_context({"font.family": "STIXGeneral", "mathtext.fontset": "stix", "font.size": 8,
                         "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
                         "legend.fontsize": 7, "legend.frameon": False, "axes.linewidth": 0.6,
                         "lines.linewidth": 1.1, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
                         "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "llmft"}):
        yield plt


def report_loss(train, val, path: Path, width: float = 4.6, height: float = 2.1) -> Path:
    """The loss curves of train's loss.png at print size, with the best validation point marked."""
    with paper_style() as plt:
        fig, ax = plt.subplots(figsize=(width, height))
        _draw_loss(ax, train, val, marker_size=3)
        if val:
            step, best = min(val, key=lambda p: p[1])
            ax.annotate(f"best {best:.4g}", (step, best), xytext=(0, -11), textcoords="offset points",
                        ha="center", fontsize=6.5, color="tab:orange")
        fig.tight_layout(pad=0.3)
        return _save(fig, path, dpi=300)


def category_deltas(panels: dict[str, list[dict]], path: Path, width: float = 6.7, cols: int = 2) -> Path:
    """Forest plot, one panel per metric: tuned − base per category with its 95% CI, coloured by verdict.

    panels: metric -> [{label, delta, lo, hi, verdict}] (verdict a key of VERDICT_COLORS). One axis per metric
    because the metrics' scales differ by orders of magnitude.
    """
    names = list(panels)
    cols = min(cols, len(names))
    nrows = math.ceil(len(names) / cols)
    tallest = [max(len(panels[n]) for n in names[r * cols:(r + 1) * cols]) for r in range(nrows)]
    with paper_style() as plt:
        fig, axes = plt.subplots(nrows, cols, figsize=(width, sum(0.16 * t + 0.55 for t in tallest)),
                                 squeeze=False, gridspec_kw={"height_ratios": [t + 3.5 for t in tallest]})
        for ax, name in zip(axes.flat, names):
            rows = panels[name]
            ys = range(len(rows))[::-1]
            for y, r in zip(ys, rows):
                c = VERDICT_COLORS[r["verdict"]]
                if r["delta"] is None:
                    continue
                lo, hi = r["lo"] if r["lo"] is not None else r["delta"], r["hi"] if r["hi"] is not None else r["delta"]
                ax.errorbar([r["delta"]], [y], xerr=[[r["delta"] - lo], [hi - r["delta"]]], fmt="o", color=c,
                            markersize=3, capsize=2, elinewidth=0.9, mfc="white" if r["verdict"] == "few" else c)
            ax.axvline(0, color="black", lw=0.6)
            ax.set_yticks(list(ys), [r["label"] for r in rows])
            ax.set_ylim(-0.7, len(rows) - 0.3)
            ax.set_title(name, loc="left")
            ax.grid(axis="x", alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        for ax in axes[-1]:
            if ax.has_data():
                ax.set_xlabel("tuned − base")
        fig.tight_layout(pad=0.3, h_pad=0.6, w_pad=1.2)
        return _save(fig, path, dpi=300)
