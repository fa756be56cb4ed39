"""The experiment's report: the entry points the DAG, the CLI and notebooks call.

    write_report(P[, plan=..., run_id=...]) -> {"results_csv", "plot", "report", "problems", ...}
    summarize(P[, plan]) -> rows        one row per expected ticket; writes P/results.csv
    result_rows(P[, plan]) -> rows      the same rows, nothing written
    format_table(P[, rows]) -> text     the accuracy table for logs and the terminal
    compare([P1, P2, ...], DIR) -> {"plot", "table", ...}   several experiments in one plot and table

``P`` is an experiment's work directory, or a replicate set's directory (``ReplicateSet``: an
experiment run with ``replicates`` > 1): then the rows are one per replicate and combination
(with ``replicate`` and ``experiment_id``), ``summarize`` also writes ``summary.csv`` and the
report shows ``mean ± std (n)`` per combination (``lottery.replicate_report``).

The report of one work directory: ``lottery.workdir_report`` (its pieces are public here too:
``plot``, ``accuracy_table``, ``matching_levels``, ...).

No TensorFlow, Keras or NumPy import.
"""

from __future__ import annotations

import os
from typing import Any

from lottery import compare as comparison
from lottery import replicate_report, workdir_report
from lottery.paths import ReplicateSet
from lottery.plan import RunPlan
from lottery.workdir_report import (  # noqa: F401 - public here
    MATCH_TOLERANCE,
    RESULT_COLUMNS,
    RESULT_JSON,
    TICKETS,
    accuracy_table,
    expected_tickets,
    mask_remaining,
    matching_levels,
    plot,
    render_markdown,
    result_row,
)


def write_report(
    path: str | os.PathLike,
    *,
    plan: RunPlan | None = None,
    tolerance: float = MATCH_TOLERANCE,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Write results.csv, the plot and report.md for the work directory ``path``; returns their
    paths and a summary (``workdir_report.write_workdir_report``). For a replicate set: each
    replicate's own report, then the set's, with summary.csv (``replicate_report.write_set_report``).

    ``plan``: the tickets and controls that were planned (default: those of the work directory's
    config, with the controls that were started); those without a result are reported as missing.
    ``run_id``: the DAG run the report describes; report.md names it and when it was written."""
    if ReplicateSet.holds_set(path):
        return replicate_report.write_set_report(path, plan=plan, tolerance=tolerance, run_id=run_id)
    return workdir_report.write_workdir_report(path, plan=plan, tolerance=tolerance, run_id=run_id)


def result_rows(path: str | os.PathLike, plan: RunPlan | None = None) -> list[dict[str, Any]]:
    """One row per expected ticket with its status (reads the results; writes nothing)."""
    if ReplicateSet.holds_set(path):
        return replicate_report.load_results(path, plan).flat_rows()
    return workdir_report.result_rows(path, plan)


def summarize(path: str | os.PathLike, plan: RunPlan | None = None) -> list[dict[str, Any]]:
    """`result_rows`, also written to ``results.csv`` (a replicate set: and ``summary.csv``)."""
    if ReplicateSet.holds_set(path):
        return replicate_report.summarize_set(path, plan).flat_rows()
    return workdir_report.summarize(path, plan)


def format_table(path: str | os.PathLike, rows: list[dict[str, Any]] | None = None) -> str:
    """Val accuracy (%) by sparsity (rows) and rewind point (columns), dense accuracy on top; a
    replicate set: ``mean ± std (n)`` per cell (``rows``: its rows, as ``result_rows`` gives them)."""
    if ReplicateSet.holds_set(path):
        return replicate_report.format_set_table(path, rows)
    return workdir_report.format_table(path, rows)


def compare(paths: list[str | os.PathLike], out_dir: str | os.PathLike, *, rewinds: list[str] | None = None) -> dict[str, Any]:
    """``DIR/comparison.png`` and ``DIR/comparison.md``: the experiments at ``paths`` (work
    directories or replicate sets, on the same data set and model) in one plot and table, each
    labelled by what differs in its config (``lottery.compare``)."""
    return comparison.compare(paths, out_dir, rewinds=rewinds)
