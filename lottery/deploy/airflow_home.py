"""A project-local Airflow: home, ``airflow.cfg``, database, pool, connection, and its components.

Used by ``make run`` (``lottery.deploy.run``), ``make ui`` (``lottery.deploy.ui``), the loopback
cluster (``lottery.deploy.cluster``, for the secrets) and the tests.

    python -m lottery.deploy.airflow_home init [--home DIR]   # config + database + pool + connection
    python -m lottery.deploy.airflow_home env  [--home DIR]   # `eval` it to use the airflow CLI on that home
    source scripts/airflow_env.sh                             # the same, for a shell

The home (default ``.airflow/``, gitignored) holds ``airflow.cfg`` (written by ``write_config``:
LocalExecutor, SQLite, parallelism = the machine's cores, this repo's dags/ and plugins/), the
SQLite database, logs and the simple auth manager's password file. Secrets (JWT, Fernet, API secret
key) are generated once and kept when the config is rewritten.

Airflow 3.3 runs the LocalExecutor on SQLite (``airflow standalone`` does the same); task processes
talk to the API server's execution API, never to the database, so SQLite's single writer is only
shared by the scheduler, dag-processor, API server and triggerer.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import secrets
import shlex
import subprocess
import sys
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Callable

from lottery.deploy.api import Api
from lottery.deploy.constants import (
    HEARTBEAT_CHECK_INTERVAL_S, POOL, POOL_SLOTS, REPO, SPARK_CONN_ID,
    TASK_HEARTBEAT_TIMEOUT_S,
)
from lottery.deploy.supervisor import Supervisor, alive, cores, venv_bin
from lottery.files import json_or

DEFAULT_HOME = Path(os.environ.get("LOTTERY_AIRFLOW_HOME", REPO / ".airflow"))
USER = "admin"
DEFAULT_UI_PORT = int(os.environ.get("LOTTERY_UI_PORT", "8080"))
COMPONENTS_FILE = "components.json"  # pids and port of the components of a `make ui` / `make run`


def default_parallelism() -> int:
    """Task slots of the LocalExecutor: one training task per core (and at least two, so that a
    light task never waits behind a training task on a one-core machine)."""
    return max(2, cores())


# ---- configuration ----------------------------------------------------------------------------
def _sections(home: Path, parallelism: int, port: int, keep: Callable[[str, str, Callable[[], str]], str]) -> dict:
    return {
        "core": {
            "dags_folder": str(REPO / "dags"),
            "plugins_folder": str(REPO / "plugins"),
            "executor": "LocalExecutor",
            "parallelism": str(parallelism),
            "max_active_tasks_per_dag": str(max(32, parallelism)),
            "load_examples": "False",
            "dags_are_paused_at_creation": "False",
            "auth_manager": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "simple_auth_manager_users": f"{USER}:admin",
            "simple_auth_manager_passwords_file": str(home / "passwords.json"),
            "execution_api_server_url": f"http://127.0.0.1:{port}/execution/",
            "fernet_key": keep("core", "fernet_key", lambda: urlsafe_b64encode(os.urandom(32)).decode()),
        },
        # SQLite takes one writer at a time: wait up to 30 s for the lock (sqlite3's default is 5 s, which
        # several runs starting at once exceed, and a scheduler that meets "database is locked" exits).
        "database": {"sql_alchemy_conn": f"sqlite:///{home / 'airflow.db'}?timeout=30"},
        "api": {
            "host": "127.0.0.1",
            "port": str(port),
            "base_url": f"http://127.0.0.1:{port}",
            "workers": "1",
            "secret_key": keep("api", "secret_key", lambda: secrets.token_urlsafe(32)),
        },
        "api_auth": {"jwt_secret": keep("api_auth", "jwt_secret", lambda: secrets.token_urlsafe(32))},
        "logging": {"base_log_folder": str(home / "logs")},
        "scheduler": {
            "task_queued_timeout": "3600",
            # a task whose supervisor stopped heartbeating is failed (and retried) within ~35 s, not 5 min
            "task_instance_heartbeat_timeout": str(TASK_HEARTBEAT_TIMEOUT_S),
            "task_instance_heartbeat_timeout_detection_interval": str(HEARTBEAT_CHECK_INTERVAL_S),
        },
        "dag_processor": {"refresh_interval": "30"},
        # A task's supervisor notices its process's exit at its next wake-up, every
        # min_heartbeat_interval seconds (default 5): with 20 instances that idled a slot
        # for about a minute of a `make run`. 2 s costs one heartbeat request per task every 2 s.
        "workers": {"min_heartbeat_interval": "2"},
    }


def write_config(home: Path, *, parallelism: int | None = None, port: int = DEFAULT_UI_PORT) -> Path:
    """Write ``home/airflow.cfg`` (keeping the secrets of an existing one) and the password file."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "airflow.cfg"
    old = configparser.ConfigParser(interpolation=None)
    if path.exists():
        old.read(path)

    def keep(section: str, key: str, make: Callable[[], str]) -> str:
        return old.get(section, key, fallback=None) or make()

    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read_dict(_sections(home, parallelism or default_parallelism(), port, keep))
    with open(path, "w") as f:
        f.write("# Written by lottery.deploy.airflow_home (make run / make ui); edits are overwritten.\n")
        cfg.write(f)
    os.chmod(path, 0o600)
    passwords = home / "passwords.json"
    if not passwords.exists() or USER not in json_or(passwords, {}):
        passwords.write_text(json.dumps({USER: secrets.token_urlsafe(12)}) + "\n")
        os.chmod(passwords, 0o600)
    return path


def password(home: Path) -> str:
    return json_or(Path(home) / "passwords.json", {})[USER]


def default_backend() -> str:
    """The Keras backend of `make run` and `make ui` when ``KERAS_BACKEND`` is unset: JAX where it is
    installed. On a 2-core CPU, two one-thread processes train the default LeNet-300-100 1.26x as
    fast on JAX (XLA:CPU) as on TensorFlow, and a JAX task process imports no TensorFlow
    (`bench/threads.py --backends tensorflow,jax`, docs/benchmarks.md). TensorFlow otherwise."""
    import importlib.util

    return "jax" if importlib.util.find_spec("jax") is not None else "tensorflow"


def environ(home: Path, *, port: int | None = None, parallelism: int | None = None) -> dict[str, str]:
    """Environment of the Airflow processes on ``home``. ``port`` / ``parallelism`` override the
    config for these processes only (``make run`` uses a free port next to a running ``make ui``)."""
    home = Path(home).resolve()
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW_CONFIG=str(home / "airflow.cfg"),
        PATH=f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}",
        KERAS_BACKEND=env.get("KERAS_BACKEND") or default_backend(),
        # JAX's persistent compilation cache, shared by the task processes: each one would otherwise
        # compile the same model's steps again (and its initialisers, op by op), 4-10 s per process
        # on 2 cores; with the cache about 1 s. Every compilation is cached (minimum time and size 0).
        JAX_COMPILATION_CACHE_DIR=env.get("JAX_COMPILATION_CACHE_DIR") or str(home / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=env.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=env.get("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0"),
        TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        PYTHONUNBUFFERED="1",
    )
    if port is not None:
        env.update(
            AIRFLOW__API__PORT=str(port),
            AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        )
    if parallelism is not None:
        env["AIRFLOW__CORE__PARALLELISM"] = str(parallelism)
    return env


def init(home: Path, *, parallelism: int | None = None, port: int = DEFAULT_UI_PORT, quiet: bool = False) -> dict[str, str]:
    """Config, database (migrated), pool and connection; returns the environment to run Airflow in."""
    write_config(home, parallelism=parallelism, port=port)
    env = environ(home)
    out = subprocess.run([sys.executable, "-m", "lottery.deploy.airflow_home", "_init_db"], env=env, capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise RuntimeError(f"initialising the Airflow database in {home} failed (exit {out.returncode})")
    if not quiet:
        print(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else f"Airflow home {home} ready")
    return env


def _init_db_inprocess() -> None:
    """Runs in a child whose environment points at the home: migrate, pool, connection."""
    import logging

    logging.disable(logging.WARNING)
    from airflow.utils import db
    from airflow.utils.session import create_session

    from lottery.deploy.airflow_init import ensure_pool, point_spark_default

    db.initdb()
    with create_session() as session:
        ensure_pool(session)
        master = point_spark_default(
            session, "local[*]", keep_existing=True,
            description="Spark in this process tree (make run); point it at a cluster for production",
        )
    master = master if master.endswith("(kept)") else f"{master} (created)"
    print(f"Airflow home {os.environ['AIRFLOW_HOME']}: database ready, pool {POOL} = {POOL_SLOTS} slots, "
          f"{SPARK_CONN_ID} = {master}")


# ---- components -------------------------------------------------------------------------------
# Airflow's log server (the scheduler's with the LocalExecutor, the triggerer's) listens on every
# interface, with no setting to change that; the API server reads the task logs from this home's
# disk, so the components run without it and every port stays on 127.0.0.1.
LOOPBACK_ARGS = {"scheduler": ["--skip-serve-logs"], "triggerer": ["--skip-serve-logs"]}
class LocalAirflow:
    """The Airflow components of ``make run`` / ``make ui`` on a home, under one supervisor; their
    pids and port in ``home/components.json`` while they run (``make run`` finds a ``make ui``)."""

    def __init__(self, home: Path, port: int, *, parallelism: int | None = None):
        self.home = Path(home).resolve()
        self.port = port
        self.env = environ(self.home, port=port, parallelism=parallelism)
        self.supervisor = Supervisor(self.home / "logs", on_change=self._record, home=self.home)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *names: str) -> None:
        """Start components; each is started again when it dies (``Supervisor.watch``), on the same port."""
        for name in names:
            self.supervisor.start(name, [str(venv_bin() / "airflow"), name, *LOOPBACK_ARGS.get(name, [])], self.env,
                                  restart=True)

    def stop(self) -> None:
        if self.supervisor.claimed:  # not another supervisor's record
            self.supervisor.stop()
            (self.home / COMPONENTS_FILE).unlink(missing_ok=True)

    def api(self) -> Api:
        return Api(self.url, USER, password(self.home))

    def _record(self) -> None:
        (self.home / COMPONENTS_FILE).write_text(json.dumps({
            "pids": self.supervisor.pids, "started": self.supervisor.started, "port": self.port}))


def running_ui(home: Path) -> int | None:
    """The API port of the components (a `make ui`) running on this home, if any."""
    info = json_or(Path(home) / COMPONENTS_FILE, {})
    pids, started = info.get("pids", {}), info.get("started", {})
    if not pids or not info.get("port"):
        return None
    if not all(alive(pid, started.get(name, 0.0)) for name, pid in pids.items()):
        return None
    return int(info["port"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lottery.deploy.airflow_home", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["init", "env", "_init_db"])
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--parallelism", type=int)
    args = parser.parse_args(argv)
    if args.command == "_init_db":
        _init_db_inprocess()
    elif args.command == "init":
        init(args.home, parallelism=args.parallelism)
    else:
        if not (Path(args.home) / "airflow.cfg").exists():
            write_config(args.home, parallelism=args.parallelism)
        env = environ(args.home)
        for key in ("AIRFLOW_HOME", "AIRFLOW_CONFIG", "PATH"):
            print(f"export {key}={shlex.quote(env[key])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
