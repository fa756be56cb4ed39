"""The tables of docs/results.md's "Iterative pruning and replicates" from the replicate sets that
scripts/science_imp.sh wrote (their summary.csv, written by its `report` part):

    python scripts/science_imp_summary.py ROOT

Prints, in markdown: the dense networks (mean ± std), one-shot against iterative per level and
rewind point (mean ± std over the replicates, the difference in units of the larger std), down to
which share of weights each matches the dense network (mean within 1 point), the controls, and
full against weights rewinding at 1ep.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

TOLERANCE = 0.01


def load(root: Path, name: str) -> tuple[dict, dict]:
    """(summary rows by (mask id, rewind, control), dense mean/std/n) of the experiment ``name``."""
    replicate_set = Path(json.loads((root / f"{name}.replicates.json").read_text())["replicate_set"])
    with open(replicate_set / "summary.csv") as f:
        rows = {(r["mask_id"], r["rewind"], r["control"]): r for r in csv.DictReader(f)}
    dense = [json.loads((Path(w) / "dense" / "result.json").read_text())["val_accuracy"]
             for w in json.loads((replicate_set / "replicates.json").read_text())["workdirs"]]
    return rows, {"mean": statistics.fmean(dense), "std": statistics.stdev(dense), "n": len(dense), "values": dense}


def cell(row: dict | None) -> str:
    if not row or not row["mean_val_accuracy"]:
        return "–"
    std = f"{100 * float(row['std_val_accuracy']):.2f}" if row["std_val_accuracy"] else "–"
    return f"{100 * float(row['mean_val_accuracy']):.2f} ± {std} ({row['n']})"


def sparsest_match(rows: dict, rewind: str, dense: float) -> tuple[float | None, int]:
    """The fewest weights left (share) among levels whose mean matches, and how many levels match."""
    good = [float(r["remaining"]) for (m, rw, c), r in rows.items()
            if rw == rewind and not c and r["mean_val_accuracy"] and float(r["mean_val_accuracy"]) >= dense - TOLERANCE]
    return (min(good) if good else None), len(good)


def main(root: Path) -> None:
    one, dense_one = load(root, "one_shot")
    imp, dense_imp = load(root, "iterative")
    weights, dense_w = load(root, "weights")
    for name, d in (("one-shot", dense_one), ("iterative", dense_imp), ("weights rewinding", dense_w)):
        print(f"- dense network ({name} experiment): {100 * d['mean']:.2f} ± {100 * d['std']:.2f}% (n = {d['n']})")
    print()
    masks = sorted({m for m, _, c in one if not c}, key=lambda m: float(m[2:]))
    print("| level | left (one-shot / iterative) | one-shot 0it | iterative 0it | diff / std | one-shot 1ep | iterative 1ep | diff / std |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, m in enumerate(masks, 1):
        cells = []
        for rewind in ("0it", "1ep"):
            a, b = one.get((m, rewind, "")), imp.get((m, rewind, ""))
            cells += [cell(a), cell(b), _effect(a, b)]
        left = f"{100 * float(one[(m, '0it', '')]['remaining']):.1f}% / {100 * float(imp[(m, '0it', '')]['remaining']):.1f}%"
        print(f"| {k} | {left} | " + " | ".join(cells) + " |")
    print()
    for name, rows, dense in (("one-shot", one, dense_one), ("iterative", imp, dense_imp)):
        for rewind in ("0it", "1ep"):
            left, count = sparsest_match(rows, rewind, dense["mean"])
            where = f"down to {100 * left:.1f}% of the weights" if left is not None else "at no level"
            print(f"- {name}, rewind {rewind}: {count} of {len(masks)} levels match the dense network (mean within 1 point), {where}")
    print()
    print("| control | level | left | one-shot 0it | iterative 0it | one-shot 1ep | iterative 1ep |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for control in ("random_reinit", "random_prune"):
        for m in sorted({m for m, _, c in one if c == control}, key=lambda m: float(m[2:])):
            cells = [cell(rows.get((m, r, control))) for r in ("0it", "1ep") for rows in (one, imp)]
            print(f"| {control} | {masks.index(m) + 1} | {100 * float(one[(m, '0it', control)]['remaining']):.1f}% | "
                  + " | ".join(cells) + " |")
    print()
    print("| level | left | full 1ep | weights 1ep | diff / std |")
    print("|---:|---:|---:|---:|---:|")
    for k, m in enumerate(masks, 1):
        a, b = one.get((m, "1ep", "")), weights.get((m, "1ep", ""))
        print(f"| {k} | {100 * float(a['remaining']):.1f}% | {cell(a)} | {cell(b)} | {_effect(a, b)} |")


def _effect(a: dict | None, b: dict | None) -> str:
    """b's mean minus a's, in points, and in units of the larger of their standard deviations."""
    if not a or not b or not a["mean_val_accuracy"] or not b["mean_val_accuracy"]:
        return "–"
    diff = 100 * (float(b["mean_val_accuracy"]) - float(a["mean_val_accuracy"]))
    spread = 100 * max(float(a["std_val_accuracy"] or 0), float(b["std_val_accuracy"] or 0))
    return f"{diff:+.2f} ({diff / spread:+.1f}σ)" if spread else f"{diff:+.2f}"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
