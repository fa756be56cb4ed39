"""A project-local Airflow: home, config, database, pool, connection, and its components.

Used by ``make run`` (scripts/run_experiment.py), ``make ui`` (scripts/ui.py) and the tests.

    python scripts/airflow_local.py init [--home DIR]   # config + database + pool + connection
    python scripts/airflow_local.py env  [--home DIR]   # `eval` it to use the airflow CLI on that home

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
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = Path(os.environ.get("LOTTERY_AIRFLOW_HOME", REPO / ".airflow"))
DAG_ID = "lottery_ticket"
POOL = "lottery_workers"
POOL_SLOTS = 20
USER = "admin"
DEFAULT_UI_PORT = int(os.environ.get("LOTTERY_UI_PORT", "8080"))


def venv_bin() -> Path:
    """The directory of the Python running this script (the project venv under `make`)."""
    return Path(sys.executable).parent


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_parallelism() -> int:
    """Task slots of the LocalExecutor: one training task per core (and at least two, so that a
    light task never waits behind a training task on a one-core machine)."""
    return max(2, cores())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- configuration ----------------------------------------------------------------------------
def write_config(home: Path, *, parallelism: int | None = None, port: int = DEFAULT_UI_PORT) -> Path:
    """Write ``home/airflow.cfg`` (keeping the secrets of an existing one) and the password file."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "airflow.cfg"
    old = configparser.ConfigParser(interpolation=None)
    if path.exists():
        old.read(path)

    def keep(section: str, key: str, make) -> str:
        return old.get(section, key, fallback=None) or make()

    parallelism = parallelism or default_parallelism()
    cfg = configparser.ConfigParser(interpolation=None)
    cfg["core"] = {
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
    }
    cfg["database"] = {"sql_alchemy_conn": f"sqlite:///{home / 'airflow.db'}"}
    cfg["api"] = {
        "host": "127.0.0.1",
        "port": str(port),
        "base_url": f"http://127.0.0.1:{port}",
        "workers": "1",
        "secret_key": keep("api", "secret_key", lambda: secrets.token_urlsafe(32)),
    }
    cfg["api_auth"] = {"jwt_secret": keep("api_auth", "jwt_secret", lambda: secrets.token_urlsafe(32))}
    cfg["logging"] = {"base_log_folder": str(home / "logs")}
    cfg["scheduler"] = {"task_queued_timeout": "3600"}
    cfg["dag_processor"] = {"refresh_interval": "30"}
    with open(path, "w") as f:
        f.write("# Written by scripts/airflow_local.py (make run / make ui); edits are overwritten.\n")
        cfg.write(f)
    os.chmod(path, 0o600)
    passwords = home / "passwords.json"
    if not passwords.exists() or USER not in _read_json(passwords):
        passwords.write_text(json.dumps({USER: secrets.token_urlsafe(12)}) + "\n")
        os.chmod(passwords, 0o600)
    return path


def password(home: Path) -> str:
    return _read_json(Path(home) / "passwords.json")[USER]


def environ(home: Path, *, port: int | None = None, parallelism: int | None = None) -> dict[str, str]:
    """Environment of the Airflow processes on ``home``. ``port`` / ``parallelism`` override the
    config for these processes only (``make run`` uses a free port next to a running ``make ui``)."""
    home = Path(home).resolve()
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW_CONFIG=str(home / "airflow.cfg"),
        PATH=f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}",
        KERAS_BACKEND=env.get("KERAS_BACKEND", "tensorflow"),
        TF_CPP_MIN_LOG_LEVEL=env.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        PYTHONUNBUFFERED="1",
    )
    if port is not None:
        env.update(
            AIRFLOW__API__PORT=str(port),
            AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
            # the LocalExecutor's log server (default 8793) must not collide with another Airflow
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        )
    if parallelism is not None:
        env["AIRFLOW__CORE__PARALLELISM"] = str(parallelism)
    return env


def init(home: Path, *, parallelism: int | None = None, port: int = DEFAULT_UI_PORT, quiet: bool = False) -> dict[str, str]:
    """Config, database (migrated), pool and connection; returns the environment to run Airflow in."""
    write_config(home, parallelism=parallelism, port=port)
    env = environ(home)
    out = subprocess.run(
        [sys.executable, __file__, "_init_db"], env=env, capture_output=True, text=True, cwd=REPO
    )
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
    from airflow.models import Connection, Pool
    from airflow.utils import db
    from airflow.utils.session import create_session

    db.initdb()
    with create_session() as session:
        Pool.create_or_update_pool(
            POOL, POOL_SLOTS, "Training tasks of the lottery-ticket DAG (one per GPU worker slot)", False, session=session
        )
        conn = session.query(Connection).filter(Connection.conn_id == "spark_default").one_or_none()
        if conn is None:
            session.add(Connection(conn_id="spark_default", conn_type="spark", host="local[*]",
                                   description="Spark in this process tree (make run); point it at a cluster for production"))
            master = "local[*] (created)"
        else:
            master = f"{conn.host} (kept)"
    print(f"Airflow home {os.environ['AIRFLOW_HOME']}: database ready, pool {POOL} = {POOL_SLOTS} slots, spark_default = {master}")


def use_test_home(prefix: str = "lottery-airflow-test-") -> Path:
    """Tests: point this process's Airflow at a throwaway home (SQLite, this repo's DAG and plugins).

    Call before anything imports ``airflow``; a second call in the same process returns the same
    home. The database is not created here (``init_db_here``)."""
    import atexit
    import shutil
    import tempfile

    if os.environ.get("LOTTERY_TEST_AIRFLOW_HOME"):
        return Path(os.environ["LOTTERY_TEST_AIRFLOW_HOME"])
    if "airflow" in sys.modules:
        raise RuntimeError("airflow was imported before use_test_home(): its configuration is already loaded")
    home = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    write_config(home, parallelism=2, port=free_port())
    env = environ(home)
    os.environ.update({k: env[k] for k in ("AIRFLOW_HOME", "AIRFLOW_CONFIG", "PATH")})
    os.environ["LOTTERY_TEST_AIRFLOW_HOME"] = str(home)
    return home


def init_db_here() -> None:
    """Create (migrate) the database of this process's Airflow home, once per process."""
    if os.environ.get("LOTTERY_TEST_AIRFLOW_DB") == os.environ.get("AIRFLOW_HOME"):
        return
    import logging

    from airflow.utils import db

    level = logging.root.level
    db.initdb()
    logging.root.setLevel(level)
    os.environ["LOTTERY_TEST_AIRFLOW_DB"] = os.environ.get("AIRFLOW_HOME", "")


# ---- components -------------------------------------------------------------------------------
class Components:
    """Airflow components as child processes (own process groups), logs in ``home/logs/<name>.log``."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.home = Path(home).resolve()
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_dir = self.home / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, *names: str) -> None:
        for name in names:
            log = open(self.log_dir / f"{name}.log", "ab")
            self.procs[name] = subprocess.Popen(
                [str(venv_bin() / "airflow"), name], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO,
            )
            log.close()
        self._write_pids()

    def _write_pids(self) -> None:
        (self.home / "components.json").write_text(
            json.dumps({"pids": {n: p.pid for n, p in self.procs.items()}, "port": self.env.get("AIRFLOW__API__PORT")})
        )

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode}, see {self.log_dir / (n + '.log')})" for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to each component's process group (LocalExecutor workers, task processes), then SIGKILL."""
        for p in self.procs.values():
            if p.poll() is None:
                _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            _signal_group(p.pid, signal.SIGKILL)  # stragglers in the group (task processes)
            if p.poll() is None:
                p.wait(5)
        (self.home / "components.json").unlink(missing_ok=True)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- REST API ---------------------------------------------------------------------------------
class Api:
    """The public REST API (v2) with a JWT from the simple auth manager."""

    def __init__(self, base_url: str, user: str, password: str):
        self.base = base_url.rstrip("/")
        self.user, self.password = user, password
        self.token: str | None = None

    def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True, timeout: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            if self.token is None:
                self.login()
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
            if err.code == 401 and auth and self.token is not None:
                self.token = None  # expired: log in again once
                return self._request(method, path, body, auth=auth, timeout=timeout)
            return err.code, payload

    def login(self) -> None:
        status, payload = self._request("POST", "/auth/token", {"username": self.user, "password": self.password}, auth=False)
        if status not in (200, 201):
            raise RuntimeError(f"login to {self.base} as {self.user} failed: HTTP {status} {payload}")
        self.token = payload["access_token"]

    def get(self, path: str) -> tuple[int, Any]:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return self._request("POST", path, body)

    def patch(self, path: str, body: Any) -> tuple[int, Any]:
        return self._request("PATCH", path, body)

    def healthy(self) -> dict | None:
        try:
            status, payload = self._request("GET", "/api/v2/monitor/health", auth=False, timeout=5)
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            return None
        return payload if status == 200 else None


def wait_until(predicate, timeout: float, interval: float = 1.0, *, what: str, components: Components | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if components is not None and components.dead():
            raise RuntimeError(f"while waiting for {what}: component died: {', '.join(components.dead())}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
