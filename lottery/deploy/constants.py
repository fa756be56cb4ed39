"""Deployment constants, defined once: the DAG, the plugin, docker/ and lottery.deploy import them.

Pure Python (the DAG file imports it at parse time, the plugin in every Airflow component).
Values a deployment may change come from the environment of the scheduler, dag-processor and workers.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DAG_ID = "lottery_ticket"
# The pool every training task takes a slot of: one slot per GPU worker.
POOL = "lottery_workers"
POOL_SLOTS = int(os.environ.get("LOTTERY_POOL_SLOTS", "20"))
POOL_DESCRIPTION = "Training tasks of the lottery-ticket DAG (one slot per GPU worker)"
SPARK_CONN_ID = "spark_default"

# The queue the training tasks are declared on; a run's `queue` param moves them to another one
# (plugins/airflow_local_settings.py). QUEUE_PATTERN is what a queue name may look like.
GPU_QUEUE = os.environ.get("LOTTERY_GPU_QUEUE", "gpu")
DEFAULT_QUEUE = "default"
QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$"
QUEUE_DAGS = frozenset(filter(None, os.environ.get("LOTTERY_QUEUE_DAGS", DAG_ID).split(",")))

ARTIFACT_ROOT = os.environ.get("LOTTERY_ARTIFACT_ROOT", str(REPO / "artifacts"))
# Training tasks are retried (a lost worker, an OOM); invalid configs and corrupt artifacts are not.
# A lost worker's ticket may start again at once on another worker (it resumes from its last epoch
# checkpoint): the delay only keeps a failing machine from burning the retries in one second.
RETRIES = int(os.environ.get("LOTTERY_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=int(os.environ.get("LOTTERY_RETRY_DELAY_S", "10")))
# The preprocess task's execution_timeout: a last bound over everything it may wait for (the data
# lock, 30 min at most; the Spark job, whose own bounds catch a lost master or worker). Generous:
# ImageNet's 1.28 M images at the 242 images/s Spark reached on 2 cores (docs/benchmarks.md) take 1.5 h.
PREPROCESS_TIMEOUT = timedelta(seconds=int(os.environ.get("LOTTERY_PREPROCESS_TIMEOUT_S", str(6 * 3600))))

# How a lost worker is noticed, in every deployment (airflow.cfg of make run / make ui, the loopback
# cluster, docker-compose.yaml's x-airflow-env): a running task instance whose heartbeat is older
# than TASK_HEARTBEAT_TIMEOUT_S is failed (and retried) by the scheduler, which looks every
# HEARTBEAT_CHECK_INTERVAL_S. Airflow's defaults, 300 s and 10 s, cost a lost ticket about 6
# minutes. The heartbeat comes from the task's supervisor process (every [workers]
# min_heartbeat_interval, 5 s by default), not from the training process, so a ticket busy in one
# long step is never taken for lost (docs/cluster.md, "Losing a worker").
TASK_HEARTBEAT_TIMEOUT_S = 30
HEARTBEAT_CHECK_INTERVAL_S = 5

# Where a run may write (artifact_root) and read (an image-folder dataset): the deployment's choice,
# os.pathsep-separated lists (lottery/deploy/roots.py; README, "Security"). The deployment's own
# ARTIFACT_ROOT is always allowed; no data root by default (only the bundled Fashion-MNIST).
ALLOWED_ARTIFACT_ROOTS_ENV = "LOTTERY_ALLOWED_ARTIFACT_ROOTS"
ALLOWED_DATA_ROOTS_ENV = "LOTTERY_ALLOWED_DATA_ROOTS"
