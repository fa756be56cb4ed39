"""The bodies of the ``lottery_ticket`` DAG's tasks: one short function per task, called by the
DAG's ``@task`` of the same name.

Each one logs a start and an end line (what, threads, queue, work dir; duration and result), calls
one engine step, and returns only small values for XCom (ids, paths, labels, a few metrics).
Errors a retry cannot fix (``ConfigError``, ``lottery.errors.PermanentError``) fail the task at once
(``engine_call``). The engine (Keras, TensorFlow, NumPy) is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from lottery.config import ConfigError
from lottery.dag.params import FASHION_MNIST, check_params, remaining_label
from lottery.deploy.constants import POOL_SLOTS
from lottery.deploy.supervisor import cores
from lottery.errors import is_permanent
from lottery.plan import RunPlan, check_data_size

log = logging.getLogger("lottery.dag")

# Mapped late_reset / controls instances are named from their kwargs (rendered before the task runs):
# a group of one "5.0% left, rewind 2ep", "random_prune: 5.0% left, rewind 2ep"; a larger group
# "rewind 1ep: masks 1-10 (80.0%…10.7% left)".
GROUP_LABEL = "{{ task.op_kwargs['group'] }}"
# What a retraining result may carry through XCom.
TICKET_KEYS = ("mask_id", "sparsity", "remaining", "rewind", "control", "val_accuracy", "best_val_accuracy", "skipped", "ticket")
DENSE_KEYS = ("val_accuracy", "best_val_accuracy", "epochs", "steps", "skipped")
MASK_KEYS = ("index", "mask_id", "sparsity", "remaining")


# ---- helpers ----------------------------------------------------------------------------------
def training_threads(kind: str) -> int:
    """TF threads for one training task: the cores divided among the training tasks that run at once
    (``LOTTERY_THREADS`` wins). The dense network trains alone; a ticket shares the machine with the
    other tasks of its worker (its executor's slots, never more than the pool's)."""
    if os.environ.get("LOTTERY_THREADS"):
        return max(1, int(os.environ["LOTTERY_THREADS"]))
    if kind == "dense":
        return cores()
    from airflow.sdk import conf

    executor = conf.get("core", "executor", fallback="LocalExecutor")
    if "Celery" in executor:
        slots = conf.getint("celery", "worker_concurrency", fallback=16)
    else:
        slots = conf.getint("core", "parallelism", fallback=32)
    return max(1, cores() // max(1, min(slots, POOL_SLOTS)))


def engine_call(fn, *args, **kwargs):
    """Run an engine step; errors a retry cannot fix (a bad config, a corrupt or missing input: the
    message names the file) fail the task at once; any other error is retried."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if is_permanent(exc):
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        raise


def queue_note() -> str:
    ti = get_current_context().get("ti")
    return f"queue {getattr(ti, 'queue', None) or '?'}"


def ticket_label(mask: dict, rewind: str, control: str | None = None) -> str:
    """One ticket's name: ``5.0% left, rewind 2ep``, ``random_prune: 5.0% left, rewind 2ep``."""
    label = f"{mask.get('label') or remaining_label(mask['remaining'])}, rewind {rewind}"
    return f"{control}: {label}" if control else label


def group_label(masks: list[dict], rewind: str, control: str | None = None) -> str:
    """A group's name: ``rewind 1ep: masks 1-10 (80.0%…10.7% left)``, ``random_prune, rewind 1ep: masks 3, 10, 17
    (51.2%…2.3% left)``. Mask k is the k-th sparsity level (1 = the least pruned), as in ``sparsity_k``."""
    numbers = [m["index"] + 1 for m in masks]
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    names = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    left = [(m.get("label") or remaining_label(m["remaining"])).removesuffix(" left") for m in masks]
    span = left[0] if len(left) == 1 else f"{left[0]}…{left[-1]}"
    head = f"{control}, rewind {rewind}" if control else f"rewind {rewind}"
    return f"{head}: mask{'s' if len(masks) > 1 else ''} {names} ({span} left)"


def _pick(result: dict | None, keys) -> dict[str, Any]:
    return {k: (result or {}).get(k) for k in keys}


# ---- the tasks --------------------------------------------------------------------------------
def validate_config() -> dict[str, Any]:
    context = get_current_context()
    try:
        return check_params(dict(context["params"]), dict(context["dag_run"].conf or {}))
    except ConfigError as exc:
        for field, value, reason in exc.errors:  # every invalid field, one line each: fix them all at once
            log.error("config field %r = %r: %s", field, value, reason)
        raise AirflowFailException(str(exc)) from exc


def fetch_dataset(dataset: str, source: str, limit: int | None) -> dict[str, Any]:
    if dataset != FASHION_MNIST:
        raise AirflowSkipException(f"dataset is the image folder {dataset}: nothing to fetch")
    from lottery.data.fetch import export_fashion_mnist

    started = time.perf_counter()
    log.info("fetch_dataset: start  Fashion-MNIST -> %s (limit %s)", source, limit)
    summary = engine_call(export_fashion_mnist, source, limit=limit)
    log.info("fetch_dataset: done in %.1fs  %s", time.perf_counter() - started, summary)
    return {k: v for k, v in (summary or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}


def prepare_workdir(plan: dict, data_dir: str, artifact_root: str) -> dict[str, Any]:
    from lottery.paths import Workdir

    run = RunPlan.from_dict(plan)
    engine_call(check_data_size, run.config, data_dir)  # the data's size is known now: before any training
    workdir = engine_call(Workdir.for_experiment, artifact_root, run.config, data_dir)
    fresh = not workdir.config_json.exists()
    engine_call(workdir.prepare, run.config, data_dir)
    state = "new" if fresh else f"reused: {workdir.status(run).summary()}"
    log.info("work dir %s (experiment %s): %s", workdir, workdir.name, state)
    return {"workdir": str(workdir), "experiment_id": workdir.name, "reused": not fresh}


def train_dense(plan: dict, data_dir: str, workdir: str) -> dict[str, Any]:
    from lottery import dense

    threads = training_threads("dense")
    log.info("train_dense: start  workdir %s  threads %d  %s", workdir, threads, queue_note())
    started = time.perf_counter()
    result = engine_call(dense.run_dense, RunPlan.from_dict(plan).config, data_dir, workdir, threads=threads)
    log.info(
        "train_dense: %s in %.1fs  val_accuracy %.4f",
        "already done" if result.get("skipped") else "done", time.perf_counter() - started, result["val_accuracy"],
    )
    return _pick(result, DENSE_KEYS)


def make_masks(workdir: str) -> list[dict[str, Any]]:
    from lottery import masks as pruning_step

    started = time.perf_counter()
    masks = engine_call(pruning_step.make_masks, workdir)
    out = [{**_pick(m, MASK_KEYS), "label": remaining_label(m["remaining"])} for m in masks]
    log.info("make_masks: %d masks in %.1fs: %s", len(out), time.perf_counter() - started, ", ".join(m["label"] for m in out))
    return out


def plan_tickets(masks: list[dict], plan: dict, per_task: int = 1) -> list[dict[str, Any]]:
    run = RunPlan.from_dict(plan)
    kwargs = mapped_kwargs(masks, run.tickets, per_task)
    log.info("late_reset: %d masks x %d rewind points = %d tickets in %d tasks (%d per task at most)",
             len(run.masks), len(run.rewinds), len(run.tickets), len(kwargs), per_task)
    return kwargs


def plan_controls(masks: list[dict], plan: dict, per_task: int = 1) -> list[dict[str, Any]]:
    run = RunPlan.from_dict(plan)
    if not run.controls:
        log.info("controls are off")
        return []
    kwargs = mapped_kwargs(masks, run.controls, per_task)
    kinds = dict.fromkeys(c.control for c in run.controls)
    labels = dict.fromkeys(m["label"] for m in masks if m["mask_id"] in {c.mask_id for c in run.controls})
    log.info("controls: %s at %s x %d rewind points = %d runs in %d tasks", ", ".join(kinds), ", ".join(labels),
             len(run.rewinds), len(run.controls), len(kwargs))
    return kwargs


def mapped_kwargs(masks: list[dict], specs, per_task: int = 1) -> list[dict[str, Any]]:
    """The kwargs of the mapped late_reset / controls instances: groups of up to ``per_task``
    consecutive masks of one rewind point and control kind, each with its name (``group``); with
    ``per_task`` 1, a group of one per ticket of the plan, in the plan's order."""
    by_id = {m["mask_id"]: m for m in masks}
    if per_task <= 1:
        chunks = [(s.control, s.rewind, [by_id[s.mask_id]]) for s in specs]
    else:
        runs: dict[tuple, list[dict]] = {}  # (control, rewind) -> its masks, in the plan's order
        for s in specs:
            runs.setdefault((s.control, s.rewind), []).append(by_id[s.mask_id])
        chunks = [(c, r, group[i:i + per_task]) for (c, r), group in runs.items() for i in range(0, len(group), per_task)]
    return [
        {"masks": chunk, "rewind": rewind, **({"control": control} if control else {}),
         "group": ticket_label(chunk[0], rewind, control) if per_task <= 1 else group_label(chunk, rewind, control)}
        for control, rewind, chunk in chunks
    ]


def retrain(workdir: str, masks: list[dict], rewind: str, group: str, control: str | None = None) -> dict[str, Any]:
    """The late_reset task (``control`` None) and the controls task: the tickets of ``masks`` at one
    rewind point in one process (`lottery.late_reset.retrain`, which skips the tickets already done,
    so a cleared group trains only its unfinished tickets)."""
    from lottery import late_reset

    ids, threads = [m["mask_id"] for m in masks], training_threads("ticket")
    log.info("%s: start  masks %s  rewind %s  threads %d  %s  workdir %s", group, ", ".join(ids), rewind, threads,
             queue_note(), workdir)
    started = time.perf_counter()
    results = engine_call(late_reset.retrain, workdir, ids, rewind, control=control, threads=threads)
    for mask, result in zip(masks, results):
        _log_result(ticket_label(mask, rewind, control), result)
    if len(results) > 1:
        skipped = sum(bool(r.get("skipped")) for r in results)
        log.info("%s: done in %.1fs  %d trained, %d already done", group, time.perf_counter() - started,
                 len(results) - skipped, skipped)
    return {"group": group, "tickets": [_pick(r, TICKET_KEYS) for r in results]}


def _log_result(label: str, result: dict) -> None:
    """One ticket's end line: its accuracy, or "already done"."""
    if result.get("skipped"):
        log.info("%s: already done (val_accuracy %.4f), nothing to do: %s", label, result["val_accuracy"], result.get("ticket"))
    else:
        log.info("%s: done in %.1fs  val_accuracy %.4f (best %.4f)", label, result["wall_s"],
                 result["val_accuracy"], result["best_val_accuracy"])


def report(workdir: str | None, plan: dict) -> dict[str, Any]:
    """Write results.csv, the plot and report.md from what is on disk (failed and missing tickets listed)."""
    if not workdir:
        raise AirflowFailException("no work directory: the run failed before prepare_workdir (see the failed task above)")
    from lottery import report as reporting
    from lottery.paths import Workdir

    if not Workdir(workdir).config_json.exists():
        raise AirflowFailException(f"the run's work directory {workdir} is gone (deleted, or not on this machine's disk): "
                                   "nothing to report; trigger the same config again to recompute it")
    run = RunPlan.from_dict(plan)
    paths = engine_call(reporting.write_report, workdir, plan=run, run_id=get_current_context()["run_id"])
    log.info("results:\n%s", reporting.format_table(workdir, reporting.result_rows(workdir, plan=run)))
    for problem in paths.get("problems", []):
        log.warning("not done: %s", problem)
    log.info("report: %s", paths["report"])
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in paths.items()}


def check_results(workdir: str | None, plan: dict) -> dict[str, Any]:
    """Rebuild the report from disk, then fail when any combination failed or is missing. Never the
    ``report`` task's XCom: after "Clear only failed tasks" (which leaves a successful ``report``
    alone) the check judges, and the report shows, the tickets that were just retrained."""
    summary = report(workdir, plan)
    problems = summary.get("problems", [])
    if problems:
        raise AirflowFailException(
            f"{len(problems)} of {summary.get('expected', '?')} combinations failed or are missing "
            f"(see {summary.get('report')}): " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
            + ". Fix the cause, then clear the failed tasks of this run (README: When tickets fail)."
        )
    log.info("all %s combinations done; report %s", summary.get("expected"), summary.get("report"))
    return {"ok": True, "report": summary.get("report")}
