"""What the report page shows, read from one run's work directory: no Airflow import here.

``RunFacts`` is what the page's Airflow side (``lottery.ui.report_page``) found in the metadata
database (the run's state, its plan and work directory from XCom, its task instances);
``build_view`` adds what the files say. A damaged file never raises: it is named in
``ReportView.corrupt`` and the rest of the page is still shown. ``plot_png`` draws the
accuracy-vs-sparsity plot of a partial run (cached by the results it shows); ``ticket_file``
resolves a download inside the work directory or returns None.

A run with replicates (``prepare_workdir``'s ``report_dir`` is a replicate set, not the work
directory): the view's rows are the combinations' ``mean ± std (n)`` over the replicates
(``lottery.replicate_report.aggregate``), each replicate's results read and verified as one work
directory's are, its damaged files and problems named with the replicate.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lottery import replicate_report, report, stability_report
from lottery.errors import LotteryError
from lottery.paths import ReplicateSet, Workdir
from lottery.plan import RunPlan, StabilitySpec, TicketSpec

log = logging.getLogger("lottery.ui")

# Run states after which nothing changes any more (the page stops refreshing itself).
FINISHED_RUN_STATES = {"success", "failed"}
# The ticket tasks whose mapped instances train the tickets (their task instance holds the log).
TICKET_TASKS = ("late_reset", "controls", "imp_chain")
# A ticket without a result, by its task instance's state: still to come, or a problem.
WAITING_STATES = {None, "none", "scheduled", "queued", "up_for_retry", "up_for_reschedule", "restarting", "deferred"}


@dataclass
class TaskInstanceFacts:
    task_id: str
    map_index: int
    state: str | None
    name: str | None  # rendered_map_index: "50.1% left, rewind 0it"
    try_number: int


@dataclass
class RunFacts:
    """One DAG run as the metadata database knows it."""

    dag_id: str
    run_id: str
    state: str
    conf: dict[str, Any]
    plan: dict[str, Any] | None = None  # validate_config's "plan" XCom
    workdir: str | None = None  # prepare_workdir's return value
    report_dir: str | None = None  # prepare_workdir's: the replicate set's directory, or the work directory
    workdirs: list[str] = field(default_factory=list)  # prepare_workdir's: every replicate's work directory
    mapped_kwargs: dict[str, list] = field(default_factory=dict)  # task id -> plan_tickets / plan_controls / ... XCom
    task_instances: list[TaskInstanceFacts] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_RUN_STATES

    def ticket_instance(self, spec: TicketSpec, workdir: str | None = None) -> TaskInstanceFacts | None:
        """The mapped instance that trains ``spec`` (one ticket or its group, or the chain of an iterative
        run) of the replicate in ``workdir`` (default: the run's only one), if it was created; named by
        its map name (Airflow renders ``name`` only when the instance starts)."""
        chain = not spec.control and bool(self.mapped_kwargs.get("imp_chain"))
        task_id = "imp_chain" if chain else "controls" if spec.control else "late_reset"
        for index, kwargs in enumerate(self.mapped_kwargs.get(task_id) or []):
            masks = kwargs.get("masks") or [kwargs.get("mask") or {}]
            if kwargs.get("rewind") == spec.rewind and kwargs.get("control") == spec.control and (
                    chain or any(m.get("mask_id") == spec.mask_id for m in masks)) and (
                    workdir is None or kwargs.get("workdir") in (None, str(workdir))):
                ti = next((ti for ti in self.task_instances if ti.task_id == task_id and ti.map_index == index), None)
                if ti is not None and not ti.name:
                    ti.name = kwargs.get("group") or _map_name(masks[0], spec)
                return ti
        return None

    def stability_state(self, row: dict, workdir: str) -> str | None:
        """The state of the stability instance of ``row``'s analysis in ``workdir`` (None: not created)."""
        for index, kwargs in enumerate(self.mapped_kwargs.get("stability") or []):
            if (kwargs.get("rewind"), kwargs.get("mask") or "", kwargs.get("workdir")) == (row["rewind"], row["mask_id"], workdir):
                return next((ti.state for ti in self.task_instances if ti.task_id == "stability" and ti.map_index == index), None)
        return None


def _map_name(mask: dict, spec: TicketSpec) -> str:
    """The name the DAG's map_index_template gives one ticket: "50.1% left, rewind 0it"."""
    name = f"{mask.get('label') or mask.get('mask_id')}, rewind {spec.rewind}"
    return f"{spec.control}: {name}" if spec.control else name


@dataclass
class Problem:
    """A failed or missing ticket, or a failed task, with the task instance whose log says why."""

    what: str
    status: str
    detail: str = ""
    instance: TaskInstanceFacts | None = None


@dataclass
class ReportView:
    facts: RunFacts
    notice: str = ""  # why there is no report (yet), when there is none
    experiment_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    changed: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    dense: dict[str, Any] | None = None
    corrupt: list[str] = field(default_factory=list)  # "<file>: <why>"
    problems: list[Problem] = field(default_factory=list)
    matching: dict[str, dict] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)  # ticket names with a verified model.keras to download
    waiting: list[Problem] = field(default_factory=list)  # queued or running tickets: not problems
    replicates: int = 1  # > 1: a replicate set; rows are its combinations' means (``n``, ``std``)
    report_dir: str = ""  # the replicate set's directory
    replicate_dirs: list[str] = field(default_factory=list)
    replicate_rows: list[dict[str, Any]] = field(default_factory=list)  # one per replicate and combination
    stability: list[dict[str, Any]] = field(default_factory=list)  # the instability analyses (a set's: their means)
    stability_threshold: float = 2.0
    rewind_here: list[str] = field(default_factory=list)  # one sentence per network

    @property
    def dense_accuracy(self) -> float | None:
        return self.dense.get("val_accuracy") if self.dense else None

    @property
    def dense_std(self) -> float | None:
        return self.dense.get("std") if self.dense else None

    @property
    def done(self) -> int:
        """Tickets done (a replicate set: (replicate, ticket) pairs done)."""
        return sum(r.get("n", r["status"] == "ok") for r in self.rows)

    @property
    def expected(self) -> int:
        return len(self.rows) * self.replicates


# ---- the view ----------------------------------------------------------------------------------
def build_view(facts: RunFacts) -> ReportView:
    """Everything the page shows; the files are read here (a damaged one is named, never raised)."""
    view = ReportView(facts)
    view.problems = _failed_tasks(facts)
    if facts.report_dir and Path(facts.report_dir) != Path(facts.workdir or ""):
        return build_set_view(facts, view)
    if not facts.workdir:
        view.notice = ("The run has not created its work directory yet (prepare_workdir has not run)." if not facts.finished
                       else "The run ended before prepare_workdir created a work directory: no results.")
        return view
    workdir = Workdir(facts.workdir)
    view.experiment_id = workdir.name
    if not workdir.path.is_dir():
        view.notice = (f"The artifacts of this run are gone: {workdir} no longer exists (deleted, or not on this "
                       "machine's disk). The run's tasks are listed below.")
        return view
    plan = _plan(facts, workdir, view)
    if plan is None:
        return view
    view.config, view.changed, view.labels = plan.config.to_dict(), plan.config.id_fields(), list(plan.rewinds)
    view.rows = _rows(workdir, plan, view)
    view.dense = _read_json_or_note(workdir.dense_result, workdir, view)
    view.matching = report.matching_levels(view.rows, view.labels, view.dense_accuracy, report.MATCH_TOLERANCE)
    _with_stability(view, plan, _stability(facts, workdir, plan, view))
    _progress(facts, view.rows)
    tickets = _ticket_problems(facts, view.rows)
    view.waiting = [p for p in tickets if p.status in ("queued", "running")]
    failed_tasks = [p for p in view.problems if not (tickets and p.instance and p.instance.task_id == "check_results")]
    view.problems = [p for p in tickets if p not in view.waiting] + failed_tasks
    done = [spec_name(r) for r in view.rows if r["status"] == "ok"]
    view.models = [name for name in done if ticket_file(workdir.path, name, done) is not None]
    return view


def _progress(facts: RunFacts, rows: list[dict], workdir: str | None = None) -> None:
    """A ticket without a result is "queued" or "running" while its task instance is; "missing" only
    when its instance finished (or the run did) without writing one."""
    for row in rows:
        if row["status"] != "missing":
            continue
        ti = facts.ticket_instance(TicketSpec(row["mask_id"], row["rewind"], row["control"] or None), workdir)
        state = ti.state if ti is not None else None
        if state == "running":
            row["status"] = "running"
        elif state in ("failed", "upstream_failed"):
            row.update(status="failed", error=row["error"] or f"its task {state} without writing a result (see its log)")
        elif state in WAITING_STATES and not facts.finished:
            row["status"] = "queued"


# ---- a run with replicates ----------------------------------------------------------------------
def build_set_view(facts: RunFacts, view: ReportView) -> ReportView:
    """The view of a run whose report is a replicate set: each replicate's rows read and verified
    as one work directory's, then combined (mean ± std (n)); problems and damaged files name the
    replicate. A ticket without a result is "queued" while the run is in progress."""
    replicate_set = ReplicateSet(facts.report_dir)
    view.experiment_id, view.report_dir = replicate_set.name, str(replicate_set)
    members = _set_members(facts, replicate_set, view)
    if members is None:
        return view
    plan, workdirs = members
    view.config, view.changed, view.labels = plan.config.to_dict(), plan.config.id_fields(), list(plan.rewinds)
    view.replicates, view.replicate_dirs = len(workdirs), [str(w) for w in workdirs]
    per, dense, analyses = [], [], []
    for i, workdir in enumerate(workdirs):
        where = f"replicate {i} ({workdir.name}): "
        rows = _rows(workdir, plan, view, where)
        _progress(facts, rows, str(workdir))
        per.append(rows)
        dense.append(_read_json_or_note(workdir.dense_result, workdir, view, where))
        analyses.append(_stability(facts, workdir, plan, view, where))
    view.rows = replicate_report.aggregate(per)
    _with_stability(view, plan, stability_report.aggregate_stability(analyses))
    view.replicate_rows = [{"replicate": i, "experiment_id": w.name, **row} for i, (w, rows) in enumerate(zip(workdirs, per))
                           for row in rows]
    stats = replicate_report.stats([d["val_accuracy"] if d else None for d in dense])
    view.dense = {"val_accuracy": stats["mean"], "std": stats["std"], "n": stats["n"]} if stats["n"] else None
    view.matching = report.matching_levels(view.rows, view.labels, view.dense_accuracy, report.MATCH_TOLERANCE)
    tickets = [Problem(f"replicate {i} ({w.name}): {_what(row)}", row["status"], row.get("error") or "")
               for i, (w, rows) in enumerate(zip(workdirs, per)) for row in rows if row["status"] not in ("ok", "queued")]
    view.waiting = _waiting_combinations(view.rows)
    view.problems = tickets + [p for p in view.problems if not (tickets and p.instance and p.instance.task_id == "check_results")]
    return view


def _set_members(facts: RunFacts, replicate_set: ReplicateSet, view: ReportView) -> tuple[RunPlan, list[Workdir]] | None:
    """The plan and the replicates' work directories: from ``replicates.json`` (else the run's XCom);
    None, with the notice saying why, when they cannot be known."""
    cfg, workdirs = None, [Workdir(w) for w in facts.workdirs]
    if replicate_set.replicates_json.exists():
        try:
            cfg, workdirs = replicate_set.load()
        except (LotteryError, OSError, ValueError, KeyError, TypeError) as exc:
            view.corrupt.append(f"{replicate_set.replicates_json.name}: {exc}")
    elif not replicate_set.path.is_dir():
        view.notice = (f"The artifacts of this run are gone: {replicate_set} no longer exists (deleted, or not on this "
                       "machine's disk). The run's tasks are listed below.")
        return None
    try:
        plan = RunPlan.from_dict(facts.plan) if facts.plan else RunPlan.from_config(cfg) if cfg else None
    except (LotteryError, ValueError, KeyError, TypeError) as exc:
        view.corrupt.append(f"the run's plan: {exc}")
        plan = None
    if plan is None or not workdirs:
        view.notice = "The replicates of this run cannot be read (no replicates.json yet), so their tickets are unknown."
        return None
    return replicate_report.replicate_plan(plan.config, workdirs, plan), workdirs


def _stability(facts: RunFacts, workdir: Workdir, plan: RunPlan, view: ReportView, where: str = "") -> list[dict]:
    """The work directory's instability analyses (``lottery.stability_report``): those the plan
    asks for (a finished run: only when it planned them, ``plan_stability``; a run older than the
    analysis has none) and those on disk. A damaged result is named at the top of the page; one
    without a result is "queued" or "running" while its task instance (or the run) is, "failed"
    when its instance failed without writing one."""
    planned = "stability" in facts.mapped_kwargs or not facts.finished
    rows = stability_report.stability_rows(workdir, plan, planned=planned, remaining=report.mask_remaining(workdir))
    for row in rows:
        if row["status"] == "corrupt":
            name = StabilitySpec(row["mask_id"] or None, row["rewind"]).name
            view.corrupt.append(f"{where}stability/{name}: {row['error']}")
        if row["status"] != "missing":
            continue
        state = facts.stability_state(row, str(workdir))
        if state == "running":
            row["status"] = "running"
        elif state in ("failed", "upstream_failed"):
            row.update(status="failed", error=f"its task {state} without writing a result (see its log)")
        elif state in WAITING_STATES and not facts.finished:
            row["status"] = "queued"
    return rows


def _with_stability(view: ReportView, plan: RunPlan, rows: list[dict]) -> None:
    """The analyses' rows and the "rewind here" sentences, judged by the run's threshold."""
    view.stability, view.stability_threshold = rows, plan.config.stability_threshold
    found = stability_report.verdicts(rows, view.labels, view.stability_threshold)
    view.rewind_here = [stability_report.verdict_line(v, view.stability_threshold, markdown=False) for v in found.values()]


def _waiting_combinations(rows: list[dict]) -> list[Problem]:
    """One line per combination some replicates of which are still to come: ``…, replicates 1, 2``."""
    out = []
    for row in rows:
        waiting = [str(d["replicate"]) for d in row["not_done"] if d["status"] in ("queued", "running")]
        if waiting:
            out.append(Problem(f"{_what(row)}, replicate{'s' if len(waiting) > 1 else ''} {', '.join(waiting)}", "queued"))
    return out


def spec_name(row: dict) -> str:
    return TicketSpec(row["mask_id"], row["rewind"], row["control"] or None).name


def _plan(facts: RunFacts, workdir: Workdir, view: ReportView) -> RunPlan | None:
    """The run's own plan (its XCom); else the plan of the work directory's config.json."""
    try:
        if facts.plan:
            return RunPlan.from_dict(facts.plan)
        return RunPlan.from_config(workdir.load()[0])
    except FileNotFoundError:
        view.notice = f"{workdir} has no config.json yet."
    except (LotteryError, ValueError, KeyError, TypeError) as exc:
        view.corrupt.append(f"{workdir.config_json.name}: {exc}")
        view.notice = "The experiment's config cannot be read, so its tickets are unknown."
    return None


def _rows(workdir: Workdir, plan: RunPlan, view: ReportView, where: str = "") -> list[dict[str, Any]]:
    """``report``'s rows; each damaged result file (a "corrupt" row) is also named at the top of the
    page (after ``where``: which replicate)."""
    sparsity, left = {m.mask_id: m.sparsity for m in plan.masks}, report.mask_remaining(workdir)
    rows = []
    for spec in report.expected_tickets(workdir, plan):
        row = report.result_row(workdir, spec, sparsity[spec.mask_id], left.get(spec.mask_id))  # never raises
        if row["status"] == "ok" and (damage := ticket_damage(workdir.path, spec.name)):
            row.update(status="corrupt", error="; ".join(damage))
        if row["status"] == "corrupt":
            view.corrupt.append(f"{where}{report.TICKETS}/{spec.name}: {row['error']}")
        rows.append(row)
    return rows


def ticket_damage(workdir: str | os.PathLike, ticket: str) -> list[str]:
    """What no longer matches a ticket's ``result.json`` or the files it records (the engine's
    verifier, ``lottery.files.result_damage``): ``["model.keras: 10 bytes, result.json says 36"]``;
    [] when intact. Cached by the sizes and mtimes of the ticket's files, so that a page refresh
    hashes only what changed."""
    directory = Path(workdir, report.TICKETS, ticket)
    try:
        stamp = tuple((entry.name, *_stat(entry)) for entry in sorted(directory.iterdir()))
    except OSError as exc:
        return [f"{directory}: {exc}"]
    return list(_damage(str(directory / report.RESULT_JSON), stamp))


@functools.lru_cache(maxsize=4096)
def _damage(result: str, stamp: tuple) -> tuple[str, ...]:
    """``lottery.files.result_damage``, once per state of the ticket's files."""
    from lottery.files import result_damage

    return tuple(result_damage(result)[1])


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _read_json_or_note(path: Path, workdir: Workdir, view: ReportView, where: str = "") -> dict | None:
    from lottery.files import read_json

    try:
        value = read_json(path, sealed=True)
        if not isinstance(value, dict) or not isinstance(value.get("val_accuracy"), (int, float)):
            raise ValueError("no val_accuracy in it")
        return value
    except FileNotFoundError:
        return None
    except (LotteryError, OSError, ValueError) as exc:
        view.corrupt.append(f"{where}{path.relative_to(workdir.path)}: {exc}")
        return None


def _ticket_problems(facts: RunFacts, rows: list[dict]) -> list[Problem]:
    out = []
    for row in rows:
        if row["status"] == "ok":
            continue
        spec = TicketSpec(row["mask_id"], row["rewind"], row["control"] or None)
        out.append(Problem(_what(row), row["status"], row.get("error") or "", facts.ticket_instance(spec)))
    return out


def _what(row: dict) -> str:
    """``sp80.000 (20.00% left), rewind 1ep[, control random_prune]``."""
    left = row["remaining"] if row["remaining"] is not None else 1 - row["sparsity"]
    what = f"{row['mask_id']} ({100 * left:.2f}% left), rewind {row['rewind']}"
    return what + (f", control {row['control']}" if row["control"] else "")


def _failed_tasks(facts: RunFacts) -> list[Problem]:
    """Failed task instances other than the ticket tasks (those are listed ticket by ticket)."""
    return [Problem(ti.task_id + (f" [{ti.name or ti.map_index}]" if ti.map_index >= 0 else ""), ti.state or "", "", ti)
            for ti in facts.task_instances
            if ti.state in ("failed", "upstream_failed") and ti.task_id not in TICKET_TASKS]


# ---- downloads ---------------------------------------------------------------------------------
def ticket_file(workdir: str | os.PathLike, ticket: str, allowed: list[str], filename: str = "model.keras") -> Path | None:
    """``<workdir>/tickets/<ticket>/<filename>`` when ``ticket`` is one of ``allowed`` (this run's
    tickets) and the file resolves to a regular file inside the work directory; else None."""
    if ticket not in allowed or not _plain_name(ticket):
        return None
    return inside(workdir, Path(report.TICKETS, ticket, filename))


def inside(workdir: str | os.PathLike, relative: Path) -> Path | None:
    """``workdir / relative`` resolved, when it is a regular file inside the work directory (a
    symlink pointing out of it, a missing file or a directory: None)."""
    root = Path(workdir).resolve()
    try:
        path = (root / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return path if path.is_relative_to(root) and path.is_file() else None


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and not os.path.isabs(name)


# ---- the plot ----------------------------------------------------------------------------------
_PLOTS: OrderedDict[str, bytes] = OrderedDict()
_PLOTS_LOCK = threading.Lock()
_PLOTS_KEPT = 16


def plot_key(view: ReportView) -> str:
    """A digest of what the plot shows: the same results, the same picture."""
    points = [(r["mask_id"], r["rewind"], r["control"], r["status"], r["remaining"], r["val_accuracy"]) for r in view.rows]
    spread = [view.dense_std, [(r.get("std"), r.get("n")) for r in view.rows]] if view.replicates > 1 else []
    text = json.dumps([view.experiment_id, view.labels, view.dense_accuracy, points, *spread], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plot_png(view: ReportView) -> bytes:
    """The accuracy-vs-sparsity plot of the results so far, drawn by ``report.plot`` (cached by ``plot_key``)."""
    return _cached_png(plot_key(view), lambda path: report.plot(view.rows, view.labels, view.dense_accuracy, path,
                                                                title=_title(view), dense_std=view.dense_std))


def stability_accuracy(view: ReportView) -> dict[tuple, dict]:
    """``(network, rewind) ->`` the network's val accuracy row beside each analysis (the dense
    run's, or the ticket's retrained from that rewind point; ``stability_report.accuracy_rows``)."""
    dense = None
    if view.dense is not None:
        dense = {"val_accuracy": view.dense_accuracy, "std": view.dense_std, "n": view.dense.get("n", 1)}
    return stability_report.accuracy_rows(view.rows, view.labels, dense)


def instability_key(view: ReportView, accuracy: dict[tuple, dict] | None = None) -> str:
    """A digest of what the instability plot shows (``accuracy``: ``stability_accuracy(view)``,
    when the caller has it)."""
    points = [(r["network"], r["rewind"], r["status"], r["remaining"], r["instability"], r.get("std")) for r in view.stability]
    accuracy = stability_accuracy(view) if accuracy is None else accuracy
    beside = sorted((*key, row["val_accuracy"], row.get("std")) for key, row in accuracy.items())
    text = json.dumps(["instability", view.experiment_id, view.labels, view.stability_threshold, points, beside], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def instability_png(view: ReportView) -> bytes:
    """The instability-vs-rewind plot of the analyses so far, their networks' accuracy beside it
    (``stability_report.plot_instability``, cached)."""
    accuracy = stability_accuracy(view)
    return _cached_png(instability_key(view, accuracy), lambda path: stability_report.plot_instability(
        view.stability, view.labels, view.stability_threshold, path, title=_title(view), accuracy=accuracy))


def _title(view: ReportView) -> str:
    if view.replicates > 1:
        return f"{view.config.get('model', '')}  ({view.experiment_id}: mean ± std of {view.replicates} replicates)"
    return f"{view.config.get('model', '')}  ({view.experiment_id})"


def _cached_png(key: str, draw) -> bytes:
    """The PNG ``draw(path)`` writes, kept for ``key`` (the last ``_PLOTS_KEPT`` pictures)."""
    with _PLOTS_LOCK:
        if key in _PLOTS:
            _PLOTS.move_to_end(key)
            return _PLOTS[key]
    with tempfile.TemporaryDirectory(prefix="lottery-plot-") as tmp:
        png = Path(draw(Path(tmp) / "plot.png")).read_bytes()
    with _PLOTS_LOCK:
        _PLOTS[key] = png
        while len(_PLOTS) > _PLOTS_KEPT:
            _PLOTS.popitem(last=False)
    return png


def report_plot_file(view: ReportView) -> Path | None:
    """The report task's PNG when no result changed after it was drawn (a finished run: no drawing);
    a replicate set's: when no result of any replicate changed."""
    if view.replicates > 1:
        root, drawn, workdirs = Path(view.report_dir), ReplicateSet(view.report_dir).plot_png, map(Workdir, view.replicate_dirs)
    else:
        workdir = Workdir(view.facts.workdir or "")
        root, drawn, workdirs = workdir.path, workdir.plot_png, [workdir]
    png = inside(root, drawn.relative_to(root))
    if png is None:
        return None
    results = [path for workdir in workdirs for path in
               [workdir.dense_result] + [workdir.tickets_dir / spec_name(r) / name for r in view.rows
                                         for name in (report.RESULT_JSON, "error.json")]]
    newest = max((p.stat().st_mtime for p in results if p.exists()), default=0.0)
    return png if newest <= png.stat().st_mtime else None
