"""``python -m lottery rerun-failed``: re-run the failed tickets of finished runs through Airflow's
REST API (``clearTaskInstances`` with ``only_failed``, one run at a time by its run id), the same
action as the UI's *Clear Run* -> *Clear only failed tasks*, under the same permissions.

Why not ``airflow tasks clear``: without ``-t`` it clears the failed tasks of every run of the DAG,
and its ``-s/-e`` dates match logical dates, which runs triggered from the UI or the REST API do
not have. Runs are picked here by run id, or by their ``run_after`` time (when they were
triggered), which every run has.
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlencode

from lottery.deploy.api import Api
from lottery.deploy.constants import DAG_ID
from lottery.errors import LotteryError

RUNS = f"/api/v2/dags/{DAG_ID}/dagRuns"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line of ``python -m lottery rerun-failed``."""
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--run-id", action="append", default=[], help="a run of lottery_ticket (repeat for several)")
    runs.add_argument("--since", help="every failed run triggered since this date (UTC): 2026-12-01 or 2026-12-01T08:00")
    parser.add_argument("--until", help="with --since: triggered until this date (UTC)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be cleared, clear nothing")
    parser.add_argument("--home", type=Path, help="the Airflow home of the running `make ui` (default: env "
                        "LOTTERY_AIRFLOW_HOME, else .airflow)")
    parser.add_argument("--url", help="the api-server's URL instead (with LOTTERY_AIRFLOW_USER / LOTTERY_AIRFLOW_PASSWORD)")
    return parser


def run(args: argparse.Namespace) -> int:
    from lottery.deploy import airflow_home

    home = (args.home or airflow_home.DEFAULT_HOME).resolve()
    print(f"Airflow: {args.url or 'the make ui on ' + str(home)}")
    return rerun_failed(connect(home, args.url), args.run_id, args.since, args.until, dry_run=args.dry_run)


def connect(home: Path, url: str | None) -> Api:
    """The API of ``url`` (default: the ``make ui`` running on ``home``), as ``LOTTERY_AIRFLOW_USER``
    / ``LOTTERY_AIRFLOW_PASSWORD``, else the home's generated admin."""
    from lottery.deploy import airflow_home

    if url is None:
        port = airflow_home.running_ui(home)
        if port is None:
            raise LotteryError(f"no Airflow runs on {home} (`make ui` starts one there; --home or LOTTERY_AIRFLOW_HOME "
                               "picks another home, --url another server)")
        url = f"http://127.0.0.1:{port}"
    user = os.environ.get("LOTTERY_AIRFLOW_USER", airflow_home.USER)
    secret = os.environ.get("LOTTERY_AIRFLOW_PASSWORD") or airflow_home.password(home)
    return Api(url, user, secret)


def utc(text: str) -> str:
    """``2026-12-01`` or ``2026-12-01T08:00`` (UTC unless it names its zone), as the API's ISO form."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise LotteryError(f"{text!r} is not a date: use 2026-12-01 or 2026-12-01T08:00 (UTC)") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).isoformat()


def failed_runs(api: Api, since: str, until: str | None) -> list[dict]:
    """The failed runs of the DAG whose ``run_after`` is in [since, until], oldest first."""
    query = {"state": "failed", "run_after_gte": utc(since), "order_by": "run_after", "limit": 100}
    if until:
        query["run_after_lte"] = utc(until)
    runs: list[dict] = []
    while True:
        status, page = api.get(f"{RUNS}?{urlencode({**query, 'offset': len(runs)})}")
        if status != 200:
            raise LotteryError(f"listing the runs of {DAG_ID} failed: HTTP {status} {page}")
        runs += page.get("dag_runs", [])
        if not page.get("dag_runs") or len(runs) >= page.get("total_entries", 0):
            return runs


def refusal(api: Api, run: dict) -> str | None:
    """Why the failed tasks of ``run`` are not cleared, or None."""
    state = run.get("state")
    if state in ("queued", "running"):
        return (f"it is still {state}: wait until it has finished (its state is failed), then run this again; a clear "
                "while it runs would leave its report and its check as they are")
    if state != "failed":
        return f"nothing failed (the run is {state})"
    workdir = (api.xcom(run["dag_run_id"], "prepare_workdir") or {}).get("workdir")
    if workdir and not Path(workdir, "config.json").exists():
        return (f"its work directory {workdir} is gone (deleted, or not on this machine's disk): nothing to re-run from; "
                "trigger the same config again to recompute it")
    return None


def clear_failed(api: Api, run_id: str, dry_run: bool) -> list[str]:
    """Clear the failed task instances of one run (Airflow re-runs them, then the run's check);
    the names of the cleared instances."""
    body = {"dag_run_id": run_id, "only_failed": True, "include_downstream": True, "reset_dag_runs": True,
            "dry_run": dry_run}
    status, payload = api.post(f"/api/v2/dags/{DAG_ID}/clearTaskInstances", body)
    if status != 200:
        raise LotteryError(f"clearing the failed tasks of {run_id} failed: HTTP {status} {payload}")
    return [ti.get("rendered_map_index") or ti["task_id"] if ti.get("map_index", -1) >= 0 else ti["task_id"]
            for ti in payload.get("task_instances", [])]


def rerun_failed(api: Api, run_ids: list[str], since: str | None, until: str | None, *, dry_run: bool = False,
                 say: Callable[[str], None] = print) -> int:
    """Clear the failed tasks of the runs ``run_ids``, or of every failed run triggered in [since,
    until]. Returns the exit status: 0 when every run was cleared (or had nothing to clear), 1 when
    one was refused."""
    if run_ids:
        runs = []
        for run_id in run_ids:
            status, run = api.get(f"{RUNS}/{quote(run_id, safe='')}")
            if status != 200:
                raise LotteryError(f"no run {run_id!r} of {DAG_ID} at {api.base} (HTTP {status})")
            runs.append(run)
    else:
        runs = failed_runs(api, since, until)
        say(f"{len(runs)} failed run(s) of {DAG_ID} triggered since {since}" + (f" until {until}" if until else ""))
    refused = 0
    for run in runs:
        why = refusal(api, run)
        if why:
            refused += why.startswith(("it is still", "its work directory"))
            say(f"{run['dag_run_id']}: not cleared: {why}")
            continue
        names = clear_failed(api, run["dag_run_id"], dry_run)
        verb = "would clear" if dry_run else "cleared"
        say(f"{run['dag_run_id']}: {verb} {len(names)} failed task(s): {', '.join(names)}")
    return 1 if refused else 0
