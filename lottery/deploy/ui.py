"""``make ui``: the Airflow UI with the lottery_ticket DAG, its pool and Spark connection ready.

    python -m lottery.deploy.ui [--home .airflow] [--port 8080] [--parallelism N]

Starts the API server (UI + REST + execution API), scheduler (LocalExecutor), dag-processor and
triggerer on the project-local home (``.airflow/``), waits until they are healthy and the DAG is
parsed, prints the URL and the login, and runs until Ctrl-C (then stops them all, task processes
included). A component that dies is started again, at most 3 times in 10 minutes each (one line
per restart; past that ``make ui`` stops, naming the log). Component logs:
``.airflow/logs/<component>.log``. While it runs, ``make run`` triggers its run on this Airflow.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from lottery.deploy import airflow_home
from lottery.deploy.constants import DAG_ID
from lottery.deploy.supervisor import raise_keyboard_interrupt_on_sigterm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lottery.deploy.ui", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=airflow_home.DEFAULT_HOME)
    p.add_argument("--port", type=int, default=airflow_home.DEFAULT_UI_PORT,
                   help="UI / API port (default 8080, env LOTTERY_UI_PORT)")
    p.add_argument("--parallelism", type=int)
    args = p.parse_args(argv)
    home = args.home.resolve()
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", args.port)) == 0:
            print(f"error: port {args.port} is in use; choose another: make ui UI_PORT=8081", file=sys.stderr)
            return 2
    airflow_home.init(home, parallelism=args.parallelism, port=args.port)
    local = airflow_home.LocalAirflow(home, args.port, parallelism=args.parallelism)
    raise_keyboard_interrupt_on_sigterm()
    try:
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
