"""The experiment's report: results table, accuracy-vs-sparsity plot and ``report.md``.

    write_report(W) -> {"results_csv", "plot", "report", ...}

writes ``W/results.csv`` (via ``lottery.experiment.summarize``), ``W/report/accuracy_vs_sparsity.png``
and ``W/report/report.md``. It never fails because results are missing: failed and missing
(mask, rewind point[, control]) combinations are listed in the report and returned as ``problems``.

The plot follows the lottery-ticket papers: x = % of prunable weights remaining on a log axis,
reversed so that sparser networks are to the right; one line per rewind point; the dense network's
accuracy as a horizontal reference; controls dashed, in the colour of their rewind point.

Matplotlib runs on the Agg canvas directly (no pyplot, no global backend): safe in any process.
No TensorFlow, Keras or NumPy import.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("lottery")

# A ticket "matches" the dense network when its final val accuracy is at most this far below it.
MATCH_TOLERANCE = 0.01
PLOT_NAME = "accuracy_vs_sparsity.png"
REPORT_NAME = "report.md"
_CONTROL_STYLE = {"random_reinit": ("--", "x"), "random_prune": ((0, (5, 2, 1, 2)), "^")}


def write_report(
    workdir: str | os.PathLike,
    *,
    expected_controls: list[dict[str, str]] | None = None,
    tolerance: float = MATCH_TOLERANCE,
) -> dict[str, Any]:
    """Write results.csv, the plot and report.md for work directory ``workdir``.

    ``expected_controls``: the control runs that were planned (``{"mask_id", "rewind", "control"}``);
    those without a result are reported as missing (the engine only knows the ones it started).
    Returns the paths (``results_csv``, ``plot``, ``report``) and a summary: ``expected`` (number
    of planned combinations), ``done``, ``problems`` (one line per failed or missing combination),
    ``matching`` (per rewind point, the sparsest matching level) and ``dense_val_accuracy``.
    """
    from lottery import experiment

    workdir = Path(workdir)
    cfg, run_info = experiment.load_workdir(workdir)
    rows = experiment.summarize(workdir)
    rows = _add_expected_controls(rows, expected_controls or [], cfg)
    try:
        dense = experiment.dense_result(workdir)
    except Exception:  # not trained (yet): the report says so
        dense = None
    dense_acc = dense["val_accuracy"] if dense else None
    labels = cfg.rewind_labels()

    out_dir = workdir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = out_dir / PLOT_NAME
    plot(rows, labels, dense_acc, plot_path, title=f"{cfg.model}  ({workdir.name})")

    problems = [_problem_line(r) for r in rows if r["status"] != "ok"]
    matching = matching_levels(rows, labels, dense_acc, tolerance)
    text = render_markdown(
        workdir=workdir, cfg=cfg, run_info=run_info, rows=rows, labels=labels, dense=dense,
        tolerance=tolerance, matching=matching, problems=problems,
    )
    from lottery.files import write_text

    report_path = out_dir / REPORT_NAME
    write_text(report_path, text)
    done = sum(r["status"] == "ok" for r in rows)
    log.info("report: %d of %d combinations done, %d failed or missing -> %s", done, len(rows), len(problems), report_path)
    return {
        "workdir": str(workdir),
        "results_csv": str(workdir / "results.csv"),
        "plot": str(plot_path),
        "report": str(report_path),
        "expected": len(rows),
        "done": done,
        "problems": problems,
        "matching": matching,
        "dense_val_accuracy": dense_acc,
    }


# ---- pieces (public for tests and notebooks) ---------------------------------------------------
def _add_expected_controls(rows: list[dict], expected: list[dict], cfg) -> list[dict]:
    from lottery.config import Step

    have = {(r["mask_id"], r["rewind"], r["control"]) for r in rows}
    sparsity_of = {}
    from lottery.experiment import mask_id

    for s in cfg.levels():
        sparsity_of[mask_id(s)] = s
    out = list(rows)
    for e in expected:
        rewind = str(Step.parse(e["rewind"]))
        key = (e["mask_id"], rewind, e["control"])
        if key in have:
            continue
        have.add(key)
        out.append({
            "mask_id": e["mask_id"], "sparsity": sparsity_of.get(e["mask_id"], float("nan")), "remaining": None,
            "rewind": rewind, "rewind_step": None, "control": e["control"], "status": "missing",
            "val_accuracy": None, "best_val_accuracy": None, "error": "",
        })
    return out


def _problem_line(row: dict) -> str:
    what = f"{row['mask_id']} ({_left(row)} left), rewind {row['rewind']}"
    if row.get("control"):
        what += f", control {row['control']}"
    line = f"{what}: {row['status']}"
    if row.get("error"):
        line += f": {row['error']}"
    return line


def _left(row: dict) -> str:
    remaining = row.get("remaining")
    if remaining is None:
        remaining = 1 - row["sparsity"]
    return _pct(remaining)


def _pct(fraction: float) -> str:
    pct = 100 * fraction
    return f"{pct:.1f}%" if pct >= 0.95 else f"{pct:.2g}%"


def matching_levels(rows: list[dict], labels: list[str], dense_acc: float | None, tolerance: float) -> dict[str, dict]:
    """Per rewind point: how many levels match the dense accuracy and the sparsest one that does."""
    out: dict[str, dict] = {}
    if dense_acc is None:
        return out
    for label in labels:
        done = [r for r in rows if r["rewind"] == label and not r["control"] and r["status"] == "ok"]
        good = [r for r in done if r["val_accuracy"] >= dense_acc - tolerance]
        sparsest = min(good, key=lambda r: r["remaining"], default=None)
        out[label] = {
            "matching": len(good),
            "done": len(done),
            "sparsest_mask_id": sparsest["mask_id"] if sparsest else None,
            "sparsest_remaining": sparsest["remaining"] if sparsest else None,
        }
    return out


def plot(rows: list[dict], labels: list[str], dense_acc: float | None, path: str | os.PathLike, *, title: str = "") -> Path:
    """Val accuracy vs % of weights remaining (log x axis, reversed), one line per rewind point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(len(labels))]
    xs_all: list[float] = []
    for label, color in zip(labels, colors):
        for control in [""] + sorted({r["control"] for r in rows if r["control"]}):
            pts = sorted(
                ((100 * r["remaining"], 100 * r["val_accuracy"]) for r in rows
                 if r["rewind"] == label and r["control"] == control and r["status"] == "ok"),
                reverse=True,
            )
            if not pts:
                continue
            xs, ys = zip(*pts)
            xs_all.extend(xs)
            if control:
                style, marker = _CONTROL_STYLE.get(control, ("--", "s"))
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=4, linewidth=1.2, color=color,
                        alpha=0.8, label=f"{control}, rewind {label}")
            else:
                ax.plot(xs, ys, linestyle="-", marker="o", markersize=4, linewidth=1.8, color=color,
                        label=f"rewind {label}")
    if dense_acc is not None:
        ax.axhline(100 * dense_acc, color="black", linewidth=1.2, linestyle=":", label=f"dense ({100 * dense_acc:.2f}%)")
    ax.set_xscale("log")
    if xs_all:
        lo, hi = min(xs_all), max(max(xs_all), 100.0)
        ax.set_xlim(hi * 1.15, lo / 1.15)  # reversed: sparser to the right
        ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01) if lo / 1.15 <= t <= hi * 1.15]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(110, 1)
        ax.text(0.5, 0.5, "no results yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_xlabel("% of prunable weights remaining (log scale)")
    ax.set_ylabel("validation accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", ncol=2 if len(labels) > 3 else 1)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def accuracy_table(rows: list[dict], labels: list[str], *, control: str = "", dense_acc: float | None = None,
                   tolerance: float = MATCH_TOLERANCE) -> str:
    """Markdown table: one row per sparsity level, one column per rewind point (val accuracy %).
    Bold = matches the dense accuracy within ``tolerance``; failed and missing cells say so."""
    subset = [r for r in rows if r["control"] == control]
    by_mask: dict[str, dict[str, dict]] = {}
    for r in sorted(subset, key=lambda r: r["sparsity"] if not _isnan(r["sparsity"]) else 2.0):
        by_mask.setdefault(r["mask_id"], {})[r["rewind"]] = r
    lines = [
        "| sparsity | weights left | " + " | ".join(f"rewind {label}" for label in labels) + " |",
        "|---:|---:|" + "---:|" * len(labels),
    ]
    for mid, cells in by_mask.items():
        first = next(iter(cells.values()))
        known = next((c for c in cells.values() if c["remaining"] is not None), first)
        values = []
        for label in labels:
            r = cells.get(label)
            if r is None:
                values.append("")
            elif r["status"] != "ok":
                values.append(r["status"])
            else:
                cell = f"{100 * r['val_accuracy']:.2f}"
                if dense_acc is not None and r["val_accuracy"] >= dense_acc - tolerance:
                    cell = f"**{cell}**"
                values.append(cell)
        lines.append(f"| {100 * first['sparsity']:.2f}% | {_left(known)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def render_markdown(*, workdir: Path, cfg, run_info: dict, rows: list[dict], labels: list[str], dense: dict | None,
                    tolerance: float, matching: dict, problems: list[str]) -> str:
    dense_acc = dense["val_accuracy"] if dense else None
    tickets = [r for r in rows if not r["control"]]
    controls = sorted({r["control"] for r in rows if r["control"]})
    out = [f"# Lottery-ticket experiment `{workdir.name}`", ""]
    out.append(f"Model `{cfg.model}`, {cfg.training_steps} of training, batch {cfg.batch_size}, {cfg.optimizer} "
               f"lr {cfg.lr:g}; {len(cfg.levels())} sparsity levels ({cfg.pruning_scope} magnitude pruning) x "
               f"{len(labels)} rewind points ({', '.join(labels)}).")
    changed = cfg.id_fields()
    out.append("")
    out.append("Non-default settings: " + (", ".join(f"`{k}={v}`" for k, v in sorted(changed.items()) if k != "sparsities")
                                           + (", `sparsities` (custom)" if "sparsities" in changed else "") or "none") + ".")
    if run_info.get("data_dir"):
        out.append(f"Data: `{run_info['data_dir']}` (data set id `{run_info.get('dataset_id', '?')}`).")
    out.append("")
    if dense:
        out.append(f"**Dense network**: val accuracy {100 * dense_acc:.2f}% "
                   f"(best {100 * dense.get('best_val_accuracy', dense_acc):.2f}%, {dense.get('epochs', '?')} epochs).")
    else:
        out.append("**Dense network**: not trained (missing) - no ticket can be judged.")
    out.append("")
    done = sum(r["status"] == "ok" for r in tickets)
    out.append(f"## Tickets ({done} of {len(tickets)} done)")
    out.append("")
    out.append(f"Val accuracy (%) after late-reset retraining. **Bold**: matches the dense network "
               f"(at most {100 * tolerance:g} percentage points below it).")
    out.append("")
    out.append(accuracy_table(rows, labels, dense_acc=dense_acc, tolerance=tolerance))
    out.append("")
    out.append(f"![accuracy vs sparsity]({PLOT_NAME})")
    out.append("")
    if dense:
        out.append("### Which tickets match the dense network")
        out.append("")
        for label in labels:
            m = matching.get(label, {})
            if not m.get("done"):
                out.append(f"- rewind {label}: no results")
            elif m["matching"]:
                out.append(f"- rewind {label}: {m['matching']} of {m['done']} levels match; the sparsest matching ticket "
                           f"keeps {_pct(m['sparsest_remaining'])} of the weights (`{m['sparsest_mask_id']}`)")
            else:
                out.append(f"- rewind {label}: none of {m['done']} levels match")
        out.append("")
    for control in controls:
        subset = [r for r in rows if r["control"] == control]
        out.append(f"## Control `{control}` ({sum(r['status'] == 'ok' for r in subset)} of {len(subset)} done)")
        out.append("")
        out.append(accuracy_table(rows, labels, control=control, dense_acc=dense_acc, tolerance=tolerance))
        out.append("")
    out.append(f"## Failed or missing ({len(problems)})")
    out.append("")
    if problems:
        out.extend(f"- {p}" for p in problems)
        out.append("")
        out.append("Rerun them by clearing the failed task instances (or re-triggering the same config): "
                   "finished combinations are not recomputed.")
    else:
        out.append("None: every combination finished.")
    out.append("")
    out.append("Files: `results.csv` (one row per combination), `tickets/<mask>__<rewind>[__<control>]/result.json`.")
    out.append("")
    return "\n".join(out)


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
