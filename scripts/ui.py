#!/usr/bin/env python3
"""``make ui``: the Airflow UI with the lottery_ticket DAG, its pool and Spark connection ready.

Starts the API server (UI + REST + execution API), scheduler (LocalExecutor), dag-processor and
triggerer on the project-local home (``.airflow/``), waits until they are healthy and the DAG is
parsed, prints the URL and the login, and runs until Ctrl-C (then stops them all). Component logs:
``.airflow/logs/<component>.log``. While it runs, ``make run`` triggers its run on this Airflow.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import airflow_local as af  # noqa: E402
from run_experiment import wait_for_dag  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=af.DEFAULT_HOME)
    p.add_argument("--port", type=int, default=af.DEFAULT_UI_PORT, help="UI / API port (default 8080, env LOTTERY_UI_PORT)")
    p.add_argument("--parallelism", type=int)
    args = p.parse_args(argv)
    home = args.home.resolve()
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", args.port)) == 0:
            print(f"error: port {args.port} is in use; choose another: make ui UI_PORT=8081", file=sys.stderr)
            return 2
    af.init(home, parallelism=args.parallelism, port=args.port)
    env = af.environ(home, port=args.port, parallelism=args.parallelism)
    components = af.Components(home, env)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        components.start("api-server", "scheduler", "dag-processor", "triggerer")
        print(f"Starting Airflow on {home} (logs: {components.log_dir}/<component>.log) ...")
        api = af.Api(f"http://127.0.0.1:{args.port}", af.USER, af.password(home))
        af.wait_until(api.healthy, 180, what="the API server", components=components)
        wait_for_dag(api, components)
        url = f"http://127.0.0.1:{args.port}"
        print()
        print(f"  Airflow UI:  {url}/dags/{af.DAG_ID}")
        print(f"  Login:       {af.USER} / {af.password(home)}   (stored in {home / 'passwords.json'})")
        print(f"  Trigger:     the DAG's 'Trigger' button opens the params form; or `make run CONF='{{...}}'`")
        print("  CLI:         source scripts/airflow_env.sh && airflow dags list")
        print("  Stop:        Ctrl-C")
        print()
        while True:
            time.sleep(2)
            dead = components.dead()
            if dead:
                print(f"error: component stopped: {', '.join(dead)}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("\nstopping Airflow ...")
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        for name in components.procs:
            print(f"--- {name} (last lines) ---\n{components.tail(name, 15)}", file=sys.stderr)
        return 1
    finally:
        components.stop()


if __name__ == "__main__":
    sys.exit(main())
