"""spark_jobs/preprocess_images.py against a real Spark standalone cluster on 127.0.0.1.

A master and a worker (2 cores, 1 GiB) are started from the installed pyspark with
`spark-class org.apache.spark.deploy.{master.Master,worker.Worker}` on random free ports, the job
is submitted with `--master spark://127.0.0.1:PORT` (input and output on a shared local path),
and the processes are always stopped by the fixture's finalizer.

A lost cluster: a worker SIGKILLed with its executors (mid-job, then before the DAG's preprocess
task) and a master with nothing listening on its port must fail the job and the task within their
bounds, naming the cause, with the data locks free; the task succeeds once a worker is back.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lottery.data import read_manifest
from lottery.deploy.cluster import SPARK_MASTER_READY, SPARK_WORKER_READY, spark_master_argv, spark_worker_argv
from lottery.deploy.supervisor import free_port
from lottery.locks import lock_path, wait_lock
from tests.test_spark_preprocess import (JOB, ROOT, check, check_fashion_mnist_output, fashion_mnist_root,
                                         leftovers, spark_env, spark_submit, spark_submit_cmd)
from spark_jobs.preprocess.cluster import EXECUTOR_TIMEOUT_ENV
from spark_jobs.preprocess.errors import EXIT_CLUSTER, ClusterError
from spark_jobs.preprocess.spark import JVM_OPTIONS, build_py_files
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    def logged() -> bool:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text not in content and proc.poll() is not None:
            pytest.fail(f"{log.name}: process exited with {proc.returncode} before '{text}':\n{content[-4000:]}")
        return text in content
    wait_for(logged, timeout, f"'{text}' in {log.name}",
             state=lambda: log.read_text(errors="replace")[-4000:] if log.exists() else "")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started and everything in its process group (its executors)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Standalone:
    """A standalone master and its workers, started from the venv's pyspark on 127.0.0.1 and free
    ports, each in its own process group (with the executors it starts); `stop` ends them all."""

    def __init__(self, d: Path):
        self.d = d
        self.env = spark_env()
        self.env["SPARK_LOG_DIR"] = str(d / "logs")
        self.env["SPARK_WORKER_DIR"] = str(d / "work")
        self.env["SPARK_NO_DAEMONIZE"] = "1"
        self.env["SPARK_DAEMON_JAVA_OPTS"] = JVM_OPTIONS   # master and worker JVMs: start-up CPU matters here
        self.url = ""
        self.started: list[tuple[subprocess.Popen, object]] = []

    def _start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.d / f"{name}.log"
        f = open(log, "w")
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                cwd=str(self.d), start_new_session=True)
        self.started.append((proc, f))
        return proc, log

    def master(self) -> str:
        port = free_port()
        self.url = f"spark://127.0.0.1:{port}"
        master, mlog = self._start("master", spark_master_argv(port, free_port()))
        _wait_for(mlog, SPARK_MASTER_READY, master)
        return self.url

    def worker(self) -> subprocess.Popen:
        """A worker (2 cores, 1 GiB), once the master has registered it."""
        name = f"worker-{len(self.started)}"
        worker, wlog = self._start(name, spark_worker_argv(self.url, cores=2, memory="1g", work_dir=self.d / "work"))
        _wait_for(wlog, SPARK_WORKER_READY, worker)
        return worker

    def stop(self) -> None:
        for proc, f in reversed(self.started):
            _stop(proc)
            f.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(master URL, work dir) of a standalone master + one worker, stopped at the end."""
    d = tmp_path_factory.mktemp("spark_cluster")
    spark = Standalone(d)
    try:
        url = spark.master()
        spark.worker()
        yield url, d
    finally:
        spark.stop()


CLUSTER_CONF = ("--conf", "spark.executor.memory=512m", "--conf", "spark.cores.max=2",
                "--conf", "spark.executor.cores=2")


def test_job_runs_unchanged_on_a_standalone_cluster(cluster, tmp_path):
    url, d = cluster
    root = fashion_mnist_root(tmp_path, limit=60)

    # 1. the job ships `lottery` and `spark_jobs` itself (a zip built on the driver, sc.addPyFile)
    out = tmp_path / "cluster_data"
    proc = check(spark_submit("--input", root, "--output", out, "--num-shards", 2, master=url, extra=CLUSTER_CONF))
    assert f"master {url}" in proc.output and "shipped lottery.zip" in proc.output
    manifest = check_fashion_mnist_output(out, limit=60)
    assert manifest["spark"]["master"] == url
    assert leftovers(out) == []
    # the work really ran in executors launched by the worker
    assert any((d / "work").glob("app-*/*/stderr"))

    # 2. as Airflow's SparkSubmitOperator runs it: --py-files given by the caller
    zpath = build_py_files(tmp_path / "lottery.zip")
    out2 = tmp_path / "cluster_data_pyfiles"
    proc = check(spark_submit("--input", root, "--output", out2, "--num-shards", 2, master=url,
                              extra=(*CLUSTER_CONF, "--py-files", str(zpath))))
    assert "given with --py-files" in proc.output
    again = read_manifest(out2)

    # 3. the same bytes as local mode: shard assignment and order do not depend on the cluster
    out3 = tmp_path / "local_data"
    check(spark_submit("--input", root, "--output", out3, "--num-shards", 2))
    local = read_manifest(out3)
    assert again["splits"] == manifest["splits"] == local["splits"]
    assert again["dataset_id"] == manifest["dataset_id"] == local["dataset_id"]


# ---- a lost worker or master never hangs preprocess -------------------------------------------------
BOUND_S = 20      # LOTTERY_SPARK_EXECUTOR_TIMEOUT here (120 by default): the test waits it out twice
FM_SMALL = 30     # images per split: the job's own work is not what is tested
SPARK_ENV_KEYS = ("PATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_LOCAL_IP")


def _operator(root: Path, out: Path):
    """The DAG's preprocess task on the connection spark_default (AIRFLOW_CONN_SPARK_DEFAULT)."""
    from lottery.dag.preprocess import PreprocessOperator

    env = spark_env()
    conf = {k: v for k, _, v in (c.partition("=") for c in CLUSTER_CONF[1::2])}
    conf.update({"spark.ui.enabled": "false", "spark.driver.memory": "1g"})   # the JVM options: the operator's
    return PreprocessOperator(task_id="preprocess", conn_id="spark_default", application=str(JOB),
                              application_args=["--input", str(root), "--output", str(out), "--num-shards", "2"],
                              env_vars={k: env[k] for k in SPARK_ENV_KEYS}, conf=conf)


def _use_master(monkeypatch, url: str) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": url}))


def _assert_locks_free_and_nothing_written(out: Path) -> None:
    """The task's lock and the job's own are free at once (a waiter gets them without waiting)."""
    for path in (lock_path(out, "task.lock"), lock_path(out)):
        with wait_lock(path, "the test", timeout=0) as waited:
            assert waited == 0.0
    assert not out.exists() and leftovers(out) == []


def _kill_worker_once_the_job_has_executors(url: str, root: Path, out: Path,
                                            worker: subprocess.Popen) -> tuple[str, float]:
    """spark-submit by hand; SIGKILL the worker (and its executors) once the job logs its session;
    (the job's output, seconds from the kill to its exit)."""
    job = subprocess.Popen(spark_submit_cmd("--input", root, "--output", out, "--num-shards", 2, master=url,
                                            extra=CLUSTER_CONF),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=spark_env(),
                           cwd=str(ROOT), start_new_session=True)
    watchdog = threading.Timer(300, lambda: os.killpg(job.pid, signal.SIGKILL))  # a hang fails, not blocks
    watchdog.start()
    lines, killed = [], None
    try:
        for line in job.stdout:
            lines.append(line)
            if killed is None and "session ready" in line:
                os.killpg(worker.pid, signal.SIGKILL)
                killed = time.monotonic()
        rc = job.wait()
    finally:
        watchdog.cancel()
    output = "".join(lines)
    assert killed is not None, output[-4000:]
    assert rc == EXIT_CLUSTER, f"exit {rc}:\n{output[-4000:]}"
    return output, time.monotonic() - killed


def test_a_lost_worker_fails_preprocess_within_the_bound_and_the_retry_succeeds(tmp_path, monkeypatch):
    """A worker SIGKILLed with its executors, during a job and then before the DAG's preprocess task
    (the master still counts it): each fails within the executor bound naming the cause, writes
    nothing and leaves the locks free; with a worker registered again the task writes the data."""
    root = fashion_mnist_root(tmp_path, limit=FM_SMALL)
    out = tmp_path / "data"
    (tmp_path / "spark").mkdir()
    monkeypatch.setenv(EXECUTOR_TIMEOUT_ENV, str(BOUND_S))
    spark = Standalone(tmp_path / "spark")
    try:
        url = spark.master()
        _use_master(monkeypatch, url)
        output, after_kill = _kill_worker_once_the_job_has_executors(url, root, out, spark.worker())
        assert f"no Spark executor registered for {BOUND_S} s after the last one was lost (master {url})" in output
        print(f"job failed {after_kill:.1f} s after its worker was killed")
        assert after_kill < BOUND_S + 30
        _assert_locks_free_and_nothing_written(out)

        task = _operator(root, out)
        started = time.monotonic()
        with pytest.raises(ClusterError, match=rf"^no Spark executor registered within {BOUND_S} s "
                                               rf"\(master {re.escape(url)}\); is a Spark worker running"):
            task.execute({"run_id": "test"})
        failed_after = time.monotonic() - started
        print(f"preprocess task failed {failed_after:.1f} s after it started (bound {BOUND_S} s)")
        assert failed_after < BOUND_S + 60   # spark-submit's JVM and the session: 18 s on 2 busy cores
        _assert_locks_free_and_nothing_written(out)

        spark.worker()
        _operator(root, out).execute({"run_id": "test"})   # as the task's retry runs it
        assert read_manifest(out)["spark"]["master"] == url
        check_fashion_mnist_output(out, limit=FM_SMALL)
    finally:
        spark.stop()


def test_an_unreachable_master_fails_preprocess_at_once_naming_it(tmp_path, monkeypatch):
    """Nothing listens on the master's port: the task fails before starting spark-submit, and the
    job run by hand before creating its session (Spark alone retries for about a minute)."""
    root = fashion_mnist_root(tmp_path, limit=FM_SMALL)
    out = tmp_path / "data"
    url = f"spark://127.0.0.1:{free_port()}"
    _use_master(monkeypatch, url)
    task = _operator(root, out)
    started = time.monotonic()
    with pytest.raises(ClusterError, match=rf"^Spark master {re.escape(url)} unreachable: connection refused"):
        task.execute({"run_id": "test"})
    failed_after = time.monotonic() - started
    print(f"preprocess task failed {failed_after:.2f} s after it started")
    assert failed_after < 5
    assert task._hook._submit_sp is None   # no spark-submit was started
    _assert_locks_free_and_nothing_written(out)

    started = time.monotonic()
    proc = check(spark_submit("--input", root, "--output", out, master=url), rc=EXIT_CLUSTER)
    print(f"spark-submit by hand exited {time.monotonic() - started:.1f} s after it started")
    assert f"Spark master {url} unreachable: connection refused" in proc.output
    assert "session ready" not in proc.output
    _assert_locks_free_and_nothing_written(out)
