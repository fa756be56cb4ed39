"""The bounds that keep a lost Spark cluster from hanging the DAG's preprocess task, checked without
a cluster: the task's execution_timeout, the executor bound's setting, the master check against a
port nothing listens on, and the job's own error as the task's error. A real master and worker,
lost: tests/test_spark_cluster.py.
"""
import json
import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from tests.helpers import use_test_home  # noqa: E402  (before airflow is imported)

use_test_home()

from lottery.deploy.constants import PREPROCESS_TIMEOUT  # noqa: E402
from lottery.deploy.supervisor import free_port  # noqa: E402
from spark_jobs.preprocess.cluster import (EXECUTOR_TIMEOUT_ENV, check_master, executor_timeout,  # noqa: E402
                                           master_addresses)
from spark_jobs.preprocess.errors import EXIT_CLUSTER, EXIT_USAGE, ClusterError, InputError  # noqa: E402


def test_preprocess_has_an_execution_timeout():
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["lottery_ticket"]
    assert dag.get_task("preprocess").execution_timeout == PREPROCESS_TIMEOUT == timedelta(hours=6)


def test_the_preprocess_timeout_is_a_setting():
    code = "from lottery.deploy.constants import PREPROCESS_TIMEOUT as t; print(t.total_seconds())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, "LOTTERY_PREPROCESS_TIMEOUT_S": "600"})
    assert out.stdout.strip() == "600.0"


def test_the_executor_bound_is_a_setting(monkeypatch):
    monkeypatch.delenv(EXECUTOR_TIMEOUT_ENV, raising=False)
    assert executor_timeout() == 120.0
    monkeypatch.setenv(EXECUTOR_TIMEOUT_ENV, "20")
    assert executor_timeout() == 20.0
    assert executor_timeout(5) == 5.0   # --executor-timeout wins
    monkeypatch.setenv(EXECUTOR_TIMEOUT_ENV, "inf")
    assert math.isinf(executor_timeout())
    monkeypatch.setenv(EXECUTOR_TIMEOUT_ENV, "soon")
    with pytest.raises(InputError, match=f"^{EXECUTOR_TIMEOUT_ENV}='soon': expected a number of seconds$"):
        executor_timeout()
    monkeypatch.setenv(EXECUTOR_TIMEOUT_ENV, "0")
    with pytest.raises(InputError, match=f"^{EXECUTOR_TIMEOUT_ENV} must be a positive number of seconds"):
        executor_timeout()
    with pytest.raises(InputError, match="^--executor-timeout must be a positive number of seconds"):
        executor_timeout(-1)


def test_the_masters_checked_and_the_ones_that_are_not():
    assert master_addresses("spark://127.0.0.1:7077") == [("127.0.0.1", 7077)]
    assert master_addresses("spark://m1:7077,m2:7078") == [("m1", 7077), ("m2", 7078)]   # standby masters
    assert master_addresses("spark://[::1]:7077") == [("::1", 7077)]
    assert master_addresses("spark://master") == [("master", 7077)]
    for master in ("local[*]", "local[2]", "local", "local-cluster[2,1,1024]", "yarn", "k8s://https://k:443"):
        assert master_addresses(master) == []
        check_master(master)   # nothing to connect to: no error


def test_a_master_with_nothing_listening_is_named_unreachable():
    refused = f"spark://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=rf"^Spark master {refused} unreachable: connection refused; "
                                           r"is the master running, and is this its address\?$"):
        check_master(refused)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_master(f"spark://127.0.0.1:{port}")
        check_master(f"spark://127.0.0.1:{free_port()},127.0.0.1:{port}")   # one standby master answers is enough


def test_the_jobs_error_becomes_the_tasks_error(tmp_path):
    from lottery.dag.preprocess import SparkJobError, job_error

    path = tmp_path / "error.json"
    assert job_error(path) is None   # spark-submit failed before the job ran: the hook's own error stands
    path.write_text("{not json")
    assert job_error(path) is None
    cause = "no Spark executor registered within 120 s (master spark://m:7077); is a Spark worker running …"
    path.write_text(json.dumps({"error": "ClusterError", "message": cause, "exit_status": EXIT_CLUSTER}))
    error = job_error(path)
    assert type(error) is ClusterError and str(error) == cause
    unusable = "3 of 60 input files (5.0%) are unusable"
    path.write_text(json.dumps({"error": "DataError", "message": unusable, "exit_status": 1}))
    error = job_error(path)
    assert type(error) is SparkJobError and str(error) == f"the Spark job failed (exit 1): {unusable}"


def test_a_bad_bound_fails_the_job_before_spark_and_is_written_for_the_task(tmp_path, monkeypatch):
    from lottery.dag.preprocess import job_error
    from spark_jobs.preprocess.job import main

    (tmp_path / "images" / "train" / "a").mkdir(parents=True)
    error_file = tmp_path / "error.json"
    monkeypatch.setenv(EXECUTOR_TIMEOUT_ENV, "two minutes")
    status = main(["--input", str(tmp_path / "images"), "--output", str(tmp_path / "data"),
                   "--error-file", str(error_file)])
    assert status == EXIT_USAGE and not (tmp_path / "data").exists()
    record = json.loads(error_file.read_text())
    assert record == {"error": "InputError", "exit_status": EXIT_USAGE,
                      "message": f"{EXECUTOR_TIMEOUT_ENV}='two minutes': expected a number of seconds"}
    assert str(job_error(error_file)) == (f"the Spark job failed (exit 2): {EXECUTOR_TIMEOUT_ENV}='two minutes': "
                                          f"expected a number of seconds")
