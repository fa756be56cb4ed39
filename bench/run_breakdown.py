"""Where the time of one `lottery_ticket` DAG run goes: wall time, task run time, engine time, training.

Reads the run's task instances from the Airflow metadata database of the local home (`make run`
uses `.airflow/airflow.db`) and the engine's result files in the run's work directory, so the share
spent outside training (task start-up, imports, scheduling, Spark) is visible.

    .venv/bin/python -m bench.run_breakdown [--home .airflow] [--run-id RUN] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def breakdown(home: Path, run_id: str | None) -> dict:
    db = sqlite3.connect(home / "airflow.db")
    if run_id is None:
        run_id = db.execute("select run_id from dag_run where dag_id='lottery_ticket' order by start_date desc limit 1").fetchone()[0]
    start, end, state = db.execute("select start_date, end_date, state from dag_run where run_id=?", (run_id,)).fetchone()
    tasks = db.execute("select task_id, map_index, duration, state from task_instance where run_id=?", (run_id,)).fetchall()
    per_task: dict[str, list[float]] = defaultdict(list)
    for task_id, _, duration, _ in tasks:
        per_task[task_id].append(duration or 0.0)
    workdir = None
    for task_id, map_index, _, _ in tasks:
        if task_id == "prepare_workdir":
            row = db.execute("select value from xcom where run_id=? and task_id='prepare_workdir' and key='return_value'", (run_id,)).fetchone()
            if row:
                value = json.loads(row[0]) if isinstance(row[0], str) else row[0]
                workdir = Path(value["workdir"] if isinstance(value, dict) else value)
    engine, training, tickets = _engine_time(workdir) if workdir and workdir.exists() else (0.0, 0.0, 0)
    return {
        "run_id": run_id,
        "state": state,
        "wall_s": ((_time(end) or datetime.now(_time(start).tzinfo)) - _time(start)).total_seconds(),
        "task_s": {k: sum(v) for k, v in per_task.items()},
        "task_counts": {k: len(v) for k, v in per_task.items()},
        "engine_s": engine,
        "training_s": training,
        "tickets": tickets,
        "workdir": str(workdir),
    }


def _engine_time(path: Path) -> tuple[float, float, int]:
    """(seconds inside the runners, seconds in training epochs, retrainings done), from the result
    files of the dense run and of the planned tickets and controls that are done."""
    from lottery.paths import Workdir
    from lottery.plan import RunPlan

    workdir = Workdir(path)
    status = workdir.status(RunPlan.from_config(workdir.load()[0]))
    results = [workdir.dense_result] * status.dense_done + [workdir.ticket(spec).result for spec in status.done]
    engine = training = 0.0
    for result in results:
        data = json.loads(result.read_text())
        engine += data["wall_s"]
        training += sum(row["wall_s"] for row in data["curve"])
    return engine, training, len(status.done)


def to_markdown(b: dict, cores: int) -> str:
    total = sum(b["task_s"].values())
    lines = [
        f"Run `{b['run_id']}` ({b['state']}), {cores} cores, LocalExecutor parallelism {cores}.",
        "",
        f"- wall time of the DAG run: **{b['wall_s'] / 60:.1f} min**",
        f"- sum of task run times: {total / 60:.1f} min ({total / max(b['wall_s'], 1e-9):.2f} tasks running on average)",
        f"- of which inside the engine's runners (dense + {b['tickets']} retrainings, from their result.json): {b['engine_s'] / 60:.1f} min",
        f"- of which in training epochs (fit + evaluation): {b['training_s'] / 60:.1f} min = {100 * b['training_s'] / max(total, 1e-9):.0f}% of task time",
        "",
        "| task | instances | run time (s) | mean (s) |",
        "|---|---|---|---|",
    ]
    for task, seconds in sorted(b["task_s"].items(), key=lambda kv: -kv[1]):
        n = b["task_counts"][task]
        lines.append(f"| {task} | {n} | {seconds:,.0f} | {seconds / max(n, 1):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=ROOT / ".airflow")
    parser.add_argument("--run-id")
    parser.add_argument("--note", default="", help="a line to add (e.g. what else ran on the machine)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    text = to_markdown(breakdown(args.home, args.run_id), len(os.sched_getaffinity(0)))
    if args.note:
        text += "\n\n" + args.note
    print(text)
    if args.write_docs:
        from bench.docs import update_section

        update_section("`make run`: the full default experiment (`bench/run_breakdown.py`)", text, key="make-run")


if __name__ == "__main__":
    main()
