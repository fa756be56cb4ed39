"""What ``make run`` runs (``python -m lottery.deploy.run``): the real scheduler + LocalExecutor + API server
on a throwaway Airflow home, a tiny config, tasks really running in parallel. About 2-3 minutes."""

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from lottery.deploy.airflow_home import default_backend

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TINY = {
    "dataset_limit": 300,
    "training_steps": "1ep",
    "lr_milestones": [],
    "batch_size": 32,
    "rewind_points": ["0it", "2it"],
    "sparsities": [0.5, 0.8],
    "controls": True,
    "control_sparsities": [0.8],
}


def run_script(home: Path, conf: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LOTTERY_TEST_AIRFLOW"))}
    env.pop("KERAS_BACKEND", None)  # make run's own choice (JAX where installed), not the test session's
    env.setdefault("LOTTERY_ALLOWED_ARTIFACT_ROOTS", str(home.parent))  # this deployment lets the test write in its tmp_path
    return subprocess.run(
        [sys.executable, "-m", "lottery.deploy.run", "--home", str(home), "--parallelism", "2", "--poll", "2", "--conf", json.dumps(conf)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_invalid_conf_is_refused_by_the_rest_api(tmp_path):
    out = run_script(tmp_path / "home", {**TINY, "artifact_root": str(tmp_path / "art"), "image_size": 3})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the run was refused (HTTP 400): Invalid input for param image_size" in out.stderr
    assert not (tmp_path / "art").exists()


def test_run_experiment_with_the_scheduler(tmp_path):
    home, art = tmp_path / "home", tmp_path / "art"
    out = run_script(home, {**TINY, "artifact_root": str(art)})
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert "SUCCESS" in out.stdout
    assert f"Keras backend of the tasks: {default_backend()} " in out.stdout  # said before it trains
    # make run groups the tickets (tickets_per_task 10): one late_reset instance per rewind point here
    assert '"tickets_per_task": 10' in out.stdout
    assert "late_reset 2/2" in out.stdout and "tasks done" in out.stdout
    assert "tickets: val accuracy (%)" in out.stdout
    report = Path(out.stdout.split("Report: ", 1)[1].splitlines()[0].strip())
    assert report.is_file() and report.parent.parent.parent == art
    w = report.parent.parent
    assert (w / "report" / "accuracy_vs_sparsity.png").is_file()
    results = [json.loads(p.read_text()) for p in [w / "dense" / "result.json", *w.glob("tickets/*/result.json")]]
    assert len(results) == 9
    assert {r["backend"] for r in results} == {default_backend()}
    if default_backend() == "jax":  # the task processes share JAX's compilation cache
        assert len(list((home / "jax-cache").iterdir())) > 5
    # the components were stopped
    assert not (home / "components.json").exists()
    # really parallel: two late_reset / controls instances (groups) ran at the same time
    with sqlite3.connect(home / "airflow.db") as db:
        spans = [
            (datetime.fromisoformat(s), datetime.fromisoformat(e))
            for s, e in db.execute(
                "select start_date, end_date from task_instance where task_id in ('late_reset', 'controls') and state = 'success'"
            )
        ]
        queues = {q for (q,) in db.execute("select distinct queue from task_instance where task_id = 'late_reset'")}
    assert len(spans) == 6  # 2 ticket groups (one per rewind point) + 4 control groups (kind x rewind point)
    overlaps = sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1])
    assert overlaps >= 1, spans
    assert queues == {"gpu"}
