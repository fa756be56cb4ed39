"""A GPU worker lost mid-ticket on the loopback CeleryExecutor cluster; the cluster's worker commands.

One cluster (lottery.deploy.cluster: Postgres, Redis, the API server, scheduler, dag-processor, a
default worker and two `gpu` workers, Spark in local mode) serves both tests. A tiny run trains two
tickets at once, one on each GPU worker (conv2 on 600 Fashion-MNIST images, 8 epochs: a ticket
takes ~20 s). Ticket A's task process is first frozen (SIGSTOP) for longer than the heartbeat
timeout: it must not be taken for lost, because the heartbeat comes from its supervisor process.
Then A's worker and everything it started are SIGKILLed, as when its machine is lost: A must be
retried on the other worker, resume from its last epoch checkpoint, and the run succeed with
nothing finished done again. The time from the kill until A trains again is printed, not bounded
(it is the heartbeat timeout plus a task process's start on a loaded machine).
"""
from __future__ import annotations

import csv
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

from lottery.deploy import cluster as cl
from lottery.deploy.constants import DAG_ID, HEARTBEAT_CHECK_INTERVAL_S, REPO, TASK_HEARTBEAT_TIMEOUT_S
from lottery.deploy.databases import REDIS_OWNER_KEY, redis_client
from lottery.deploy.supervisor import alive
from tests.helpers import (REDIS_URL, cluster_databases, cluster_diagnosis, finished_run, kill_tree, loopback_cluster,
                           without_test_airflow)
from tests.helpers import wait_for as poll

pytestmark = pytest.mark.slow

EPOCHS = 8
CONF = {
    "dataset_limit": 600,
    "model": "conv2",
    "training_steps": f"{EPOCHS}ep",
    "lr_milestones": [],
    "batch_size": 32,
    "rewind_points": ["0it"],
    "sparsities": [0.5, 0.9],
    "controls": False,
    "stability": False,
}
RESUMED = re.compile(r"retrain (\S+): resuming from the checkpoint at step (\d+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("cluster") / "home"
    with loopback_cluster(home, database=f"lottery_cluster_test_{uuid.uuid4().hex[:8]}",  # kept by a plain `down`
                          redis_db=6, gpu_workers=2, spark=False) as c:
        yield c


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "lottery.deploy.cluster", *args, "--home", str(home)],
                         capture_output=True, text=True, cwd=REPO, env=without_test_airflow(os.environ), timeout=300)
    assert out.returncode == 0, f"{args}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def ticket(api, run_id: str, map_index: int) -> dict | None:
    return next((t for t in api.task_instances(run_id) if t["task_id"] == "late_reset" and t["map_index"] == map_index), None)


def attempt_log(home: Path, run_id: str, map_index: int, attempt: int) -> str:
    path = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=late_reset" / f"map_index={map_index}" / f"attempt={attempt}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def epochs_in(log: str, name: str) -> list[int]:
    return [int(e) for e in re.findall(rf"retrain {re.escape(name)} epoch (\d+)/{EPOCHS}", log)]


def metric_epochs(ticket_dir: Path) -> list[int]:
    path = ticket_dir / "metrics.csv"
    return [int(r["epoch"]) for r in csv.DictReader(open(path))] if path.exists() else []


def checkpointed_epochs(ticket_dir: Path) -> list[int] | None:
    """The epochs done whose checkpoint is written too (metrics.csv is written just before it)."""
    metrics, checkpoint = ticket_dir / "metrics.csv", ticket_dir / "checkpoint.npz"
    try:
        if checkpoint.stat().st_mtime_ns >= metrics.stat().st_mtime_ns:
            return metric_epochs(ticket_dir)
    except FileNotFoundError:
        pass
    return None


def task_process(ti_id: str) -> psutil.Process | None:
    """The task process of a task instance: Airflow titles it ``airflow worker -- <ti id>``."""
    for p in psutil.process_iter(["cmdline"]):
        if f"airflow worker -- {ti_id}" in " ".join(p.info["cmdline"] or ()):
            return p
    return None


@pytest.mark.timeout(1500)
def test_a_ticket_of_a_killed_gpu_worker_resumes_on_the_other(cluster):
    api, home = cluster.api(), cluster.home
    status, run = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": CONF})
    assert status in (200, 201), run
    run_id = run["dag_run_id"]
    diagnose = lambda: cluster_diagnosis(cluster, api, run_id)  # noqa: E731

    # ---- ticket A (map index 0) trains and has an epoch checkpoint ----
    a = poll(lambda: (t := ticket(api, run_id, 0)) and t["state"] == "running" and t, 600, "ticket A running")
    name = poll(lambda: (m := re.search(r"retrain (\S+): start", attempt_log(home, run_id, 0, 1))) and m.group(1), 120,
                "ticket A's start line")
    ticket_dir = Path(api.xcom(run_id, "prepare_workdir")["workdir"]) / "tickets" / name
    poll(lambda: metric_epochs(ticket_dir) and (ticket_dir / "checkpoint.npz").exists(), 300, "ticket A's first epoch")
    lost_worker = a["hostname"]
    assert lost_worker in ("gpu-worker-1", "gpu-worker-2"), a

    # ---- frozen past the heartbeat timeout, A is not taken for lost: its supervisor heartbeats ----
    proc = task_process(a["id"])
    assert proc is not None, f"no task process for {a['id']}\n{diagnose()}"
    freeze_s = TASK_HEARTBEAT_TIMEOUT_S + 2 * HEARTBEAT_CHECK_INTERVAL_S
    proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.5)
        frozen_at = metric_epochs(ticket_dir)
        end = time.monotonic() + freeze_s
        while time.monotonic() < end:
            t = ticket(api, run_id, 0)
            assert (t["state"], t["try_number"]) == ("running", 1), f"a frozen ticket was taken for lost: {t}\n{diagnose()}"
            time.sleep(2)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert metric_epochs(ticket_dir) == frozen_at  # it really was frozen
    poll(lambda: len(checkpointed_epochs(ticket_dir) or ()) > len(frozen_at), 120, "an epoch of ticket A after the freeze")

    # ---- B finished meanwhile; its worker is free for A's retry ----
    b = poll(lambda: (t := ticket(api, run_id, 1)) and t["state"] == "success" and t, 300, "ticket B done")
    assert b["try_number"] == 1 and b["hostname"] != lost_worker, b
    b_dir = next(p for p in ticket_dir.parent.iterdir() if p.name != name)
    b_result_mtime = (b_dir / "result.json").stat().st_mtime_ns
    scheduler_log = cluster.supervisor.log("airflow-scheduler")
    assert "without a heartbeat" not in scheduler_log.read_text(errors="replace")

    # ---- A's worker lost, with everything it started ----
    done_before_kill = poll(lambda: checkpointed_epochs(ticket_dir), 60, "ticket A's checkpoint")
    assert 0 < len(done_before_kill) < EPOCHS, done_before_kill
    killed_at = time.monotonic()
    kill_tree(cluster.state.pids[lost_worker])
    resumed = poll(lambda: RESUMED.search(attempt_log(home, run_id, 0, 2)), 300, "ticket A's retry resuming")
    back_s = time.monotonic() - killed_at
    poll(lambda: epochs_in(attempt_log(home, run_id, 0, 2), name), 120, "an epoch of A's retry")
    epoch_s = time.monotonic() - killed_at
    print(f"\nworker loss: killed after epoch {len(done_before_kill)}; {resumed.group(0)} {back_s:.1f}s after the kill, "
          f"its first epoch done at {epoch_s:.1f}s")
    assert "without a heartbeat" in scheduler_log.read_text(errors="replace")

    # the killed worker comes back with the CLI (after the retry was taken by the other one)
    cli(home, "restart-worker", lost_worker)
    assert re.search(rf"{lost_worker}\s+pid \d+\s+running", cli(home, "status").stdout)

    run = finished_run(api, run_id, 600, interval=3, diagnose=diagnose)
    assert run["state"] == "success", diagnose()

    # ---- A: retried once, on the other worker, from its last epoch checkpoint ----
    a = ticket(api, run_id, 0)
    assert a["state"] == "success" and a["try_number"] == 2 and a["hostname"] != lost_worker, a
    retry_log = attempt_log(home, run_id, 0, 2)
    steps_per_epoch = int(re.search(r"step (\d+)/", retry_log).group(1)) // (epochs_in(retry_log, name)[0])
    k = int(resumed.group(2)) // steps_per_epoch
    assert k in (len(done_before_kill), len(done_before_kill) + 1), (k, done_before_kill)  # one may end as it dies
    assert k > 0 and epochs_in(retry_log, name) == list(range(k + 1, EPOCHS + 1)), retry_log[-3000:]
    assert metric_epochs(ticket_dir) == list(range(1, EPOCHS + 1))
    # ---- nothing finished done again ----
    for t in api.task_instances(run_id):
        if (t["task_id"], t["map_index"]) != ("late_reset", 0):
            assert (t["try_number"], t["state"]) in ((1, "success"), (0, "skipped")), t  # controls: off
    assert (b_dir / "result.json").stat().st_mtime_ns == b_result_mtime
    print(f"\nworker loss: ticket {name} killed after epoch {len(done_before_kill)}/{EPOCHS} on {lost_worker}; "
          f"resumed at epoch {k} on {a['hostname']} {back_s:.1f}s after the kill, first epoch done at {epoch_s:.1f}s; "
          f"frozen {freeze_s}s without being taken for lost")


@pytest.mark.timeout(900)
def test_workers_added_and_restarted_by_the_cli_are_seen_by_status_and_down(cluster):
    home, state = cluster.home, cluster.state
    out = cli(home, "add-worker", "--gpu").stdout
    name = re.search(r"added (\S+) \(pid (\d+)", out).group(1)
    assert name == "gpu-worker-3", out
    record = cl.load_state(home)
    assert record.workers[name]["queue"] == "gpu" and alive(record.pids[name], record.started[name])
    assert re.search(rf"{name}\s+pid \d+\s+running\s+queue gpu", cli(home, "status").stdout)

    old_pid, old_started = record.pids[name], record.started[name]
    cli(home, "restart-worker", name)
    record = cl.load_state(home)
    assert record.pids[name] != old_pid and alive(record.pids[name], record.started[name])
    assert not alive(old_pid, old_started)
    with pytest.raises(AssertionError, match="no worker 'gpu-worker-9'"):
        cli(home, "restart-worker", "gpu-worker-9")

    # a plain `down` stops every process, the CLI's too, and keeps the database and a record of it
    pids = dict(record.pids)
    cli(home, "down")
    assert not [n for n, pid in pids.items() if alive(pid, record.started.get(n, 0))]
    assert state.database in cluster_databases()
    assert "stopped; database" in subprocess.run(
        [sys.executable, "-m", "lottery.deploy.cluster", "status", "--home", str(home)],
        capture_output=True, text=True, cwd=REPO, env=without_test_airflow(os.environ)).stdout
    r = redis_client(REDIS_URL, state.redis_db)
    try:
        assert r.get(REDIS_OWNER_KEY) is None  # the Redis claim is released by `down`
    finally:
        r.close()
    # ... so that `down --drop` after it drops the database
    assert f"dropped database {state.database}" in cli(home, "down", "--drop").stdout
    assert state.database not in cluster_databases()
    assert not (home / cl.STATE_FILE).exists()
