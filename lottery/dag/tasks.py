"""The bodies of the ``lottery_ticket`` DAG's tasks: one short function per task, called by the
DAG's ``@task`` of the same name.

Each one logs a start and an end line (what, threads, queue, work dir; duration and result), calls
one engine step, and returns only small values for XCom (ids, paths, labels, a few metrics).
Errors a retry cannot fix (``ConfigError``, ``LotteryError``) fail the task at once
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
from lottery.errors import LotteryError

log = logging.getLogger("lottery.dag")

# Mapped instances are named from their kwargs (rendered before the task runs): "5.0% left, rewind 2ep".
TICKET_LABEL = "{{ task.op_kwargs['mask']['label'] }}, rewind {{ task.op_kwargs['rewind'] }}"
CONTROL_LABEL = "{{ task.op_kwargs['control'] }}: " + TICKET_LABEL
# What a retraining result may carry through XCom.
TICKET_KEYS = ("mask_id", "sparsity", "remaining", "rewind", "control", "val_accuracy", "best_val_accuracy", "skipped", "ticket")
DENSE_KEYS = ("val_accuracy", "best_val_accuracy", "epochs", "steps", "skipped")


# ---- helpers ----------------------------------------------------------------------------------
def training_threads(kind: str) -> int:
    """TF threads for one training task: the cores divided among the training tasks that run at once.

    ``LOTTERY_THREADS`` wins. The dense network trains alone and gets every core. A ticket shares the
    machine with the other tasks of its worker: ``[core] parallelism`` for the LocalExecutor,
    ``[celery] worker_concurrency`` for Celery workers (and never more than the pool's slots).
    """
    if os.environ.get("LOTTERY_THREADS"):
        return max(1, int(os.environ["LOTTERY_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    if kind == "dense":
        return cores
    from airflow.sdk import conf

    executor = conf.get("core", "executor", fallback="LocalExecutor")
    if "Celery" in executor:
        slots = conf.getint("celery", "worker_concurrency", fallback=16)
    else:
        slots = conf.getint("core", "parallelism", fallback=32)
    return max(1, cores // max(1, min(slots, POOL_SLOTS)))


def engine_call(fn, *args, **kwargs):
    """Run an engine step; errors a retry cannot fix fail the task at once (no retries)."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, LotteryError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def queue_note() -> str:
    ti = get_current_context().get("ti")
    return f"queue {getattr(ti, 'queue', None) or '?'}"


def ticket_label(mask: dict, rewind: str, control: str | None = None) -> str:
    """The mapped instance's name, as TICKET_LABEL / CONTROL_LABEL render it."""
    label = f"{mask.get('label') or remaining_label(mask['remaining'])}, rewind {rewind}"
    return f"{control}: {label}" if control else label


def _pick(result: dict | None, keys) -> dict[str, Any]:
    return {k: (result or {}).get(k) for k in keys}


# ---- the tasks --------------------------------------------------------------------------------
def validate_config() -> dict[str, Any]:
    context = get_current_context()
    try:
        return check_params(dict(context["params"]), dict(context["dag_run"].conf or {}))
    except ConfigError as exc:
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


def prepare_workdir(config: dict, data_dir: str, artifact_root: str) -> dict[str, Any]:
    from lottery import experiment

    cfg = experiment.resolve_config(config)
    workdir = engine_call(experiment.workdir_for, cfg, data_dir, artifact_root)
    fresh = not (workdir / "config.json").exists()
    engine_call(experiment.prepare_workdir, cfg, data_dir, workdir)
    done = len(list((workdir / "tickets").glob("*/result.json")))
    dense_done = (workdir / "dense" / "result.json").exists()
    log.info(
        "work dir %s (experiment %s): %s", workdir, workdir.name,
        "new" if fresh else f"reused: dense {'done' if dense_done else 'not done'}, {done} tickets done",
    )
    return {"workdir": str(workdir), "experiment_id": workdir.name, "reused": not fresh}


def train_dense(config: dict, data_dir: str, workdir: str) -> dict[str, Any]:
    from lottery import experiment

    threads = training_threads("dense")
    log.info("train_dense: start  workdir %s  threads %d  %s", workdir, threads, queue_note())
    started = time.perf_counter()
    cfg = experiment.resolve_config(config)
    result = engine_call(experiment.run_dense, cfg, data_dir, workdir, threads=threads)
    log.info(
        "train_dense: %s in %.1fs  val_accuracy %.4f",
        "already done" if result.get("skipped") else "done", time.perf_counter() - started, result["val_accuracy"],
    )
    return _pick(result, DENSE_KEYS)


def make_masks(workdir: str) -> list[dict[str, Any]]:
    from lottery import experiment

    started = time.perf_counter()
    masks = engine_call(experiment.make_masks, workdir)
    out = [
        {**_pick(m, ("index", "mask_id", "sparsity", "remaining")), "label": remaining_label(m["remaining"])}
        for m in masks
    ]
    log.info("make_masks: %d masks in %.1fs: %s", len(out), time.perf_counter() - started, ", ".join(m["label"] for m in out))
    return out


def plan_tickets(masks: list[dict], rewinds: list[str]) -> list[dict[str, Any]]:
    plan = [{"mask": m, "rewind": r} for m in masks for r in rewinds]
    log.info("late_reset: %d masks x %d rewind points = %d tickets", len(masks), len(rewinds), len(plan))
    return plan


def plan_controls(masks: list[dict], rewinds: list[str], controls: dict | None) -> list[dict[str, Any]]:
    if not controls:
        log.info("controls are off")
        return []
    wanted = set(controls["mask_ids"])
    plan = [
        {"mask": m, "rewind": r, "control": kind}
        for kind in controls["kinds"] for m in masks if m["mask_id"] in wanted for r in rewinds
    ]
    log.info(
        "controls: %s at %s x %d rewind points = %d runs", ", ".join(controls["kinds"]),
        ", ".join(m["label"] for m in masks if m["mask_id"] in wanted), len(rewinds), len(plan),
    )
    return plan


def retrain(workdir: str, mask: dict, rewind: str, control: str | None = None) -> dict[str, Any]:
    """A ticket (``control`` None: the late_reset task) or a control (the controls task)."""
    from lottery import experiment

    label = ticket_label(mask, rewind, control)
    threads = training_threads("ticket")
    log.info("%s: start  mask %s  rewind %s  threads %d  %s  workdir %s", label, mask["mask_id"], rewind, threads, queue_note(), workdir)
    started = time.perf_counter()
    result = engine_call(experiment.retrain, workdir, mask["mask_id"], rewind, control=control, threads=threads)
    if result.get("skipped"):
        log.info("%s: already done (val_accuracy %.4f), nothing to do: %s", label, result["val_accuracy"], result.get("ticket"))
    else:
        log.info(
            "%s: done in %.1fs  val_accuracy %.4f (best %.4f)", label, time.perf_counter() - started,
            result["val_accuracy"], result["best_val_accuracy"],
        )
    return _pick(result, TICKET_KEYS)


def report(workdir: str | None, rewinds: list[str], controls: dict | None) -> dict[str, Any]:
    if not workdir:
        raise AirflowFailException("no work directory: the run failed before prepare_workdir (see the failed task above)")
    from lottery import experiment
    from lottery.report import write_report

    expected = None
    if controls:
        expected = [
            {"mask_id": mid, "rewind": r, "control": kind}
            for kind in controls["kinds"] for mid in controls["mask_ids"] for r in rewinds
        ]
    paths = engine_call(write_report, workdir, expected_controls=expected)
    log.info("results:\n%s", experiment.format_table(workdir, experiment.summarize(workdir)))
    for problem in paths.get("problems", []):
        log.warning("not done: %s", problem)
    log.info("report: %s", paths["report"])
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in paths.items()}


def check_results(summary: dict | None) -> dict[str, Any]:
    if not summary:
        raise AirflowFailException("no report was written: an earlier task failed (see validate_config, preprocess, report)")
    problems = summary.get("problems", [])
    if problems:
        raise AirflowFailException(
            f"{len(problems)} of {summary.get('expected', '?')} combinations failed or are missing "
            f"(see {summary.get('report')}): " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
        )
    log.info("all %s combinations done; report %s", summary.get("expected"), summary.get("report"))
    return {"ok": True, "report": summary.get("report")}
