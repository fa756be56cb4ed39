"""One process supervisor for ``make run``, ``make ui`` and ``make cluster-up``.

Each component is a child process in a process group of its own (stopping it stops what it
forked), with its output in ``<log_dir>/<name>.log``. Waits fail early, naming the log, when a
component dies. Airflow puts every task process in a group of its own, which a signal to the
component's group misses: ``watch()`` notes every process below each component and ``stop()``
signals those too. A component started with ``restart=True`` is restarted when it dies, up to
``restart_limit`` times within ``restart_window`` seconds; what a dead one left running (a
LocalExecutor worker supervising its task) is kept until idle, so no training is lost, but its
helpers (forks still under its own command line) are stopped before it starts again. A pid is
only signalled while its start time matches, so a reused pid is never hit.

Nothing outlives its supervisor. Each component leads a session of its own, and what it starts
stays in that session (Airflow's task processes and PySpark's workers change only their process
group). A small reaper process, in a session of its own, learns each component's session through
a pipe whose write end only the supervisor has; when the supervisor ends, however it ends
(``kill -9`` included), the pipe closes and the reaper stops every process of those sessions, and
any other that carries the stack tag in its environment (``LOTTERY_STACK``: the home). The
supervisor holds ``supervisor.lock`` in its home while it runs, with the sessions recorded in it,
so the next supervisor of that home finds whatever an earlier one left (its reaper killed too) and
stops it, naming it (``claim``).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

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


# The environment variable every component (and so every process below it) carries: the stack tag.
STACK_ENV = "LOTTERY_STACK"
LOCK_FILE = "supervisor.lock"
SWEEP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this many seconds


class HomeBusy(RuntimeError):
    """Another live supervisor runs components on this home."""


def holder_pid(home: Path) -> int | None:
    """The pid of the live supervisor holding ``home/supervisor.lock``, or None when none does."""
    path = Path(home) / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                return int(json.loads(f.read() or "{}").get("pid", 0)) or -1
            except ValueError:
                return -1
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def stack_processes(tag: str, sessions: dict[int, float] | None = None) -> Iterator:
    """The live processes (psutil) of a stack: in one of its components' ``sessions`` (session id
    -> the leader's start time, so a reused id is not taken), or carrying the stack tag ``tag`` in
    their environment (a process that retitles itself overwrites it: the sessions find those).
    Never this process."""
    import psutil

    me, sessions = os.getpid(), dict(sessions or {})
    for sid, started in list(sessions.items()):  # a leader alive under another start time: the id was reused
        try:
            if abs(psutil.Process(sid).create_time() - started) >= 1.0:
                del sessions[sid]
        except psutil.Error:
            pass  # the leader is gone; its session's members were all created after it
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            sid = os.getsid(p.pid)
            if sid in sessions and p.create_time() >= sessions[sid] - 1.0:
                yield p
            elif p.environ().get(STACK_ENV) == tag:
                yield p
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue


def describe(p) -> str:
    try:
        return f"pid {p.pid} ({' '.join(' '.join(p.cmdline()).split())[:100] or p.name()})"  # a retitled one pads with spaces
    except Exception:
        return f"pid {p.pid}"


def sweep(tag: str, sessions: dict[int, float] | None = None, grace: float = SWEEP_GRACE_S) -> list[str]:
    """Stop every process of a stack (``stack_processes``): SIGTERM, then SIGKILL after ``grace``
    seconds. What it stopped, one description each."""
    import psutil

    found = list(stack_processes(tag, sessions))
    names = [describe(p) for p in found]
    for p in found:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(found, timeout=grace)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return names


def recorded_sessions(home: Path) -> dict[int, float]:
    """The component sessions the last supervisor of ``home`` recorded in its lock file."""
    try:
        record = json.loads((Path(home) / LOCK_FILE).read_text() or "{}")
        return {int(sid): float(t) for sid, t in record.get("sessions", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


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
                 say: Callable[[str], None] | None = None, home: Path | None = None, owner: bool = True):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # the home whose lock this supervisor holds (default: the log directory); its path is the
        # stack tag. ``owner=False``: a helper (the cluster CLI's ``restart-worker`` on a cluster
        # another process supervises) whose components join that stack without claiming the home.
        self.home = Path(home if home is not None else self.log_dir).resolve()
        self.tag = str(self.home)
        self.owner = owner
        self._lock = None  # the open supervisor.lock, held while components run
        self._lifeline: int | None = None  # write end of the reaper's pipe
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

    def claim(self) -> list[str]:
        """Hold ``home/supervisor.lock`` (``HomeBusy`` when another live supervisor does), stop what
        an earlier supervisor of this home left running (their descriptions), start the reaper.
        ``start`` claims on its first call."""
        if self._lock is not None:
            return []
        self.home.mkdir(parents=True, exist_ok=True)
        f = open(self.home / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise HomeBusy(f"another process (pid {holder_pid(self.home)}) supervises the components on {self.home}") from None
        self._lock = f
        left = sweep(self.tag, recorded_sessions(self.home))
        if left:
            self.say(f"stopped {len(left)} processes left running on {self.home} by an earlier supervisor: "
                     + "; ".join(left))
        self._sessions: dict[int, float] = {}
        self._record_sessions()
        self._start_reaper()
        return left

    def _record_sessions(self) -> None:
        self._lock.seek(0)
        self._lock.truncate(0)
        self._lock.write(json.dumps({"pid": os.getpid(), "sessions": self._sessions}))
        self._lock.flush()

    @property
    def claimed(self) -> bool:
        return self._lock is not None

    def _start_reaper(self) -> None:
        """The process that stops this stack when this supervisor ends (see the module's doc)."""
        read, write = os.pipe()  # neither end is inherited by the components (close_fds)
        with open(self.log("supervisor"), "ab") as log:
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "lottery.deploy.supervisor", "reap", self.tag, str(read)], pass_fds=(read,),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        os.close(read)
        self._lifeline = write

    def _note_session(self, pid: int, created: float) -> None:
        """A new component's session: for the reaper now, for the next supervisor in the lock file."""
        if self._lock is None:
            return
        self._sessions[pid] = created
        self._record_sessions()
        try:
            os.write(self._lifeline, f"{pid} {created}\n".encode())
        except OSError:  # the reaper is gone: the next supervisor still finds the sessions
            pass

    def release(self) -> None:
        """Let the reaper go (it sweeps what is left and exits) and give up the home's lock."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
            try:  # it sweeps what is left: nothing, after a stop
                self._reaper.wait(SWEEP_GRACE_S + 10)
            except subprocess.TimeoutExpired:
                pass
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def start(self, name: str, argv: list[str], env: dict[str, str], *, restart: bool = False) -> subprocess.Popen:
        if self.owner:
            self.claim()
        self.commands[name] = (argv, env)
        if restart:
            self.restartable.add(name)
        with open(self.log(name), "ab") as log:
            proc = subprocess.Popen(argv, env={**env, STACK_ENV: self.tag}, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
        self.procs[name] = proc
        self.started[name] = create_time(proc.pid)
        self._note_session(proc.pid, self.started[name])
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
        left = {pid: t for pid, t in self.below.pop(name, {}).items() if alive(pid, t)}
        helpers = self._own_forks(name, left)
        self._stop_now(helpers)
        self.leftovers.update({pid: t for pid, t in left.items() if pid not in helpers})
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

    def _own_forks(self, name: str, processes: dict[int, float]) -> dict[int, float]:
        """Those of ``processes`` that still carry component ``name``'s command line: forks that took
        no title of their own, its helpers (the scheduler's health-check server, a Celery worker's
        bundle cleaner). They serve only the component, and a fork shares its sockets: left running,
        one keeps the dead scheduler's database connection open, with any lock its transaction held,
        and the port the new one needs."""
        import psutil

        argv = self.commands[name][0]
        found = {}
        for pid, created in processes.items():
            try:
                cmdline = psutil.Process(pid).cmdline()
            except psutil.Error:
                continue
            if cmdline == argv or cmdline[1:] == argv:  # [interpreter, script, ...] for a script's shebang
                found[pid] = created
        return found

    @staticmethod
    def _stop_now(processes: dict[int, float], timeout: float = 5.0) -> None:
        """SIGKILL ``processes`` and wait (up to ``timeout`` s) until they are gone."""
        for pid, created in processes.items():
            _kill(pid, created, signal.SIGKILL)
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(alive(pid, created) for pid, created in processes.items()):
            time.sleep(0.05)

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
        return tail(self.log(name), lines)

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

    def restart(self, name: str, timeout: float = 30) -> subprocess.Popen:
        """Stop component ``name`` with everything below it, and start it again with its command."""
        if name not in self.commands:
            raise ComponentFailed(f"no component {name!r}; components: {', '.join(self.commands)}")
        self.restarts.pop(name, None)  # asked for: not counted against the restart limit
        if name in self.procs:
            stop_groups({name: self.procs[name].pid}, {name: self.started.get(name, 0.0)},
                        procs={name: self.procs[name]}, timeout=timeout, extra=self.below.pop(name, {}))
        return self.start(name, *self.commands[name], restart=name in self.restartable)

    def revive(self) -> list[str]:
        """Start again every component that is dead, also one past its restart limit (a fresh
        budget for each); the names of those started."""
        revived = []
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None and name in self.commands:
                self.restarts.pop(name, None)
                self.say(f"{name} was down (exit {proc.returncode}): starting it again; log: {self.log(name)}")
                self.start(name, *self.commands[name], restart=True)
                revived.append(name)
        return revived

    def stop(self, timeout: float = 30) -> None:
        """Stop every component, what each started (task processes included), what dead ones left,
        and whatever else carries this stack's tag. Signals that arrive meanwhile are ignored: a
        second Ctrl-C or SIGTERM never leaves the stop half done."""
        with signals_ignored():
            extra = dict(self.leftovers)
            for below in self.below.values():
                extra.update(below)
            stop_groups(self.pids, self.started, procs=self.procs, timeout=timeout, extra=extra)
            self.leftovers.clear()
            if self._lock is not None:  # only the owner of the home sweeps its stack
                for line in sweep(self.tag, self._sessions):
                    self.say(f"stopped a process left behind: {line}")
            self.release()


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log ("" when it does not exist yet)."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _say_stopping(signum, frame) -> None:
    os.write(2, f"{signal.Signals(signum).name}: already stopping (SIGKILL aborts; the reaper then stops what is left)\n".encode())


class signals_ignored:
    """Within the block, SIGINT, SIGTERM and SIGHUP only print a line (main thread only; elsewhere a no-op)."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.saved[sig] = signal.signal(sig, _say_stopping)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False


def raise_keyboard_interrupt_on_sigterm() -> None:
    """`kill`, a closed terminal (SIGHUP) and Ctrl-C take the same path: the ``finally`` that stops
    every component. Only the first signal does: ``make`` forwards a second SIGTERM, and a
    ``KeyboardInterrupt`` raised inside the stop would leave the components running."""
    def on_signal(signum, frame):
        for sig in STOP_SIGNALS:
            signal.signal(sig, _say_stopping)
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: ``sig`` to this process when its parent dies (``make`` killed with SIGKILL leaves its
    child running otherwise); the handler set above then stops every component."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def reap(tag: str, fd: int) -> None:
    """The reaper: note the sessions the supervisor sends ("pid start-time" lines on ``fd``) until
    it ends (EOF), then stop the stack."""
    for sig in STOP_SIGNALS:  # a terminal's or a process group's signals are the supervisor's business
        signal.signal(sig, signal.SIG_IGN)
    sessions, data = {}, b""
    while chunk := os.read(fd, 4096):
        data += chunk
        *lines, data = data.split(b"\n")
        for line in lines:
            pid, created = line.split()
            sessions[int(pid)] = float(created)
    for line in sweep(tag, sessions):
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} reaper: the supervisor of {tag} is gone: stopped {line}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "reap":
        reap(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m lottery.deploy.supervisor reap TAG FD (started by Supervisor, not by hand)")
