"""Where the time of one `lottery_ticket` DAG run goes: wall time, task run time, and for each
training task where each of its seconds went.

Reads the run's task instances and XComs from the Airflow metadata database of the local home
(`make run` uses `.airflow/airflow.db`), the engine's result files in the run's work directory, and
the phases the training processes reported. Per training task (`train_dense`, `late_reset`,
`controls`), summed over its instances:

* Airflow's task start: the task instance's duration minus the engine's wall time (process start,
  Airflow's imports, the task runner, the DAG file parse, the XCom pushes); the engine's wall time
  of an instance is the largest `wall_s` of the results it wrote (a ticket's counts from the start
  of its group);
* the engine's phases (`lottery.phases`): imports, data open, build and compile, ticket start
  (rewind or resume, mask), epochs, evaluation, writing artifacts. The engine records none of them:
  `record` (below) is the listener, attached to every training process of the run by

      LOTTERY_PHASE_LISTENER=bench.run_breakdown:record PYTHONPATH=$PWD make run

  It appends one line per phase to `<AIRFLOW_HOME>/phases.jsonl`. Without it, those columns read `-`.

Only the tickets an instance trained count for it (their result.json, and their phases, fall
within its run time); tickets it found already done cost it almost nothing.

With ``--rate R`` (the 2-process img/s of `bench/threads.py` in the same sitting, for the backend
the run trained with) it adds the compute floor: the retrainings' training images / R, plus the
fetch, preprocess and dense task times; and the run's wall time against it.

    .venv/bin/python -m bench.run_breakdown [--home .airflow] [--run-id RUN] [--rate R] [--note TEXT] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING_TASKS = ("train_dense", "late_reset", "controls")
# The engine's phases (lottery.phases) and their column names, in the order they happen.
PARTS = {
    "imports": "imports", "data_open": "data open", "build_compile": "build + compile",
    "start": "ticket start", "epochs": "epochs", "eval": "evaluation", "write": "writing",
}
PHASES_FILE = "phases.jsonl"
SLACK_S = 2.0  # result.json mtimes vs the task instance's start and end (database clock vs file clock)


def record(unit: str, phase: str, seconds: float) -> None:
    """The phase listener of a training process (``LOTTERY_PHASE_LISTENER=bench.run_breakdown:record``):
    one JSON line per phase in ``<AIRFLOW_HOME>/phases.jsonl`` (an append of one short line: the
    processes of a run write to it side by side)."""
    path = Path(os.environ.get("AIRFLOW_HOME") or ROOT / ".airflow") / PHASES_FILE
    line = json.dumps({"unit": unit, "phase": phase, "seconds": seconds, "at": time.time()}) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def read_phases(home: Path) -> list[dict]:
    path = home / PHASES_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _json(raw):
    """An XCom or conf value as Python (the JSON column may hold a JSON string of JSON)."""
    while isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError:
            break
    return raw


def breakdown(home: Path, run_id: str | None) -> dict:
    db = sqlite3.connect(home / "airflow.db")
    if run_id is None:
        run_id = db.execute("select run_id from dag_run where dag_id='lottery_ticket' order by start_date desc limit 1").fetchone()[0]
    start, end, state, conf = db.execute("select start_date, end_date, state, conf from dag_run where run_id=?", (run_id,)).fetchone()
    rows = db.execute(
        "select task_id, map_index, duration, state, start_date, end_date from task_instance where run_id=?", (run_id,)
    ).fetchall()
    xcoms = {(t, i): _json(v) for t, i, v in db.execute(
        "select task_id, map_index, value from xcom where run_id=? and key='return_value'", (run_id,))}
    per_task: dict[str, list[float]] = defaultdict(list)
    for task_id, _, duration, *_ in rows:
        per_task[task_id].append(duration or 0.0)
    prepared = xcoms.get(("prepare_workdir", -1))
    workdir = Path(prepared["workdir"] if isinstance(prepared, dict) else prepared) if prepared else None
    found = workdir is not None and workdir.exists()
    seconds = task_seconds(workdir, rows, xcoms, read_phases(home)) if found else {}
    training, tickets = _training_time(workdir) if found else (0.0, 0)
    images, backends = _training_images(workdir) if found else (0, set())
    return {
        "run_id": run_id,
        "state": state,
        "tickets_per_task": conf.get("tickets_per_task", 1) if isinstance(conf := _json(conf), dict) else 1,
        "wall_s": ((_time(end) or datetime.now(timezone.utc)) - _time(start)).total_seconds(),
        "task_s": {k: sum(v) for k, v in per_task.items()},
        "task_counts": {k: len(v) for k, v in per_task.items()},
        "engine_s": sum(row["engine_s"] for row in seconds.values()),
        "training_s": training,
        "tickets": tickets,
        "training_images": images,
        "backends": sorted(backends),
        "workdir": str(workdir),
        "seconds": seconds,
    }


def _training_time(path: Path) -> tuple[float, int]:
    """(seconds in training epochs, retrainings done), from the training curves of the dense run
    and of the planned tickets and controls that are done."""
    from lottery.paths import Workdir
    from lottery.plan import RunPlan

    workdir = Workdir(path)
    status = workdir.status(RunPlan.from_config(workdir.load()[0]))
    results = [workdir.dense_result] * status.dense_done + [workdir.ticket(spec).result for spec in status.done]
    training = sum(row["wall_s"] for result in results for row in json.loads(result.read_text())["curve"])
    return training, len(status.done)


def _training_images(path: Path) -> tuple[int, set[str]]:
    """(images the done retrainings trained: steps from the rewind point to the end x batch, the
    backends their results name)."""
    from lottery.paths import Workdir
    from lottery.plan import RunPlan

    workdir = Workdir(path)
    cfg = workdir.load()[0]
    images, backends = 0, set()
    for spec in workdir.status(RunPlan.from_config(cfg)).done:
        data = json.loads(workdir.ticket(spec).result.read_text())
        last = (data.get("curve") or [{}])[-1]
        images += max(0, last.get("step", 0) - data.get("rewind_step", 0)) * cfg.batch_size
        if data.get("backend"):
            backends.add(data["backend"])
    return images, backends


def floor_lines(b: dict, rate: float) -> list[str]:
    """The compute floor of the run and its wall time against it."""
    serial = {t: b["task_s"].get(t, 0.0) for t in ("fetch_dataset", "preprocess", "train_dense")}
    train_s = b["training_images"] / rate
    floor = train_s + sum(serial.values())
    return [
        f"**Against the compute floor** (Keras on {', '.join(b['backends']) or '?'}): the retrainings trained "
        f"{b['training_images'] / 1e6:.1f} M images; at {rate:,.0f} img/s (2 processes x 1 thread, `bench/threads.py` "
        f"in the same sitting) that is {train_s:.0f} s, plus fetch {serial['fetch_dataset']:.1f} s, preprocess "
        f"{serial['preprocess']:.1f} s and dense {serial['train_dense']:.1f} s: a floor of **{floor / 60:.1f} min**. "
        f"The DAG run took {b['wall_s'] / 60:.1f} min = **{b['wall_s'] / floor:.2f} x the floor**.",
        "",
    ]


def instance_results(workdir, task_id: str, map_index: int, xcoms: dict) -> dict[str, Path]:
    """The units one training task instance is responsible for (from the planning XComs): each
    one's phase unit (`lottery.phases`) and its result file."""
    from lottery.paths import Workdir
    from lottery.plan import TicketSpec

    workdir = Workdir(workdir)
    if task_id == "train_dense":
        return {"dense": workdir.dense_result}
    planned = xcoms.get(("plan_tickets" if task_id == "late_reset" else "plan_controls", -1)) or []
    if not 0 <= map_index < len(planned):
        return {}
    kwargs = planned[map_index]
    workdir = Workdir(kwargs.get("workdir") or workdir)  # each replicate's tickets are in its own work dir
    specs = [TicketSpec(m["mask_id"], kwargs["rewind"], kwargs.get("control")) for m in kwargs["masks"]]
    return {f"retrain {spec.name}": workdir.ticket(spec).result for spec in specs}


def task_seconds(workdir, rows, xcoms: dict, phases: list[dict]) -> dict[str, dict]:
    """Per training task: instances, tickets trained, task seconds, Airflow's start, the engine's phases."""
    out: dict[str, dict] = {}
    for task_id, map_index, duration, _, start, end in rows:
        if task_id not in TRAINING_TASKS or duration is None:
            continue
        row = out.setdefault(task_id, {"instances": 0, "trained": 0, "task_s": 0.0, "engine_s": 0.0, "timed": False,
                                       **dict.fromkeys(PARTS, 0.0)})
        row["instances"] += 1
        row["task_s"] += duration
        window = (_time(start).timestamp() - SLACK_S, _time(end).timestamp() + SLACK_S)
        units = instance_results(workdir, task_id, map_index, xcoms)
        walls = [json.loads(path.read_text())["wall_s"] for path in units.values()
                 if path.is_file() and window[0] <= path.stat().st_mtime <= window[1]]
        row["trained"] += len(walls)
        row["engine_s"] += max(walls, default=0.0)
        for line in phases:
            if line["unit"] in units and window[0] <= line["at"] <= window[1] and line["phase"] in PARTS:
                row[line["phase"]] += line["seconds"]
                row["timed"] = True
    for row in out.values():
        row["airflow_s"] = row["task_s"] - row["engine_s"]
    return out


def seconds_table(seconds: dict[str, dict]) -> list[str]:
    """The per-task table: where each second of the training tasks went (sums over instances, then
    per ticket trained); ``-``: no phase of that task was reported (no listener was attached)."""
    head = ["task", "instances", "trained", "task time", "Airflow's task start", *PARTS.values(), "other (engine)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task_id in TRAINING_TASKS:
        row = seconds.get(task_id)
        if not row:
            continue
        parts = [row[k] if row["timed"] else None for k in PARTS]
        other = row["engine_s"] - sum(parts) if row["timed"] else None
        cells = [row["task_s"], row["airflow_s"], *parts, other]
        lines.append(f"| {task_id} | {row['instances']} | {row['trained']} | " + " | ".join(_cell(c, row["task_s"]) for c in cells) + " |")
        if row["trained"]:
            per = ["-" if c is None else f"{c / row['trained']:.2f}" for c in cells]
            lines.append("| per trained ticket | | | " + " | ".join(per) + " |")
    if not any(row["timed"] for row in seconds.values()):
        lines += ["", "No phases were reported: run with `LOTTERY_PHASE_LISTENER=bench.run_breakdown:record` to see them."]
    return lines


def _cell(seconds: float | None, total: float) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:,.1f} ({100 * seconds / max(total, 1e-9):.0f}%)"


def to_markdown(b: dict, cores: int, rate: float | None = None) -> str:
    total = sum(b["task_s"].values())
    lines = [
        f"Run `{b['run_id']}` ({b['state']}), {cores} cores, LocalExecutor parallelism {cores}, "
        f"tickets_per_task {b.get('tickets_per_task', 1)}.",
        "",
        f"- wall time of the DAG run: **{b['wall_s'] / 60:.1f} min**",
        f"- sum of task run times: {total / 60:.1f} min ({total / max(b['wall_s'], 1e-9):.2f} tasks running on average)",
        f"- of which inside the engine (dense + {b['tickets']} retrainings, from their result.json): {b['engine_s'] / 60:.1f} min",
        f"- of which in training epochs (fit + evaluation): {b['training_s'] / 60:.1f} min = {100 * b['training_s'] / max(total, 1e-9):.0f}% of task time",
        "",
    ]
    if rate:
        lines += floor_lines(b, rate)
    if b.get("seconds"):
        lines += [
            "Where the seconds of the training tasks went (seconds, share of the task time; sums over the instances, "
            "then per ticket trained). Airflow's task start = task instance duration - engine wall time.",
            "",
            *seconds_table(b["seconds"]),
            "",
        ]
    lines += ["| task | instances | run time (s) | mean (s) |", "|---|---|---|---|"]
    for task, seconds in sorted(b["task_s"].items(), key=lambda kv: -kv[1]):
        n = b["task_counts"][task]
        lines.append(f"| {task} | {n} | {seconds:,.0f} | {seconds / max(n, 1):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=ROOT / ".airflow")
    parser.add_argument("--run-id")
    parser.add_argument("--rate", type=float, help="bench/threads.py's 2 x 1 img/s of the same sitting: adds the compute floor")
    parser.add_argument("--note", default="", help="a line to add (e.g. what else ran on the machine)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    text = to_markdown(breakdown(args.home, args.run_id), len(os.sched_getaffinity(0)), args.rate)
    if args.note:
        text += "\n\n" + args.note
    print(text)
    if args.write_docs:
        from bench.docs import update_section

        update_section("`make run`: the full default experiment (`bench/run_breakdown.py`)", text, key="make-run")


if __name__ == "__main__":
    main()
