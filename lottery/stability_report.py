"""The instability analyses in the report (the analyses themselves: ``lottery.stability``).

    expected_analyses(W, plan[, planned]) -> [StabilitySpec]   planned ones and any found on disk
    stability_rows(W, plan[, planned, remaining]) -> rows      one per analysis, with its status
    aggregate_stability(rows per replicate) -> rows            mean ± std (n) per analysis
    verdicts(rows, labels, threshold) -> {network: verdict}    the earliest stable rewind point
    plot_instability(rows, labels, threshold, path[, accuracy]) instability vs rewind point, one line per network,
                                                               beside it the networks' val accuracy
    accuracy_rows(ticket rows, labels, dense) -> {(network, rewind): row}   the accuracy beside each analysis
    stability_section(rows, labels, threshold, accuracy)       report.md's section

A row is one analysis: a network (``dense`` or a mask id) at a rewind point, with its status
(``ok``, ``failed``, ``corrupt`` or ``missing``), ``instability`` and ``instability_train`` (the
error barrier in percentage points on the validation split and on the training subset) and the two
copies' final val accuracy. A network is *stable* at a rewind point when its instability is below
the config's ``stability_threshold``; "rewind here" names the earliest such rewind point.

An analysis is expected when the plan asks for it (the DAG's run: ``stability``,
``stability_sparsities``) or when its directory exists (the CLI runs it on request), as controls are.
``lottery.workdir_report`` and ``lottery.replicate_report`` write ``stability.csv``, the plot and
the section. Matplotlib on the Agg canvas (no pyplot). No TensorFlow or Keras import.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Callable

from lottery.errors import CorruptArtifactError
from lottery.paths import INSTABILITY_PLOT_NAME, RESULT_JSON, STABILITY_CSV, Workdir
from lottery.plan import RunPlan, StabilitySpec

STABILITY_COLUMNS = ("network", "mask_id", "sparsity", "remaining", "rewind", "rewind_step", "status", "instability",
                     "instability_train", "val_accuracy_a", "val_accuracy_b", "points", "error")
SET_STABILITY_COLUMNS = ("replicate", "experiment_id", *STABILITY_COLUMNS)
_STATUS_ORDER = ("corrupt", "failed", "running", "queued", "missing")


# ---- the rows ---------------------------------------------------------------------------------------
def expected_analyses(workdir: Workdir, plan: RunPlan, *, planned: bool = True) -> list[StabilitySpec]:
    """The plan's analyses (``planned``) and those found on disk, the dense network first, then the
    masks in the plan's order, each at its rewind points in order; a directory of a mask or rewind
    point the plan does not know is left out."""
    wanted = set(workdir.started_stability()) | set(plan.stability if planned else ())
    networks = [None] + [m.mask_id for m in plan.masks]
    return [spec for network in networks for rewind in plan.rewinds if (spec := StabilitySpec(network, rewind)) in wanted]


def stability_rows(workdir: str | os.PathLike, plan: RunPlan, *, planned: bool = True,
                   remaining: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per expected analysis (reads; writes nothing). ``remaining``: each mask's weights
    left (``masks/index.json``), until the analysis' result says."""
    workdir, left = Workdir(workdir), remaining or {}
    sparsity = {m.mask_id: m.sparsity for m in plan.masks}
    return [stability_row(workdir, spec, sparsity.get(spec.mask_id), left.get(spec.mask_id))
            for spec in expected_analyses(workdir, plan, planned=planned)]


def stability_row(workdir: Workdir, spec: StabilitySpec, sparsity: float | None, remaining: float | None) -> dict[str, Any]:
    """``spec``'s row; a damaged result marks it "corrupt", with the reason (never raised)."""
    from lottery.files import read_json

    paths = workdir.stability(spec.name)
    row = {"network": spec.network, "mask_id": spec.mask_id or "", "sparsity": sparsity,
           "remaining": 1.0 if spec.mask_id is None else remaining, "rewind": spec.rewind, "rewind_step": None,
           "status": "missing", "instability": None, "instability_train": None, "val_accuracy_a": None,
           "val_accuracy_b": None, "points": None, "error": ""}
    try:
        if paths.result.exists():
            result = read_json(paths.result, sealed=True)
            ends = result["endpoints"]
            row.update(status="ok", instability=float(result["instability"]),
                       instability_train=float(result["instability_train"]), rewind_step=result.get("rewind_step"),
                       points=result["points"], val_accuracy_a=ends["a"]["val_accuracy"],
                       val_accuracy_b=ends["b"]["val_accuracy"])
            row["remaining"] = result.get("remaining") if spec.mask_id and result.get("remaining") is not None else row["remaining"]
        elif paths.error.exists():
            row.update(status="failed", error=str(read_json(paths.error)["error"]).splitlines()[0][:300])
    except (CorruptArtifactError, OSError, KeyError, TypeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, (CorruptArtifactError, OSError)) else f"{paths.result} lacks {exc}; delete it to recompute"
        row.update(status="corrupt", error=reason[:300])
    return row


def network_label(row: dict) -> str:
    """``dense network``, or a ticket by its weights left: ``20.9% left``."""
    if not row["mask_id"]:
        return "dense network"
    left = row["remaining"] if row["remaining"] is not None else 1 - row["sparsity"]
    return f"{_pct(left)} left"


def problem_line(row: dict) -> str:
    """``stability 20.9% left (sp79.029), rewind 1ep: failed: …``."""
    what = "dense network" if not row["mask_id"] else f"{network_label(row)} ({row['mask_id']})"
    line = f"stability {what}, rewind {row['rewind']}: {row['status']}"
    return line + (f": {row['error']}" if row.get("error") else "")


# ---- over replicates --------------------------------------------------------------------------------
def aggregate_stability(rows_per_replicate: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (network, rewind point) found in any replicate: ``instability`` and
    ``instability_train`` the means over the replicates done, ``std`` and ``train_std`` their sample
    standard deviations (None below two), ``n`` done of ``replicates``, ``values`` (None where not
    done) and ``not_done`` (``{"replicate", "status", "error"}``)."""
    keyed = [{(r["network"], r["rewind"]): r for r in rows} for rows in rows_per_replicate]
    keys = dict.fromkeys((r["network"], r["rewind"]) for rows in rows_per_replicate for r in rows)
    return [_combine([cells.get(key) for cells in keyed]) for key in keys]


def _combine(cells: list[dict | None]) -> dict[str, Any]:
    first = next(c for c in cells if c is not None)
    done = [c for c in cells if c is not None and c["status"] == "ok"]
    not_done = [{"replicate": i, "status": c["status"] if c else "missing", "error": (c or {}).get("error") or ""}
                for i, c in enumerate(cells) if c is None or c["status"] != "ok"]
    known = [c["remaining"] for c in (done or cells) if c is not None and c["remaining"] is not None]
    status = "ok" if done else min((d["status"] for d in not_done), key=_status_rank)
    mean, std = _stats([c["instability"] for c in done])
    train_mean, train_std = _stats([c["instability_train"] for c in done])
    return {**first, "remaining": statistics.fmean(known) if known else None, "status": status, "instability": mean,
            "std": std, "instability_train": train_mean, "train_std": train_std, "n": len(done), "replicates": len(cells),
            "values": [c["instability"] if c is not None and c["status"] == "ok" else None for c in cells],
            "not_done": not_done, "error": "" if done else next((d["error"] for d in not_done if d["error"]), "")}


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    return (statistics.fmean(values) if values else None), (statistics.stdev(values) if len(values) > 1 else None)


def _status_rank(status: str) -> int:
    return _STATUS_ORDER.index(status) if status in _STATUS_ORDER else len(_STATUS_ORDER)


# ---- the verdicts -----------------------------------------------------------------------------------
def verdicts(rows: list[dict], labels: list[str], threshold: float) -> dict[str, dict[str, Any]]:
    """Per network (in the rows' order): ``rewind``, the earliest rewind point whose instability (a
    replicate set's: the mean) is below ``threshold`` (None: none of those done is), ``row`` (its
    row), ``before`` (the earlier rewind points not done: one of them may be stable too), ``done``,
    ``total`` (rewind points), ``lowest`` (the row of the lowest instability) and ``label``."""
    out: dict[str, dict[str, Any]] = {}
    for network in dict.fromkeys(r["network"] for r in rows):
        cells = {r["rewind"]: r for r in rows if r["network"] == network}
        ordered = [cells[label] for label in labels if label in cells]
        done = [r for r in ordered if r["status"] == "ok"]
        stable = next((r for r in done if r["instability"] < threshold), None)
        before = [r["rewind"] for r in ordered[:ordered.index(stable) if stable else len(ordered)] if r["status"] != "ok"]
        out[network] = {"label": network_label(ordered[0]), "mask_id": ordered[0]["mask_id"],
                        "rewind": stable["rewind"] if stable else None, "row": stable, "before": before, "done": len(done),
                        "total": len(ordered),
                        "lowest": min(done, key=lambda r: r["instability"], default=None)}
    return out


def verdict_line(verdict: dict[str, Any], threshold: float, *, markdown: bool = True) -> str:
    """The sentence of one network: "rewind here" with its rewind point, or that none is stable
    (``markdown``: with emphasis, as a list item; else plain text)."""
    bold, code = (lambda t: f"**{t}**", lambda t: f"`{t}`") if markdown else (str, str)
    who = bold(verdict["label"]) + (f" ({code(verdict['mask_id'])})" if verdict["mask_id"] else "")
    if not verdict["done"]:
        line = f"{who}: no instability result yet."
    elif verdict["rewind"] is None:
        low = verdict["lowest"]
        line = (f"{who}: no rewind point is stable: the instability is at least {threshold:g} points at every one done "
                f"({verdict['done']} of {verdict['total']}; lowest {instability_text(low)} at {low['rewind']}).")
    else:
        line = (f"{who}: rewind here: {bold(verdict['rewind'])}, the earliest rewind point whose instability is below "
                f"{threshold:g} points ({instability_text(verdict['row'])}).")
    if verdict["done"] and verdict["before"]:
        line += f" Not done at {', '.join(verdict['before'])}: an earlier rewind point may be stable too."
    return f"- {line}" if markdown else line


def instability_text(row: dict, key: str = "instability", std_key: str = "std") -> str:
    """``0.80``; a replicate set's ``0.80 ± 0.10 (3)`` (percentage points)."""
    if "n" not in row:
        return f"{row[key]:.2f}"
    std = row.get(std_key)
    return f"{row[key]:.2f} ± {'–' if std is None else f'{std:.2f}'} ({row['n']})"


# ---- the plot ---------------------------------------------------------------------------------------
def plot_instability(rows: list[dict], labels: list[str], threshold: float, path: str | os.PathLike, *,
                     title: str = "", accuracy: dict[tuple, dict] | None = None) -> Path:
    """Instability (percentage points) against the rewind point (in the order of ``labels``), one
    line per network, the dense network black; a shaded mean ± std band for rows with a ``std``;
    the threshold as a dotted line. With ``accuracy`` (``accuracy_rows``), a second panel beside it:
    each network's val accuracy at the same rewind points, in the same colours. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lottery.files import atomic_path

    beside = bool(accuracy)
    fig = Figure(figsize=(13 if beside else 8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if beside else 1, 1)
    x_of = {label: i for i, label in enumerate(labels)}
    colors = {network: "black" if network == "dense" else f"C{k % 10}"
              for k, network in enumerate(dict.fromkeys(r["network"] for r in rows))}
    for network, color in colors.items():
        line = [r for r in rows if r["network"] == network and r["status"] == "ok" and r["rewind"] in x_of]
        if line:
            _draw(ax, sorted(line, key=lambda r: x_of[r["rewind"]]), x_of, color)
    if beside:
        _accuracy_panel(fig.add_subplot(1, 2, 2), rows, accuracy, labels, colors)
    ax.axhline(threshold, color="gray", linestyle=":", linewidth=1.2, label=f"threshold ({threshold:g} points)")
    if not any(r["status"] == "ok" for r in rows):
        ax.text(0.5, 0.5, "no instability results yet", transform=ax.transAxes, ha="center", color="gray")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.3, max(len(labels) - 0.7, 0.3))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rewind point")
    ax.set_ylabel("instability (percentage points of val error)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _accuracy_panel(ax, rows: list[dict], accuracy: dict[tuple, dict], labels: list[str], colors: dict[str, str]) -> None:
    """Val accuracy (%) against the rewind point of each network of ``rows``: the dense run's as a
    dashed level line, a ticket's retrained from each rewind point; mean ± std bands."""
    xs = range(len(labels))
    for network, color in colors.items():
        points = [(x, accuracy[(network, label)]) for x, label in zip(xs, labels) if (network, label) in accuracy]
        if not points:
            continue
        px, cells = zip(*points)
        means = [100 * c["val_accuracy"] for c in cells]
        label = network_label(next(r for r in rows if r["network"] == network))
        ax.plot(px, means, marker="" if network == "dense" else "o", markersize=4, linewidth=1.8, color=color,
                linestyle="--" if network == "dense" else "-", label=label)
        spread = [(x, m, 100 * c["std"]) for x, m, c in zip(px, means, cells) if c.get("std") is not None]
        if spread:
            bx, bm, bs = zip(*spread)
            ax.fill_between(bx, [m - s for m, s in zip(bm, bs)], [m + s for m, s in zip(bm, bs)],
                            color=color, alpha=0.15, linewidth=0)
    ax.set_xticks(list(xs), labels)
    ax.set_xlim(-0.3, max(len(labels) - 0.7, 0.3))
    ax.set_xlabel("rewind point")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title("the dense run (dashed); each ticket retrained from the rewind point", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _draw(ax, line: list[dict], x_of: dict[str, int], color: str) -> None:
    xs, ys = [x_of[r["rewind"]] for r in line], [r["instability"] for r in line]
    ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.8, color=color, label=network_label(line[0]))
    spread = [(x, r["instability"], r["std"]) for x, r in zip(xs, line) if r.get("std") is not None]
    if spread:
        bx, means, stds = zip(*spread)
        ax.fill_between(bx, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=color, alpha=0.15, linewidth=0)


# ---- report.md ---------------------------------------------------------------------------------------
def accuracy_rows(ticket_rows: list[dict], labels: list[str], dense: dict | None) -> dict[tuple, dict]:
    """``(network, rewind) -> `` the row of the network's val accuracy (``val_accuracy``, and ``std``
    and ``n`` over replicates): a ticket's (not a control's) result at that rewind point, the dense
    run's at every one (``dense``: a result, or None)."""
    out = {(r["mask_id"], r["rewind"]): r for r in ticket_rows if not r["control"] and r["status"] == "ok"}
    if dense is not None:
        out.update({("dense", label): dense for label in labels})
    return out


def write_stability(directory, rows: list[dict], labels: list[str], threshold: float, accuracy: dict[tuple, dict],
                    text: Callable[[dict], str], *, title: str, problems: list[str], csv_rows: list[dict] | None = None,
                    columns: tuple[str, ...] = STABILITY_COLUMNS) -> dict[str, Any]:
    """``directory``'s (a work directory or a replicate set) ``stability.csv`` (``csv_rows``, default
    ``rows``) and ``report/instability_vs_rewind.png`` (beside it the networks' ``accuracy``, from
    ``accuracy_rows``), when there is any analysis; returns report.md's ``section`` (the accuracy
    cells written by ``text``) and the summary: the files, ``stability_expected`` / ``_done``,
    ``stability_problems`` and ``rewind_here`` (network -> its earliest stable rewind point, or None)."""
    from lottery.files import write_csv

    out: dict[str, Any] = {"stability_csv": None, "instability_plot": None}
    if rows:
        write_csv(directory.stability_csv, columns, rows if csv_rows is None else csv_rows)
        plot_instability(rows, labels, threshold, directory.instability_png, title=title, accuracy=accuracy)
        out.update(stability_csv=str(directory.stability_csv), instability_plot=str(directory.instability_png))
    cells = {key: text(row) for key, row in accuracy.items()}
    return {**out, "section": stability_section(rows, labels, threshold, cells, problems),
            "stability_expected": sum(r.get("replicates", 1) for r in rows),
            "stability_done": sum(r.get("n", r["status"] == "ok") for r in rows), "stability_problems": problems,
            "rewind_here": {k: v["rewind"] for k, v in verdicts(rows, labels, threshold).items()}}


def stability_section(rows: list[dict], labels: list[str], threshold: float, accuracy: dict[tuple, str],
                      problems: list[str] = ()) -> list[str]:
    """The instability table (one line per network and rewind point, beside the network's val
    accuracy there), the plot, one "rewind here" sentence per network and the analyses not done
    (``problems``); [] without analyses."""
    if not rows:
        return []
    done = sum(r.get("n", r["status"] == "ok") for r in rows)
    of = sum(r.get("replicates", 1) for r in rows)
    out = [f"## Instability ({done} of {of} analyses done)", "",
           "Two copies of the network trained from the rewind point with different data orders; the instability is the "
           "highest val error on the line between them less the mean of the two ends', in percentage points (on the "
           f"training subset too). **Bold**: below {threshold:g} points, stable. Val accuracy: the dense run's, or the "
           "ticket's retrained from that rewind point.", "",
           "| network | rewind | instability (points) | on the training subset | val accuracy (%) |", "|---|---|---:|---:|---:|"]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["status"], ""]
        else:
            stable = row["instability"] < threshold
            cells = [f"**{instability_text(row)}**" if stable else instability_text(row),
                     instability_text(row, "instability_train", "train_std")]
        key = (row["network"], row["rewind"])
        out.append(f"| {network_label(row)} | {row['rewind']} | {cells[0]} | {cells[1]} | {accuracy.get(key, '')} |")
    out += ["", f"![instability vs rewind point]({INSTABILITY_PLOT_NAME})", "", "### Where to rewind", ""]
    out += [verdict_line(v, threshold) for v in verdicts(rows, labels, threshold).values()]
    if problems:
        out += ["", f"Not done ({len(problems)}):", "", *(f"- {p}" for p in problems)]
    return out + ["", f"Files: `{STABILITY_CSV}` (one row per analysis), `stability/<network>__<rewind>/{RESULT_JSON}`.", ""]


def _pct(fraction: float) -> str:
    pct = 100 * fraction
    return f"{pct:.1f}%" if pct >= 0.95 else f"{pct:.2g}%"
