"""Cluster policy of the lottery-ticket project: route a run's training tasks to the run's queue.

An operator's ``queue`` is not a templated field, so a per-run queue cannot come from a param in
the DAG file; Airflow's way is ``task_instance_mutation_hook``, which the scheduler calls with the
``DagRun`` whenever it creates (or re-creates) a task instance.

Rule: in the DAGs listed in ``LOTTERY_QUEUE_DAGS`` (default ``lottery_ticket``), a task instance
whose task is declared on the GPU queue (``LOTTERY_GPU_QUEUE``, default ``gpu``) is moved to
``dag_run.conf["queue"]`` when the run sets one. Other tasks (Spark submit, report) keep their queue.
The param's schema already rejected malformed queue names when the run was created; the pattern is
checked again here because this runs inside the scheduler.
"""

from __future__ import annotations

import re

# The names are lottery.deploy.constants' (a cheap, pure-Python import: the package is installed
# in every Airflow component's environment, the venv or the image).
from lottery.deploy.constants import GPU_QUEUE, QUEUE_DAGS, QUEUE_PATTERN

# Airflow copies every public name of this module into airflow.settings: export the hook only.
__all__ = ["task_instance_mutation_hook"]

_QUEUE_RE = re.compile(QUEUE_PATTERN)


def run_queue(dag_run) -> str | None:
    """The queue a run asks for, or None."""
    conf = getattr(dag_run, "conf", None) or {}
    queue = conf.get("queue") if isinstance(conf, dict) else None
    if isinstance(queue, str) and _QUEUE_RE.match(queue):
        return queue
    return None


def task_instance_mutation_hook(task_instance, dag_run=None) -> None:
    # dag_run is None while a task instance is being constructed; the scheduler calls the hook
    # again with the run before the instance is queued. Never touch the database here.
    if dag_run is None or task_instance.dag_id not in QUEUE_DAGS:
        return
    queue = run_queue(dag_run)
    if queue and task_instance.queue == GPU_QUEUE:
        task_instance.queue = queue
