"""The compose topology on loopback: one DAG run through CeleryExecutor, Redis, Postgres and Spark.

lottery.deploy.cluster (make cluster-up) starts, as local processes: a Spark standalone master and worker,
docker/airflow-init.sh (db migrate, pool, spark_default -> that master), the API server, the
scheduler (CeleryExecutor), the dag-processor, a Celery worker on `default` and one on `gpu`
(concurrency 1, standing in for a GPU worker). The metadata database and the Celery result backend
are a throwaway database on the local PostgreSQL; the broker is a Redis database number of this
run's own. A tiny experiment is triggered through the REST API (JWT from /auth/token) and must
succeed with every training task on the `gpu` queue, run by the gpu worker, and everything else by
the default worker. Every process group is stopped, the database dropped and the Redis database
flushed at the end, whatever happened; the test checks that too.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from lottery.deploy import cluster as cl
from lottery.deploy.constants import DAG_ID, GPU_QUEUE, POOL
from lottery.deploy.databases import REDIS_OWNER_KEY, pg_connect, redis_client
from lottery.deploy.supervisor import alive
from tests.helpers import (PG_URL, REDIS_URL, cluster_databases, cluster_diagnosis, finished_run, loopback_cluster, tiny_run,
                           wait_for)

pytestmark = pytest.mark.slow

TINY = tiny_run(dataset_limit=200, sparsities=[0.5, 0.9], controls=False, drop=("control_sparsities",))
TRAINING = {"train_dense", "late_reset", "imp_chain", "controls"}
NO_WORKER = {"chains_done"}  # an EmptyOperator: the scheduler marks it done, no worker runs it
RUN_TIMEOUT = 900


def _celery_results(database: str) -> int:
    conn = pg_connect(PG_URL, database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.mark.timeout(1800)
def test_dag_run_on_celery_workers_with_a_gpu_queue(tmp_path):
    started = time.monotonic()
    with loopback_cluster(tmp_path / "home", database=None, redis_db=5, gpu_workers=1, spark=True, spark_cores=1,
                          spark_memory="1g") as cluster:
        state = cluster.state
        up_s = time.monotonic() - started
        assert state.database.startswith("lottery_cluster_") and state.database in cluster_databases()

        # ---- trigger through the public REST API with a JWT from /auth/token ----
        api = cluster.api()
        status, run = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": TINY})
        assert status in (200, 201), run
        run_id = run["dag_run_id"]
        run = finished_run(api, run_id, RUN_TIMEOUT, supervisor=cluster.supervisor,
                           diagnose=lambda: cluster_diagnosis(cluster, api, run_id))
        run_s = time.monotonic() - started - up_s
        assert run["state"] == "success", cluster_diagnosis(cluster, api, run_id)

        # ---- who ran what, on which queue ----
        tis = api.task_instances(run_id)
        ran = [t for t in tis if t["state"] == "success"]
        tickets = [t for t in ran if t["task_id"] == "late_reset"]
        assert len(tickets) == len(TINY["sparsities"]) * len(TINY["rewind_points"]) == 4
        for t in ran:
            where = (t["queue"], t["hostname"])
            if t["task_id"] in NO_WORKER:
                continue
            if t["task_id"] in TRAINING:
                assert where == (GPU_QUEUE, "gpu-worker-1"), t
                assert t["pool"] == POOL, t
            else:
                assert where == ("default", "airflow-worker"), t
        assert {t["task_id"] for t in ran} >= {"validate_config", "preprocess", "train_dense", "make_masks",
                                               "late_reset", "report", "check_results"}
        # every executed task went through the Celery result backend on the same Postgres database
        # (a Celery task ends, and stores its result, just after its task instance does)
        on_workers = [t for t in ran if t["task_id"] not in NO_WORKER]
        wait_for(lambda: _celery_results(state.database) >= len(on_workers), 60,
                 f"{len(on_workers)} successful Celery results in celery_taskmeta")

        # ---- what the run produced ----
        prepared = api.xcom(run_id, "prepare_workdir")
        summary = api.xcom(run_id, "report")
        workdir = Path(prepared["workdir"])
        assert workdir.parent == tmp_path / "artifacts"
        rows = list(csv.DictReader(open(workdir / "results.csv")))
        assert len(rows) == 4
        assert Path(summary["report"]).is_file() and Path(summary["report"]).parent.parent == workdir
        assert not summary.get("problems")
        # preprocess ran on the standalone master, its executors in the worker's work dir
        manifest = json.loads(next((tmp_path / "artifacts" / "data").glob("*/manifest.json")).read_text())
        assert manifest["spark"]["master"] == state.spark_master
        assert any((tmp_path / "home" / "spark" / "work").glob("app-*/*/stderr"))
        print(f"\ncluster up in {up_s:.0f}s, DAG run {run_s:.0f}s; {len(ran)} tasks; "
              f"broker {state.redis_url}/{state.redis_db}, database {state.database}")

    # ---- the finalizer left nothing behind ----
    assert state.database not in cluster_databases()
    r = redis_client(REDIS_URL, state.redis_db)
    try:
        assert r.get(REDIS_OWNER_KEY) is None
    finally:
        r.close()
    assert not [n for n, pid in state.pids.items() if alive(pid, state.started.get(n, 0))]
    assert not (tmp_path / "home" / cl.STATE_FILE).exists()
