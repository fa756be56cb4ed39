#!/usr/bin/env python3
"""The topology of docker-compose.yaml as local processes on 127.0.0.1 (no Docker needed).

    python scripts/cluster_local.py up   [--gpu-workers 1] [--port P] [--artifacts DIR]
    python scripts/cluster_local.py status
    python scripts/cluster_local.py down [--drop]
    source build/cluster-local/env.sh   # the airflow CLI on this cluster

Same services, same configuration mechanism (``AIRFLOW__...`` environment variables, compared with
the compose file by tests/test_compose.py), same init script (docker/airflow-init.sh):

====================  ========================================================================
compose service       here
====================  ========================================================================
postgres              the local PostgreSQL (``--pg-url``, default postgresql://postgres@127.0.0.1:5432):
                      a database of its own (``--database``; a unique throwaway one in tests)
redis                 the local Redis (``--redis-url``), a database number of its own (claimed
                      with a key, default 5; only that database is ever flushed)
airflow-init          ``docker/airflow-init.sh`` (db migrate, pool, spark_default -> this master)
airflow-apiserver     ``airflow api-server`` on a free port (UI, REST, execution API)
airflow-scheduler     ``airflow scheduler`` (CeleryExecutor)
airflow-dag-processor ``airflow dag-processor``
airflow-triggerer     ``airflow triggerer`` (``--no-triggerer`` leaves it out: the DAG defers nothing)
airflow-worker        ``airflow celery worker --queues default``
gpu-worker            ``airflow celery worker --queues gpu --concurrency 1``, ``--gpu-workers`` of them
spark-master/-worker  ``spark-class ...Master`` / ``...Worker`` from the venv's pyspark
====================  ========================================================================

Every worker reports its own host name to Airflow (``gpu-worker-1``, ``airflow-worker``: the
``[core] hostname_callable`` below), so a task instance's ``hostname`` says which worker ran it, as a
container id does under Docker. State (pids, database, Redis claim) is kept in
``<home>/cluster.json`` for ``status`` and ``down``; component logs in ``<home>/logs/<name>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import airflow_local as af  # noqa: E402

REPO = af.REPO
SCRIPTS = Path(__file__).resolve().parent
DEFAULT_HOME = REPO / "build" / "cluster-local"
GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"
REDIS_OWNER_KEY = "lottery-cluster-local:owner"
STATE_FILE = "cluster.json"


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the local workers: the name of the worker (several workers
    share this machine's host name); other processes fall back to Airflow's default."""
    name = os.environ.get("LOTTERY_WORKER_HOSTNAME")
    if name:
        return name
    from airflow.utils.net import getfqdn

    return getfqdn()


# ---- Postgres and Redis ------------------------------------------------------------------------
def _pg_connect(pg_url: str, dbname: str = "postgres"):
    import psycopg2

    parts = urlsplit(pg_url)
    conn = psycopg2.connect(
        host=parts.hostname or "127.0.0.1", port=parts.port or 5432, user=parts.username or "postgres",
        password=parts.password, dbname=dbname, connect_timeout=10,
    )
    conn.autocommit = True
    return conn


def create_database(pg_url: str, name: str) -> bool:
    """Create database ``name`` unless it exists; True when it was created."""
    conn = _pg_connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                return False
            cur.execute(f'CREATE DATABASE "{name}"')
            return True
    finally:
        conn.close()


def drop_database(pg_url: str, name: str) -> None:
    conn = _pg_connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def database_url(pg_url: str, name: str, driver: str = "postgresql+psycopg2") -> str:
    parts = urlsplit(pg_url)
    return urlunsplit((driver, parts.netloc, f"/{name}", "", ""))


def _redis(redis_url: str, db: int):
    import redis

    return redis.Redis.from_url(redis_url, db=db, socket_timeout=10)


def claim_redis_db(redis_url: str, token: str, preferred: int = 5) -> int:
    """A Redis database number for this cluster alone: the preferred one if nobody owns it and it
    holds no foreign keys, else the first such one of 1..15. Claimed with an owner key."""
    for db in [preferred, *[d for d in range(1, 16) if d != preferred]]:
        r = _redis(redis_url, db)
        try:
            if r.set(REDIS_OWNER_KEY, token, nx=True):
                if r.dbsize() == 1:
                    return db
                r.delete(REDIS_OWNER_KEY)  # someone else's data without an owner key: leave it
            elif (r.get(REDIS_OWNER_KEY) or b"").decode() == token:
                return db
        finally:
            r.close()
    raise RuntimeError(f"no free Redis database at {redis_url} (1..15 are all in use)")


def release_redis_db(redis_url: str, db: int, token: str) -> bool:
    """Flush the claimed database, only if this cluster still owns it."""
    r = _redis(redis_url, db)
    try:
        if (r.get(REDIS_OWNER_KEY) or b"").decode() != token:
            return False
        r.flushdb()
        return True
    finally:
        r.close()


# ---- configuration -----------------------------------------------------------------------------
@dataclass
class Settings:
    home: Path
    artifact_root: Path
    pg_url: str = "postgresql://postgres@127.0.0.1:5432"
    database: str | None = None  # None: a unique throwaway database, dropped by stop()
    redis_url: str = "redis://127.0.0.1:6379"
    redis_db: int = 5  # preferred
    gpu_workers: int = 1
    default_concurrency: int = 2
    gpu_threads: int | None = None  # LOTTERY_THREADS of the GPU workers (None: the DAG decides)
    spark: bool = True
    spark_cores: int = 1
    spark_memory: str = "1g"
    triggerer: bool = True
    port: int | None = None  # API server; None: a free port
    pool_slots: int = 20


@dataclass
class State:
    home: str
    port: int
    database: str
    drop_database: bool
    pg_url: str
    redis_url: str
    redis_db: int
    redis_token: str
    spark_master: str | None
    spark_ui: str | None
    artifact_root: str
    pids: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def clean_environ() -> dict[str, str]:
    """This process's environment without Airflow or project settings (a test session may hold
    another Airflow home's, or a connection override)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LOTTERY_", "SPARK_", "PYSPARK_"))}


def cluster_env(home: Path, *, port: int, sql_alchemy_conn: str, result_backend: str, broker_url: str,
                artifact_root: Path) -> dict[str, str]:
    """The environment every Airflow process of the cluster shares: docker-compose.yaml's
    ``x-airflow-env`` with loopback addresses (tests/test_compose.py compares the two)."""
    home = Path(home).resolve()
    env = clean_environ()
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW_CONFIG=str(home / "airflow.cfg"),
        PATH=f"{af.venv_bin()}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        # -- the same keys as docker-compose.yaml's x-airflow-env --
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{af.USER}:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sql_alchemy_conn,
        AIRFLOW__CELERY__BROKER_URL=broker_url,
        AIRFLOW__CELERY__RESULT_BACKEND=result_backend,
        AIRFLOW__OPERATORS__DEFAULT_QUEUE=DEFAULT_QUEUE,
        AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT="172800",
        AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="True",
        AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT="172800",
        AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(home / "logs"),
        LOTTERY_ARTIFACT_ROOT=str(Path(artifact_root).resolve()),
        LOTTERY_GPU_QUEUE=GPU_QUEUE,
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="2",
        # -- loopback only: one machine, many components --
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT=str(af.free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(af.free_port()),
        AIRFLOW__CORE__PARALLELISM="32",
        SPARK_LOCAL_IP="127.0.0.1",
    )
    # the secrets (fernet, JWT, API) live in airflow.cfg, written once by airflow_local.write_config
    return env


# ---- processes ---------------------------------------------------------------------------------
class Cluster:
    """Start, check and stop the loopback cluster. ``start()`` returns when every component is up
    and the DAG is parsed; ``stop()`` always stops every process group it started."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.home = Path(settings.home).resolve()
        self.log_dir = self.home / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.state: State | None = None
        self.env: dict[str, str] = {}

    # -- lifecycle --
    def start(self, timeout: float = 600) -> State:
        s = self.s
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        Path(s.artifact_root).mkdir(parents=True, exist_ok=True)
        port = s.port or af.free_port()
        ephemeral = s.database is None
        database = s.database or f"lottery_cluster_{uuid.uuid4().hex[:10]}"
        token = uuid.uuid4().hex
        redis_db = claim_redis_db(s.redis_url, token, s.redis_db)
        self.state = State(
            home=str(self.home), port=port, database=database, drop_database=ephemeral, pg_url=s.pg_url,
            redis_url=s.redis_url, redis_db=redis_db, redis_token=token, spark_master=None, spark_ui=None,
            artifact_root=str(Path(s.artifact_root).resolve()),
        )
        self._save()
        try:
            create_database(s.pg_url, database)
            af.write_config(self.home, parallelism=32, port=port)
            broker = f"{s.redis_url.rstrip('/')}/{redis_db}"
            self.env = cluster_env(
                self.home, port=port, sql_alchemy_conn=database_url(s.pg_url, database),
                result_backend=database_url(s.pg_url, database, "db+postgresql+psycopg2"), broker_url=broker,
                artifact_root=Path(s.artifact_root),
            )
            self._write_env_sh()
            deadline = time.monotonic() + timeout
            if s.spark:
                self._start_spark(deadline)
            self._init()
            self._start_airflow()
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self.state

    def stop(self, drop: bool | None = None) -> None:
        """Stop every process group (SIGTERM, then SIGKILL), release the Redis database, and drop
        the metadata database when it was a throwaway one (or ``drop``)."""
        if self.state is None:
            return
        stop_pids(self.state.pids, self.state.started, procs=self.procs)
        cleanup(self.state, drop=drop)
        self._save(remove=True)

    # -- pieces --
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=REPO)
        finally:
            log.close()
        self.procs[name] = proc
        self.state.pids[name] = proc.pid
        self.state.started[name] = _create_time(proc.pid)
        self._save()
        return proc

    def _start_spark(self, deadline: float) -> None:
        s, st = self.s, self.state
        env = dict(self.env)
        env.update(SPARK_LOG_DIR=str(self.home / "spark" / "logs"), SPARK_WORKER_DIR=str(self.home / "spark" / "work"),
                   SPARK_NO_DAEMONIZE="1")
        spark_class = str(af.venv_bin() / "spark-class")
        mport, mui = af.free_port(), af.free_port()
        st.spark_master, st.spark_ui = f"spark://127.0.0.1:{mport}", f"http://127.0.0.1:{mui}"
        self._spawn("spark-master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                     "--port", str(mport), "--webui-port", str(mui)], env)
        self._wait_log("spark-master", "I have been elected leader", deadline)
        self._spawn("spark-worker", [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                     "--port", str(af.free_port()), "--webui-port", str(af.free_port()),
                                     "--cores", str(s.spark_cores), "--memory", s.spark_memory,
                                     "--work-dir", str(self.home / "spark" / "work"), st.spark_master], env)
        self._wait_log("spark-worker", "Successfully registered with master", deadline)

    def _init(self) -> None:
        env = dict(self.env)
        env.update(SPARK_MASTER_URL=self.state.spark_master or "local[*]", LOTTERY_POOL_SLOTS=str(self.s.pool_slots))
        with open(self.log_dir / "airflow-init.log", "ab") as log:
            rc = subprocess.run(["bash", str(REPO / "docker" / "airflow-init.sh")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO).returncode
        if rc != 0:
            raise RuntimeError(f"airflow-init failed (exit {rc}):\n{self.tail('airflow-init', 30)}")

    def _worker_env(self, name: str, concurrency: int, threads: int | None) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            AIRFLOW__CELERY__WORKER_CONCURRENCY=str(concurrency),
            AIRFLOW__CORE__HOSTNAME_CALLABLE="cluster_local.worker_hostname",
            LOTTERY_WORKER_HOSTNAME=name,
            PYTHONPATH=os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")])),
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(af.free_port()),
        )
        if threads:
            env["LOTTERY_THREADS"] = str(threads)
        return env

    def _start_airflow(self) -> None:
        airflow = str(af.venv_bin() / "airflow")
        self._spawn("airflow-apiserver", [airflow, "api-server", "--port", str(self.state.port)], self.env)
        self._spawn("airflow-scheduler", [airflow, "scheduler"], self.env)
        self._spawn("airflow-dag-processor", [airflow, "dag-processor"], self.env)
        if self.s.triggerer:
            self._spawn("airflow-triggerer", [airflow, "triggerer"], self.env)
        host = socket.gethostname()
        c = self.s.default_concurrency
        self._spawn("airflow-worker", [airflow, "celery", "worker", "--queues", DEFAULT_QUEUE, "--concurrency", str(c),
                                       "--celery-hostname", f"airflow-worker@{host}"],
                    self._worker_env("airflow-worker", c, None))
        for i in range(1, self.s.gpu_workers + 1):
            name = f"gpu-worker-{i}"
            self._spawn(name, [airflow, "celery", "worker", "--queues", GPU_QUEUE, "--concurrency", "1",
                               "--celery-hostname", f"{name}@{host}"],
                        self._worker_env(name, 1, self.s.gpu_threads))

    def _wait_ready(self, deadline: float) -> None:
        from run_experiment import wait_for_dag

        api = self.api()
        af.wait_until(api.healthy, max(1.0, deadline - time.monotonic()), what="the API server", components=self)
        for name in self.procs:
            if name == "airflow-worker" or name.startswith("gpu-worker-"):
                self._wait_log(name, " ready.", deadline)
        wait_for_dag(api, self)

    # -- helpers --
    def _wait_log(self, name: str, text: str, deadline: float) -> None:
        def seen():
            return text in (self.log_dir / f"{name}.log").read_text(errors="replace")

        af.wait_until(seen, max(1.0, deadline - time.monotonic()), interval=0.5, what=f"{name} ({text!r} in its log)",
                      components=self)

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode}, see {self.log_dir / (n + '.log')})" for n, p in self.procs.items()
                if p.poll() is not None]

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def api(self) -> af.Api:
        return af.Api(self.state.api_url, af.USER, af.password(self.home))

    def _save(self, remove: bool = False) -> None:
        path = self.home / STATE_FILE
        if remove:
            path.unlink(missing_ok=True)
        elif self.state is not None:
            path.write_text(json.dumps(asdict(self.state), indent=1))

    def _write_env_sh(self) -> None:
        keys = [k for k in self.env if k.startswith(("AIRFLOW", "LOTTERY_")) or k in ("PATH", "KERAS_BACKEND")]
        lines = [f"export {k}={shlex.quote(self.env[k])}" for k in sorted(keys)]
        (self.home / "env.sh").write_text("# source me: the airflow CLI on the loopback cluster\n" + "\n".join(lines) + "\n")


def _create_time(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return 0.0


def _alive(pid: int, created: float) -> bool:
    """The process we started is still there (not a reused pid)."""
    try:
        import psutil

        p = psutil.Process(pid)
        return not created or abs(p.create_time() - created) < 1.0
    except Exception:
        return False


def stop_pids(pids: dict[str, int], started: dict[str, float], *, procs: dict[str, subprocess.Popen] | None = None,
              timeout: float = 30) -> None:
    """SIGTERM to each of our process groups (workers first), then SIGKILL to what is left."""
    procs = procs or {}
    order = sorted(pids, key=lambda n: (not n.startswith(("gpu-worker", "airflow-worker")), n.startswith("spark")))
    live = [n for n in order if n in procs and procs[n].poll() is None or n not in procs and _alive(pids[n], started.get(n, 0))]
    for name in live:
        _killpg(pids[name], signal.SIGTERM)
    end = time.monotonic() + timeout
    for name in live:
        while time.monotonic() < end:
            if (procs[name].poll() is not None) if name in procs else not _alive(pids[name], started.get(name, 0)):
                break
            time.sleep(0.2)
    for name in live:
        _killpg(pids[name], signal.SIGKILL)  # stragglers: task processes, Spark executors
        if name in procs:
            try:
                procs[name].wait(10)
            except subprocess.TimeoutExpired:
                pass


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cleanup(state: State, *, drop: bool | None = None) -> list[str]:
    """Release the Redis database; drop the metadata database when asked (default: when it was a
    throwaway one). Returns what was done."""
    done = []
    try:
        if release_redis_db(state.redis_url, state.redis_db, state.redis_token):
            done.append(f"flushed Redis db {state.redis_db}")
    except Exception as exc:  # never keep the rest of the cleanup from running
        done.append(f"Redis db {state.redis_db} not released: {exc}")
    if state.drop_database if drop is None else drop:
        try:
            drop_database(state.pg_url, state.database)
            done.append(f"dropped database {state.database}")
        except Exception as exc:
            done.append(f"database {state.database} not dropped: {exc}")
    return done


def load_state(home: Path) -> State | None:
    try:
        return State(**json.loads((Path(home) / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


# ---- command line ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"state, config, logs (default {DEFAULT_HOME})")
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts", help="LOTTERY_ARTIFACT_ROOT (default: artifacts/)")
    p.add_argument("--gpu-workers", type=int, default=1)
    p.add_argument("--gpu-threads", type=int, help="LOTTERY_THREADS of each GPU worker (default: all cores)")
    p.add_argument("--default-concurrency", type=int, default=2)
    p.add_argument("--port", type=int, help="API server port (default: a free one)")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--database", default="lottery_cluster_local", help="metadata database (kept by `down` unless --drop)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    p.add_argument("--redis-db", type=int, default=5, help="preferred Redis database number")
    p.add_argument("--no-spark", action="store_true", help="no Spark master/worker: spark_default = local[*]")
    p.add_argument("--no-triggerer", action="store_true")
    p.add_argument("--drop", action="store_true", help="down: also drop the metadata database")
    args = p.parse_args(argv)
    home = args.home.resolve()
    state = load_state(home)

    if args.command == "status":
        if state is None:
            print(f"no cluster on {home}")
            return 1
        for name, pid in state.pids.items():
            print(f"  {name:24s} pid {pid:<8d} {'running' if _alive(pid, state.started.get(name, 0)) else 'STOPPED'}")
        _print_urls(state)
        return 0
    if args.command == "down":
        if state is None:
            print(f"no cluster on {home}")
            return 0
        stop_pids(state.pids, state.started)
        for line in cleanup(state, drop=True if args.drop else None):
            print(line)
        (home / STATE_FILE).unlink(missing_ok=True)
        print(f"stopped {len(state.pids)} processes")
        return 0

    if state is not None and any(_alive(pid, state.started.get(n, 0)) for n, pid in state.pids.items()):
        print(f"a cluster is already running on {home}:")
        _print_urls(state)
        return 0
    cluster = Cluster(Settings(
        home=home, artifact_root=args.artifacts, pg_url=args.pg_url, database=args.database, redis_url=args.redis_url,
        redis_db=args.redis_db, gpu_workers=args.gpu_workers, default_concurrency=args.default_concurrency,
        gpu_threads=args.gpu_threads, spark=not args.no_spark, triggerer=not args.no_triggerer, port=args.port,
    ))
    print(f"starting the loopback cluster on {home} (logs: {cluster.log_dir}/<service>.log) ...")
    try:
        state = cluster.start()
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_urls(state)
    return 0


def _print_urls(state: State) -> None:
    home = Path(state.home)
    print(f"  Airflow UI / API:  {state.api_url}/dags/{af.DAG_ID}   login {af.USER} / {af.password(home)}")
    if state.spark_ui:
        print(f"  Spark master:      {state.spark_master}   UI {state.spark_ui}")
    print(f"  Metadata DB:       {database_url(state.pg_url, state.database, 'postgresql')}")
    print(f"  Broker:            {state.redis_url.rstrip('/')}/{state.redis_db}")
    print(f"  Artifacts:         {state.artifact_root}")
    print(f"  Trigger:           the UI, or POST {state.api_url}/api/v2/dags/{af.DAG_ID}/dagRuns")
    print(f"  CLI:               source {home / 'env.sh'} && airflow dags list")
    print(f"  Stop:              python scripts/cluster_local.py down{'' if home == DEFAULT_HOME else f' --home {home}'} [--drop]")


if __name__ == "__main__":
    sys.exit(main())
