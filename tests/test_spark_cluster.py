"""spark_jobs/preprocess_images.py against a real Spark standalone cluster on 127.0.0.1.

A master and a worker (2 cores, 1 GiB) are started from the installed pyspark with
`spark-class org.apache.spark.deploy.{master.Master,worker.Worker}` on random free ports, the job
is submitted with `--master spark://127.0.0.1:PORT` (input and output on a shared local path),
and the processes are always stopped by the fixture's finalizer.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lottery.data import read_manifest
from tests.test_spark_preprocess import (FAST_JVM, check, check_fashion_mnist_output, fashion_mnist_root,
                                         leftovers, spark_env, spark_submit)
from spark_jobs.preprocess.spark import build_py_files
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(master URL, work dir) of a standalone master + one worker, stopped at the end."""
    d = tmp_path_factory.mktemp("spark_cluster")
    env = spark_env()
    env["SPARK_LOG_DIR"] = str(d / "logs")
    env["SPARK_WORKER_DIR"] = str(d / "work")
    env["SPARK_NO_DAEMONIZE"] = "1"
    env["SPARK_DAEMON_JAVA_OPTS"] = FAST_JVM   # master and worker JVMs: start-up CPU matters here
    spark_class = str(Path(sys.executable).parent / "spark-class")
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    started: list[tuple[subprocess.Popen, object]] = []

    def start(name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = d / f"{name}.log"
        f = open(log, "w")
        proc = subprocess.Popen([spark_class, *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=str(d), start_new_session=True)
        started.append((proc, f))
        return proc, log

    try:
        master, mlog = start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                        "--port", str(port), "--webui-port", str(_free_port())])
        _wait_for(mlog, "I have been elected leader", master)
        worker, wlog = start("worker", ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                        "--port", str(_free_port()), "--webui-port", str(_free_port()),
                                        "--cores", "2", "--memory", "1g", "--work-dir", str(d / "work"), url])
        _wait_for(wlog, "Successfully registered with master", worker)
        yield url, d
    finally:
        for proc, f in reversed(started):
            _stop(proc)
            f.close()


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
