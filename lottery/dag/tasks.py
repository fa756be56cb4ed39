"""The bodies of the ``lottery_ticket`` DAG's tasks: one short function per task, called by the
DAG's ``@task`` of the same name.

Each one logs a start and an end line (what, threads, queue, work dir; duration and result), calls
one engine step, and returns only small values for XCom (ids, paths, labels, a few metrics).
Errors a retry cannot fix (``ConfigError``, ``lottery.errors.PermanentError``) fail the task at once
(``engine_call``). A training task whose unit another run is training gives its worker back and
comes back later (``training_call``). The engine (Keras, TensorFlow, NumPy) is imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException, AirflowSkipException

from lottery.config import ConfigError
from lottery.dag.params import FASHION_MNIST, check_params, remaining_label
from lottery.deploy.constants import POOL_SLOTS
from lottery.deploy.supervisor import cores
from lottery.errors import is_permanent
from lottery.locks import (TRAINING_LOCK_POLL_ENV, TRAINING_LOCK_TIMEOUT_ENV, LockTimeout, TrainingLockBusy, busy_raises,
                           lock_timeout, training_lock_poll_s)
from lottery.plan import RunPlan, check_data_size

log = logging.getLogger("lottery.dag")

# Mapped late_reset / controls / imp_chain / stability instances are named from their kwargs (rendered
# before the task runs): a group of one "5.0% left, rewind 2ep", "random_prune: 5.0% left, rewind 2ep";
# a larger group "rewind 1ep: masks 1-10 (80.0%…10.7% left)"; a chain "chain, rewind 1ep"; an
# instability analysis "dense, rewind 1ep" or "5.0% left, rewind 1ep". With several replicates each
# name starts with its replicate's: "rep 2: 5.0% left, rewind 2ep".
GROUP_LABEL = "{{ task.op_kwargs['group'] }}"
# Mapped train_dense / make_masks instances, one per replicate: "rep 1", "rep 2", ...; with one
# replicate, its experiment id.
REPLICATE_LABEL = "{{ task.op_kwargs['replicate'] }}"
# What a retraining result may carry through XCom.
TICKET_KEYS = ("mask_id", "sparsity", "remaining", "rewind", "control", "val_accuracy", "best_val_accuracy", "skipped", "ticket")
LEVEL_KEYS = ("level", *TICKET_KEYS)
STABILITY_KEYS = ("stability", "mask_id", "rewind", "instability", "instability_train", "points", "skipped")
DENSE_KEYS = ("val_accuracy", "best_val_accuracy", "epochs", "steps", "skipped")
MASK_KEYS = ("index", "mask_id", "sparsity", "remaining")


# ---- helpers ----------------------------------------------------------------------------------
def training_threads(kind: str, together: int = 1) -> int:
    """TF threads for one training task: the cores divided among the training tasks that run at once
    (``LOTTERY_THREADS`` wins). The dense network trains alone, or beside the ``together`` dense
    networks of the other replicates; a ticket or a chain shares the machine with the other tasks of
    its worker (its executor's slots, never more than the pool's)."""
    if os.environ.get("LOTTERY_THREADS"):
        return max(1, int(os.environ["LOTTERY_THREADS"]))
    if kind == "dense" and together <= 1:
        return cores()
    from airflow.sdk import conf

    executor = conf.get("core", "executor", fallback="LocalExecutor")
    if "Celery" in executor:
        slots = conf.getint("celery", "worker_concurrency", fallback=16)
    else:
        slots = conf.getint("core", "parallelism", fallback=32)
    slots = min(slots, POOL_SLOTS) if kind != "dense" else min(slots, POOL_SLOTS, together)
    return max(1, cores() // max(1, slots))


def engine_call(fn, *args, **kwargs):
    """Run an engine step; errors a retry cannot fix (a bad config, a corrupt or missing input: the
    message names the file) fail the task at once; any other error is retried."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if is_permanent(exc):
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        raise


def training_call(unit: str, fn, *args, **kwargs):
    """`engine_call` for a training step (``unit``: the task's name in the log). When another
    process trains one of its units, the task does not wait for it in a worker: the units it could
    train are trained, then it gives its worker and pool slot back (``up_for_reschedule``) and comes
    back in ``LOTTERY_TRAINING_LOCK_POLL_S`` seconds, finding done what either process finished."""
    with busy_raises():
        try:
            return engine_call(fn, *args, **kwargs)
        except TrainingLockBusy as busy:
            raise _reschedule(unit, busy) from busy


def _reschedule(unit: str, busy: TrainingLockBusy) -> AirflowRescheduleException:
    """The reschedule of a task that met ``busy``, with one log line naming the holder and when the
    task looks again; ``LockTimeout`` instead once this try has been giving its worker back for
    ``LOTTERY_TRAINING_LOCK_TIMEOUT`` seconds (counted from its first reschedule; a retry waits again)."""
    context = get_current_context()
    now = datetime.now(timezone.utc)
    first = context["ti"].get_first_reschedule_date(context) or now
    waited, bound = (now - first).total_seconds(), lock_timeout(math.inf, TRAINING_LOCK_TIMEOUT_ENV)
    if waited >= bound:
        raise LockTimeout(f"waited {waited:.0f} s for another run's training: {busy}; it is still training: clear this "
                          f"task once it has finished, or raise {TRAINING_LOCK_TIMEOUT_ENV}")
    poll = min(training_lock_poll_s(), bound - waited)
    again = now + timedelta(seconds=poll)
    so_far = f", giving it back for {waited:.0f} s so far" if waited else ""
    log.info("%s: waiting for another run's training: %s; giving the worker back, looking again at %s UTC "
             "(in %.1f s, %s%s)", unit, busy, again.strftime("%H:%M:%S"), poll, TRAINING_LOCK_POLL_ENV, so_far)
    return AirflowRescheduleException(reschedule_date=again)


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
    """Every replicate's work directory (``<root>/<its experiment id>``: created, or checked to hold
    it) and, for several replicates, the set directory their report goes to."""
    from lottery.paths import Workdir, prepare_replicates

    run = RunPlan.from_dict(plan)
    engine_call(check_data_size, run.config, data_dir)  # the data's size is known now: before any training
    configs = run.config.replicate_configs()
    fresh = [not engine_call(Workdir.for_experiment, artifact_root, c, data_dir).config_json.exists() for c in configs]
    replicate_set, workdirs = engine_call(prepare_replicates, artifact_root, run.config, data_dir)
    for i, (workdir, cfg) in enumerate(zip(workdirs, configs)):
        state = "new" if fresh[i] else f"reused: {workdir.status(RunPlan.from_config(cfg)).summary()}"
        who = f"rep {i + 1} (seed {cfg.seed}): " if len(workdirs) > 1 else ""
        log.info("%swork dir %s (experiment %s): %s", who, workdir, workdir.name, state)
    if replicate_set is not None:
        log.info("%d replicates, seeds %d..%d; their report: %s", len(workdirs), configs[0].seed, configs[-1].seed, replicate_set)
    return {"workdir": str(workdirs[0]), "workdirs": [str(w) for w in workdirs],
            "report_dir": str(replicate_set or workdirs[0]), "experiment_id": workdirs[0].name,
            "experiment_ids": [w.name for w in workdirs], "reused": not any(fresh)}


def replicate_label(index: int, count: int, experiment_id: str) -> str:
    """A replicate's name: ``rep 2`` (the second: seed + 1) among several; the experiment id when it is the only one."""
    return f"rep {index + 1}" if count > 1 else experiment_id


def plan_replicates(workdirs: list[str], experiment_ids: list[str]) -> list[dict[str, Any]]:
    """The kwargs of the mapped train_dense / make_masks: one per replicate, its work dir and its name."""
    return [{"workdir": w, "replicate": replicate_label(i, len(workdirs), e)} for i, (w, e) in enumerate(zip(workdirs, experiment_ids))]


def train_dense(plan: dict, data_dir: str, workdir: str, replicate: str) -> dict[str, Any]:
    """One replicate's dense network, from the config in its work directory (its own seed); the
    replicates' dense networks share the machine's cores."""
    from lottery import dense
    from lottery.paths import Workdir

    cfg, _ = engine_call(Workdir(workdir).load)
    threads = training_threads("dense", together=RunPlan.from_dict(plan).config.replicates)
    log.info("train_dense: start  %s (seed %d)  workdir %s  threads %d  %s", replicate, cfg.seed, workdir, threads, queue_note())
    started = time.perf_counter()
    result = training_call(f"train_dense {replicate}", dense.run_dense, cfg, data_dir, workdir, threads=threads)
    log.info(
        "train_dense: %s in %.1fs  val_accuracy %.4f  (%s)",
        "already done" if result.get("skipped") else "done", time.perf_counter() - started, result["val_accuracy"], replicate,
    )
    return {**_pick(result, DENSE_KEYS), "workdir": workdir, "replicate": replicate}


def make_masks(workdir: str, replicate: str) -> dict[str, Any]:
    """One replicate's masks: ``{"workdir", "replicate", "masks": [one small descriptor per mask]}``
    (an iterative experiment's are nominal: each chain makes its own)."""
    from lottery import masks as pruning_step

    started = time.perf_counter()
    masks = engine_call(pruning_step.make_masks, workdir)
    out = [{**_pick(m, MASK_KEYS), "label": remaining_label(m["remaining"])} for m in masks]
    log.info("make_masks: %d masks in %.1fs: %s  (%s)", len(out), time.perf_counter() - started,
             ", ".join(m["label"] for m in out), replicate)
    return {"workdir": workdir, "replicate": replicate, "masks": out}


def _prefix(run: RunPlan, replicate: dict) -> str:
    """What a mapped instance's name starts with: ``rep 2: `` among several replicates, nothing for one."""
    return f"{replicate['replicate']}: " if run.config.replicates > 1 else ""


def _over_replicates(replicates: list[dict], run: RunPlan, specs, per_task: int) -> list[dict[str, Any]]:
    """``mapped_kwargs`` of each replicate (make_masks' results, in replicate order), one after the other."""
    return [kwargs for rep in replicates
            for kwargs in mapped_kwargs(rep["masks"], specs, per_task, workdir=rep["workdir"], prefix=_prefix(run, rep))]


def _times(run: RunPlan, replicates: list[dict]) -> str:
    return f" x {len(replicates)} replicates" if run.config.replicates > 1 else ""


def plan_tickets(replicates: list[dict], plan: dict, per_task: int = 1) -> list[dict[str, Any]]:
    """The late_reset kwargs over replicates x tickets; none for an iterative experiment (its tickets are the chains' levels)."""
    run, replicates = RunPlan.from_dict(plan), list(replicates)  # make_masks' results: read once
    if run.iterative:
        log.info("late_reset: nothing to do: pruning_schedule iterative, the tickets are the levels of the chains (imp_chain)")
        return []
    kwargs = _over_replicates(replicates, run, run.tickets, per_task)
    log.info("late_reset: %d masks x %d rewind points%s = %d tickets in %d tasks (%d per task at most)", len(run.masks),
             len(run.rewinds), _times(run, replicates), len(run.tickets) * len(replicates), len(kwargs), per_task)
    return kwargs


def chain_label(rewind: str, prefix: str = "") -> str:
    """A chain's name: ``chain, rewind 1ep``; ``rep 2: chain, rewind 1ep`` among several replicates."""
    return f"{prefix}chain, rewind {rewind}"


def plan_chains(replicates: list[dict], plan: dict) -> list[dict[str, Any]]:
    """The imp_chain kwargs: one chain per (replicate, rewind point) of an iterative experiment; none for one-shot."""
    run, replicates = RunPlan.from_dict(plan), list(replicates)  # make_masks' results: read once
    if not run.chains:
        log.info("imp_chain: nothing to do: pruning_schedule %s (late_reset trains the tickets)", run.config.pruning_schedule)
        return []
    kwargs = [{"workdir": rep["workdir"], "rewind": rewind, "group": chain_label(rewind, _prefix(run, rep))}
              for rep in replicates for rewind in run.chains]
    log.info("imp_chain: %d rewind points%s = %d chains of %d levels each (%s)", len(run.chains), _times(run, replicates),
             len(kwargs), len(run.masks), ", ".join(m.mask_id for m in run.masks))
    return kwargs


def plan_controls(replicates: list[dict], plan: dict, per_task: int = 1) -> list[dict[str, Any]]:
    """The controls kwargs over replicates x controls (an iterative experiment's run on its chains' level masks)."""
    run, replicates = RunPlan.from_dict(plan), list(replicates)  # make_masks' results: read once
    if not run.controls:
        log.info("controls are off")
        return []
    kwargs = _over_replicates(replicates, run, run.controls, per_task)
    kinds = dict.fromkeys(c.control for c in run.controls)
    masks = replicates[0]["masks"] if replicates else []
    labels = dict.fromkeys(m["label"] for m in masks if m["mask_id"] in {c.mask_id for c in run.controls})
    log.info("controls: %s at %s x %d rewind points%s = %d runs in %d tasks", ", ".join(kinds), ", ".join(labels),
             len(run.rewinds), _times(run, replicates), len(run.controls) * len(replicates), len(kwargs))
    return kwargs


def mapped_kwargs(masks: list[dict], specs, per_task: int = 1, *, workdir: str | None = None,
                  prefix: str = "") -> list[dict[str, Any]]:
    """The kwargs of the mapped late_reset / controls instances of one work directory (``workdir``,
    when given, in each): groups of up to ``per_task`` consecutive masks of one rewind point and
    control kind, each with its name (``group``, after ``prefix``); with ``per_task`` 1, a group of
    one per ticket of the plan, in the plan's order."""
    by_id = {m["mask_id"]: m for m in masks}
    if per_task <= 1:
        chunks = [(s.control, s.rewind, [by_id[s.mask_id]]) for s in specs]
    else:
        runs: dict[tuple, list[dict]] = {}  # (control, rewind) -> its masks, in the plan's order
        for s in specs:
            runs.setdefault((s.control, s.rewind), []).append(by_id[s.mask_id])
        chunks = [(c, r, group[i:i + per_task]) for (c, r), group in runs.items() for i in range(0, len(group), per_task)]
    return [
        {**({"workdir": workdir} if workdir is not None else {}), "masks": chunk, "rewind": rewind,
         **({"control": control} if control else {}),
         "group": prefix + (ticket_label(chunk[0], rewind, control) if per_task <= 1 else group_label(chunk, rewind, control))}
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
    results = training_call(group, late_reset.retrain, workdir, ids, rewind, control=control, threads=threads)
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


def chain(workdir: str, rewind: str, group: str) -> dict[str, Any]:
    """The imp_chain task: the chain of levels of one rewind point in one replicate's work directory
    (`lottery.imp.run_chain`: levels done before are kept, so a cleared chain resumes where it stopped)."""
    from lottery import imp

    threads = training_threads("ticket")
    log.info("%s: start  rewind %s  threads %d  %s  workdir %s", group, rewind, threads, queue_note(), workdir)
    started = time.perf_counter()
    results = training_call(group, imp.run_chain, workdir, rewind, threads=threads)
    for result in results:
        _log_result(f"level {result['level']}: {remaining_label(result['remaining'])}, rewind {rewind}", result)
    skipped = sum(bool(r.get("skipped")) for r in results)
    log.info("%s: done in %.1fs  %d levels trained, %d already done", group, time.perf_counter() - started,
             len(results) - skipped, skipped)
    return {"group": group, "workdir": workdir, "levels": [_pick(r, LEVEL_KEYS) for r in results]}


def stability_label(mask: dict | None, rewind: str, prefix: str = "") -> str:
    """An instability analysis' name: ``dense, rewind 1ep``, ``5.0% left, rewind 1ep``; ``rep 2: dense, rewind 1ep``
    among several replicates."""
    network = "dense" if mask is None else mask.get("label") or remaining_label(mask["remaining"])
    return f"{prefix}{network}, rewind {rewind}"


def plan_stability(replicates: list[dict], plan: dict) -> list[dict[str, Any]]:
    """The stability kwargs: one instability analysis per (replicate, network, rewind point) of the
    plan (the dense network, then the tickets at ``stability_sparsities``); none when ``stability`` is false."""
    run, replicates = RunPlan.from_dict(plan), list(replicates)  # make_masks' results: read once
    if not run.stability:
        log.info("stability: off (stability false): no instability analysis")
        return []
    points = run.config.stability_points
    kwargs = [{"workdir": rep["workdir"], "rewind": spec.rewind, "mask": spec.mask_id, "points": points,
               "group": stability_label(_mask_of(rep, spec.mask_id), spec.rewind, _prefix(run, rep))}
              for rep in replicates for spec in run.stability]
    networks = list(dict.fromkeys("dense" if s.mask_id is None else s.mask_id for s in run.stability))
    log.info("stability: %s x %d rewind points%s = %d analyses (two trainings each, from the rewind point to the end; "
             "%d points on the line)", ", ".join(networks), len(run.rewinds), _times(run, replicates), len(kwargs), points)
    return kwargs


def _mask_of(replicate: dict, mask_id: str | None) -> dict | None:
    """make_masks' descriptor of ``mask_id`` in ``replicate`` (None for the dense network)."""
    return None if mask_id is None else next(m for m in replicate["masks"] if m["mask_id"] == mask_id)


def stability(workdir: str, rewind: str, mask: str | None, points: int, group: str) -> dict[str, Any]:
    """The stability task: the instability analysis of one network at one rewind point
    (`lottery.stability.run_stability`: both copies trained one after the other in this process,
    then the path; copies done before are kept, a finished analysis is "already done")."""
    from lottery import stability as analysis

    threads = training_threads("ticket")
    log.info("%s: start  instability analysis of %s at rewind %s  %d points  threads %d  %s  workdir %s", group,
             f"mask {mask}" if mask else "the dense network", rewind, points, threads, queue_note(), workdir)
    started = time.perf_counter()
    result = training_call(group, analysis.run_stability, workdir, rewind, mask, points=points, threads=threads)
    log.info("%s: %s in %.1fs  instability %.2f points (training subset %.2f)", group,
             "already done" if result.get("skipped") else "done", time.perf_counter() - started,
             result["instability"], result["instability_train"])
    return {"group": group, "workdir": workdir, **_pick(result, STABILITY_KEYS)}


def report(report_dir: str | None, workdirs: list[str] | None, plan: dict) -> dict[str, Any]:
    """Write each replicate's results.csv, plot and report.md from what is on disk (failed and missing
    tickets listed) and, for several replicates, the report over them in ``report_dir``."""
    if not report_dir:
        raise AirflowFailException("no work directory: the run failed before prepare_workdir (see the failed task above)")
    from lottery.paths import ReplicateSet, Workdir

    workdirs = list(workdirs or [report_dir])
    gone = [w for w in workdirs if not Workdir(w).config_json.exists()]
    if len(workdirs) > 1 and not ReplicateSet.holds_set(report_dir):
        gone.append(report_dir)
    if gone:
        what = f"directory {gone[0]} is" if len(gone) == 1 else f"directories {', '.join(gone)} are"
        raise AirflowFailException(f"the run's work {what} gone (deleted, or not on this machine's disk): nothing to "
                                   "report; trigger the same config again to recompute it")
    run, run_id = RunPlan.from_dict(plan), get_current_context()["run_id"]
    paths = _replicate_report(workdirs[0], run, 0, run_id) if len(workdirs) == 1 else _set_report(report_dir, run, run_id)
    for problem in paths.get("problems", []) + paths.get("stability_problems", []):
        log.warning("not done: %s", problem)
    for network, rewind in (paths.get("rewind_here") or {}).items():
        log.info("instability: %s: %s", network, f"rewind here: {rewind}" if rewind else "no stable rewind point (yet)")
    log.info("report: %s", paths["report"])
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in paths.items()}


def _replicate_report(workdir: str, run: RunPlan, index: int, run_id: str) -> dict[str, Any]:
    """Replicate ``index``'s own report in its work directory (its plan: its config, seed + index); logs its table."""
    from lottery import report as reporting

    plan = RunPlan.from_config(run.config.replicate(index))
    paths = engine_call(reporting.write_report, workdir, plan=plan, run_id=run_id)
    log.info("results:\n%s", reporting.format_table(workdir, reporting.result_rows(workdir, plan=plan)))
    return paths


def _set_report(report_dir: str, run: RunPlan, run_id: str) -> dict[str, Any]:
    """The report over the replicates in the set's directory (and each replicate's own, in its work
    directory: `lottery.report.write_report` on a set); logs the mean ± std table."""
    from lottery import report as reporting

    paths = engine_call(reporting.write_report, report_dir, plan=run, run_id=run_id)
    log.info("results over %d replicates (mean ± std (n)):\n%s", run.config.replicates,
             reporting.format_table(report_dir, reporting.result_rows(report_dir, plan=run)))
    return paths


def check_results(report_dir: str | None, workdirs: list[str] | None, plan: dict) -> dict[str, Any]:
    """Rebuild the report from disk, then fail when any combination of any replicate failed or is
    missing. Never the ``report`` task's XCom: after "Clear only failed tasks" (which leaves a
    successful ``report`` alone) the check judges, and the report shows, the tickets that were just retrained."""
    summary = report(report_dir, workdirs, plan)
    problems = summary.get("problems", []) + summary.get("stability_problems", [])
    expected = summary.get("expected", 0) + summary.get("stability_expected", 0)
    if problems:
        raise AirflowFailException(
            f"{len(problems)} of {expected or '?'} combinations failed or are missing "
            f"(see {summary.get('report')}): " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
            + ". Fix the cause, then clear the failed tasks of this run (README: When tickets fail)."
        )
    log.info("all %s combinations done; report %s", expected, summary.get("report"))
    return {"ok": True, "report": summary.get("report")}
