"""The report of one experiment's work directory: the results table, the accuracy-vs-sparsity plot
and ``report.md`` (the entry points, for a work directory or a replicate set: ``lottery.report``).

    summarize(W[, plan]) -> rows        one row per expected ticket; writes W/results.csv
    format_table(W[, rows]) -> text     the accuracy table for logs and the terminal
    write_workdir_report(W[, plan=...]) -> {"results_csv", "plot", "report", "problems", ...}

``write_workdir_report`` writes ``results.csv``, ``report/accuracy_vs_sparsity.png`` and
``report/report.md`` (paths: lottery/paths.py). It never fails because results are missing:
failed and missing (mask, rewind point[, control]) tickets are listed in the report and returned as
``problems``. The ``plan`` says which tickets and controls are expected.

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
from typing import Any, Callable

from lottery.config import CONTROLS
from lottery.errors import CorruptArtifactError
from lottery.files import atomic_path
from lottery.paths import PLOT_NAME, RESULT_JSON, RESULTS_CSV, TICKETS, Workdir
from lottery.plan import RunPlan, TicketSpec

log = logging.getLogger("lottery")

# A ticket "matches" the dense network when its final val accuracy is at most this far below it.
MATCH_TOLERANCE = 0.01
RESULT_COLUMNS = ("mask_id", "sparsity", "remaining", "rewind", "rewind_step", "control", "status",
                  "val_accuracy", "best_val_accuracy", "error")
_CONTROL_STYLE = {"random_reinit": ("--", "x"), "random_prune": ((0, (5, 2, 1, 2)), "^")}


# ---- the results table --------------------------------------------------------------------------
def expected_tickets(workdir: Workdir, plan: RunPlan, *, planned_controls: bool = True) -> list[TicketSpec]:
    """The plan's tickets, then its controls and any control found on disk, kind by kind (in
    ``CONTROLS`` order), mask by mask, rewind by rewind. ``planned_controls=False``: only the
    controls that were started (the CLI runs controls on request only)."""
    wanted = set(workdir.started_controls()) | set(plan.controls if planned_controls else ())
    controls = [
        spec for kind in CONTROLS for m in plan.masks for r in plan.rewinds
        if (spec := TicketSpec(m.mask_id, r, kind)) in wanted
    ]
    return list(plan.tickets) + controls


def result_rows(workdir: str | os.PathLike, plan: RunPlan | None = None) -> list[dict[str, Any]]:
    """One row per expected ticket with its status (reads the results; writes nothing).

    ``plan``: which tickets and controls are expected (the DAG passes its run's). Default: the plan
    of the work directory's ``config.json``, with the controls that were started."""
    workdir = Workdir(workdir)
    started_only = plan is None
    plan = plan or RunPlan.from_config(workdir.load()[0])
    specs = expected_tickets(workdir, plan, planned_controls=not started_only)
    sparsity_of, left = {m.mask_id: m.sparsity for m in plan.masks}, mask_remaining(workdir)
    return [result_row(workdir, spec, sparsity_of[spec.mask_id], left.get(spec.mask_id)) for spec in specs]


def mask_remaining(workdir: Workdir) -> dict[str, float]:
    """Each made mask's share of prunable weights left (``masks/index.json``), so that a ticket not
    done yet shows the "weights left" its result will have; empty before make_masks."""
    from lottery.files import read_json

    try:
        return {m["mask_id"]: float(m["remaining"]) for m in read_json(workdir.mask_index)}
    except (CorruptArtifactError, OSError, KeyError, TypeError, ValueError):
        return {}


def summarize(workdir: str | os.PathLike, plan: RunPlan | None = None) -> list[dict[str, Any]]:
    """`result_rows`, also written to ``results.csv``."""
    from lottery.files import write_csv

    rows = result_rows(workdir, plan)
    write_csv(Workdir(workdir).results_csv, RESULT_COLUMNS, rows)
    return rows


def result_row(workdir: Workdir, spec: TicketSpec, sparsity: float, remaining: float | None = None) -> dict[str, Any]:
    """``spec``'s row; ``remaining``: its mask's weights left, until its result says."""
    from lottery.files import read_json

    paths = workdir.ticket(spec)
    row = {"mask_id": spec.mask_id, "sparsity": sparsity, "remaining": remaining, "rewind": spec.rewind, "rewind_step": None,
           "control": spec.control or "", "status": "missing", "val_accuracy": None, "best_val_accuracy": None, "error": ""}
    # A damaged file marks its own row "corrupt", with the reason: the report is written whatever it finds.
    try:
        if paths.result.exists():
            result = read_json(paths.result, sealed=True)
            values = {k: result[k] for k in ("remaining", "rewind_step", "val_accuracy", "best_val_accuracy")}
            row.update(values, status="ok")
        elif paths.error.exists():
            row.update(status="failed", error=str(read_json(paths.error)["error"]).splitlines()[0][:300])
    except (CorruptArtifactError, OSError, KeyError, TypeError) as exc:  # unreadable, or not a result
        damaged = paths.result if paths.result.exists() else paths.error
        reason = str(exc) if isinstance(exc, (CorruptArtifactError, OSError)) else f"{damaged} lacks {exc}; delete it to recompute"
        row.update(status="corrupt", error=reason[:300])
    return row


def format_table(workdir: str | os.PathLike, rows: list[dict[str, Any]] | None = None) -> str:
    """Val accuracy (%) by sparsity (rows) and rewind point (columns), dense accuracy on top."""
    workdir = Workdir(workdir)
    cfg, _ = workdir.load()
    rows = result_rows(workdir) if rows is None else rows  # printing a table never rewrites results.csv
    labels = cfg.rewind_labels()
    lines = []
    dense = dense_result(workdir)
    if dense:
        lines.append(f"dense network: val accuracy {100 * dense['val_accuracy']:.2f}%")
    for control in sorted({r["control"] for r in rows}, key=lambda c: (c != "", c)):
        subset = [r for r in rows if r["control"] == control]
        lines.append("")
        lines.append(f"{'tickets' if not control else 'control ' + control}: val accuracy (%) by weights remaining and rewind point")
        lines.append(f"{'sparsity':>9} {'left':>7} " + " ".join(f"{label:>9}" for label in labels))
        lines.extend(_text_row(subset, mid, labels) for mid in dict.fromkeys(r["mask_id"] for r in subset))
    return "\n".join(lines)


def _text_row(subset: list[dict], mid: str, labels: list[str]) -> str:
    cells = {r["rewind"]: r for r in subset if r["mask_id"] == mid}
    first = next(iter(cells.values()))
    left = next((r["remaining"] for r in cells.values() if r["remaining"] is not None), 1 - first["sparsity"])
    values = []
    for label in labels:
        r = cells.get(label)
        values.append(f"{'':>9}" if r is None else f"{100 * r['val_accuracy']:9.2f}" if r["status"] == "ok" else f"{r['status']:>9}")
    return f"{100 * first['sparsity']:8.2f}% {100 * left:6.2f}% " + " ".join(values)


def dense_result(workdir: Workdir) -> dict | None:
    """The dense run's result, or None when it is not trained (or its result cannot be read)."""
    from lottery.files import read_json

    try:
        return read_json(workdir.dense_result, sealed=True)
    except Exception:  # missing or unreadable: the report says "not trained"
        return None


# ---- the report ---------------------------------------------------------------------------------
def write_workdir_report(
    workdir: str | os.PathLike,
    *,
    plan: RunPlan | None = None,
    tolerance: float = MATCH_TOLERANCE,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Write results.csv, the plot and report.md for ``workdir``; returns their paths and a summary.

    ``plan``: the tickets and controls that were planned (default: see ``summarize``); those without
    a result are reported as missing. ``run_id``: the DAG run the report describes; report.md names
    it and when it was written, so that an old report is not taken for a new one."""
    workdir = Workdir(workdir)
    cfg, run_info = workdir.load()
    rows = summarize(workdir, plan)
    dense = dense_result(workdir)  # None when not trained (yet): the report says so
    dense_acc = dense["val_accuracy"] if dense else None
    labels = cfg.rewind_labels()
    plot(rows, labels, dense_acc, workdir.plot_png, title=f"{cfg.model}  ({workdir.name})")
    problems = [problem_line(r) for r in rows if r["status"] != "ok"]
    matching = matching_levels(rows, labels, dense_acc, tolerance)
    stability = stability_part(workdir, plan, rows, dense, title=f"{cfg.model}  ({workdir.name})")
    written = utc_now()
    text = render_markdown(
        workdir=workdir, cfg=cfg, run_info=run_info, rows=rows, labels=labels, dense=dense,
        tolerance=tolerance, matching=matching, problems=problems, described=described(run_id, written),
        stability=stability.pop("section"),
    )
    from lottery.files import write_text

    write_text(workdir.report_md, text)
    done = sum(r["status"] == "ok" for r in rows)
    log.info("report: %d of %d combinations done, %d failed or missing -> %s", done, len(rows), len(problems), workdir.report_md)
    return {
        **stability,
        "workdir": str(workdir),
        "results_csv": str(workdir.results_csv),
        "plot": str(workdir.plot_png),
        "report": str(workdir.report_md),
        "expected": len(rows),
        "done": done,
        "problems": problems,
        "matching": matching,
        "dense_val_accuracy": dense_acc,
        "run_id": run_id,
        "written": written,
    }


def stability_part(workdir: Workdir, plan: RunPlan | None, rows: list[dict], dense: dict | None, *,
                   title: str) -> dict[str, Any]:
    """The work directory's instability analyses (``lottery.stability_report.write_stability``):
    those ``plan`` asks for and those found on disk (no plan: those only), judged by the plan's
    ``stability_threshold`` (no plan: the config's)."""
    from lottery import stability_report as stab

    started_only = plan is None
    plan = plan or RunPlan.from_config(workdir.load()[0])
    labels = list(plan.rewinds)
    found = stab.stability_rows(workdir, plan, planned=not started_only, remaining=mask_remaining(workdir))
    accuracy = stab.accuracy_rows(rows, labels, dense)
    return stab.write_stability(workdir, found, labels, plan.config.stability_threshold, accuracy,
                                lambda r: f"{100 * r['val_accuracy']:.2f}", title=title,
                                problems=[stab.problem_line(r) for r in found if r["status"] != "ok"])


def utc_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def described(run_id: str | None, written: str) -> str:
    return f"Written {written}" + (f" for DAG run `{run_id}`." if run_id else " (outside a DAG run).")


# ---- pieces (public for tests and notebooks) ---------------------------------------------------
def problem_line(row: dict) -> str:
    what = f"{row['mask_id']} ({weights_left(row)} left), rewind {row['rewind']}"
    if row.get("control"):
        what += f", control {row['control']}"
    line = f"{what}: {row['status']}"
    if row.get("error"):
        line += f": {row['error']}"
    return line


def weights_left(row: dict) -> str:
    remaining = row.get("remaining")
    if remaining is None:
        remaining = 1 - row["sparsity"]
    return pct(remaining)


def pct(fraction: float) -> str:
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


def plot(rows: list[dict], labels: list[str], dense_acc: float | None, path: str | os.PathLike, *, title: str = "",
         dense_std: float | None = None) -> Path:
    """Val accuracy vs % of weights remaining (log x axis, reversed), one line per rewind point.

    Rows with a ``std`` (the mean over replicates, ``lottery.replicate_report``) get a shaded band
    of mean ± std around their line (tickets only; controls stay plain dashed lines);
    ``dense_std`` shades the dense reference alike."""
    fig, ax = new_figure()
    colors = [f"C{i % 10}" for i in range(len(labels))]
    for label, color in zip(labels, colors):
        for control in [""] + sorted({r["control"] for r in rows if r["control"]}):
            line = [r for r in rows if r["rewind"] == label and r["control"] == control and r["status"] == "ok"]
            if line:
                _draw_line(ax, line, color, control, label)
    if dense_acc is not None:
        spread = f" ± {100 * dense_std:.2f}" if dense_std is not None else ""
        ax.axhline(100 * dense_acc, color="black", linewidth=1.2, linestyle=":", label=f"dense ({100 * dense_acc:.2f}{spread}%)")
        if dense_std is not None:
            ax.axhspan(100 * (dense_acc - dense_std), 100 * (dense_acc + dense_std), color="black", alpha=0.08, linewidth=0)
    if not any(r["status"] == "ok" for r in rows):
        ax.text(0.5, 0.06, "no ticket results yet", transform=ax.transAxes, ha="center", va="bottom", color="gray",
                bbox={"facecolor": "white", "edgecolor": "none"})
    return save_figure(fig, ax, path, [percent_left(r) for r in rows], title=title, legend_columns=2 if len(labels) > 3 else 1)


def _draw_line(ax, line: list[dict], color: str, control: str, label: str) -> None:
    """One rewind point's tickets (or one control kind's), sparser to the right; with their band."""
    line = sorted(line, key=lambda r: -r["remaining"])
    xs, ys = [100 * r["remaining"] for r in line], [100 * r["val_accuracy"] for r in line]
    if control:
        style, marker = _CONTROL_STYLE.get(control, ("--", "s"))
        ax.plot(xs, ys, linestyle=style, marker=marker, markersize=4, linewidth=1.2, color=color,
                alpha=0.8, label=f"{control}, rewind {label}")
        return
    ax.plot(xs, ys, linestyle="-", marker="o", markersize=4, linewidth=1.8, color=color, label=f"rewind {label}")
    draw_band(ax, line, color)


def draw_band(ax, line: list[dict], color: str) -> None:
    """The shaded mean ± std of the points of ``line`` that have a std (none: nothing drawn)."""
    spread = [(100 * r["remaining"], 100 * r["val_accuracy"], 100 * r["std"]) for r in line if r.get("std") is not None]
    if spread:
        xs, means, stds = zip(*spread)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=color, alpha=0.18, linewidth=0)


def percent_left(row: dict) -> float:
    """% of the prunable weights a row's ticket keeps (its mask's, or 1 - sparsity until known)."""
    return 100 * (row["remaining"] if row["remaining"] is not None else 1 - row["sparsity"])


def new_figure():
    """A figure on the Agg canvas (no pyplot: safe in any process) and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig, ax, path: str | os.PathLike, xs_all: list[float], *, title: str = "", legend_columns: int = 1) -> Path:
    """Label the axes, spread the x axis over ``xs_all`` (% of weights left, every planned ticket,
    done or not: the same axes in progress as when finished) and write the PNG atomically."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

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
    ax.set_xlabel("% of prunable weights remaining (log scale)")
    ax.set_ylabel("validation accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", ncol=legend_columns)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def accuracy_table(rows: list[dict], labels: list[str], *, control: str = "", dense_acc: float | None = None,
                   tolerance: float = MATCH_TOLERANCE, cell: Callable[[dict], str] | None = None) -> str:
    """Markdown table: one row per sparsity level, one column per rewind point (val accuracy %).
    Bold = matches the dense accuracy within ``tolerance``; failed and missing cells say so.
    ``cell``: the text of a done cell (default: its accuracy in %, two decimals)."""
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
                text = cell(r) if cell else f"{100 * r['val_accuracy']:.2f}"
                if dense_acc is not None and r["val_accuracy"] >= dense_acc - tolerance:
                    text = f"**{text}**"
                values.append(text)
        lines.append(f"| {100 * first['sparsity']:.2f}% | {weights_left(known)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def render_markdown(*, workdir: Path, cfg, run_info: dict, rows: list[dict], labels: list[str], dense: dict | None,
                    tolerance: float, matching: dict, problems: list[str], described: str = "",
                    stability: list[str] = ()) -> str:
    dense_acc = dense["val_accuracy"] if dense else None
    out = [f"# Lottery-ticket experiment `{Workdir(workdir).name}`", ""]
    if described:
        out += [described, ""]
    out += settings_section(cfg, run_info, labels)
    out += _tickets_section(rows, labels, dense, tolerance)
    if dense:
        out += _matching_section(labels, matching)
    for control in sorted({r["control"] for r in rows if r["control"]}):
        subset = [r for r in rows if r["control"] == control]
        out.append(f"## Control `{control}` ({sum(r['status'] == 'ok' for r in subset)} of {len(subset)} done)")
        out.append("")
        out.append(accuracy_table(rows, labels, control=control, dense_acc=dense_acc, tolerance=tolerance))
        out.append("")
    out += stability
    out += problems_section(problems)
    out.append(f"Files: `{RESULTS_CSV}` (one row per combination), `{TICKETS}/<mask>__<rewind>[__<control>]/{RESULT_JSON}`.")
    out.append("")
    return "\n".join(out)


def settings_section(cfg, run_info: dict, labels: list[str]) -> list[str]:
    out = [f"Model `{cfg.model}`, {cfg.training_steps} of training, batch {cfg.batch_size}, {cfg.optimizer} "
           f"lr {cfg.lr:g}; {len(cfg.levels())} sparsity levels ({cfg.pruning_scope} magnitude pruning) x "
           f"{len(labels)} rewind points ({', '.join(labels)})."]
    changed = cfg.id_fields()
    out.append("")
    parts = [f"`{k}={v}`" for k, v in sorted(changed.items()) if k != "sparsities"]
    parts += ["`sparsities` (custom)"] if "sparsities" in changed else []
    out.append("Non-default settings: " + (", ".join(parts) or "none") + ".")
    if run_info.get("data_dir"):
        out.append(f"Data: `{run_info['data_dir']}` (data set id `{run_info.get('dataset_id', '?')}`).")
    out.append("")
    return out


def _tickets_section(rows: list[dict], labels: list[str], dense: dict | None, tolerance: float) -> list[str]:
    dense_acc = dense["val_accuracy"] if dense else None
    if dense:
        out = [f"**Dense network**: val accuracy {100 * dense_acc:.2f}% "
               f"(best {100 * dense.get('best_val_accuracy', dense_acc):.2f}%, {dense.get('epochs', '?')} epochs)."]
    else:
        out = ["**Dense network**: not trained (missing) - no ticket can be judged."]
    tickets = [r for r in rows if not r["control"]]
    done = sum(r["status"] == "ok" for r in tickets)
    return out + [
        "", f"## Tickets ({done} of {len(tickets)} done)", "",
        f"Val accuracy (%) after late-reset retraining. **Bold**: matches the dense network "
        f"(at most {100 * tolerance:g} percentage points below it).", "",
        accuracy_table(rows, labels, dense_acc=dense_acc, tolerance=tolerance), "",
        f"![accuracy vs sparsity]({PLOT_NAME})", "",
    ]


def _matching_section(labels: list[str], matching: dict) -> list[str]:
    out = ["### Which tickets match the dense network", ""]
    for label in labels:
        m = matching.get(label, {})
        if not m.get("done"):
            out.append(f"- rewind {label}: no results")
        elif m["matching"]:
            out.append(f"- rewind {label}: {m['matching']} of {m['done']} levels match; the sparsest matching ticket "
                       f"keeps {pct(m['sparsest_remaining'])} of the weights (`{m['sparsest_mask_id']}`)")
        else:
            out.append(f"- rewind {label}: none of {m['done']} levels match")
    out.append("")
    return out


def problems_section(problems: list[str]) -> list[str]:
    out = [f"## Failed or missing ({len(problems)})", ""]
    if problems:
        out.extend(f"- {p}" for p in problems)
        out.append("")
        out.append("Re-run them all once the cause is fixed: the run's *Clear Run*, *Clear only failed tasks* "
                   "(or `python -m lottery rerun-failed --run-id <run id>`); finished combinations are not recomputed.")
    else:
        out.append("None: every combination finished.")
    out.append("")
    return out


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
