"""One comparison of several experiments on the same data set and model.

    compare([P1, P2, ...], DIR[, rewinds=[...]]) -> {"plot", "table", "experiments"}

Each ``P`` is an experiment's work directory or a replicate set (``lottery.replicate_report``).
The plot has one line per (experiment, rewind point): the tickets' mean val accuracy against the
weights left, with a shaded mean ± std band where the experiment has replicates, and each
experiment's dense mean as a dotted line; one colour per experiment, one line style per rewind
point. ``rewinds`` keeps the plot legible: only those rewind points (default: every one of any
experiment). The random controls are left out (each experiment's own report has them).

Each experiment is labelled by what differs between the configs: the fields of the experiment id
(``ExperimentConfig.id_fields``) whose values differ, ``pruning_schedule=iterative``,
``rewind_mode=weights``; two experiments of the same config by their directory names. Experiments
on different data sets (``dataset_id``) or models are refused: ``NotComparableError`` names both.

Writes ``DIR/comparison.png`` and ``DIR/comparison.md`` (``lottery.paths.Comparison``) through
``lottery.files``. No TensorFlow, Keras or NumPy import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lottery.config import ExperimentConfig
from lottery.errors import NotComparableError
from lottery.paths import Comparison
from lottery.replicate_report import ReplicateResults, cell_text, load_results, spread
from lottery.workdir_report import (
    MATCH_TOLERANCE,
    draw_band,
    matching_levels,
    new_figure,
    pct,
    percent_left,
    save_figure,
    utc_now,
    weights_left,
)

_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def compare(paths: list[str | os.PathLike], out_dir: str | os.PathLike, *, rewinds: list[str] | None = None,
            tolerance: float = MATCH_TOLERANCE) -> dict[str, Any]:
    """Write the comparison plot and table of the experiments at ``paths`` into ``out_dir``; returns
    their paths and, per experiment, its path, label, replicates and dense mean."""
    if len(paths) < 2:
        raise ValueError(f"a comparison needs two experiments or more (got {len(paths)})")
    experiments = [load_results(p) for p in paths]
    check_comparable(experiments)
    names = experiment_labels([e.cfg for e in experiments], [e.name for e in experiments])
    labels = _rewind_labels(experiments, rewinds)
    out = Comparison(out_dir)
    comparison_plot(experiments, names, labels, out.plot_png)
    from lottery.files import write_text

    write_text(out.table_md, render_comparison(experiments, names, labels, tolerance=tolerance, written=utc_now()))
    return {"plot": str(out.plot_png), "table": str(out.table_md), "experiments": [
        {"path": str(e.path), "label": name, "replicates": e.replicates, "dense_val_accuracy": e.dense_stats["mean"],
         "dense_std": e.dense_stats["std"]} for e, name in zip(experiments, names)]}


def check_comparable(experiments: list[ReplicateResults]) -> None:
    """Refuse experiments on different data sets or models (each named with its value)."""
    first = experiments[0]
    for other in experiments[1:]:
        for what, mine, theirs in (("model", first.cfg.model, other.cfg.model), ("data set", _dataset(first), _dataset(other))):
            if mine != theirs:
                raise NotComparableError(
                    f"cannot compare {first.path} ({what} {mine}) with {other.path} ({what} {theirs}): a comparison is "
                    "of experiments on the same data set and model")


def _dataset(experiment: ReplicateResults) -> str:
    dataset = experiment.run_info.get("dataset_id")
    if not dataset:
        raise NotComparableError(f"cannot compare {experiment.path}: its data set is unknown (no readable run.json)")
    return dataset


def experiment_labels(cfgs: list[ExperimentConfig], names: list[str]) -> list[str]:
    """Each experiment's label: ``field=value`` for each experiment-id field whose value differs
    between the configs (in the config's field order); its name when none differs, or when two
    labels would be the same."""
    fields = [cfg.id_fields() for cfg in cfgs]  # the non-default fields: a field absent is at its default
    differing = [k for k in ExperimentConfig.model_fields
                 if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in fields}) > 1]
    labels = [", ".join(f"{k}={_shown(cfg, k)}" for k in differing) or name for cfg, name in zip(cfgs, names)]
    return [f"{label} ({name})" if labels.count(label) > 1 and label != name else label for label, name in zip(labels, names)]


def _shown(cfg: ExperimentConfig, field: str) -> str:
    if field == "sparsities":
        levels = cfg.levels()
        return ",".join(f"{s:g}" for s in levels) if len(levels) <= 4 else f"{len(levels)} levels to {levels[-1]:g}"
    value = getattr(cfg, field)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return "unset" if value is None else str(value)


def _rewind_labels(experiments: list[ReplicateResults], wanted: list[str] | None) -> list[str]:
    labels = list(dict.fromkeys(label for e in experiments for label in e.labels))
    if not wanted:
        return labels
    unknown = [w for w in wanted if w not in labels]
    if unknown:
        raise ValueError(f"unknown rewind point {', '.join(unknown)}: these experiments have {', '.join(labels)}")
    return [label for label in labels if label in wanted]


# ---- the plot -----------------------------------------------------------------------------------
def comparison_plot(experiments: list[ReplicateResults], names: list[str], labels: list[str], path: str | os.PathLike) -> Path:
    """Mean val accuracy vs % of weights left (log, reversed), a line per (experiment, rewind point)."""
    fig, ax = new_figure()
    for k, (experiment, name) in enumerate(zip(experiments, names)):
        color = f"C{k % 10}"
        tickets = [r for r in experiment.summary if not r["control"] and r["status"] == "ok"]
        for j, label in enumerate(labels):
            line = sorted((r for r in tickets if r["rewind"] == label), key=lambda r: -r["remaining"])
            if not line:
                continue
            mean_of = f" (mean of {experiment.replicates})" if experiment.replicates > 1 else ""
            ax.plot([100 * r["remaining"] for r in line], [100 * r["val_accuracy"] for r in line], color=color,
                    linestyle=_LINE_STYLES[j % len(_LINE_STYLES)], marker=_MARKERS[j % len(_MARKERS)], markersize=4,
                    linewidth=1.6, label=f"{name}, rewind {label}{mean_of}")
            draw_band(ax, line, color)
        dense = experiment.dense_stats
        if dense["mean"] is not None:
            std = f" ± {100 * dense['std']:.2f}" if dense["std"] is not None else ""
            ax.axhline(100 * dense["mean"], color=color, linewidth=1.0, linestyle=(0, (1, 3)), alpha=0.8,
                       label=f"dense, {name} ({100 * dense['mean']:.2f}{std}%)")
    xs = [percent_left(r) for e in experiments for r in e.summary if not r["control"]]
    model = experiments[0].cfg.model
    return save_figure(fig, ax, path, xs, title=f"{model}: {len(experiments)} experiments compared (mean ± std)",
                       legend_columns=2 if len(experiments) * len(labels) > 6 else 1)


# ---- the table ----------------------------------------------------------------------------------
def render_comparison(experiments: list[ReplicateResults], names: list[str], labels: list[str], *,
                      tolerance: float = MATCH_TOLERANCE, written: str = "") -> str:
    first = experiments[0]
    out = [f"# Comparison of {len(experiments)} experiments", "",
           f"{'Written ' + written + '. ' if written else ''}Model `{first.cfg.model}`, data set `{first.run_info.get('dataset_id')}`. "
           "Val accuracy (%) of the tickets: mean ± sample standard deviation (n: the replicates done) over each "
           f"experiment's replicates. **Bold**: the mean matches that experiment's dense mean (at most {100 * tolerance:g} "
           "percentage points below it).", "",
           "| experiment | directory | replicates | dense val accuracy (%) |", "|---|---|---:|---:|"]
    for experiment, name in zip(experiments, names):
        dense = experiment.dense_stats
        shown = spread(dense["mean"], dense["std"], dense["n"]) if dense["n"] else "not trained"
        out.append(f"| {name} | `{experiment.path}` | {experiment.replicates} | {shown} |")
    out += ["", "![comparison](comparison.png)", ""]
    for label in labels:
        out += _rewind_section(experiments, names, label, tolerance)
    return "\n".join(out)


def _rewind_section(experiments: list[ReplicateResults], names: list[str], label: str, tolerance: float) -> list[str]:
    """One rewind point: a line per sparsity level, a column per experiment; then who matches."""
    cells = [{r["mask_id"]: r for r in e.summary if r["rewind"] == label and not r["control"]} for e in experiments]
    levels = sorted({mid: row for c in cells for mid, row in c.items()}.values(), key=lambda r: r["sparsity"])
    out = [f"## Rewind {label}", "", "| sparsity | weights left | " + " | ".join(names) + " |",
           "|---:|---:|" + "---:|" * len(names)]
    for level in levels:
        texts = [_cell(c.get(level["mask_id"]), e.dense_stats["mean"], tolerance) for c, e in zip(cells, experiments)]
        out.append(f"| {100 * level['sparsity']:.2f}% | {weights_left(level)} | " + " | ".join(texts) + " |")
    out.append("")
    for experiment, name in zip(experiments, names):
        m = matching_levels(experiment.summary, [label], experiment.dense_stats["mean"], tolerance).get(label)
        if m and m["matching"]:
            out.append(f"- {name}: {m['matching']} of {m['done']} levels match; the sparsest keeps "
                       f"{pct(m['sparsest_remaining'])} of the weights (`{m['sparsest_mask_id']}`)")
        elif m and m["done"]:
            out.append(f"- {name}: none of {m['done']} levels match")
    return out + [""]


def _cell(row: dict | None, dense: float | None, tolerance: float) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    text = cell_text(row)
    return f"**{text}**" if dense is not None and row["val_accuracy"] >= dense - tolerance else text
