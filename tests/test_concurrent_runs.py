"""Runs that share an artifact root: three runs triggered at once on one artifact root all succeed, and so does a
fourth that repeats the first's config.

The real scheduler (LocalExecutor, 4 slots), API server and dag-processor on a throwaway home
(``lottery.deploy.airflow_home.LocalAirflow``, as ``make run``), runs of a tiny experiment with
seeds 1, 2, 3 and 1 again on one artifact root, triggered through the REST API one right after the
other. They share the Fashion-MNIST export and the preprocessed data: one run writes each, the
others wait for it and find it done; no task is retried. The two runs of seed 1 share a work
directory: its dense network and its ticket are each trained once (the other run waits for the
training lock, or finds the unit done). About 3-4 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from lottery.deploy.constants import DAG_ID
from tests.helpers import local_airflow, log_events, tiny_run, wait_for

pytestmark = pytest.mark.slow

TINY = tiny_run(dataset_limit=200, rewind_points=["0it"], sparsities=[0.5], controls=False, drop=("control_sparsities",))
SEEDS = (1, 2, 3, 1)  # the last repeats the first: the same config, the same work directory


@pytest.fixture
def airflow(tmp_path, monkeypatch):
    """A started Airflow on a fresh home whose runs may write in ``tmp_path``; stopped afterwards."""
    for name in list(os.environ):
        if name.startswith(("AIRFLOW", "LOTTERY_TEST_AIRFLOW")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LOTTERY_ALLOWED_ARTIFACT_ROOTS", str(tmp_path))
    # the run waiting for its twin's training looks again every 5 s, not every 30 s: the same path, sooner
    monkeypatch.setenv("LOTTERY_TRAINING_LOCK_POLL_S", "5")
    with local_airflow(tmp_path / "home", "api-server", "scheduler", "dag-processor", parallelism=4,
                       unpause=True) as started:
        yield started


def task_log(home: Path, run_id: str, task_id: str) -> str:
    task_dir = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / f"task_id={task_id}"
    logs = sorted(task_dir.glob("**/attempt=*.log"))  # a mapped task's are in map_index=*/
    return "\n".join(p.read_text(errors="replace") for p in logs)


def trigger(api, conf: dict) -> str:
    """Trigger a run; the id. The API answers 500 ("Database error": SQLite busy, its audit-log
    insert failed before the run was made) when a trigger meets the writes of starting tasks: a
    user would press Trigger again, and so does this (the run count is checked after)."""
    for _ in range(5):
        status, run = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
        if status in (200, 201):
            return run["dag_run_id"]
        assert status == 500 and "Database error" in json.dumps(run), (status, run)
        time.sleep(1)
    pytest.fail(f"triggering failed 5 times: {status} {run}")


def events(log: str) -> list[str]:
    """The messages of a task log."""
    return [str(event.get("event", "")) for event in log_events(log)]


def wait_for_runs(local, api, run_ids: list[str], timeout: float = 900) -> dict[str, str]:
    """Every run finished; meanwhile the components are watched, as `make ui` does (a dead one is
    restarted, or the test fails naming it)."""
    def states() -> dict[str, str]:
        return {r: api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{r}")[1].get("state") for r in run_ids}

    def finished() -> dict[str, str] | None:
        now = states()
        return now if all(s in ("success", "failed") for s in now.values()) else None

    return wait_for(finished, timeout, "the runs to finish", interval=2, state=states, supervisor=local.supervisor)


def test_runs_at_once_on_one_artifact_root_all_succeed_and_train_nothing_twice(airflow, tmp_path):
    local, api = airflow
    root = tmp_path / "artifacts"
    triggered = time.monotonic()
    run_ids = [trigger(api, {**TINY, "seed": seed, "artifact_root": str(root)}) for seed in SEEDS]
    assert api.get(f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["total_entries"] == len(SEEDS)
    states = wait_for_runs(local, api, run_ids)
    wall = time.monotonic() - triggered
    logs = {r: {t: task_log(local.home, r, t) for t in ("fetch_dataset", "preprocess", "train_dense", "late_reset")}
            for r in run_ids}
    assert states == {r: "success" for r in run_ids}, json.dumps(logs, indent=1)[-8000:]

    # nothing collided: no task tried twice, nobody refused for a lock
    for r in run_ids:
        retried = [t["task_id"] for t in api.task_instances(r) if (t.get("try_number") or 1) > 1]
        assert retried == [], (r, retried)
    everything = "\n".join(log for r in run_ids for t, log in logs[r].items() if t in ("fetch_dataset", "preprocess"))
    assert "another preprocessing job is writing" not in everything

    # written once: one export, one Spark job; the others waited for it or found it done, without Spark
    exports = [r for r in run_ids if "exported Fashion-MNIST to" in logs[r]["fetch_dataset"]]
    writers = [r for r in run_ids if "starting spark-submit" in logs[r]["preprocess"]]
    assert len(exports) == 1 and len(writers) == 1, logs
    assert "done: 400 records written" in logs[writers[0]]["preprocess"]
    readers = [r for r in run_ids if r not in writers]
    waits = []
    for r in readers:
        log = logs[r]["preprocess"]
        assert "is already up to date" in log and "Spark not started" in log, log
        assert "spark-submit" not in log.replace("starting spark-submit", "") and "Spark-Submit cmd" not in log, log
        waits.append(float(re.search(r"after waiting (\d+\.\d) s for another run", log).group(1)))
    assert max(waits) > 0, "no run waited for the one writing the data: they did not overlap"
    data = root / "data"
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == ["fashion_mnist-28px-c1-png-n200"]

    # three experiments, each with its report; the repeated config's units trained once, by one of its two runs
    workdirs = sorted(p for p in root.iterdir() if p.name.startswith("lenet_300_100-"))
    assert len(workdirs) == 3 and all((w / "report" / "report.md").is_file() for w in workdirs)
    twins = [run_ids[0], run_ids[3]]
    for task, trained, skipped in (("train_dense", "dense: done in", "dense: already done"),
                                   ("late_reset", "retrain sp50.000__0it: done in", "retrain sp50.000__0it: already done")):
        seen = {r: events(logs[r][task]) for r in twins}
        assert sorted(sum(e.startswith(trained) for e in seen[r]) for r in twins) == [0, 1], seen
        assert sum(e.startswith(skipped) for r in twins for e in seen[r]) == 1, seen
    waited = [r for r in twins if "giving the worker back" in logs[r]["train_dense"] + logs[r]["late_reset"]]
    print(f"\nfour runs at once: {wall:.0f} s from the triggers to the last run's end; "
          f"preprocess waits of the runs that did not write: {', '.join(f'{w:.1f} s' for w in waits)}; "
          f"the repeated config's run that waited for a training lock: {waited or 'none (it found the units done)'}")
