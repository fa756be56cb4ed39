"""``make ui``: the Airflow UI with the lottery_ticket DAG, its pool and Spark connection ready.

    python -m lottery.deploy.ui [--home .airflow] [--port 8080] [--parallelism N]

Starts the API server (UI + REST + execution API), scheduler (LocalExecutor), dag-processor and
triggerer on the project-local home (``.airflow/``), waits until they are healthy and the DAG is
parsed, prints the URL and the login, and runs until Ctrl-C (then stops them all, task processes
included). A component that dies is started again, at most 3 times in 10 minutes each (one line
per restart; past that ``make ui`` stops, naming the log). Component logs:
``.airflow/logs/<component>.log``. While it runs, ``make run`` triggers its run on this Airflow.
Every port is bound to 127.0.0.1. Ctrl-C, SIGTERM or a closed terminal stop everything; so does
the death of ``make`` itself, and a SIGKILL of this process (its reaper stops the components). A
``make ui`` that finds processes an earlier one left on its home stops them first, naming them.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from lottery.deploy import airflow_home
from lottery.deploy.constants import DAG_ID
from lottery.deploy.supervisor import HomeBusy, raise_keyboard_interrupt_on_sigterm, stop_with_parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lottery.deploy.ui", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=airflow_home.DEFAULT_HOME)
    p.add_argument("--port", type=int, default=airflow_home.DEFAULT_UI_PORT,
                   help="UI / API port (default 8080, env LOTTERY_UI_PORT)")
    p.add_argument("--parallelism", type=int)
    args = p.parse_args(argv)
    home = args.home.resolve()
    raise_keyboard_interrupt_on_sigterm()
    stop_with_parent()
    local = airflow_home.LocalAirflow(home, args.port, parallelism=args.parallelism)
    try:
        try:  # first: what an earlier make ui on this home left running would hold the port
            local.supervisor.claim()
        except HomeBusy as exc:
            print(f"error: {exc} (a make ui or make run): stop it first, or use another home: "
                  "make ui LOTTERY_AIRFLOW_HOME=DIR", file=sys.stderr)
            return 2
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", args.port)) == 0:
                print(f"error: port {args.port} is in use; choose another: make ui UI_PORT=8081", file=sys.stderr)
                return 2
        airflow_home.init(home, parallelism=args.parallelism, port=args.port)
        local.start("api-server", "scheduler", "dag-processor", "triggerer")
        print(f"Starting Airflow on {home} (logs: {local.supervisor.log_dir}/<component>.log) ...")
        local.api().wait_ready(local.supervisor)
        print_welcome(local)
        while True:  # a component that dies is started again (lottery.deploy.supervisor: limit, log line)
            time.sleep(2)
            local.supervisor.watch()
    except KeyboardInterrupt:
        print("\nstopping Airflow ...")
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(local.supervisor.tails(15), file=sys.stderr)
        return 1
    finally:
        local.stop()


def print_welcome(local: airflow_home.LocalAirflow) -> None:
    print()
    print(f"  Airflow UI:  {local.url}/dags/{DAG_ID}")
    print(f"  Login:       {airflow_home.USER} / {airflow_home.password(local.home)}   "
          f"(stored in {local.home / 'passwords.json'})")
    print("  Trigger:     the DAG's 'Trigger' button opens the params form; or `make run CONF='{...}'`")
    print("  CLI:         source scripts/airflow_env.sh && airflow dags list")
    print("  Stop:        Ctrl-C")
    print()


if __name__ == "__main__":
    sys.exit(main())
