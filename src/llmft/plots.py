"""Plots people would rather look at than read: loss curves (CSV for `dvc plots`, PNG for humans)."""
from __future__ import annotations

import csv
import os
from pathlib import Path


def _write_csv(path: Path, points: list[tuple[int, float]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows(points)
    os.replace(tmp, path)


def loss_curves(train: list[tuple[int, float]], val: list[tuple[int, float]], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "train_loss.csv", train)
    _write_csv(out_dir / "eval_loss.csv", val)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", color="tab:orange", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out_dir / "loss.png"
    tmp = out_dir / ".loss.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return png
