"""The cluster under the job: a master that answers, and executors that register and stay.

Left to itself, Spark retries an unreachable standalone master for about a minute before it gives
up, and a job with no executor waits for one forever ("Initial job has not accepted any
resources"), holding the output's lock. So, on a non-local master:

* before the session, `check_master`: a TCP connect to each ``spark://`` master address;
* after it, `wait_for_executors`: at least one executor within the bound (``--executor-timeout``,
  else ``$LOTTERY_SPARK_EXECUTOR_TIMEOUT``, else 120 s), unless executors are allocated dynamically
  (they are only requested once a Spark job waits for them);
* while the job runs, `ExecutorWatch`: once a Spark job has waited as long without any executor
  (the last worker was lost), it cancels the job's Spark jobs and names the cause.

Each failure is a `ClusterError` (exit 3, nothing written). Local masters (``local``,
``local[N]``, ``local-cluster[...]``) are never checked. The DAG's preprocess task runs
`check_master` too, before it starts spark-submit.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from .errors import ClusterError, InputError

log = logging.getLogger("preprocess_images")

# How long the job waits for an executor (seconds); the env var is read by the driver, so it
# reaches a job started by the DAG through the worker's environment.
EXECUTOR_TIMEOUT_ENV = "LOTTERY_SPARK_EXECUTOR_TIMEOUT"
DEFAULT_EXECUTOR_TIMEOUT = 120.0
CONNECT_TIMEOUT_S = 5.0
DEFAULT_MASTER_PORT = 7077
POLL_S = 1.0
WORKER_HINT = "is a Spark worker running and registered with the master, with the cores and memory the job asks for?"


def executor_timeout(value: float | None = None) -> float:
    """The bound: ``value`` (``--executor-timeout``), else ``$LOTTERY_SPARK_EXECUTOR_TIMEOUT``, else
    120 s. Anything but a positive number of seconds (``inf``: no bound) is an `InputError`."""
    source = "--executor-timeout"
    if value is None:
        text = os.environ.get(EXECUTOR_TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_EXECUTOR_TIMEOUT
        source = EXECUTOR_TIMEOUT_ENV
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{EXECUTOR_TIMEOUT_ENV}={text!r}: expected a number of seconds") from None
    if not value > 0:
        raise InputError(f"{source} must be a positive number of seconds (inf: no bound), got {value:g}")
    return float(value)


def is_local(master: str) -> bool:
    return master.startswith("local")


def master_addresses(master: str) -> list[tuple[str, int]]:
    """(host, port) of each master of a ``spark://`` URL (``spark://h1:7077,h2:7077`` for standby
    masters); none for any other kind of master."""
    if not master.startswith("spark://"):
        return []
    addresses = []
    for part in master[len("spark://"):].split(","):
        host, sep, port = part.strip().rstrip("/").rpartition(":")
        if not sep or not port.isdigit():
            host, port = part.strip().rstrip("/"), str(DEFAULT_MASTER_PORT)
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def _reason(exc: OSError, timeout: float) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    return (exc.strerror or str(exc)).lower()


def check_master(master: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise `ClusterError` unless some master of ``master`` accepts a TCP connection (checked
    only for ``spark://`` masters: Spark itself would retry for about a minute)."""
    addresses = master_addresses(master)
    reasons = []
    for host, port in addresses:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except OSError as e:
            reasons.append(_reason(e, timeout) if len(addresses) == 1 else f"{host}:{port} {_reason(e, timeout)}")
    if reasons:
        raise ClusterError(f"Spark master {master} unreachable: {'; '.join(reasons)}; "
                           f"is the master running, and is this its address?")


def submitted_master() -> str:
    """The master spark-submit was given (``spark.master``), read before the session exists."""
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # else SparkConf() does not see spark-submit's settings yet
    return SparkConf().get("spark.master", "") or ""


def executor_count(sc) -> int:
    # One block manager per executor, plus the driver's own.
    return max(0, sc._jsc.sc().getExecutorMemoryStatus().size() - 1)


def dynamic_allocation(sc) -> bool:
    return (sc.getConf().get("spark.dynamicAllocation.enabled", "false") or "").strip().lower() == "true"


def _none_registered(timeout: float, master: str) -> str:
    return (f"no Spark executor registered within {timeout:g} s (master {master}); {WORKER_HINT} "
            f"(the bound: --executor-timeout or {EXECUTOR_TIMEOUT_ENV})")


def wait_for_executors(sc, timeout: float) -> float | None:
    """Wait until an executor has registered; the seconds waited (None on a local master, or with
    dynamic allocation: `ExecutorWatch` bounds that wait). Raises `ClusterError` after ``timeout``
    seconds, or when Spark gave up on the master."""
    master = sc.master
    if is_local(master) or dynamic_allocation(sc):
        return None
    started = time.monotonic()
    logged = False
    while executor_count(sc) < 1:
        if sc._jsc.sc().isStopped():
            raise ClusterError(f"the Spark context stopped before any executor registered (master {master}): "
                               f"the master refused or dropped the application; its log says why")
        if time.monotonic() - started >= timeout:
            raise ClusterError(_none_registered(timeout, master))
        if not logged:
            log.info("waiting up to %g s for a Spark executor to register (master %s)", timeout, master)
            logged = True
        time.sleep(POLL_S)
    return time.monotonic() - started


class ExecutorWatch(threading.Thread):
    """While the job runs on a non-local master: once a Spark job has waited ``timeout`` seconds
    without any executor registered, record why in ``cause`` and cancel the Spark jobs (every poll
    from then on, so a job submitted after the first cancel is cancelled too). Time without a
    running Spark job does not count: dynamically allocated executors leave when idle."""

    def __init__(self, sc, timeout: float):
        super().__init__(daemon=True, name="executor-watch")
        self.sc, self.timeout = sc, timeout
        self.cause: str | None = None
        self.seen = False
        self.done = threading.Event()

    def _check(self, since: float | None) -> float | None:
        if executor_count(self.sc) > 0:
            self.seen = True
            return None
        if self.cause is None and not self.sc.statusTracker().getActiveJobsIds():
            return None
        since = since or time.monotonic()
        if time.monotonic() - since >= self.timeout:
            if self.cause is None:
                self.cause = (f"no Spark executor registered for {self.timeout:g} s after the last one was lost "
                              f"(master {self.sc.master}): the job's Spark jobs were cancelled; {WORKER_HINT}"
                              if self.seen else _none_registered(self.timeout, self.sc.master))
                log.error("%s", self.cause)
            self.sc.cancelAllJobs()
        return since

    def run(self) -> None:
        since = None
        while not self.done.wait(POLL_S):
            try:
                since = self._check(since)
            except Exception:  # the context is being stopped: nothing left to watch
                return

    def __enter__(self) -> "ExecutorWatch":
        if not is_local(self.sc.master):
            self.seen = executor_count(self.sc) > 0  # now: an executor lost before the first poll was seen
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.is_alive():
            self.join(timeout=10)
