"""``make run``: the lottery_ticket DAG once on a project-local Airflow, with real parallel task execution.

    python -m lottery.deploy.run [--conf '{"model": "conv4"}'] [--home .airflow] [--parallelism N]

1. sets up the Airflow home (``.airflow/``: airflow.cfg with the LocalExecutor on SQLite and
   ``parallelism`` = the machine's cores, the database, pool ``lottery_workers``, connection
   ``spark_default`` = ``local[*]``) -- see ``lottery.deploy.airflow_home``;
2. starts the API server (REST + the execution API the task processes report to, on a free port),
   the scheduler (with its LocalExecutor worker processes) and the dag-processor, in the background;
   when ``make ui`` is already running on the same home, uses that one instead;
3. waits for the DAG to be parsed, unpauses it and triggers a run through the REST API with the
   given conf (an invalid conf is refused here, with the field named);
4. shows progress (tasks done / total, running, failed, elapsed) until the run finishes; a
   component that dies is started again (at most 3 times in 10 minutes, one line each; the API
   server on the same port, the progress loop waits for it);
5. prints the accuracy table and the report's path, stops what it started (task processes
   included; also on Ctrl-C, SIGTERM or an error), and exits 0 when the
   run succeeded, 1 when it failed, 2 when the conf was refused, 3 when Airflow did not come up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lottery.deploy import airflow_home
from lottery.deploy.api import Api
from lottery.deploy.constants import DAG_ID
from lottery.deploy.supervisor import (
    ComponentFailed, HomeBusy, Supervisor, free_port, raise_keyboard_interrupt_on_sigterm, stop_with_parent,
)

FINISHED = {"success", "failed", "skipped", "upstream_failed", "removed"}
TERMINAL_RUN = {"success", "failed"}
EXIT_FAILED, EXIT_REFUSED, EXIT_NO_AIRFLOW = 1, 2, 3
# How long the progress loop waits for an API server that does not answer (a restart takes ~15 s).
API_OUTAGE_S = 180.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lottery.deploy.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conf", default="", help="JSON object of DAG params (default: the DAG's defaults)")
    p.add_argument("--home", type=Path, default=airflow_home.DEFAULT_HOME, help="Airflow home (default: .airflow/)")
    p.add_argument("--parallelism", type=int, help="LocalExecutor slots (default: the machine's cores, at least 2)")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("LOTTERY_RUN_TIMEOUT", 24 * 3600)),
                   help="give up after this many seconds (default: 24 h)")
    p.add_argument("--poll", type=float, default=3.0, help="seconds between progress polls")
    p.add_argument("--run-id", help="DAG run id (default: generated)")
    return p.parse_args(argv)


def load_conf(text: str) -> dict:
    text = (text or "").strip()
    if not text:
        return {}
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --conf / CONF is not valid JSON: {exc}: {text!r}")
    if not isinstance(conf, dict):
        raise SystemExit(f"error: --conf / CONF must be a JSON object, not {text!r}")
    return conf


def fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(tis: list[dict], elapsed: float) -> str:
    states = [t.get("state") or "none" for t in tis]
    current = sorted({t["task_id"] for t in tis if t.get("state") == "running"})
    parts = [f"{sum(s in FINISHED for s in states)}/{len(tis)} tasks done", f"{states.count('running')} running"]
    for task_id in ("late_reset", "imp_chain", "stability"):  # the tickets (one-shot, or chains), the instability analyses
        mapped = [t for t in tis if t["task_id"] == task_id and t.get("map_index", -1) >= 0]
        if mapped:
            parts.append(f"{task_id} {sum((t.get('state') or '') in FINISHED for t in mapped)}/{len(mapped)}")
    for state, label in (("failed", "failed"), ("upstream_failed", "upstream failed"), ("up_for_retry", "up for retry")):
        if states.count(state):
            parts.append(f"{states.count(state)} {label}")
    line = f"[{fmt_elapsed(elapsed)}] " + ", ".join(parts)
    if current:
        line += f"  ({', '.join(current)})"
    return line


# On a CPU machine a ticket's task start-up (Airflow, imports, data, compile) is a large part of its
# time: groups of 10 tickets per task pay it once per group and still keep both cores busy to the end
# (docs/dag.md, docs/benchmarks.md). A CONF that sets tickets_per_task wins.
LAPTOP_TICKETS_PER_TASK = 10


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conf = {"tickets_per_task": LAPTOP_TICKETS_PER_TASK, **load_conf(args.conf)}
    home = args.home.resolve()
    started = time.monotonic()
    local: airflow_home.LocalAirflow | None = None
    raise_keyboard_interrupt_on_sigterm()
    stop_with_parent()
    try:
        port = airflow_home.running_ui(home)
        if port:
            print(f"Using the Airflow already running on {home} (make ui, port {port})")
        else:
            local = airflow_home.LocalAirflow(home, free_port(), parallelism=args.parallelism)
            local.supervisor.claim()  # stops what an earlier make run or make ui on this home left running
            airflow_home.init(home, parallelism=args.parallelism)
            local.start("api-server", "scheduler", "dag-processor")
            port = local.port
            print(f"Started api-server ({local.url}), scheduler (LocalExecutor, parallelism "
                  f"{args.parallelism or airflow_home.default_parallelism()}) and dag-processor; "
                  f"logs in {local.supervisor.log_dir}")
            print(f"Keras backend of the tasks: {local.env['KERAS_BACKEND']} "
                  "(KERAS_BACKEND=tensorflow or =jax chooses; docs/benchmarks.md says why JAX by default)")
        api = Api(f"http://127.0.0.1:{port}", airflow_home.USER, airflow_home.password(home))
        return run(api, port, conf, args, started, local.supervisor if local else None)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping Airflow (finished work is kept; `make run` again resumes it)", file=sys.stderr)
        return 130
    except HomeBusy as exc:
        print(f"error: {exc}, and its Airflow is not up: wait for it, or use another home "
              "(make run LOTTERY_AIRFLOW_HOME=DIR)", file=sys.stderr)
        return EXIT_NO_AIRFLOW
    finally:
        if local is not None:
            local.stop()


def run(api: Api, port: int, conf: dict, args: argparse.Namespace, started: float,
        supervisor: Supervisor | None) -> int:
    """Trigger the run on a started Airflow and follow it to the end; the exit status."""
    home = args.home.resolve()
    try:
        dag = api.wait_ready(supervisor)
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: Airflow did not come up: {exc}", file=sys.stderr)
        if supervisor:
            print(supervisor.tails(15), file=sys.stderr)
        return EXIT_NO_AIRFLOW
    if dag.get("is_paused"):
        api.patch(f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    body = {"logical_date": None, "conf": conf, **({"dag_run_id": args.run_id} if args.run_id else {})}
    status, dag_run = api.post(f"/api/v2/dags/{DAG_ID}/dagRuns", body)
    if status not in (200, 201):
        detail = dag_run.get("detail") if isinstance(dag_run, dict) else dag_run
        if isinstance(detail, str):
            detail = detail.split("\n\nFailed validating")[0]  # the schema dump adds nothing
        print(f"error: the run was refused (HTTP {status}): {detail}", file=sys.stderr)
        return EXIT_REFUSED
    run_id = dag_run["dag_run_id"]
    print(f"Triggered {DAG_ID} run {run_id} with conf {json.dumps(conf)}")
    print(f"  UI (while this runs): http://127.0.0.1:{port}/dags/{DAG_ID}/runs/{run_id}  "
          f"login {airflow_home.USER} / {airflow_home.password(home)}")
    state = follow(api, run_id, args, started, supervisor)
    return finish(api, run_id, state, started, home)


def follow(api: Api, run_id: str, args: argparse.Namespace, started: float, supervisor: Supervisor | None) -> str:
    """Progress lines until the run ends (one updated line on a terminal); the run's final state."""
    tty = sys.stdout.isatty()
    last_line, last_print = "", 0.0
    unanswered_since: float | None = None
    while True:
        if supervisor is not None:
            try:
                supervisor.watch()  # restarts a dead component (one line each), up to its limit
            except ComponentFailed as exc:
                raise SystemExit(f"error: {exc}")
        try:
            state, tis = poll(api, run_id)
            unanswered_since = None
        except OSError as exc:  # the api-server is restarting: same port, back in a few seconds
            unanswered_since = unanswered_since or time.monotonic()
            if time.monotonic() - unanswered_since > API_OUTAGE_S:
                raise SystemExit(f"error: the API server at {api.base} has not answered for {API_OUTAGE_S:.0f}s: {exc}")
            time.sleep(args.poll)
            continue
        line = progress_line(tis, time.monotonic() - started)
        now = time.monotonic()
        core = line.split("] ", 1)[-1]
        if tty:
            sys.stdout.write("\r" + line[:160].ljust(160))
            sys.stdout.flush()
        elif core != last_line or now - last_print > 60:
            print(line, flush=True)
            last_line, last_print = core, now
        if state in TERMINAL_RUN:
            if tty:
                print()
            return state
        if time.monotonic() - started > args.timeout:
            raise SystemExit(f"error: the run did not finish within {args.timeout:.0f}s")
        time.sleep(args.poll)


def poll(api: Api, run_id: str) -> tuple[str | None, list[dict]]:
    """The run's state and its task instances; OSError while the API server does not answer."""
    status, dag_run = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
    state = dag_run.get("state") if status == 200 else None
    try:
        tis = api.task_instances(run_id)
    except RuntimeError:
        tis = []
    return state, tis


def finish(api: Api, run_id: str, state: str, started: float, home: Path) -> int:
    """The accuracy table, where the report is, and what did not succeed; the exit status."""
    tis = api.task_instances(run_id)
    print(f"\nRun {run_id}: {state.upper()} after {fmt_elapsed(time.monotonic() - started)}")
    prepared = api.xcom(run_id, "prepare_workdir") or {}
    summary = api.xcom(run_id, "report") or {}
    workdir = prepared.get("workdir") or summary.get("workdir")
    if workdir:
        print_table(workdir)
    if summary.get("report"):
        print(f"\nReport: {summary['report']}")
        print(f"Plot:   {summary.get('plot')}")
        print(f"CSV:    {summary.get('results_csv')}")
        print_rewind_here(summary)
    elif workdir:
        print(f"\nWork directory: {workdir} (no report was written)")
    bad = [t for t in tis if t.get("state") in ("failed", "upstream_failed")]
    if bad:
        print_failures(api, run_id, bad)
        print(f"Task logs: {home / 'logs' / f'dag_id={DAG_ID}' / f'run_id={run_id}'}")
    for p in (summary.get("problems", []) + summary.get("stability_problems", []))[:25]:
        print(f"  not done: {p}")
    return 0 if state == "success" else EXIT_FAILED


def print_rewind_here(summary: dict) -> None:
    """The instability analysis' files and, per network, its earliest stable rewind point."""
    if not summary.get("instability_plot"):
        return
    print(f"Instability: {summary['instability_plot']} ({summary.get('stability_csv')})")
    for network, rewind in (summary.get("rewind_here") or {}).items():
        print(f"  {network}: {f'rewind here: {rewind}' if rewind else 'no stable rewind point'}")


def print_table(workdir: str) -> None:
    try:
        from lottery.report import format_table

        print()
        print(format_table(workdir))
    except Exception as exc:  # the table is a courtesy; the report has it too
        print(f"(no table: {type(exc).__name__}: {exc})")


def print_failures(api: Api, run_id: str, bad: list[dict]) -> None:
    """The task instances that did not succeed, with the error of the first ten failed ones."""
    print(f"\n{len(bad)} task instance(s) did not succeed:")
    shown = 0
    for t in bad[:25]:
        name = t.get("rendered_map_index") or (t["map_index"] if t.get("map_index", -1) >= 0 else "")
        line = f"  {t['task_id']}{f' [{name}]' if name != '' else ''}: {t['state']}"
        if t["state"] == "failed" and shown < 10:
            error = api.task_error(run_id, t)
            if error:
                line += f": {error}"
                shown += 1
        print(line)


if __name__ == "__main__":
    sys.exit(main())
