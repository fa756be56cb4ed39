"""The compose topology on loopback (`make cluster-up`: CeleryExecutor, Redis, Postgres, Spark
standalone) runs the DAG and heals itself: faults injected as a user would meet them (SIGKILL),
one cluster for the whole sequence, started and stopped with the CLI as a user does.

`up` leaves its supervisor running, which starts a Spark master and worker, docker/airflow-init.sh
(db migrate, pool, spark_default -> that master), the API server, the scheduler, the dag-processor,
a Celery worker on `default` and one on `gpu` (concurrency 1, standing in for a GPU worker). The
metadata database and the Celery result backend are a throwaway database on the local PostgreSQL;
the broker a Redis database number of the test's own. Runs are triggered through the REST API (JWT
from /auth/token).

1. every listening socket of the cluster's processes is on loopback;
2. the Spark worker SIGKILLed (and its supervisor paused, so that nothing restarts it yet) before
   a preprocess: the task fails within the executor bound, naming the cause; once the supervisor
   goes on it restarts the worker, and the task's retry succeeds;
3. the scheduler SIGKILLed while tickets train: its helper processes are stopped and it is restarted
   within seconds, its health-check server on its port again; the run succeeds and no training task
   ran twice;
4. the Spark master SIGKILLed: restarted, and the next run, whose data is new, preprocesses on it;
5. the supervisor itself SIGKILLed: every component is gone within 10 s (its reaper), and `up`
   starts the cluster again, saying so;
the first run also shows who ran what: every training task on the `gpu` queue and pool, run by the
gpu worker, everything else by the default worker, each through the Celery result backend, and
preprocess on the standalone master. Then `down --drop` leaves no process, database or Redis claim.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from lottery.deploy import airflow_home
from lottery.deploy import cluster as cl
from lottery.deploy.api import Api
from lottery.deploy.constants import DAG_ID, GPU_QUEUE, POOL, REPO
from lottery.deploy.databases import REDIS_OWNER_KEY, pg_connect, redis_client
from lottery.deploy.supervisor import alive
from tests.helpers import PG_URL, REDIS_URL, cluster_databases, require_cluster_services, tiny_run, wait_for
from tests.helpers import kill_tree, listening, without_test_airflow

EXECUTOR_BOUND_S = 30
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
HEALTH_PORT = "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"
# Tickets of a few seconds each, four of them: long enough to SIGKILL the scheduler mid-training.
FIRST = tiny_run(dataset_limit=200, training_steps="6ep", sparsities=[0.5, 0.9], controls=False,
                 drop=("control_sparsities",))
SECOND = tiny_run(dataset_limit=240, training_steps="1ep", sparsities=[0.5], rewind_points=["0it"], controls=False,
                  drop=("control_sparsities",))


TRAINING = {"train_dense", "late_reset", "imp_chain", "controls", "stability"}
NO_WORKER = {"chains_done"}  # an EmptyOperator: the scheduler marks it done, no worker runs it


def celery_results(database: str) -> int:
    conn = pg_connect(PG_URL, database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
            return cur.fetchone()[0]
    finally:
        conn.close()


def check_who_ran_what(c: "Cluster", api: Api, run_id: str, art: Path) -> None:
    """Training on the gpu queue and pool by the gpu worker, the rest by the default worker, each
    through the Celery result backend; preprocess on the standalone master; the run's outputs."""
    ran = [t for t in api.task_instances(run_id) if t["state"] == "success"]
    for t in ran:
        if t["task_id"] in NO_WORKER:
            continue
        if t["task_id"] in TRAINING:
            assert (t["queue"], t["hostname"], t["pool"]) == (GPU_QUEUE, "gpu-worker-1", POOL), t
        else:
            assert (t["queue"], t["hostname"]) == ("default", "airflow-worker"), t
    assert {t["task_id"] for t in ran} >= {"validate_config", "preprocess", "train_dense", "make_masks",
                                           "late_reset", "report", "check_results"}
    # a Celery task ends, and stores its result, just after its task instance does
    on_workers = [t for t in ran if t["task_id"] not in NO_WORKER]
    wait_for(lambda: celery_results(c.state.database) >= len(on_workers), 60,
             f"{len(on_workers)} successful Celery results in celery_taskmeta")
    workdir = Path(api.xcom(run_id, "prepare_workdir")["workdir"])
    summary = api.xcom(run_id, "report")
    assert workdir.parent == art and len(list(csv.DictReader(open(workdir / "results.csv")))) == 4
    assert Path(summary["report"]).is_file() and not summary.get("problems")
    manifest = json.loads(next((art / "data").glob("*/manifest.json")).read_text())
    assert manifest["spark"]["master"] == c.state.spark_master
    assert any((c.home / "spark" / "work").glob("app-*/*/stderr"))  # the executors ran in the worker's work dir


def cli(home: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "lottery.deploy.cluster", *args, "--home", str(home)], cwd=REPO,
                         env=without_test_airflow(os.environ), capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"cluster {' '.join(args)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


class Cluster:
    """What the test sees of a cluster `up` started: its record, its supervisor, its logs."""

    def __init__(self, home: Path):
        self.home = home

    @property
    def state(self) -> cl.State:
        return cl.load_state(self.home)

    def pid(self, name: str) -> int:
        return self.state.pids[name]

    def supervisor(self) -> psutil.Process:
        return psutil.Process(self.state.supervisor["pid"])

    def api(self) -> Api:
        return Api(self.state.api_url, airflow_home.USER, airflow_home.password(self.home))

    def log(self, name: str) -> str:
        return (self.home / "logs" / f"{name}.log").read_text(errors="replace")

    def sessions(self) -> set[int]:
        """The sessions of every process below the supervisor (each component leads one)."""
        found = set()
        for p in self.supervisor().children(recursive=True):
            try:
                if "lottery.deploy.supervisor" not in " ".join(p.cmdline()):  # not the reaper
                    found.add(os.getsid(p.pid))
            except (psutil.Error, OSError):
                pass
        return found

    def restarted(self, name: str, old_pid: int, timeout: float = 60) -> float:
        """Seconds until ``name`` runs again under a new pid, with the supervisor's line for it."""
        t0 = time.monotonic()
        wait_for(lambda: self.state.pids[name] != old_pid and alive(self.state.pids[name]), timeout,
                 f"{name} restarted", interval=0.2, state=lambda: self.log("cluster-supervisor")[-2000:])
        took = time.monotonic() - t0
        assert re.search(rf"{name} died \(exit -9\), restarting it \(1/3\); log: ", self.log("cluster-supervisor"))
        return took


def in_sessions(sessions: set[int]) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sessions and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def task(api: Api, run_id: str, task_id: str) -> dict:
    return next(t for t in api.task_instances(run_id) if t["task_id"] == task_id)


def trigger(api: Api, conf: dict) -> str:
    status, run = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
    assert status in (200, 201), run
    return run["dag_run_id"]


def finished(api: Api, run_id: str, timeout: float = 900) -> dict:
    def done():
        status, run = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        return run if run["state"] in ("success", "failed") else None

    return wait_for(done, timeout, f"run {run_id} to end", interval=3,
                    state=lambda: [(t["task_id"], t.get("map_index"), t["state"], t["try_number"])
                                   for t in api.task_instances(run_id)])


def attempt_log(home: Path, run_id: str, task_id: str, attempt: int) -> str:
    paths = list((home / "logs").glob(f"dag_id={DAG_ID}/run_id={run_id}/task_id={task_id}/attempt={attempt}.log"))
    return paths[0].read_text(errors="replace") if paths else ""


@pytest.mark.timeout(2400)
def test_the_cluster_heals_itself(tmp_path):
    require_cluster_services()
    home, art = tmp_path / "home", tmp_path / "art"
    database = f"lottery_cluster_test_{uuid.uuid4().hex[:8]}"
    options = ["--artifacts", str(art), "--database", database, "--redis-db", "8", "--pg-url", PG_URL,
               "--redis-url", REDIS_URL, "--gpu-workers", "1", "--gpu-threads", "1", "--no-triggerer",
               "--env", f"LOTTERY_SPARK_EXECUTOR_TIMEOUT={EXECUTOR_BOUND_S}"]
    figures, sessions = {}, set()
    c = Cluster(home)
    try:
        cli(home, "up", *options)
        api = c.api()

        # ---- 1. every port on loopback ----
        sessions = c.sessions()
        sockets = listening(in_sessions(sessions))
        assert any(port == c.state.port for _, port, _ in sockets), sockets
        assert all(ip in LOOPBACK for ip, _, _ in sockets), sockets

        # ---- 2. the Spark worker lost before a preprocess: bounded failure, then the retry ----
        supervisor = c.supervisor()
        supervisor.suspend()
        try:
            worker = c.pid("spark-worker")
            kill_tree(worker)
            run_id = trigger(api, FIRST)
            t = wait_for(lambda: (t := task(api, run_id, "preprocess"))["state"] in ("up_for_retry", "failed") and t,
                         600, "preprocess's first try to fail", interval=1)
            first_log = attempt_log(home, run_id, "preprocess", 1)
            assert "starting spark-submit" in first_log, first_log[-3000:]
            assert "no Spark executor registered" in first_log, first_log[-3000:]
            figures["preprocess failed after (s)"] = round(t["duration"], 1)
            assert t["duration"] < EXECUTOR_BOUND_S + 60, t
        finally:
            supervisor.resume()
        figures["spark-worker back (s)"] = c.restarted("spark-worker", worker)

        # ---- 3. the scheduler lost while tickets train ----
        wait_for(lambda: any(t["task_id"] == "late_reset" and t["state"] == "running"
                             for t in api.task_instances(run_id)), 900, "a ticket in training", interval=1)
        scheduler = c.pid("airflow-scheduler")
        helpers = psutil.Process(scheduler).children(recursive=True)  # its health-check server
        assert helpers
        os.kill(scheduler, signal.SIGKILL)
        figures["scheduler back (s)"] = c.restarted("airflow-scheduler", scheduler)
        # gone before the new one started: a helper shares the old scheduler's database connection,
        # and with it any lock its transaction held (the new one could then never queue a task)
        assert not any(h.is_running() and h.status() != psutil.STATUS_ZOMBIE for h in helpers), helpers
        health = int(psutil.Process(c.pid("airflow-scheduler")).environ()[HEALTH_PORT])
        wait_for(lambda: any(port == health for _, port, _ in
                             listening(psutil.Process(c.pid("airflow-scheduler")).children())),
                 60, "the new scheduler's health-check server", interval=0.5)
        run = finished(api, run_id)
        tis = api.task_instances(run_id)
        assert run["state"] == "success", tis
        assert task(api, run_id, "preprocess")["try_number"] == 2
        trained = [t for t in tis if t["task_id"] in ("train_dense", "late_reset")]
        assert len(trained) == 5 and all(t["try_number"] == 1 for t in trained), trained  # nothing trained twice
        check_who_ran_what(c, api, run_id, art)

        # ---- 4. the Spark master lost: restarted, and the next run's new data is preprocessed on it ----
        master = c.pid("spark-master")
        logs = {name: len(c.log(name)) for name in ("spark-master", "spark-worker")}
        t0 = time.monotonic()
        os.kill(master, signal.SIGKILL)
        c.restarted("spark-master", master)
        wait_for(lambda: "I have been elected leader" in c.log("spark-master")[logs["spark-master"]:], 120,
                 "the new master's lead", interval=0.5)
        wait_for(lambda: "Successfully registered with master" in c.log("spark-worker")[logs["spark-worker"]:], 120,
                 "the worker's registration with the new master", interval=0.5)
        figures["spark-master back, worker registered (s)"] = round(time.monotonic() - t0, 1)
        second = trigger(api, SECOND)
        assert finished(api, second)["state"] == "success", api.task_instances(second)
        assert "starting spark-submit" in attempt_log(home, second, "preprocess", 1)
        assert task(api, second, "preprocess")["try_number"] == 1

        # ---- 5. the supervisor lost: its reaper stops everything; `up` starts the cluster again ----
        sessions = c.sessions()
        supervisor = c.supervisor()
        t0 = time.monotonic()
        supervisor.kill()
        wait_for(lambda: not in_sessions(sessions), 10, "every component of the killed supervisor to end", interval=0.2,
                 state=lambda: [" ".join(p.cmdline())[:80] for p in in_sessions(sessions)])
        figures["components gone after the supervisor's SIGKILL (s)"] = round(time.monotonic() - t0, 1)
        out = cli(home, "up", *options).stdout
        assert f"the supervisor of the cluster on {home} is gone: starting the cluster again" in out, out
        assert all(cl.running(c.state).values()) and cl.supervisor_alive(c.state)
        assert c.api().healthy()
        sessions = c.sessions()
    finally:
        down = cli(home, "down", "--drop", check=False)
        print(down.stdout, down.stderr)
    assert not in_sessions(sessions)
    assert database not in cluster_databases()
    r = redis_client(REDIS_URL, 8)
    try:
        assert r.get(REDIS_OWNER_KEY) is None
    finally:
        r.close()
    print(f"\nfigures: {figures}")
