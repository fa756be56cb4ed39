#!/usr/bin/env python3
"""Run the lottery_ticket DAG once on a project-local Airflow, with real parallel task execution.

    python scripts/run_experiment.py [--conf '{"model": "conv4"}'] [--home .airflow]

What ``make run`` does:

1. sets up the Airflow home (``.airflow/``: airflow.cfg with the LocalExecutor on SQLite and
   ``parallelism`` = the machine's cores, the database, pool ``lottery_workers``, connection
   ``spark_default`` = ``local[*]``) -- see scripts/airflow_local.py;
2. starts the API server (REST + the execution API the task processes report to, on a free port),
   the scheduler (with its LocalExecutor worker processes) and the dag-processor, in the background;
   when ``make ui`` is already running on the same home, uses that one instead;
3. waits for the DAG to be parsed, unpauses it and triggers a run through the REST API with the
   given conf (an invalid conf is refused here, with the field named);
4. shows progress (tasks done / total, running, failed, elapsed) until the run finishes;
5. prints the accuracy table and the report's path, stops what it started, and exits 0 when the
   run succeeded, 1 when it failed, 2 when the conf was refused, 3 when Airflow did not come up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import airflow_local as af  # noqa: E402

FINISHED = {"success", "failed", "skipped", "upstream_failed", "removed"}
TERMINAL_RUN = {"success", "failed"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conf", default="", help="JSON object of DAG params (default: the DAG's defaults)")
    p.add_argument("--home", type=Path, default=af.DEFAULT_HOME, help="Airflow home (default: .airflow/)")
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


def running_ui(home: Path) -> int | None:
    """The API port of a `make ui` running on this home, if any."""
    info = af._read_json(home / "components.json")
    pids = info.get("pids", {})
    if not pids or not info.get("port"):
        return None
    for pid in pids.values():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return int(info["port"])


def task_instances(api: af.Api, run_id: str) -> list[dict]:
    out, offset = [], 0
    while True:
        status, page = api.get(f"/api/v2/dags/{af.DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100&offset={offset}")
        if status != 200:
            raise RuntimeError(f"listing task instances failed: HTTP {status} {page}")
        items = page.get("task_instances", [])
        out.extend(items)
        offset += len(items)
        if not items or offset >= page.get("total_entries", 0):
            return out


def xcom(api: af.Api, run_id: str, task_id: str):
    status, entry = api.get(f"/api/v2/dags/{af.DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")
    if status != 200:
        return None
    value = entry.get("value")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def task_error(api: af.Api, run_id: str, ti: dict) -> str | None:
    """The exception message in a failed task instance's log (via the REST API)."""
    from urllib.parse import quote

    path = (f"/api/v2/dags/{af.DAG_ID}/dagRuns/{quote(run_id)}/taskInstances/{ti['task_id']}/logs/"
            f"{max(1, ti.get('try_number') or 1)}?full_content=true&map_index={ti.get('map_index', -1)}")
    status, payload = api.get(path)
    if status != 200 or not isinstance(payload, dict):
        return None
    for event in reversed(payload.get("content") or []):
        if isinstance(event, dict):
            for detail in event.get("error_detail") or []:
                if detail.get("exc_value"):
                    return f"{detail.get('exc_type')}: {detail['exc_value']}"
    return None


def fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(tis: list[dict], elapsed: float) -> str:
    states = [t.get("state") or "none" for t in tis]
    done = sum(s in FINISHED for s in states)
    running = sum(s == "running" for s in states)
    failed = sum(s == "failed" for s in states)
    upstream = sum(s == "upstream_failed" for s in states)
    retry = sum(s == "up_for_retry" for s in states)
    tickets = [t for t in tis if t["task_id"] == "late_reset" and t.get("map_index", -1) >= 0]
    tickets_done = sum((t.get("state") or "") in FINISHED for t in tickets)
    current = sorted({t["task_id"] for t in tis if t.get("state") == "running"})
    parts = [f"{done}/{len(tis)} tasks done", f"{running} running"]
    if tickets:
        parts.append(f"late_reset {tickets_done}/{len(tickets)}")
    if failed:
        parts.append(f"{failed} failed")
    if upstream:
        parts.append(f"{upstream} upstream failed")
    if retry:
        parts.append(f"{retry} up for retry")
    line = f"[{fmt_elapsed(elapsed)}] " + ", ".join(parts)
    if current:
        line += f"  ({', '.join(current)})"
    return line


def main(argv=None) -> int:
    args = parse_args(argv)
    conf = load_conf(args.conf)
    home = args.home.resolve()
    started = time.monotonic()
    components: af.Components | None = None

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        port = running_ui(home)
        if port:
            print(f"Using the Airflow already running on {home} (make ui, port {port})")
        else:
            af.init(home, parallelism=args.parallelism)
            port = af.free_port()
            env = af.environ(home, port=port, parallelism=args.parallelism)
            components = af.Components(home, env)
            components.start("api-server", "scheduler", "dag-processor")
            print(f"Started api-server (http://127.0.0.1:{port}), scheduler (LocalExecutor, parallelism "
                  f"{args.parallelism or af.default_parallelism()}) and dag-processor; logs in {components.log_dir}")
        api = af.Api(f"http://127.0.0.1:{port}", af.USER, af.password(home))
        try:
            af.wait_until(api.healthy, 180, what="the API server", components=components)
            dag = wait_for_dag(api, components)
        except (TimeoutError, RuntimeError) as exc:
            print(f"error: Airflow did not come up: {exc}", file=sys.stderr)
            if components:
                for name in components.procs:
                    print(f"--- {name} (last lines) ---\n{components.tail(name, 15)}", file=sys.stderr)
            return 3
        if dag.get("is_paused"):
            api.patch(f"/api/v2/dags/{af.DAG_ID}", {"is_paused": False})
        body = {"logical_date": None, "conf": conf}
        if args.run_id:
            body["dag_run_id"] = args.run_id
        status, run = api.post(f"/api/v2/dags/{af.DAG_ID}/dagRuns", body)
        if status not in (200, 201):
            detail = run.get("detail") if isinstance(run, dict) else run
            if isinstance(detail, str):
                detail = detail.split("\n\nFailed validating")[0]  # the schema dump adds nothing
            print(f"error: the run was refused (HTTP {status}): {detail}", file=sys.stderr)
            return 2
        run_id = run["dag_run_id"]
        print(f"Triggered {af.DAG_ID} run {run_id} with conf {json.dumps(conf)}")
        print(f"  UI (while this runs): http://127.0.0.1:{port}/dags/{af.DAG_ID}/runs/{run_id}  "
              f"login {af.USER} / {af.password(home)}")
        state = follow(api, run_id, args, started, components)
        return finish(api, run_id, state, started, home)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping Airflow (finished work is kept; `make run` again resumes it)", file=sys.stderr)
        return 130
    finally:
        if components is not None:
            components.stop()


def wait_for_dag(api: af.Api, components) -> dict:
    def parsed():
        status, dag = api.get(f"/api/v2/dags/{af.DAG_ID}")
        if status == 200:
            return dag
        status, errors = api.get("/api/v2/importErrors")
        if status == 200 and errors.get("import_errors"):
            for err in errors["import_errors"]:
                if "lottery_ticket" in err.get("filename", ""):
                    raise RuntimeError(f"the DAG file does not import:\n{err.get('stack_trace')}")
        return None

    return af.wait_until(parsed, 300, interval=2, what=f"the dag-processor to parse {af.DAG_ID}", components=components)


def follow(api: af.Api, run_id: str, args, started: float, components) -> str:
    tty = sys.stdout.isatty()
    last_line, last_print = "", 0.0
    while True:
        status, run = api.get(f"/api/v2/dags/{af.DAG_ID}/dagRuns/{run_id}")
        state = run.get("state") if status == 200 else None
        try:
            tis = task_instances(api, run_id)
        except RuntimeError:
            tis = []
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
        if components is not None and components.dead():
            raise SystemExit(f"error: an Airflow component died: {', '.join(components.dead())}")
        if time.monotonic() - started > args.timeout:
            raise SystemExit(f"error: the run did not finish within {args.timeout:.0f}s")
        time.sleep(args.poll)


def finish(api: af.Api, run_id: str, state: str, started: float, home: Path) -> int:
    tis = task_instances(api, run_id)
    bad = [t for t in tis if t.get("state") in ("failed", "upstream_failed")]
    print(f"\nRun {run_id}: {state.upper()} after {fmt_elapsed(time.monotonic() - started)}")
    prepared = xcom(api, run_id, "prepare_workdir") or {}
    summary = xcom(api, run_id, "report") or {}
    workdir = prepared.get("workdir") or summary.get("workdir")
    if workdir:
        sys.path.insert(0, str(af.REPO))
        try:
            from lottery import experiment

            print()
            print(experiment.format_table(workdir))
        except Exception as exc:  # the table is a courtesy; the report has it too
            print(f"(no table: {type(exc).__name__}: {exc})")
    if summary.get("report"):
        print(f"\nReport: {summary['report']}")
        print(f"Plot:   {summary.get('plot')}")
        print(f"CSV:    {summary.get('results_csv')}")
    elif workdir:
        print(f"\nWork directory: {workdir} (no report was written)")
    if bad:
        print(f"\n{len(bad)} task instance(s) did not succeed:")
        shown = 0
        for t in bad[:25]:
            name = t.get("rendered_map_index") or (t["map_index"] if t.get("map_index", -1) >= 0 else "")
            line = f"  {t['task_id']}{f' [{name}]' if name != '' else ''}: {t['state']}"
            if t["state"] == "failed" and shown < 10:
                error = task_error(api, run_id, t)
                if error:
                    line += f": {error}"
                    shown += 1
            print(line)
        print(f"Task logs: {home / 'logs' / f'dag_id={af.DAG_ID}' / f'run_id={run_id}'}")
    for p in summary.get("problems", [])[:25]:
        print(f"  not done: {p}")
    return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
