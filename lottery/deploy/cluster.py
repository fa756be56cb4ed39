"""The topology of docker-compose.yaml as local processes on 127.0.0.1 (no Docker needed).

    python -m lottery.deploy.cluster up   [--gpu-workers 1] [--port P] [--artifacts DIR]   # make cluster-up
    python -m lottery.deploy.cluster status
    python -m lottery.deploy.cluster restart NAME                                         # any component, e.g. spark-worker
    python -m lottery.deploy.cluster add-worker [--gpu]                                   # gpu-worker-N / airflow-worker-N
    python -m lottery.deploy.cluster down [--drop]                                        # make cluster-down
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
``up`` leaves a supervisor process running (``lottery.deploy.supervisor``, as under ``make run`` and
``make ui``; its log ``logs/cluster-supervisor.log``): it started every component, restarts one that
dies, stops them all on SIGTERM (``down``), and does ``restart`` and ``add-worker`` for the CLI
(requests in ``<home>/control/``). A worker restarted or added later is recorded there too. After a plain ``down`` the file stays,
marked stopped, so that a later ``down --drop`` still knows which database to drop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import shlex
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lottery.deploy import airflow_home
from lottery.deploy.api import Api
from lottery.deploy.constants import (
    DAG_ID, DEFAULT_QUEUE, GPU_QUEUE, HEARTBEAT_CHECK_INTERVAL_S, POOL_SLOTS, REPO, TASK_HEARTBEAT_TIMEOUT_S,
)
from lottery.deploy.databases import (
    claim_redis_db, create_database, database_exists, database_url, drop_database, release_redis_db,
)
from lottery.files import write_text
from lottery.deploy.supervisor import (
    ComponentFailed, HomeBusy, Supervisor, alive, free_port, raise_keyboard_interrupt_on_sigterm, recorded_sessions,
    create_time, holder_pid, stop_groups, sweep, tail, venv_bin, wait_until,
)

DEFAULT_HOME = REPO / "build" / "cluster-local"
STATE_FILE = "cluster.json"
# What a standalone master and worker log once they serve (Supervisor.wait_log).
SPARK_MASTER_READY = "I have been elected leader"
SPARK_WORKER_READY = "Successfully registered with master"


def spark_master_argv(port: int, ui_port: int) -> list[str]:
    """A standalone Spark master on 127.0.0.1, from the venv's pyspark (also bench/spark_preprocess.py's)."""
    return [str(venv_bin() / "spark-class"), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
            "--port", str(port), "--webui-port", str(ui_port)]


def spark_worker_argv(master: str, *, cores: int, memory: str, work_dir: Path) -> list[str]:
    """A standalone Spark worker on 127.0.0.1 and free ports, offering ``cores`` and ``memory`` to ``master``."""
    return [str(venv_bin() / "spark-class"), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
            "--port", str(free_port()), "--webui-port", str(free_port()), "--cores", str(cores), "--memory", memory,
            "--work-dir", str(work_dir), master]


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the local workers: the name of the worker (several workers
    share this machine's host name); other processes fall back to Airflow's default."""
    name = os.environ.get("LOTTERY_WORKER_HOSTNAME")
    if name:
        return name
    from airflow.utils.net import getfqdn

    return getfqdn()


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
    pool_slots: int = POOL_SLOTS
    # more environment of every component (``--env KEY=VALUE``), as compose's x-airflow-env would set:
    # the project's settings (LOTTERY_SPARK_EXECUTOR_TIMEOUT, LOTTERY_RETRIES, ...)
    extra_env: dict[str, str] = field(default_factory=dict)


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
    # name -> {"queue", "concurrency", "threads"}: what restart-worker starts again
    workers: dict[str, dict] = field(default_factory=dict)
    stopped: bool = False  # `down` ran; the database (and this record) stay until `down --drop`
    redis_released: bool = False
    # the process that started and watches every component (`up` starts it in the background)
    supervisor: dict = field(default_factory=dict)  # {"pid", "started"}
    ready: bool = False  # every component came up; the supervisor now only watches

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def cluster_env(home: Path, *, port: int, sql_alchemy_conn: str, result_backend: str, broker_url: str,
                artifact_root: Path) -> dict[str, str]:
    """The environment every Airflow process of the cluster shares: docker-compose.yaml's
    ``x-airflow-env`` with loopback addresses (tests/test_compose.py compares the two)."""
    home = Path(home).resolve()
    # without this process's Airflow or project settings (another Airflow home's, a connection override)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LOTTERY_", "SPARK_", "PYSPARK_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW_CONFIG=str(home / "airflow.cfg"),
        PATH=f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        # -- the same keys as docker-compose.yaml's x-airflow-env --
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{airflow_home.USER}:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sql_alchemy_conn,
        AIRFLOW__CELERY__BROKER_URL=broker_url,
        AIRFLOW__CELERY__RESULT_BACKEND=result_backend,
        AIRFLOW__OPERATORS__DEFAULT_QUEUE=DEFAULT_QUEUE,
        AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT="172800",
        AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="True",
        AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT="172800",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=str(TASK_HEARTBEAT_TIMEOUT_S),
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL=str(HEARTBEAT_CHECK_INTERVAL_S),
        AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(home / "logs"),
        LOTTERY_ARTIFACT_ROOT=str(Path(artifact_root).resolve()),
        LOTTERY_GPU_QUEUE=GPU_QUEUE,
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="2",
        # -- loopback only: one machine, many components --
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT=str(free_port()),
        AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST="127.0.0.1",
        AIRFLOW__CORE__PARALLELISM="32",
        SPARK_LOCAL_IP="127.0.0.1",
    )
    # the secrets (fernet, JWT, API) live in airflow.cfg, written once by airflow_home.write_config
    return env


# ---- processes ---------------------------------------------------------------------------------
class ClusterError(RuntimeError):
    """A cluster command that cannot be done (no cluster, an unknown worker); the message says why."""


CONTROL_DIR = "control"  # the CLI's requests to the supervisor, and its replies
SUPERVISOR_LOG = "cluster-supervisor.log"


class Cluster:
    """Start, check and stop the loopback cluster; ``attach()`` takes over one that another process
    started (``restart-worker``, ``add-worker``)."""

    def __init__(self, settings: Settings, *, owner: bool = True):
        self.s = settings
        self.home = Path(settings.home).resolve()
        self.supervisor = Supervisor(self.home / "logs", on_change=self._save, home=self.home, owner=owner,
                                     say=lambda line: print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True))
        self.state: State | None = None
        self.env: dict[str, str] = {}

    @classmethod
    def attach(cls, home: Path) -> "Cluster":
        """The running cluster recorded in ``home/cluster.json``."""
        state = load_state(home)
        if state is None or state.stopped:
            raise ClusterError(f"no running cluster on {home} (start one with `up`)")
        cluster = cls(Settings(home=Path(home), artifact_root=Path(state.artifact_root)), owner=False)
        cluster.state = state
        cluster.env = cluster._environment()
        return cluster

    # -- lifecycle --
    def start(self, timeout: float = 600) -> State:
        s = self.s
        Path(s.artifact_root).mkdir(parents=True, exist_ok=True)
        ephemeral = s.database is None
        database = s.database or f"lottery_cluster_{uuid.uuid4().hex[:10]}"
        token = uuid.uuid4().hex
        self.state = State(
            home=str(self.home), port=s.port or free_port(), database=database, drop_database=ephemeral,
            pg_url=s.pg_url, redis_url=s.redis_url, redis_db=claim_redis_db(s.redis_url, token, s.redis_db),
            redis_token=token, spark_master=None, spark_ui=None, artifact_root=str(Path(s.artifact_root).resolve()),
        )
        self._save()
        try:
            deadline = time.monotonic() + timeout
            self._configure()
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
        """Stop every process, release the Redis database, drop the metadata database when it was a
        throwaway one (or ``drop``)."""
        if self.state is None:
            return
        self.stop_processes()
        cleanup(self.state, drop=drop)
        self._save(remove=True)

    # -- supervision (the process `up` leaves running) --
    def serve(self, interval: float = 1.0) -> None:
        """Watch every component until interrupted: a dead one is started again (one log line; past
        its restart limit it stays down until `up` or `restart` starts it), and answer the CLI's
        requests (``control/``)."""
        while True:
            try:
                self.supervisor.watch()
            except ComponentFailed as exc:
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {exc}; `up` or `restart NAME` starts it again", flush=True)
            for request in sorted((self.home / CONTROL_DIR).glob("*.request.json")):
                self._answer(request)
            time.sleep(interval)

    def _answer(self, request: Path) -> None:
        reply: dict = {"ok": True}
        try:
            ask = json.loads(request.read_text())
            command = ask.get("command")
            if command == "revive":
                reply["revived"] = self.supervisor.revive()
            elif command == "restart":
                reply["pid"] = self.restart(ask["name"])
            elif command == "add-worker":
                reply["name"] = self.add_worker(gpu=bool(ask.get("gpu")), threads=ask.get("threads"), timeout=None)
            else:
                raise ClusterError(f"unknown request {command!r}")
        except (ClusterError, ComponentFailed, OSError, ValueError, KeyError) as exc:
            reply = {"ok": False, "error": str(exc)}
        write_text(request.with_name(request.name.replace(".request.", ".reply.")), json.dumps(reply))
        request.unlink(missing_ok=True)

    def restart(self, name: str) -> int:
        """Stop component ``name`` with everything it started, and start it again; its new pid.
        A worker's running tasks are lost (Airflow retries them when their heartbeat stops)."""
        if name not in self.supervisor.commands:
            raise ClusterError(f"no component {name!r} on {self.home}; components: {', '.join(self.supervisor.commands)}")
        return self.supervisor.restart(name).pid

    def stop_processes(self) -> None:
        """Stop every process (the workers' task processes too); the record, the database and the
        Redis claim stay (`down` decides about those)."""
        for name, pid in self.state.pids.items():
            if name in self.state.workers and alive(pid, self.state.started.get(name, 0.0)):
                stop_worker_tree(pid)  # with the task processes Airflow put in groups of their own
        self.supervisor.stop()
        # workers another process added or restarted are in the record, not in this supervisor
        stop_groups(self.state.pids, self.state.started)

    # -- workers --
    def restart_worker(self, name: str, timeout: float | None = 180) -> int:
        """Stop worker ``name`` (whatever it runs is lost: Airflow retries it when its heartbeat
        stops) and start it again with the same queue and concurrency; returns its new pid."""
        spec = self.state.workers.get(name)
        if spec is None:
            raise ClusterError(f"no worker {name!r} in {self.home / STATE_FILE}; workers: {', '.join(self.state.workers)}")
        pid, started = self.state.pids.get(name), self.state.started.get(name, 0.0)
        if pid and alive(pid, started):
            stop_worker_tree(pid)
        return self._start_worker(name, timeout=timeout, **spec)

    def add_worker(self, *, gpu: bool, threads: int | None = None, timeout: float = 180) -> str:
        """Start one more worker on the ``gpu`` queue (concurrency 1) or the ``default`` queue (as
        the first default worker); returns its name (``gpu-worker-N``, ``airflow-worker-N``)."""
        stem, queue = ("gpu-worker", GPU_QUEUE) if gpu else ("airflow-worker", DEFAULT_QUEUE)
        siblings = [w for w in self.state.workers.values() if w["queue"] == queue]
        concurrency = 1 if gpu else (siblings[0]["concurrency"] if siblings else self.s.default_concurrency)
        if threads is None and siblings:
            threads = siblings[0]["threads"]
        n = 1 if gpu else 2  # the first default worker is plain "airflow-worker"
        while f"{stem}-{n}" in self.state.workers:
            n += 1
        name = f"{stem}-{n}"
        self._start_worker(name, queue=queue, concurrency=concurrency, threads=threads, timeout=timeout)
        return name

    def api(self) -> Api:
        return Api(self.state.api_url, airflow_home.USER, airflow_home.password(self.home))

    # -- pieces --
    def _configure(self) -> None:
        """The metadata database, airflow.cfg (the secrets) and the environment of every process."""
        st = self.state
        create_database(st.pg_url, st.database)
        airflow_home.write_config(self.home, parallelism=32, port=st.port)
        self.env = {**self._environment(), **self.s.extra_env}
        self._write_env_sh()

    def _environment(self) -> dict[str, str]:
        st = self.state
        return cluster_env(
            self.home, port=st.port, sql_alchemy_conn=database_url(st.pg_url, st.database),
            result_backend=database_url(st.pg_url, st.database, "db+postgresql+psycopg2"),
            broker_url=f"{st.redis_url.rstrip('/')}/{st.redis_db}", artifact_root=Path(st.artifact_root),
        )

    def _start_spark(self, deadline: float) -> None:
        s, st, sup = self.s, self.state, self.supervisor
        env = dict(self.env)
        env.update(SPARK_LOG_DIR=str(self.home / "spark" / "logs"), SPARK_WORKER_DIR=str(self.home / "spark" / "work"),
                   SPARK_NO_DAEMONIZE="1")
        mport, mui = free_port(), free_port()
        st.spark_master, st.spark_ui = f"spark://127.0.0.1:{mport}", f"http://127.0.0.1:{mui}"
        sup.start("spark-master", spark_master_argv(mport, mui), env, restart=True)
        sup.wait_log("spark-master", SPARK_MASTER_READY, deadline)
        sup.start("spark-worker", spark_worker_argv(st.spark_master, cores=s.spark_cores, memory=s.spark_memory,
                                                    work_dir=self.home / "spark" / "work"), env, restart=True)
        sup.wait_log("spark-worker", SPARK_WORKER_READY, deadline)

    def _init(self) -> None:
        env = dict(self.env)
        env.update(SPARK_MASTER_URL=self.state.spark_master or "local[*]", LOTTERY_POOL_SLOTS=str(self.s.pool_slots))
        with open(self.supervisor.log("airflow-init"), "ab") as log:
            rc = subprocess.run(["bash", str(REPO / "docker" / "airflow-init.sh")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO).returncode
        if rc != 0:
            raise RuntimeError(f"airflow-init failed (exit {rc}):\n{self.supervisor.tail('airflow-init', 30)}")

    def _worker_env(self, name: str, concurrency: int, threads: int | None) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            AIRFLOW__CELERY__WORKER_CONCURRENCY=str(concurrency),
            AIRFLOW__CORE__HOSTNAME_CALLABLE="lottery.deploy.cluster.worker_hostname",
            LOTTERY_WORKER_HOSTNAME=name,
        )
        if threads:
            env["LOTTERY_THREADS"] = str(threads)
        return env

    def _start_airflow(self) -> None:
        airflow, sup = str(venv_bin() / "airflow"), self.supervisor
        # every port on 127.0.0.1: the API server's host is given; Airflow's log servers (a worker's,
        # the triggerer's) listen on every interface with no setting to change that, and are not
        # needed here: the API server reads the task logs from the shared log folder
        sup.start("airflow-apiserver", [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.state.port)],
                  self.env, restart=True)
        sup.start("airflow-scheduler", [airflow, "scheduler"], self.env, restart=True)
        sup.start("airflow-dag-processor", [airflow, "dag-processor"], self.env, restart=True)
        if self.s.triggerer:
            sup.start("airflow-triggerer", [airflow, "triggerer", "--skip-serve-logs"], self.env, restart=True)
        self._start_worker("airflow-worker", queue=DEFAULT_QUEUE, concurrency=self.s.default_concurrency, threads=None)
        for i in range(1, self.s.gpu_workers + 1):
            self._start_worker(f"gpu-worker-{i}", queue=GPU_QUEUE, concurrency=1, threads=self.s.gpu_threads)

    def _start_worker(self, name: str, *, queue: str, concurrency: int, threads: int | None,
                      timeout: float | None = None) -> int:
        """Start a Celery worker and record it; with ``timeout``, wait until it says it is ready."""
        offset = log_size(self.home, name)
        self.state.workers[name] = {"queue": queue, "concurrency": concurrency, "threads": threads}
        argv = [str(venv_bin() / "airflow"), "celery", "worker", "--queues", queue, "--concurrency", str(concurrency),
                "--celery-hostname", f"{name}@{socket.gethostname()}", "--skip-serve-logs"]
        proc = self.supervisor.start(name, argv, self._worker_env(name, concurrency, threads), restart=True)
        if timeout is not None:
            wait_worker_ready(self.home, name, offset, timeout, proc=proc)
        return proc.pid

    def _wait_ready(self, deadline: float) -> None:
        api, sup = self.api(), self.supervisor
        sup.wait_until(api.healthy, max(1.0, deadline - time.monotonic()), what="the API server")
        for name in sup.procs:
            if name == "airflow-worker" or name.startswith("gpu-worker-"):
                sup.wait_log(name, " ready.", deadline)
        api.wait_for_dag(sup)

    def _save(self, remove: bool = False) -> None:
        path = self.home / STATE_FILE
        if remove:
            path.unlink(missing_ok=True)
        elif self.state is not None:
            # merged: a cluster taken over by attach() keeps the pids of the processes it did not start
            self.state.pids = {**self.state.pids, **self.supervisor.pids}
            self.state.started = {**self.state.started, **self.supervisor.started}
            save_state(path, self.state)

    def _write_env_sh(self) -> None:
        keys = [k for k in self.env if k.startswith(("AIRFLOW", "LOTTERY_")) or k in ("PATH", "KERAS_BACKEND")]
        lines = [f"export {k}={shlex.quote(self.env[k])}" for k in sorted(keys)]
        (self.home / "env.sh").write_text("# source me: the airflow CLI on the loopback cluster\n" + "\n".join(lines) + "\n")


def cleanup(state: State, *, drop: bool | None = None) -> tuple[list[str], bool]:
    """Release the Redis database (unless done before); drop the metadata database when asked
    (default: when it was a throwaway one). Returns what was done, and whether the database is gone."""
    done, dropped = [], False
    if not state.redis_released:
        try:
            # False: the claim is no longer ours (released before, or taken over): nothing to flush
            flushed = release_redis_db(state.redis_url, state.redis_db, state.redis_token)
            state.redis_released = True
            done.append(f"flushed Redis db {state.redis_db}" if flushed else f"Redis db {state.redis_db} was not ours any more")
        except Exception as exc:  # never keep the rest of the cleanup from running
            done.append(f"Redis db {state.redis_db} not released: {exc}")
    if state.drop_database if drop is None else drop:
        try:
            drop_database(state.pg_url, state.database)
            done.append(f"dropped database {state.database}")
            dropped = True
        except Exception as exc:
            done.append(f"database {state.database} not dropped: {exc}")
    return done, dropped


def stop_worker_tree(pid: int, timeout: float = 30) -> None:
    """Stop a worker's process group and those of the task processes Airflow put in groups of their
    own; SIGTERM, then SIGKILL after ``timeout`` seconds."""
    import psutil

    try:
        leader = psutil.Process(pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    groups = {pid}
    for p in tree:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        _, left = psutil.wait_procs(tree, timeout=timeout if sig == signal.SIGTERM else 10)
        if not left:
            return


def load_state(home: Path) -> State | None:
    try:
        return State(**json.loads((Path(home) / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def save_state(path: Path, state: State) -> None:
    """Write the record atomically (status and down may read it at any time)."""
    write_text(path, json.dumps(asdict(state), indent=1))


def running(state: State) -> dict[str, bool]:
    return {name: alive(pid, state.started.get(name, 0.0)) for name, pid in state.pids.items()}


def supervisor_alive(state: State | None) -> bool:
    sup = (state.supervisor if state else None) or {}
    return bool(sup.get("pid")) and alive(sup["pid"], sup.get("started", 0.0))


def ask_supervisor(home: Path, request: dict, timeout: float = 120) -> dict:
    """Send ``request`` to the cluster's supervisor (a file in ``control/``); its reply."""
    control = Path(home) / CONTROL_DIR
    control.mkdir(parents=True, exist_ok=True)
    ident = uuid.uuid4().hex[:12]
    write_text(control / f"{ident}.request.json", json.dumps(request))
    reply = control / f"{ident}.reply.json"
    deadline = time.monotonic() + timeout
    while not reply.exists():
        if time.monotonic() > deadline:
            (control / f"{ident}.request.json").unlink(missing_ok=True)
            raise ClusterError(f"the cluster's supervisor did not answer within {timeout:.0f} s; "
                               f"see {Path(home) / 'logs' / SUPERVISOR_LOG}")
        time.sleep(0.2)
    answer = json.loads(reply.read_text())
    reply.unlink(missing_ok=True)
    if not answer.get("ok"):
        raise ClusterError(answer.get("error", "refused"))
    return answer


def wait_worker_ready(home: Path, name: str, offset: int, timeout: float = 180,
                      proc: subprocess.Popen | None = None) -> None:
    """Until worker ``name``'s log says " ready." after byte ``offset``; with ``proc`` (this
    process's child), ``ClusterError`` as soon as it exits."""
    log = Path(home) / "logs" / f"{name}.log"

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{name} exited ({proc.returncode}) while starting; see {log}")
        with open(log, "rb") as f:
            f.seek(offset)
            return b" ready." in f.read()

    wait_until(ready, timeout, 0.5, what=f"{name} (' ready.' in {log})")


def log_size(home: Path, name: str) -> int:
    path = Path(home) / "logs" / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


# ---- command line ------------------------------------------------------------------------------
COMMANDS = ["up", "down", "status", "restart", "restart-worker", "add-worker", "_serve"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lottery.deploy.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("worker", nargs="?", metavar="NAME",
                   help="restart: the component's name, as `status` lists it (restart-worker: the same)")
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
    p.add_argument("--drop", action="store_true", help="down: also drop the metadata database (also after a plain down)")
    p.add_argument("--gpu", action="store_true", help="add-worker: a worker on the gpu queue (default: the default queue)")
    p.add_argument("--timeout", type=float, default=600, help="up: seconds to wait for every component")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="up: one more environment variable of every component, e.g. LOTTERY_SPARK_EXECUTOR_TIMEOUT=60")
    args = p.parse_args(argv)
    if bad := [item for item in args.env if "=" not in item or not item.split("=", 1)[0]]:
        p.error(f"--env takes KEY=VALUE, not {bad[0]!r}")
    if (args.command in ("restart", "restart-worker")) != (args.worker is not None):
        p.error("restart takes the name of one component (and only it does)")
    return args


def status(home: Path, state: State | None) -> int:
    if state is None:
        print(f"no cluster on {home}")
        return 1
    if state.stopped:
        print(f"cluster on {home} is stopped; database {state.database} kept (`down --drop` drops it)")
        return 1
    sup = state.supervisor or {}
    print(f"  {'supervisor':24s} pid {sup.get('pid', 0):<8d} {'running' if supervisor_alive(state) else 'STOPPED':8s}"
          f" log {home / 'logs' / SUPERVISOR_LOG}")
    for name, up in running(state).items():
        queue = state.workers.get(name, {}).get("queue")
        print(f"  {name:24s} pid {state.pids[name]:<8d} {'running' if up else 'STOPPED':8s}"
              + (f" queue {queue}" if queue else ""))
    print_urls(state)
    return 0


def down(home: Path, state: State | None, *, drop: bool, pg_url: str = "", database: str = "") -> int:
    """Stop every process; release the Redis claim; drop the database with ``drop`` (also after a
    plain ``down``, from the record it left). Without --drop the record stays, marked stopped."""
    if state is None:
        if drop and database and database_exists(pg_url, database):
            drop_database(pg_url, database)
            print(f"no cluster record on {home}; dropped database {database}")
        else:
            print(f"no cluster on {home}")
        return 0
    stopped = len(state.pids)
    if supervisor_alive(state):  # it stops what it started, and exits
        sup = state.supervisor
        os.kill(sup["pid"], signal.SIGTERM)
        try:
            wait_until(lambda: not alive(sup["pid"], sup.get("started", 0.0)), 180, 0.5, what="the cluster's supervisor to stop")
        except TimeoutError as exc:
            print(f"warning: {exc}; stopping the components from here")
        state = load_state(home) or state
    for name, pid in state.pids.items():
        if alive(pid, state.started.get(name, 0.0)) and name in state.workers:
            stop_worker_tree(pid)  # with the task processes Airflow put in groups of their own
    stop_groups(state.pids, state.started)
    for line in sweep(str(home), recorded_sessions(home)):  # what lost its component (a killed scheduler's child)
        print(f"stopped a process left behind: {line}")
    lines, dropped = cleanup(state, drop=True if drop else None)
    for line in lines:
        print(line)
    if dropped:
        (home / STATE_FILE).unlink(missing_ok=True)
    else:
        state.pids, state.started, state.stopped, state.ready = {}, {}, True, False
        save_state(home / STATE_FILE, state)
        print(f"database {state.database} kept: `down --drop` drops it")
    print(f"stopped {stopped} processes")
    return 0


def workers_command(args: argparse.Namespace, home: Path, state: State | None) -> int:
    """restart NAME / add-worker [--gpu] on the running cluster of ``home``: done by its supervisor,
    so that it watches what it starts; without one (a cluster a test supervises itself), here."""
    try:
        if supervisor_alive(state):
            if args.command in ("restart", "restart-worker"):
                offset = log_size(home, args.worker)
                pid = ask_supervisor(home, {"command": "restart", "name": args.worker})["pid"]
                if args.worker in state.workers:
                    wait_worker_ready(home, args.worker, offset)
                print(f"restarted {args.worker} (pid {pid}); log: {home / 'logs' / (args.worker + '.log')}")
            else:
                name = ask_supervisor(home, {"command": "add-worker", "gpu": args.gpu,
                                             "threads": args.gpu_threads if args.gpu else None})["name"]
                wait_worker_ready(home, name, 0)
                record = load_state(home)
                print(f"added {name} (pid {record.pids[name]}, queue {record.workers[name]['queue']}); "
                      f"log: {home / 'logs' / (name + '.log')}")
            return 0
        cluster = Cluster.attach(home)
        if args.command in ("restart", "restart-worker"):
            if args.worker not in cluster.state.workers:
                raise ClusterError(f"no worker {args.worker!r} in {home / STATE_FILE}, and no supervisor to restart "
                                   f"other components (`up` starts one); workers: {', '.join(cluster.state.workers)}")
            pid = cluster.restart_worker(args.worker)
            print(f"restarted {args.worker} (pid {pid}); log: {cluster.supervisor.log(args.worker)}")
        else:
            name = cluster.add_worker(gpu=args.gpu, threads=args.gpu_threads if args.gpu else None)
            print(f"added {name} (pid {cluster.state.pids[name]}, queue {cluster.state.workers[name]['queue']}); "
                  f"log: {cluster.supervisor.log(name)}")
    except (ClusterError, TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def settings_of(args: argparse.Namespace, home: Path) -> Settings:
    return Settings(
        home=home, artifact_root=args.artifacts, pg_url=args.pg_url, database=args.database, redis_url=args.redis_url,
        redis_db=args.redis_db, gpu_workers=args.gpu_workers, default_concurrency=args.default_concurrency,
        gpu_threads=args.gpu_threads, spark=not args.no_spark, triggerer=not args.no_triggerer, port=args.port,
        extra_env=dict(item.split("=", 1) for item in args.env),
    )


def up(args: argparse.Namespace, home: Path, state: State | None, argv: list[str]) -> int:
    """Start the cluster's supervisor in the background and wait until every component is up; on a
    running cluster, start again whatever is down, and say what."""
    if supervisor_alive(state) and not state.stopped:
        revived = ask_supervisor(home, {"command": "revive"})["revived"]
        if revived:
            print(f"restarted what was down on {home}: {', '.join(revived)}")
        else:
            print(f"a cluster is already running on {home}, every component up ({len(state.pids)}):")
        print_urls(load_state(home) or state)
        return 0
    holder = holder_pid(home) if state is not None and not state.stopped else None
    if holder:
        print(f"a cluster is already running on {home}, supervised by pid {holder}:")
        print_urls(state)
        return 0
    if state is not None and not state.stopped:
        # its supervisor is gone (killed, or the machine restarted): stop what it left, free its Redis claim
        print(f"the supervisor of the cluster on {home} is gone: starting the cluster again")
        for line in sweep(str(home), recorded_sessions(home)):
            print(f"  stopped a process left behind: {line}")
        for line in cleanup(state, drop=False)[0]:
            print(f"  {line}")
        if args.port is None:  # the UI stays where the user's browser has it
            args.port = state.port
            argv = [*argv, "--port", str(state.port)]
    if state is not None and state.database != args.database:
        print(f"note: database {state.database} of the cluster stopped before stays; drop it with "
              f"`down --drop --database {state.database}` after this one is down")
    log = home / "logs" / SUPERVISOR_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting the loopback cluster on {home} (logs: {log.parent}/<service>.log) ...")
    with open(log, "ab") as out:
        # the same options, with the paths made absolute (the supervisor runs in the repository)
        daemon = subprocess.Popen([sys.executable, "-m", "lottery.deploy.cluster", "_serve", *argv[1:], "--home", str(home),
                                   "--artifacts", str(Path(args.artifacts).resolve())], cwd=REPO,
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        if daemon.poll() is not None:
            raise ClusterError(f"the cluster did not come up (exit {daemon.returncode}):\n" + tail(log, 30))
        record = load_state(home)
        return bool(record and record.ready and record.supervisor.get("pid") == daemon.pid)

    try:
        wait_until(ready, args.timeout, 1.0, what=f"the cluster to come up (see {log})")
    except (ClusterError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if daemon.poll() is None:
            daemon.terminate()
        return 1
    print_urls(load_state(home))
    return 0


def serve(args: argparse.Namespace, home: Path) -> int:
    """The supervisor `up` leaves running: start every component, then watch them until SIGTERM
    (`down`), which stops them all."""
    raise_keyboard_interrupt_on_sigterm()
    cluster = Cluster(settings_of(args, home))
    try:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor pid {os.getpid()}: starting the cluster on {home}", flush=True)
        cluster.supervisor.claim()
        state = cluster.start(timeout=args.timeout)
        state.supervisor = {"pid": os.getpid(), "started": create_time(os.getpid())}
        state.ready = True
        cluster._save()
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} every component is up; watching them", flush=True)
        cluster.serve()
    except KeyboardInterrupt:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} stopping every component", flush=True)
        cluster.stop_processes()
        return 0
    except HomeBusy as exc:
        print(f"error: {exc}", flush=True)
        return 2
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}\n{cluster.supervisor.tails(15)}", flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = args.home.resolve()
    state = load_state(home)
    if args.command == "status":
        return status(home, state)
    if args.command == "down":
        return down(home, state, drop=args.drop, pg_url=args.pg_url, database=args.database)
    if args.command in ("restart", "restart-worker", "add-worker"):
        return workers_command(args, home, state)
    if args.command == "_serve":
        return serve(args, home)
    return up(args, home, state, sys.argv[1:] if argv is None else argv)


def print_urls(state: State) -> None:
    home = Path(state.home)
    print(f"  Airflow UI / API:  {state.api_url}/dags/{DAG_ID}   login {airflow_home.USER} / {airflow_home.password(home)}")
    if state.spark_ui:
        print(f"  Spark master:      {state.spark_master}   UI {state.spark_ui}")
    print(f"  Metadata DB:       {database_url(state.pg_url, state.database, 'postgresql')}")
    print(f"  Broker:            {state.redis_url.rstrip('/')}/{state.redis_db}")
    print(f"  Artifacts:         {state.artifact_root}")
    print(f"  Trigger:           the UI, or POST {state.api_url}/api/v2/dags/{DAG_ID}/dagRuns")
    print(f"  CLI:               source {home / 'env.sh'} && airflow dags list")
    if home == DEFAULT_HOME.resolve():
        print("  Stop:              make cluster-down  (or python -m lottery.deploy.cluster down --drop: the database too)")
    else:
        print(f"  Stop:              python -m lottery.deploy.cluster down --home {home} [--drop]")


if __name__ == "__main__":
    sys.exit(main())
