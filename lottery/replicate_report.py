"""The report over an experiment's replicates: mean ± standard deviation per combination.

    stats(values) -> {"mean", "std", "n"}                  over the values that are not None
    aggregate(rows_per_replicate) -> rows                   one row per (mask, rewind point, control)
    load_results(P[, plan]) -> ReplicateResults             a work directory or a replicate set, read
    summarize_set(S[, plan]) -> ReplicateResults            writes S/results.csv and S/summary.csv
    write_set_report(S[, plan=..., run_id=...]) -> {...}    the CSVs, S/report/report.md and the plot
    format_set_table(S[, rows]) -> text                     the mean ± std (n) table for logs

Statistics (Python's ``statistics``): the mean is over the replicates whose result is done, ``n`` of
them; the spread is the sample standard deviation (``statistics.stdev``, n - 1 in the denominator).
One value has no sample spread: its std is None, written ``–`` (``82.00 ± – (1)``), never 0. A
cell reads ``mean ± std (n)``, in percent. A combination counts as done in the aggregate ("ok")
when at least one replicate's result is; each replicate without one is listed in its ``not_done``
and named in the problems (``replicate 1 (<experiment id>): sp80.000 (20.0% left), rewind 1ep:
failed: …``).

"Matches the dense network" is judged on the means: a combination's mean against the mean of the
replicates' dense runs (``MATCH_TOLERANCE``), the spread of both written beside them. The plot
draws the mean line of each rewind point with a shaded mean ± std band (controls: dashed, no band).

Each replicate is an experiment of its own (``ExperimentConfig.replicate``) whose work directory
gets its own report too, so that one replicate can be read alone. No TensorFlow, Keras or NumPy.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lottery.config import CONTROLS, ExperimentConfig
from lottery.errors import LotteryError, MissingArtifactError
from lottery.paths import PLOT_NAME, RESULTS_CSV, SUMMARY_CSV, ReplicateSet, Workdir
from lottery.plan import RunPlan, StabilitySpec, TicketSpec
from lottery.workdir_report import (
    MATCH_TOLERANCE,
    RESULT_COLUMNS,
    accuracy_table,
    dense_result,
    described,
    mask_remaining,
    matching_levels,
    pct,
    plot,
    problem_line,
    problems_section,
    result_rows,
    settings_section,
    utc_now,
    write_workdir_report,
)

log = logging.getLogger("lottery")

SET_RESULT_COLUMNS = ("replicate", "experiment_id", *RESULT_COLUMNS)
SUMMARY_COLUMNS = ("mask_id", "sparsity", "remaining", "rewind", "control", "replicates", "n", "mean_val_accuracy",
                   "std_val_accuracy", "mean_best_val_accuracy", "std_best_val_accuracy", "not_done")
# A combination no replicate has done shows the first of these its replicates are in.
_STATUS_ORDER = ("corrupt", "failed", "running", "queued", "missing")


# ---- the statistics (pure) ---------------------------------------------------------------------
def stats(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1; None below two values) and count of the values
    that are not None (None: a replicate without a result). No values: mean and std None, n 0."""
    done = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(done) if done else None,
            "std": statistics.stdev(done) if len(done) > 1 else None, "n": len(done)}


def aggregate(rows_per_replicate: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (mask, rewind point, control) found in any replicate, in the order first seen.

    Each has the keys of a result row (``val_accuracy`` and ``best_val_accuracy`` the means, so
    that ``plot``, ``accuracy_table`` and ``matching_levels`` read it as they read one replicate's)
    and ``std``, ``best_std``, ``n`` (replicates done), ``replicates``, ``values`` (each
    replicate's val accuracy, None where not done) and ``not_done`` (``{"replicate", "status",
    "error"}`` per replicate without a result; a combination missing from a replicate's rows is
    "missing" there)."""
    keyed = [{_key(r): r for r in rows} for rows in rows_per_replicate]
    keys = dict.fromkeys(_key(r) for rows in rows_per_replicate for r in rows)
    return [_combine([cells.get(key) for cells in keyed]) for key in keys]


def _key(row: dict) -> tuple[str, str, str]:
    return row["mask_id"], row["rewind"], row["control"] or ""


def _combine(cells: list[dict | None]) -> dict[str, Any]:
    """One combination's replicates (None: not among that replicate's rows) as one row."""
    first = next(c for c in cells if c is not None)
    done = [c for c in cells if c is not None and c["status"] == "ok"]
    acc, best = stats([c["val_accuracy"] for c in done]), stats([c.get("best_val_accuracy") for c in done])
    not_done = [{"replicate": i, "status": c["status"] if c else "missing", "error": (c or {}).get("error") or ""}
                for i, c in enumerate(cells) if c is None or c["status"] != "ok"]
    known = [c["remaining"] for c in (done or cells) if c is not None and c["remaining"] is not None]
    status = "ok" if done else min((d["status"] for d in not_done), key=_status_rank)
    return {
        "mask_id": first["mask_id"], "sparsity": first["sparsity"], "remaining": statistics.fmean(known) if known else None,
        "rewind": first["rewind"], "control": first["control"] or "", "status": status,
        "val_accuracy": acc["mean"], "std": acc["std"], "n": acc["n"], "replicates": len(cells),
        "best_val_accuracy": best["mean"], "best_std": best["std"],
        "values": [c["val_accuracy"] if c is not None and c["status"] == "ok" else None for c in cells],
        "not_done": not_done, "error": "" if done else next((d["error"] for d in not_done if d["error"]), ""),
    }


def _status_rank(status: str) -> int:
    return _STATUS_ORDER.index(status) if status in _STATUS_ORDER else len(_STATUS_ORDER)


def spread(mean: float, std: float | None, n: int) -> str:
    """``82.00 ± 2.00 (3)``: a mean and its std in percent, and how many values; ``82.00 ± – (1)``."""
    return f"{100 * mean:.2f} ± {'–' if std is None else f'{100 * std:.2f}'} ({n})"


def cell_text(row: dict) -> str:
    """An aggregated row's cell: ``mean ± std (n)``."""
    return spread(row["val_accuracy"], row["std"], row["n"])


# ---- reading an experiment: one work directory, or a replicate set ------------------------------
@dataclass
class ReplicateResults:
    """An experiment's results, replicate by replicate (one work directory: one replicate)."""

    path: Path  # the work directory or the replicate set's directory
    cfg: ExperimentConfig  # ``replicates``: how many
    plan: RunPlan  # what every replicate is expected to have done
    run_info: dict[str, Any]  # the first readable replicate's run.json (data directory, data set id); {} if none
    workdirs: list[Workdir]
    rows: list[list[dict[str, Any]]]  # each replicate's result rows (``workdir_report.result_rows``)
    dense: list[dict[str, Any] | None]  # each replicate's dense result (None: not trained, or unreadable)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def replicates(self) -> int:
        return len(self.workdirs)

    @property
    def labels(self) -> list[str]:
        return list(self.plan.rewinds)

    @functools.cached_property
    def summary(self) -> list[dict[str, Any]]:
        """``aggregate`` of the replicates' rows."""
        return aggregate(self.rows)

    @property
    def dense_stats(self) -> dict[str, Any]:
        return stats([d.get("val_accuracy") if d else None for d in self.dense])

    def flat_rows(self) -> list[dict[str, Any]]:
        """One row per replicate and combination, with its ``replicate`` (0-based) and ``experiment_id``."""
        return [{"replicate": i, "experiment_id": w.name, **row} for i, (w, rows) in enumerate(zip(self.workdirs, self.rows))
                for row in rows]

    def problems(self) -> list[str]:
        """Every failed or missing (replicate, combination), naming the replicate."""
        return [f"replicate {i} ({w.name}): {problem_line(row)}" for i, (w, rows) in enumerate(zip(self.workdirs, self.rows))
                for row in rows if row["status"] != "ok"]


def load_results(path: str | os.PathLike, plan: RunPlan | None = None) -> ReplicateResults:
    """The results of the work directory or replicate set at ``path`` (reads; writes nothing).

    ``plan``: what was planned (default: the config's tickets and the controls that were started);
    with replicates, each is expected to have every control started in any of them."""
    path = Path(path)
    if ReplicateSet.holds_set(path):
        cfg, workdirs = ReplicateSet(path).load()
    elif Workdir(path).config_json.exists():
        cfg, workdirs = Workdir(path).load()[0], [Workdir(path)]
    else:
        raise MissingArtifactError(f"{path} is neither an experiment's work directory (no config.json) nor a replicate "
                                   "set (no replicates.json)")
    plan = replicate_plan(cfg, workdirs, plan)
    return ReplicateResults(path, cfg, plan, _run_info(workdirs), workdirs,
                            [result_rows(w, plan) for w in workdirs], [dense_result(w) for w in workdirs])


def replicate_plan(cfg: ExperimentConfig, workdirs: list[Workdir], plan: RunPlan | None = None) -> RunPlan:
    """The plan every replicate is judged by: ``plan`` (default: the config's, without its
    controls and instability analyses) with every control and analysis started in any replicate:
    all expect the same combinations."""
    base = plan or RunPlan.from_config(cfg)
    wanted = set(plan.controls if plan else ()) | {spec for w in workdirs for spec in w.started_controls()}
    controls = tuple(spec for kind in CONTROLS for m in base.masks for r in base.rewinds
                     if (spec := TicketSpec(m.mask_id, r, kind)) in wanted)
    analyses = set(plan.stability if plan else ()) | {spec for w in workdirs for spec in w.started_stability()}
    stability = tuple(spec for network in [None, *(m.mask_id for m in base.masks)] for r in base.rewinds
                      if (spec := StabilitySpec(network, r)) in analyses)
    return dataclasses.replace(base, controls=controls, stability=stability)


def _run_info(workdirs: list[Workdir]) -> dict[str, Any]:
    for workdir in workdirs:
        try:
            return workdir.load()[1]
        except (LotteryError, OSError, ValueError):
            continue
    return {}


# ---- the set's report ---------------------------------------------------------------------------
def summarize_set(path: str | os.PathLike, plan: RunPlan | None = None) -> ReplicateResults:
    """``load_results``, also written: ``S/results.csv`` (``SET_RESULT_COLUMNS``: one row per
    replicate and combination) and ``S/summary.csv`` (``SUMMARY_COLUMNS``: mean, std, n)."""
    from lottery.files import write_csv

    replicate_set, results = ReplicateSet(path), load_results(path, plan)
    write_csv(replicate_set.results_csv, SET_RESULT_COLUMNS, results.flat_rows())
    write_csv(replicate_set.summary_csv, SUMMARY_COLUMNS, summary_csv_rows(results.summary))
    return results


def summary_csv_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``summary.csv``; ``not_done`` reads ``1:failed 2:missing`` (replicate:status)."""
    return [{**r, "mean_val_accuracy": r["val_accuracy"], "std_val_accuracy": r["std"],
             "mean_best_val_accuracy": r["best_val_accuracy"], "std_best_val_accuracy": r["best_std"],
             "not_done": " ".join(f"{d['replicate']}:{d['status']}" for d in r["not_done"])} for r in summary]


def write_set_report(
    path: str | os.PathLike,
    *,
    plan: RunPlan | None = None,
    tolerance: float = MATCH_TOLERANCE,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Each replicate's own report (in its work directory), then the set's: ``results.csv``,
    ``summary.csv``, ``report/accuracy_vs_sparsity.png`` and ``report/report.md``. Returns the keys
    of ``write_workdir_report`` (``expected`` and ``done`` count (replicate, combination) pairs) and
    ``summary_csv``, ``replicates``, ``workdirs``, ``replicate_reports``, ``combinations``, ``dense_std``."""
    from lottery.files import write_text

    replicate_set, results = ReplicateSet(path), summarize_set(path, plan)
    own = [_own_report(w, results.plan, tolerance, run_id) for w in results.workdirs]
    dense = results.dense_stats
    plot(results.summary, results.labels, dense["mean"], replicate_set.plot_png, dense_std=dense["std"],
         title=f"{results.cfg.model}  ({results.name}: mean ± std of {results.replicates} replicates)")
    problems = results.problems()
    matching = matching_levels(results.summary, results.labels, dense["mean"], tolerance)
    stability = set_stability(replicate_set, results)
    written = utc_now()
    write_text(replicate_set.report_md, render_set_markdown(results, tolerance=tolerance, matching=matching, problems=problems,
                                                            described=described(run_id, written), own_reports=own,
                                                            stability=stability.pop("section")))
    done, expected = sum(r["status"] == "ok" for r in results.flat_rows()), sum(len(rows) for rows in results.rows)
    log.info("report over %d replicates: %d of %d (replicate, combination) pairs done, %d failed or missing -> %s",
             results.replicates, done, expected, len(problems), replicate_set.report_md)
    return {
        **stability,
        "workdir": str(replicate_set), "results_csv": str(replicate_set.results_csv), "summary_csv": str(replicate_set.summary_csv),
        "plot": str(replicate_set.plot_png), "report": str(replicate_set.report_md), "expected": expected, "done": done,
        "problems": problems, "matching": matching, "dense_val_accuracy": dense["mean"], "dense_std": dense["std"],
        "replicates": results.replicates, "workdirs": [str(w) for w in results.workdirs], "replicate_reports": own,
        "combinations": len(results.summary), "run_id": run_id, "written": written,
    }


def set_stability(replicate_set: ReplicateSet, results: ReplicateResults) -> dict[str, Any]:
    """The replicates' instability analyses, mean ± std (n) per (network, rewind point)
    (``lottery.stability_report.write_stability``): the set's ``stability.csv`` holds one row per
    replicate and analysis; "rewind here" is judged on the means."""
    from lottery import stability_report as stab

    per = [stab.stability_rows(w, results.plan, remaining=mask_remaining(w)) for w in results.workdirs]
    flat = [{"replicate": i, "experiment_id": w.name, **row} for i, (w, rows) in enumerate(zip(results.workdirs, per))
            for row in rows]
    problems = [f"replicate {r['replicate']} ({r['experiment_id']}): {stab.problem_line(r)}" for r in flat if r["status"] != "ok"]
    dense = results.dense_stats
    dense_row = {"val_accuracy": dense["mean"], "std": dense["std"], "n": dense["n"]} if dense["n"] else None
    accuracy = stab.accuracy_rows(results.summary, results.labels, dense_row)
    title = f"{results.cfg.model}  ({results.name}: mean ± std of {results.replicates} replicates)"
    return stab.write_stability(replicate_set, stab.aggregate_stability(per), results.labels,
                                results.plan.config.stability_threshold, accuracy, cell_text, title=title, problems=problems,
                                csv_rows=flat, columns=stab.SET_STABILITY_COLUMNS)


def _own_report(workdir: Workdir, plan: RunPlan, tolerance: float, run_id: str | None) -> str | None:
    """A replicate's own report in its work directory; None (logged) when it cannot be written."""
    try:
        return write_workdir_report(workdir, plan=plan, tolerance=tolerance, run_id=run_id)["report"]
    except (LotteryError, OSError) as exc:
        log.warning("report of replicate %s not written: %s", workdir, exc)
        return None


# ---- report.md ----------------------------------------------------------------------------------
def render_set_markdown(results: ReplicateResults, *, tolerance: float, matching: dict, problems: list[str],
                        described: str = "", own_reports: list[str | None] = (), stability: list[str] = ()) -> str:
    labels, summary, dense = results.labels, results.summary, results.dense_stats
    out = [f"# Lottery-ticket experiment `{results.name}`: {results.replicates} replicates", ""]
    if described:
        out += [described, ""]
    out += settings_section(results.cfg, results.run_info, labels)
    out += _replicates_section(results, own_reports)
    out += _set_tickets_section(results, tolerance)
    if dense["n"]:
        out += _set_matching_section(summary, labels, matching, dense)
    for control in sorted({r["control"] for r in summary if r["control"]}):
        subset = [r for r in summary if r["control"] == control]
        out.append(f"## Control `{control}` ({sum(r['n'] for r in subset)} of {results.replicates * len(subset)} done)")
        out.append("")
        out.append(accuracy_table(summary, labels, control=control, dense_acc=dense["mean"], tolerance=tolerance, cell=cell_text))
        out.append("")
    out += stability
    out += problems_section(problems)
    out.append(f"Files: `{RESULTS_CSV}` (one row per replicate and combination), `{SUMMARY_CSV}` (mean, std and n "
               "per combination); each replicate's results and report in its own work directory.")
    out.append("")
    return "\n".join(out)


def _replicates_section(results: ReplicateResults, own_reports: list[str | None]) -> list[str]:
    seed = results.cfg.seed
    out = [f"{results.replicates} replicates (seeds {seed} to {seed + results.replicates - 1}), each an experiment of its "
           "own with its own work directory and report:", "",
           "| replicate | seed | experiment | dense val accuracy (%) | done | its report |", "|---:|---:|---|---:|---:|---|"]
    for i, (workdir, rows, dense) in enumerate(zip(results.workdirs, results.rows, results.dense)):
        acc = f"{100 * dense['val_accuracy']:.2f}" if dense and "val_accuracy" in dense else "not trained"
        report = own_reports[i] if i < len(own_reports) and own_reports[i] else "-"
        done = sum(r["status"] == "ok" for r in rows)
        out.append(f"| {i} | {seed + i} | `{workdir.name}` | {acc} | {done} of {len(rows)} | `{report}` |")
    return out + [""]


def _set_tickets_section(results: ReplicateResults, tolerance: float) -> list[str]:
    dense, summary = results.dense_stats, results.summary
    if dense["n"]:
        out = [f"**Dense network**: val accuracy (%) {spread(dense['mean'], dense['std'], dense['n'])}: the mean ± "
               "sample standard deviation (n) of the replicates' dense runs."]
    else:
        out = ["**Dense network**: not trained (missing) in any replicate - no ticket can be judged."]
    tickets = [r for r in summary if not r["control"]]
    return out + [
        "", f"## Tickets ({sum(r['n'] for r in tickets)} of {results.replicates * len(tickets)} done)", "",
        f"Val accuracy (%) after late-reset retraining: mean ± sample standard deviation (n: the replicates done, of "
        f"{results.replicates}). **Bold**: the mean matches the dense network's mean (at most {100 * tolerance:g} "
        "percentage points below it).", "",
        accuracy_table(summary, results.labels, dense_acc=dense["mean"], tolerance=tolerance, cell=cell_text), "",
        f"![accuracy vs sparsity: mean ± std]({PLOT_NAME})", "",
    ]


def _set_matching_section(summary: list[dict], labels: list[str], matching: dict, dense: dict) -> list[str]:
    out = ["### Which tickets match the dense network (judged on the means)", ""]
    for label in labels:
        m = matching.get(label, {})
        if not m.get("done"):
            out.append(f"- rewind {label}: no results")
        elif m["matching"]:
            row = next(r for r in summary if r["mask_id"] == m["sparsest_mask_id"] and r["rewind"] == label and not r["control"])
            out.append(f"- rewind {label}: {m['matching']} of {m['done']} levels match; the sparsest matching ticket keeps "
                       f"{pct(m['sparsest_remaining'])} of the weights (`{m['sparsest_mask_id']}`: {cell_text(row)} against "
                       f"the dense {spread(dense['mean'], dense['std'], dense['n'])})")
        else:
            out.append(f"- rewind {label}: none of {m['done']} levels match")
    out.append("")
    return out


# ---- the table for logs and the terminal -------------------------------------------------------
def format_set_table(path: str | os.PathLike, rows: list[dict[str, Any]] | None = None) -> str:
    """Val accuracy (%) ``mean ± std (n)`` by sparsity and rewind point. ``rows``: the set's flat
    rows (``ReplicateResults.flat_rows``, with ``replicate``); default: read them."""
    results = load_results(path)
    per = results.rows if rows is None else [[r for r in rows if r["replicate"] == i] for i in range(results.replicates)]
    summary, dense = aggregate(per), results.dense_stats
    lines = [f"replicate set {results.name}: {results.replicates} replicates; val accuracy (%) mean ± std (n)"]
    if dense["n"]:
        lines.append(f"dense network: {spread(dense['mean'], dense['std'], dense['n'])}")
    for control in sorted({r["control"] for r in summary}, key=lambda c: (c != "", c)):
        subset = [r for r in summary if r["control"] == control]
        lines += ["", "tickets" if not control else f"control {control}",
                  f"{'sparsity':>9} {'left':>7} " + " ".join(f"{label:>20}" for label in results.labels)]
        for mid in dict.fromkeys(r["mask_id"] for r in subset):
            cells = {r["rewind"]: r for r in subset if r["mask_id"] == mid}
            first = next(iter(cells.values()))
            left = first["remaining"] if first["remaining"] is not None else 1 - first["sparsity"]
            texts = [_text_cell(cells.get(label)) for label in results.labels]
            lines.append(f"{100 * first['sparsity']:8.2f}% {100 * left:6.2f}% " + " ".join(f"{t:>20}" for t in texts))
    return "\n".join(lines)


def _text_cell(row: dict | None) -> str:
    return "" if row is None else cell_text(row) if row["status"] == "ok" else row["status"]
