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
from lottery.deploy.api import Api
from lottery.deploy.constants import DAG_ID, GPU_QUEUE, POOL
from lottery.deploy.databases import REDIS_OWNER_KEY, pg_connect, redis_client
from lottery.deploy.supervisor import alive, wait_until
from tests.helpers import tiny_run

pytestmark = pytest.mark.slow

PG_URL = "postgresql://postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379"
TINY = tiny_run(dataset_limit=200, sparsities=[0.5, 0.9], controls=False, drop=("control_sparsities",))
TRAINING = {"train_dense", "late_reset", "controls"}
RUN_TIMEOUT = 900


def _require_services() -> None:
    try:
        pg_connect(PG_URL).close()
    except Exception as exc:
        pytest.fail(f"the cluster test needs PostgreSQL at {PG_URL} (trust auth): {exc}")
    try:
        r = redis_client(REDIS_URL, 0)
        r.ping()
        r.close()
    except Exception as exc:
        pytest.fail(f"the cluster test needs Redis at {REDIS_URL}: {exc}")


def _databases() -> set[str]:
    conn = pg_connect(PG_URL)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def _celery_results(database: str) -> int:
    conn = pg_connect(PG_URL, database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
            return cur.fetchone()[0]
    finally:
        conn.close()


def _diagnose(cluster: cl.Cluster, api: Api | None, run_id: str | None) -> str:
    lines = []
    if api is not None and run_id:
        for t in api.task_instances(run_id):
            lines.append(f"  {t['task_id']}[{t.get('map_index')}]: {t.get('state')} queue={t.get('queue')} host={t.get('hostname')}")
            if t.get("state") == "failed":
                lines.append(f"    {api.task_error(run_id, t)}")
    lines.append(cluster.supervisor.tails(12))
    return "\n".join(lines)


@pytest.mark.timeout(1800)
def test_dag_run_on_celery_workers_with_a_gpu_queue(tmp_path):
    _require_services()
    cluster = cl.Cluster(cl.Settings(
        home=tmp_path / "home", artifact_root=tmp_path / "artifacts", pg_url=PG_URL, database=None,
        redis_url=REDIS_URL, redis_db=5, gpu_workers=1, default_concurrency=2, gpu_threads=1,
        spark=True, spark_cores=1, spark_memory="1g", triggerer=False,
    ))
    api, run_id, state = None, None, None
    started = time.monotonic()
    try:
        try:
            state = cluster.start(timeout=600)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"the cluster did not come up: {exc}\n{_diagnose(cluster, None, None)}")
        up_s = time.monotonic() - started
        assert state.database.startswith("lottery_cluster_") and state.database in _databases()

        # ---- trigger through the public REST API with a JWT from /auth/token ----
        api = cluster.api()
        status, run = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": TINY})
        assert status in (200, 201), run
        run_id = run["dag_run_id"]
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            status, run = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            assert status == 200, run
            if run["state"] in ("success", "failed"):
                break
            assert not cluster.supervisor.dead(), f"a component died: {cluster.supervisor.dead()}\n{_diagnose(cluster, api, run_id)}"
            assert time.monotonic() < deadline, f"run not done after {RUN_TIMEOUT}s\n{_diagnose(cluster, api, run_id)}"
            time.sleep(5)
        run_s = time.monotonic() - started - up_s
        assert run["state"] == "success", _diagnose(cluster, api, run_id)

        # ---- who ran what, on which queue ----
        tis = api.task_instances(run_id)
        ran = [t for t in tis if t["state"] == "success"]
        tickets = [t for t in ran if t["task_id"] == "late_reset"]
        assert len(tickets) == len(TINY["sparsities"]) * len(TINY["rewind_points"]) == 4
        for t in ran:
            where = (t["queue"], t["hostname"])
            if t["task_id"] in TRAINING:
                assert where == (GPU_QUEUE, "gpu-worker-1"), t
                assert t["pool"] == POOL, t
            else:
                assert where == ("default", "airflow-worker"), t
        assert {t["task_id"] for t in ran} >= {"validate_config", "preprocess", "train_dense", "make_masks",
                                               "late_reset", "report", "check_results"}
        # every executed task went through the Celery result backend on the same Postgres database
        # (a Celery task ends, and stores its result, just after its task instance does)
        wait_until(lambda: _celery_results(state.database) >= len(ran), 60,
                      what=f"{len(ran)} successful Celery results in celery_taskmeta")

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
    finally:
        cluster.stop()

    # ---- the finalizer left nothing behind ----
    if state is not None:
        assert state.database not in _databases()
        r = redis_client(REDIS_URL, state.redis_db)
        try:
            assert r.get(REDIS_OWNER_KEY) is None
        finally:
            r.close()
        assert not [n for n, pid in state.pids.items() if alive(pid, state.started.get(n, 0))]
        assert not (tmp_path / "home" / cl.STATE_FILE).exists()
