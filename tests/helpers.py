"""The tests' shared scaffolding: the tiny experiment, a throwaway Airflow home for this process,
launchers for a local Airflow and for `make run`, one wait helper, one parser of Airflow's JSON
task logs."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

import pytest

from lottery.deploy import airflow_home
from lottery.deploy.constants import ALLOWED_ARTIFACT_ROOTS_ENV, ALLOWED_DATA_ROOTS_ENV, DAG_ID, REPO
from lottery.deploy.supervisor import free_port

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]

# The tiny experiment of the end-to-end tests (a run of the DAG: 300 Fashion-MNIST images, one
# epoch, 2 masks x 2 rewind points, one control; the instability analysis off: the test of it turns
# it on); tests change what they need with tiny_run(...).
TINY_RUN = {
    "dataset_limit": 300,
    "training_steps": "1ep",
    "lr_milestones": [],
    "batch_size": 32,
    "rewind_points": ["0it", "2it"],
    "sparsities": [0.5, 0.8],
    "controls": True,
    "control_sparsities": [0.8],
    "stability": False,
}


# The tiny training of the engine's tests (256 synthetic 8x8 images / batch 32 = 8 iterations an
# epoch, 3 epochs; tests.datasets.make_synthetic_shards); tests change what they need with tiny_training(...).
TINY_TRAINING = {
    "training_steps": "3ep", "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-4, "warmup_steps": "4it", "lr_milestones": ["2ep"], "rewind_points": ["0it", "1ep"],
    "sparsities": [0.5, 0.9],
}


def tiny_training(*, drop: tuple[str, ...] = (), **changes) -> dict:
    """The tiny training config with ``changes``, without the keys in ``drop``."""
    return _changed(TINY_TRAINING, drop, changes)


def _changed(conf: dict, drop: tuple[str, ...], changes: dict) -> dict:
    conf = {**json.loads(json.dumps(conf)), **changes}
    return {k: v for k, v in conf.items() if k not in drop}


def tiny_run(*, drop: tuple[str, ...] = (), **changes) -> dict:
    """The tiny DAG run's config with ``changes``, without the keys in ``drop``."""
    return _changed(TINY_RUN, drop, changes)


# ---- a throwaway Airflow home for this process (the DAG tested in-process) -------------------------
def use_test_home(prefix: str = "lottery-airflow-test-") -> Path:
    """Point this process's Airflow at a throwaway home (SQLite, this repo's DAG and plugins).

    Call before anything imports ``airflow``; a second call in the same process returns the same
    home. The database is not created here (``init_db_here``)."""
    import atexit
    import shutil
    import tempfile

    # The test deployment lets runs write and read in the temp directory (pytest's tmp_path), as a
    # deployment would list its volumes; set before the DAG file is parsed (lottery/deploy/roots.py).
    for name in (ALLOWED_ARTIFACT_ROOTS_ENV, ALLOWED_DATA_ROOTS_ENV):
        os.environ.setdefault(name, tempfile.gettempdir())
    if os.environ.get("LOTTERY_TEST_AIRFLOW_HOME"):
        return Path(os.environ["LOTTERY_TEST_AIRFLOW_HOME"])
    if "airflow" in sys.modules:
        raise RuntimeError("airflow was imported before use_test_home(): its configuration is already loaded")
    home = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    airflow_home.write_config(home, parallelism=2, port=free_port())
    env = airflow_home.environ(home)
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


# ---- launchers ------------------------------------------------------------------------------------
def without_test_airflow(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without this process's Airflow (its home, config, connections): for an Airflow or a
    `make run` of its own."""
    return {k: v for k, v in env.items() if not k.startswith(("AIRFLOW", "LOTTERY_TEST_AIRFLOW"))}


@contextlib.contextmanager
def local_airflow(home: Path, *components: str, parallelism: int = 2, env: Mapping[str, str] | None = None,
                  unpause: bool = False) -> Iterator[tuple[airflow_home.LocalAirflow, object]]:
    """``components`` of a `make ui`-style Airflow (``LocalAirflow``) on a fresh ``home``, with
    ``env`` added to theirs, started and ready (the DAG parsed; unpaused if ``unpause``); stopped
    afterwards. Yields (local, api)."""
    port = free_port()
    airflow_home.init(home, parallelism=parallelism, port=port, quiet=True)
    local = airflow_home.LocalAirflow(home, port, parallelism=parallelism)
    local.env = {k: v for k, v in local.env.items() if not k.startswith(("AIRFLOW_CONN_", "LOTTERY_TEST_AIRFLOW"))}
    local.env.update(env or {})
    local.start(*components)
    try:
        api = local.api()
        dag = api.wait_ready(local.supervisor)
        if unpause and dag.get("is_paused"):
            api.patch(f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        yield local, api
    finally:
        local.stop()


def make_run_command(home: Path, conf: dict, *, poll: int) -> tuple[list[str], dict[str, str]]:
    """What `make run` runs (``python -m lottery.deploy.run``) on ``home``, with its own Airflow and
    its own Keras backend; the test's tmp_path (``home``'s parent) is an allowed artifact root."""
    env = without_test_airflow(os.environ)
    env.pop("KERAS_BACKEND", None)  # make run's own choice (JAX where installed), not the test session's
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # make run's own cache in its home, not the test session's
    env.setdefault("LOTTERY_ALLOWED_ARTIFACT_ROOTS", str(home.parent))
    cmd = [sys.executable, "-m", "lottery.deploy.run", "--home", str(home), "--parallelism", "2", "--poll", str(poll),
           "--conf", json.dumps(conf)]
    return cmd, env


def make_run(home: Path, conf: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd, env = make_run_command(home, conf, poll=2)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start_make_run(home: Path, conf: dict, out: Path) -> subprocess.Popen:
    """`make run` in the background, its output (stdout and stderr) in ``out``."""
    cmd, env = make_run_command(home, conf, poll=1)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out.open("w"), stderr=subprocess.STDOUT)


# ---- the loopback cluster (make cluster-up's processes on this machine) ----------------------------
PG_URL = "postgresql://postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379"


def require_cluster_services() -> None:
    """The loopback cluster's PostgreSQL (trust auth) and Redis answer, else the test fails saying which."""
    from lottery.deploy.databases import pg_connect, redis_client

    try:
        pg_connect(PG_URL).close()
    except Exception as exc:
        pytest.fail(f"the cluster test needs PostgreSQL at {PG_URL} (trust auth): {exc}")
    try:
        r = redis_client(REDIS_URL, 0)
        r.ping()
        r.close()
    except Exception as exc:
        pytest.fail(f"the cluster test needs Redis at {REDIS_URL}: {exc}")


def cluster_databases() -> set[str]:
    """The databases of the cluster's PostgreSQL."""
    from lottery.deploy.databases import pg_connect

    conn = pg_connect(PG_URL)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def cluster_diagnosis(cluster, api=None, run_id: str | None = None) -> str:
    """For a failure message: the run's task instances (with the failed ones' errors) and the last
    lines of every component's log."""
    lines = []
    if api is not None and run_id:
        for t in api.task_instances(run_id):
            lines.append(f"  {t['task_id']}[{t.get('map_index')}]: {t.get('state')} queue={t.get('queue')} host={t.get('hostname')}")
            if t.get("state") == "failed":
                lines.append(f"    {api.task_error(run_id, t)}")
    lines.append(cluster.supervisor.tails(12))
    return "\n".join(lines)


@contextlib.contextmanager
def loopback_cluster(home: Path, **settings) -> Iterator:
    """A ``lottery.deploy.cluster.Cluster`` on ``home`` (artifacts beside it), on the local
    PostgreSQL and Redis, with ``settings`` (``cluster.Settings``) changed; started (the test fails
    with the components' logs if it does not come up). Afterwards stopped (``Cluster.stop``), and
    so is any worker the cluster CLI added or restarted (those are only in the cluster's record)."""
    from lottery.deploy import cluster as cl
    from lottery.deploy.supervisor import alive

    require_cluster_services()
    settings = {"artifact_root": home.parent / "artifacts", "pg_url": PG_URL, "redis_url": REDIS_URL,
                "default_concurrency": 2, "gpu_threads": 1, "triggerer": False, **settings}
    cluster = cl.Cluster(cl.Settings(home=home, **settings))
    try:
        try:
            cluster.start(timeout=600)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"the cluster did not come up: {exc}\n{cluster_diagnosis(cluster)}")
        yield cluster
    finally:
        record = cl.load_state(home)
        cluster.stop(drop=True)
        if record is not None and any(alive(pid, record.started.get(n, 0.0)) for n, pid in record.pids.items()):
            cl.down(home, record, drop=True)


def finished_run(api, run_id: str, timeout: float, *, interval: float = 5.0, supervisor=None,
                 diagnose: Callable[[], str] | None = None) -> dict:
    """The DAG run ``run_id`` (REST API) once it has succeeded or failed."""
    def finished() -> dict | None:
        status, run = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        assert status == 200, run
        return run if run["state"] in ("success", "failed") else None

    return wait_for(finished, timeout, f"DAG run {run_id} to end", interval=interval, state=diagnose, supervisor=supervisor)


# ---- waiting --------------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], T], timeout: float = 15.0, what: str = "a condition", *, interval: float = 0.5,
             state: Callable[[], object] | None = None, supervisor=None) -> T:
    """The first true value of ``predicate()``, polled every ``interval`` s. After ``timeout`` s the
    test fails, naming ``what`` it waited for and the last state (``state()``, else the last value);
    with a ``Supervisor``, as soon as one of its components died (it restarts those it should)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if supervisor is not None:
            supervisor.watch()
            if supervisor.dead():
                pytest.fail(f"while waiting for {what}: component died: {', '.join(supervisor.dead())}; "
                            f"last state: {state() if state is not None else value!r}"[-6000:])
        if time.monotonic() >= deadline:
            last = state() if state is not None else value
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last state: {last!r}"[-6000:])
        time.sleep(interval)


# ---- killed processes -----------------------------------------------------------------------------
def kill_tree(pid: int) -> None:
    """SIGKILL a component and every process it started (their own process groups included), as
    losing its machine or container does."""
    import psutil

    leader = psutil.Process(pid)
    for p in [leader, *leader.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def listening(procs) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket of ``procs`` (psutil processes)."""
    import psutil

    names = {}
    for p in procs:
        try:
            names[p.pid] = " ".join(p.cmdline())[:80]
        except psutil.Error:
            pass
    return [(c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in names]


def kill_at(cmd: list[str], env: Mapping[str, str], checkpoint: Path, *paths: Path, timeout: float = 600) -> None:
    """Start ``cmd`` (``python -m MODULE ...``), held for good once it has written ``checkpoint``
    (tests/stop_at.py), and SIGKILL it there, once ``paths`` exist too (or it ended, or time ran out)."""
    python, flag, *module = cmd
    assert flag == "-m", cmd
    proc = subprocess.Popen([python, "-m", "tests.stop_at", str(checkpoint), *module], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or all(p.exists() for p in (checkpoint, *paths)), timeout,
                 f"{checkpoint} written", interval=0.05)
    finally:
        proc.kill()
        proc.wait()


# ---- Airflow's task logs --------------------------------------------------------------------------
def log_events(log: str) -> list[dict]:
    """The events of an Airflow task log (one JSON object a line; other lines are skipped)."""
    out = []
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def event_time(event: dict) -> float:
    """An event's timestamp, in epoch seconds."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
