"""What ``make run`` runs (``python -m lottery.deploy.run``): the real scheduler + LocalExecutor + API server
on a throwaway Airflow home, a tiny config, tasks really running in parallel. About 2-3 minutes."""

import json
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from lottery.deploy.airflow_home import default_backend
from tests.helpers import TINY_RUN, make_run

pytestmark = pytest.mark.slow

def test_invalid_conf_is_refused_by_the_rest_api(tmp_path):
    out = make_run(tmp_path / "home", {**TINY_RUN, "artifact_root": str(tmp_path / "art"), "image_size": 3})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the run was refused (HTTP 400): Invalid input for param image_size" in out.stderr
    assert not (tmp_path / "art").exists()


def test_run_experiment_with_the_scheduler(tmp_path):
    home, art = tmp_path / "home", tmp_path / "art"
    out = make_run(home, {**TINY_RUN, "artifact_root": str(art)})
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
