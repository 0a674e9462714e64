"""Do the speed switches change the math? Training and validation loss of runs against a reference run.

    python benchmarks/bench.py loss        # the runs (real SmolLM2 weights) and then this comparison
    python benchmarks/loss_equivalence.py --runs DIR --ref ref --names bf16 fp8 --out DIR

Each run's curves are its `train` stage's CSVs, RUNS/NAME/{train,eval}_loss.csv (`bench.py loss` points each run's
paths.train_plots there).
For every name, at the steps both runs logged: the largest and the mean relative difference |run - ref| / ref,
for training loss (per logged step) and validation loss (per evaluation), and the final values. Writes
DIR/loss_equivalence.json and DIR/loss_equivalence.png (curves above, relative difference in % below).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

TOLERANCE = 0.01  # the bar for a switch that claims the same math: curves within 1 % of the reference's


def read(path: Path) -> dict[int, float]:
    with path.open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def compare(ref: dict[int, float], run: dict[int, float]) -> dict:
    steps = sorted(set(ref) & set(run))
    if not steps:
        return {"steps": 0}
    rel = [abs(run[s] - ref[s]) / abs(ref[s]) for s in steps]
    worst = max(range(len(steps)), key=rel.__getitem__)
    return {"steps": len(steps), "max_rel": round(rel[worst], 5), "at_step": steps[worst],
            "mean_rel": round(sum(rel) / len(rel), 5), "final_ref": round(ref[steps[-1]], 4),
            "final_run": round(run[steps[-1]], 4), "within_1pct": rel[worst] <= TOLERANCE}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="folder holding one folder of CSVs per run")
    ap.add_argument("--ref", required=True, help="the reference run's name")
    ap.add_argument("--names", nargs="+", required=True, help="runs to compare with it")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for name in [args.ref, *args.names]:
        try:
            curves[name] = {kind: read(runs / name / f"{kind}_loss.csv") for kind in ("train", "eval")}
        except FileNotFoundError as e:
            raise SystemExit(f"loss_equivalence: run {name!r} has no curve: {e.filename} (did its train stage finish?)")
    res = {"ref": args.ref, "tolerance": TOLERANCE,
           "runs": {n: {k: compare(curves[args.ref][k], curves[n][k]) for k in ("train", "eval")} for n in args.names}}
    (out / "loss_equivalence.json").write_text(json.dumps(res, indent=1) + "\n")
    for n, r in res["runs"].items():
        said = [f"{kind} max {r[kind]['max_rel']:.2%} (mean {r[kind]['mean_rel']:.2%}, {r[kind]['steps']} points)"
                if r[kind]["steps"] else f"no {kind} curve" for kind in ("train", "eval")]
        print(f"RESULT {n} vs {args.ref}: " + ", ".join(said), flush=True)
    plot(curves, args.ref, args.names, out / "loss_equivalence.png")


def plot(curves, ref, names, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("train", "eval") if curves[ref][k]]
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 6), sharex="col", squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for col, kind in enumerate(kinds):
        top, bottom = axes[0][col], axes[1][col]
        for name in [ref, *names]:
            pts = sorted(curves[name][kind].items())
            top.plot([s for s, _ in pts], [v for _, v in pts], label=name, lw=2.2 if name == ref else 1.1,
                     color="black" if name == ref else None, marker="o" if kind == "eval" else None, ms=3)
            if name != ref:
                base = curves[ref][kind]
                steps = sorted(set(base) & set(curves[name][kind]))
                bottom.plot(steps, [100 * (curves[name][kind][s] - base[s]) / base[s] for s in steps], label=name)
        top.set_title(f"{'training' if kind == 'train' else 'validation'} loss")
        top.legend(fontsize=8)
        for y in (-100 * TOLERANCE, 100 * TOLERANCE):
            bottom.axhline(y, color="grey", ls="--", lw=0.8)
        bottom.axhline(0, color="black", lw=0.6)
        bottom.set_ylabel(f"% vs {ref}")
        bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
