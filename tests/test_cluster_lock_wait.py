"""Two runs of one config on the loopback cluster with ONE gpu worker: the run that waits for the
other's training holds no worker and no pool slot while it waits.

lottery.deploy.cluster with a default worker (concurrency 2) and one `gpu` worker (concurrency 1),
Spark in local mode, a busy lock looked at again every 5 s. Run A (conf `queue: default`) trains
on the default worker; run B of the same config trains on `gpu`. A's train_dense task process is frozen (SIGSTOP) while it holds the dense
network's training lock, so that B's train_dense meets the lock for sure. B's task must then be
`up_for_reschedule`, not running: the pool's only occupied slot is A's and nothing runs on the gpu
worker. A is let go; both runs succeed, B's train_dense with no retry, and each unit (the dense
network, the ticket) is trained once, by one run, the other run finding it done.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from lottery.deploy.constants import DAG_ID, POOL
from tests.helpers import cluster_diagnosis, event_time, finished_run, log_events, loopback_cluster, tiny_run, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = tiny_run(dataset_limit=200, rewind_points=["0it"], sparsities=[0.5], controls=False, drop=("control_sparsities",))
GAVE_BACK = "giving the worker back, looking again at"
POLL_S = 5  # LOTTERY_TRAINING_LOCK_POLL_S of the workers (30 by default)


def ti_of(api, run_id: str, task_id: str) -> dict | None:
    return next((t for t in api.task_instances(run_id) if t["task_id"] == task_id), None)


def task_events(home: Path, run_id: str, task_id: str) -> list[str]:
    """The messages of a task's logs (every attempt, every map index)."""
    task_dir = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
    return [str(e.get("event", "")) for p in sorted(task_dir.glob("**/attempt=*.log"))
            for e in log_events(p.read_text(errors="replace"))]


def trigger(api, conf: dict) -> str:
    status, run = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
    assert status in (200, 201), run
    return run["dag_run_id"]


def lock_holder_pid(lock: Path) -> int | None:
    """The pid recorded in a held training lock (empty once released)."""
    try:
        return json.loads(lock.read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def waiting_sample(api, run_a: str, run_b: str) -> dict | None:
    """B's train_dense up_for_reschedule before and after reading the pool and who runs what: the
    pool's occupancy and the running training tasks at that moment, else None."""
    if (ti_of(api, run_b, "train_dense") or {}).get("state") != "up_for_reschedule":
        return None
    status, pool = api.get(f"/api/v2/pools/{POOL}")
    assert status == 200, pool
    running = [(r, t["task_id"], t["hostname"]) for r in (run_a, run_b) for t in api.task_instances(r)
               if t["state"] == "running"]
    if (ti_of(api, run_b, "train_dense") or {}).get("state") != "up_for_reschedule":
        return None
    return {"pool": {k: pool[k] for k in ("occupied_slots", "running_slots", "queued_slots", "open_slots")},
            "running": running}


@pytest.mark.timeout(1500)
def test_a_run_waiting_for_another_runs_training_holds_no_gpu_worker(tmp_path):
    started = time.monotonic()
    with loopback_cluster(tmp_path / "home", database=None, redis_db=7, gpu_workers=1, spark=False,
                          extra_env={"LOTTERY_TRAINING_LOCK_POLL_S": str(POLL_S)}) as cluster:
        api, home = cluster.api(), cluster.home
        up_s = time.monotonic() - started
        run_a = trigger(api, {**TINY, "queue": "default"})
        diagnose = lambda: cluster_diagnosis(cluster, api, run_a) + "\n" + cluster_diagnosis(cluster, api, run_b)  # noqa: E731
        run_b = None

        # ---- A trains the dense network on the default worker, frozen while it holds the lock ----
        workdir = Path(wait_for(lambda: (x := api.xcom(run_a, "prepare_workdir")) and x["workdir"], 600,
                                "A's work directory", interval=1, supervisor=cluster.supervisor))
        lock = workdir / ".locks" / "dense.train.lock"
        pid = wait_for(lambda: lock_holder_pid(lock), 600, "A's dense training holding its lock", interval=0.1,
                       supervisor=cluster.supervisor)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert lock_holder_pid(lock) == pid and not (workdir / "dense" / "result.json").exists()
            dense_a = ti_of(api, run_a, "train_dense")
            assert (dense_a["state"], dense_a["hostname"]) == ("running", "airflow-worker"), dense_a

            # ---- B meets the lock on the gpu worker and gives the worker back ----
            run_b = trigger(api, TINY)
            frozen = time.monotonic()
            sample = wait_for(lambda: waiting_sample(api, run_a, run_b), 600, "B's train_dense up_for_reschedule",
                              interval=1, state=diagnose, supervisor=cluster.supervisor)
            waited_s = time.monotonic() - frozen
        finally:
            os.kill(pid, signal.SIGCONT)
        released, released_at = time.monotonic(), time.time()
        assert sample["pool"]["occupied_slots"] == sample["pool"]["running_slots"] == 1, sample  # A's train_dense
        assert sample["running"] == [(run_a, "train_dense", "airflow-worker")], sample  # nothing on gpu-worker-1

        for run_id in (run_a, run_b):
            run = finished_run(api, run_id, 600, interval=2, supervisor=cluster.supervisor, diagnose=diagnose)
            assert run["state"] == "success", diagnose()
        dense_b = ti_of(api, run_b, "train_dense")
        assert (dense_b["try_number"], dense_b["hostname"]) == (1, "gpu-worker-1"), dense_b
        back_s = event_time({"timestamp": dense_b["end_date"]}) - released_at

        # ---- each unit trained once; B's wait named A's process and took no retry ----
        logs = {r: {t: task_events(home, r, t) for t in ("train_dense", "late_reset")} for r in (run_a, run_b)}
        gave_back = [m for line in logs[run_b]["train_dense"] if (m := re.fullmatch(
            rf"train_dense \S+: waiting for another run's training: dense training in {re.escape(str(workdir))} \(pid (\d+) on "
            rf"[^)]*\) holds {re.escape(str(lock))}; {GAVE_BACK} [\d:]+ UTC \(in {POLL_S}.0 s, LOTTERY_TRAINING_LOCK_POLL_S.*\)", line))]
        assert gave_back and {m.group(1) for m in gave_back} == {str(pid)}, logs[run_b]["train_dense"][-30:]
        for task, trained, skipped in (("train_dense", "dense: done in", "dense: already done"),
                                       ("late_reset", "retrain sp50.000__0it: done in", "retrain sp50.000__0it: already done")):
            lines = {r: logs[r][task] for r in (run_a, run_b)}
            assert sum(line.startswith(trained) for r in lines for line in lines[r]) == 1, (task, lines)
            assert sum(line.startswith(skipped) for r in lines for line in lines[r]) == 1, (task, lines)
        assert not [line for line in logs[run_b]["train_dense"] if line.startswith(("dense: start", "dense: done in"))]
        for r in (run_a, run_b):
            retried = [t["task_id"] for t in api.task_instances(r) if (t.get("try_number") or 1) > 1]
            assert retried == [], (r, retried)
        reschedules = sum(GAVE_BACK in line for r in (run_a, run_b) for t in logs[r] for line in logs[r][t])
        print(f"\ncluster up in {up_s:.0f}s; B's train_dense up_for_reschedule {waited_s:.0f}s after B's trigger, pool "
              f"{sample['pool']}, running {sample['running']}; B's train_dense gave its worker back {len(gave_back)} "
              f"times ({reschedules} reschedules in all) and ended {back_s:.0f}s after A was let go; both runs done "
              f"{time.monotonic() - released:.0f}s after; {time.monotonic() - started:.0f}s in all")
