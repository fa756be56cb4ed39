"""One process supervisor for ``make run``, ``make ui`` and ``make cluster-up``.

Each component is a child process in a process group of its own (so that stopping it also stops
what it forked: LocalExecutor workers, Celery pool processes, task processes, Spark executors),
with its output in ``<log_dir>/<name>.log``. Waits fail early, naming the log, when a component
dies. ``stop_groups`` also stops components started by an earlier process (``make cluster-down``):
a pid is only signalled while its start time matches, so a reused pid is never hit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from lottery.deploy.constants import REPO

T = TypeVar("T")


def venv_bin() -> Path:
    """The directory of the running Python (the project venv under `make`): airflow, spark-class."""
    return Path(sys.executable).parent


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_time(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return 0.0


def alive(pid: int, created: float = 0.0) -> bool:
    """The process we started is still there (not a reused pid)."""
    try:
        import psutil

        p = psutil.Process(pid)
        return not created or abs(p.create_time() - created) < 1.0
    except Exception:
        return False


class Supervisor:
    """Start components, watch them, wait for them, stop them all. ``on_change`` is called after
    each start (the caller records the pids: ``components.json``, ``cluster.json``)."""

    def __init__(self, log_dir: Path, *, on_change: Callable[[], None] | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.on_change = on_change

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=REPO)
        self.procs[name] = proc
        self.started[name] = create_time(proc.pid)
        if self.on_change:
            self.on_change()
        return proc

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode}, see {self.log(n)})" for n, p in self.procs.items() if p.poll() is not None]

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def tails(self, lines: int = 15) -> str:
        """The last lines of every component's log, for an error message."""
        return "\n".join(f"--- {name} (last lines) ---\n{self.tail(name, lines)}" for name in self.procs)

    def wait_until(self, predicate: Callable[[], T], timeout: float, *, what: str, interval: float = 1.0) -> T:
        return wait_until(predicate, timeout, interval, what=what, supervisor=self)

    def wait_log(self, name: str, text: str, deadline: float) -> None:
        """Until ``text`` appears in the component's log (a worker's " ready.", Spark's registration)."""
        def seen() -> bool:
            return text in self.log(name).read_text(errors="replace")

        self.wait_until(seen, max(1.0, deadline - time.monotonic()), interval=0.5, what=f"{name} ({text!r} in its log)")

    def stop(self, timeout: float = 30) -> None:
        stop_groups(self.pids, self.started, procs=self.procs, timeout=timeout)


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 1.0, *, what: str,
               supervisor: Supervisor | None = None) -> T:
    """The first true value of ``predicate()``; RuntimeError as soon as a component died,
    TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if supervisor is not None and supervisor.dead():
            raise RuntimeError(f"while waiting for {what}: component died: {', '.join(supervisor.dead())}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_groups(pids: dict[str, int], started: dict[str, float], *,
                procs: dict[str, subprocess.Popen] | None = None, timeout: float = 30) -> None:
    """SIGTERM to each live process group (workers first, Spark last), then SIGKILL to what is left
    in the groups (task processes, executors). ``procs``: the children of this process, if any."""
    procs = procs or {}

    def running(name: str) -> bool:
        if name in procs:
            return procs[name].poll() is None
        return alive(pids[name], started.get(name, 0.0))

    order = sorted(pids, key=lambda n: (not n.startswith(("gpu-worker", "airflow-worker")), n.startswith("spark")))
    live = [name for name in order if running(name)]
    for name in live:
        _killpg(pids[name], signal.SIGTERM)
    end = time.monotonic() + timeout
    for name in live:
        while time.monotonic() < end and running(name):
            time.sleep(0.2)
    for name in order:
        if name in live or name in procs:  # our children: even when the leader died before
            _killpg(pids[name], signal.SIGKILL)  # stragglers in the group
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


def raise_keyboard_interrupt_on_sigterm() -> None:
    """`kill` and Ctrl-C take the same path: the ``finally`` that stops every component."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
