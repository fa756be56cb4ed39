"""One process supervisor for ``make run``, ``make ui`` and ``make cluster-up``.

Each component is a child process in a process group of its own (stopping it stops what it
forked), with its output in ``<log_dir>/<name>.log``. Waits fail early, naming the log, when a
component dies. Airflow puts every task process in a group of its own, which a signal to the
component's group misses: ``watch()`` notes every process below each component and ``stop()``
signals those too. A component started with ``restart=True`` is restarted when it dies, up to
``restart_limit`` times within ``restart_window`` seconds; what a dead one left running (a
LocalExecutor worker supervising its task) is kept until idle, so no training is lost. A pid is
only signalled while its start time matches, so a reused pid is never hit.
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


RESTART_LIMIT = 3  # restarts of one component ...
RESTART_WINDOW_S = 600.0  # ... within this many seconds, then give up


class ComponentFailed(RuntimeError):
    """A component died more often than its restart limit allows (or may not be restarted)."""


def alive(pid: int, created: float = 0.0) -> bool:
    """The process we started is still there (not a reused pid, not a zombie waiting to be reaped)."""
    try:
        import psutil

        p = psutil.Process(pid)
        return (not created or abs(p.create_time() - created) < 1.0) and p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


class Supervisor:
    """Start, watch, wait for and stop components. ``on_change`` is called after each start (the
    caller records the pids); ``say`` prints a restart line."""

    def __init__(self, log_dir: Path, *, on_change: Callable[[], None] | None = None,
                 restart_limit: int = RESTART_LIMIT, restart_window: float = RESTART_WINDOW_S,
                 say: Callable[[str], None] | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.on_change = on_change
        self.restart_limit, self.restart_window = restart_limit, restart_window
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.restartable: set[str] = set()
        self.restarts: dict[str, list[float]] = {}  # monotonic times of each component's restarts
        self.below: dict[str, dict[int, float]] = {}  # last seen processes under each component: pid -> start time
        self.leftovers: dict[int, float] = {}  # still running under a component that died
        self.idle_seen: set[int] = set()  # leftovers seen idle at the last watch

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, argv: list[str], env: dict[str, str], *, restart: bool = False) -> subprocess.Popen:
        self.commands[name] = (argv, env)
        if restart:
            self.restartable.add(name)
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=REPO)
        self.procs[name] = proc
        self.started[name] = create_time(proc.pid)
        if self.on_change:
            self.on_change()
        return proc

    def watch(self) -> None:
        """Note the processes below each component; start a dead restartable component again
        (``ComponentFailed`` past its limit); stop what dead components left once it is idle."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                self.below[name] = descendants(proc.pid)
            elif name in self.restartable:
                self._restart(name, proc.returncode)
        self._stop_idle_leftovers()

    def _restart(self, name: str, code: int) -> None:
        self.leftovers.update({pid: t for pid, t in self.below.pop(name, {}).items() if alive(pid, t)})
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < self.restart_window]
        if len(recent) >= self.restart_limit:
            self.restartable.discard(name)  # dead() names it from now on
            raise ComponentFailed(
                f"{name} died (exit {code}) {len(recent) + 1} times within {self.restart_window / 60:.0f} min; "
                f"not restarting it again; log: {self.log(name)}")
        self.restarts[name] = recent + [now]
        self.say(f"{name} died (exit {code}), restarting it ({len(recent) + 1}/{self.restart_limit}); log: {self.log(name)}")
        with open(self.log(name), "a") as log:
            log.write(f"\n---- {name} died (exit {code}); restarted by lottery.deploy.supervisor ----\n")
        self.start(name, *self.commands[name], restart=True)

    def _stop_idle_leftovers(self) -> None:
        """A LocalExecutor worker of a dead scheduler takes what is left in that scheduler's queue,
        then waits forever for work that cannot come: stop it once idle (its title says ``<idle>``,
        nothing below it) at two watches in a row. SIGKILL: such a worker ignores SIGTERM (the
        scheduler's handler, inherited, leaves it to the dead scheduler)."""
        for pid, created in list(self.leftovers.items()):
            try:
                import psutil

                p = psutil.Process(pid)
                if abs(p.create_time() - created) >= 1.0 or p.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(pid)
                idle = "<idle>" in " ".join(p.cmdline()) and not p.children()
                if not idle:
                    self.idle_seen.discard(pid)
                elif pid in self.idle_seen:
                    p.kill()
                else:
                    self.idle_seen.add(pid)
            except Exception:  # gone (or not ours any more)
                del self.leftovers[pid]
                self.idle_seen.discard(pid)

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
        """Stop every component, what each started (task processes included) and what dead ones left."""
        extra = dict(self.leftovers)
        for below in self.below.values():
            extra.update(below)
        stop_groups(self.pids, self.started, procs=self.procs, timeout=timeout, extra=extra)
        self.leftovers.clear()


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 1.0, *, what: str,
               supervisor: Supervisor | None = None) -> T:
    """The first true value of ``predicate()``; RuntimeError as soon as a component died,
    TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if supervisor is not None:
            supervisor.watch()
        if supervisor is not None and supervisor.dead():
            raise RuntimeError(f"while waiting for {what}: component died: {', '.join(supervisor.dead())}")
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def descendants(pid: int) -> dict[int, float]:
    """Every process below ``pid`` (pid -> start time), whatever process group it moved to."""
    try:
        import psutil

        found = {}
        for child in psutil.Process(pid).children(recursive=True):
            try:
                found[child.pid] = child.create_time()
            except psutil.Error:
                pass
        return found
    except Exception:
        return {}


def stop_groups(pids: dict[str, int], started: dict[str, float], *,
                procs: dict[str, subprocess.Popen] | None = None, timeout: float = 30,
                extra: dict[int, float] | None = None) -> None:
    """SIGTERM to each live process group (workers first, Spark last), to every process below them
    that left the group and to ``extra`` (pid -> start time), then SIGKILL to what is left.
    ``procs``: the children of this process, if any."""
    procs = procs or {}

    def running(name: str) -> bool:
        if name in procs:
            return procs[name].poll() is None
        return alive(pids[name], started.get(name, 0.0))

    order = sorted(pids, key=lambda n: (not n.startswith(("gpu-worker", "airflow-worker")), n.startswith("spark")))
    live = [name for name in order if running(name)]
    others = dict(extra or {})
    for name in live:  # seen before any signal: once a parent is gone its children are out of reach
        others.update(descendants(pids[name]))
    for name in live:
        _killpg(pids[name], signal.SIGTERM)
    for pid, created in others.items():
        _kill(pid, created, signal.SIGTERM)
    end = time.monotonic() + timeout
    for name in live:
        while time.monotonic() < end and running(name):
            time.sleep(0.2)
    while time.monotonic() < end and any(alive(pid, created) for pid, created in others.items()):
        time.sleep(0.2)
    for name in order:
        if name in live or name in procs:  # our children: even when the leader died before
            _killpg(pids[name], signal.SIGKILL)  # stragglers in the group
    for pid, created in others.items():
        _kill(pid, created, signal.SIGKILL)
    for name in procs:
        try:
            procs[name].wait(10)
        except subprocess.TimeoutExpired:
            pass


def _kill(pid: int, created: float, sig: int) -> None:
    """Signal one process, only while it is the one we saw (a reused pid is left alone)."""
    if alive(pid, created):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
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
