"""Waiting for a writer of shared data or for another run's training: an flock held for the work.

Runs that share an artifact root share its data: the first one writes it, the others wait for it
and then find it done. ``wait_lock`` polls a non-blocking flock, so the wait is bounded and its log
line can name the holder (recorded in the lock file). A killed writer never blocks anyone.

Writing data takes minutes (``LOTTERY_DATA_LOCK_TIMEOUT``, 30 min by default); a training takes
hours, and that bound never applies to waiting for one (``wait_training_lock``). How a run waits for
another run training the same unit depends on where it runs:

* in a process of its own (``python -m lottery``, a notebook): it waits in the process, bounded by
  ``LOTTERY_TRAINING_LOCK_TIMEOUT`` when set, else only by the process's own limits;
* inside ``busy_raises()`` (the DAG's training tasks, ``lottery.dag.tasks.training_call``): it does
  not wait. A training lock another process holds raises ``TrainingLockBusy``, naming the holder;
  a task holding several units trains those whose locks it got (``hold_training_locks``) and raises
  it after them. The task then gives its worker and pool slot back (Airflow's reschedule) and comes
  back every ``LOTTERY_TRAINING_LOCK_POLL_S`` seconds (30 by default), finding done what the other
  run finished; ``LOTTERY_TRAINING_LOCK_TIMEOUT`` there bounds the time one try spends giving its
  worker back (counted from the first time it did).

A thread that already holds a training lock and takes it again gets it at once: two flocks of one
process on one file exclude each other, so the process would wait for itself.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from lottery.errors import LotteryError

# How long a run waits for another run writing the same data (seconds); the env var wins.
LOCK_TIMEOUT_ENV = "LOTTERY_DATA_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 1800.0
# How long a run waits for another run training the same unit (seconds; unset: no bound).
TRAINING_LOCK_TIMEOUT_ENV = "LOTTERY_TRAINING_LOCK_TIMEOUT"
# How often a DAG task that gave its worker back looks at a busy training lock again (seconds).
TRAINING_LOCK_POLL_ENV = "LOTTERY_TRAINING_LOCK_POLL_S"
DEFAULT_TRAINING_LOCK_POLL_S = 30.0
POLL_S = 0.5

T = TypeVar("T")
# Inside busy_raises(): a busy training lock raises TrainingLockBusy instead of being waited for.
_BUSY_RAISES = contextvars.ContextVar("lottery_training_lock_busy_raises", default=False)
# The training locks each thread holds (absolute paths), so that taking one again does not wait.
_held = threading.local()


class LockTimeout(LotteryError, TimeoutError):
    """Another process held the lock for longer than the wait allows (transient: retried)."""


class TrainingLockBusy(LotteryError):
    """Other processes train units of this one (their training locks are held), and this one does
    not wait for them (``busy_raises``): it comes back for them later. ``held``: (holder, lock path)
    of each busy unit; the message names the first."""

    def __init__(self, held: list[tuple[str, Path]]):
        self.held = list(held)
        holder, path = self.held[0]
        more = f" (and {len(self.held) - 1} more units of this task)" if len(self.held) > 1 else ""
        super().__init__(f"{holder} holds {path}{more}")


def lock_timeout(default: float = DEFAULT_LOCK_TIMEOUT, env: str = LOCK_TIMEOUT_ENV) -> float:
    """The wait bound: ``env`` (``LOTTERY_DATA_LOCK_TIMEOUT``) seconds, else ``default``."""
    value = os.environ.get(env, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"{env}={value!r}: expected a number of seconds") from None


def lock_path(target: str | os.PathLike, kind: str = "lock") -> Path:
    """The hidden sibling lock file of a directory: ``<parent>/.<name>.<kind>``."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
        return f"{info['what']} (pid {info['pid']} on {info['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _record_holder(f, what: str) -> None:
    """Best effort: the record only names the holder in a waiter's log (a full disk must not fail
    the work the lock guards; that work says so itself when it writes)."""
    record = json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    try:  # unbuffered: a failed write leaves nothing for close() to fail on again
        os.ftruncate(f.fileno(), 0)
        os.write(f.fileno(), record.encode())
    except OSError:
        pass


@contextlib.contextmanager
def wait_lock(path: str | os.PathLike, what: str, *, timeout: float | None = None,
              log: logging.Logger | None = None, setting: str = LOCK_TIMEOUT_ENV) -> Iterator[float]:
    """Hold the flock on ``path`` for the block; yields the seconds waited for it.

    ``what`` says what the holder does ("writing /a/data/x"): the waiters' log names it.
    Raises ``LockTimeout`` after ``timeout`` seconds (default ``lock_timeout()``) of waiting;
    ``setting``: the environment variable that bound comes from (the log and the error name it)."""
    log = log or logging.getLogger("lottery")
    timeout = lock_timeout() if timeout is None else float(timeout)
    with _locked(Path(path), what, log, lambda f, p: _acquire(f, p, timeout, log, setting)) as waited:
        yield waited


@contextlib.contextmanager
def busy_raises() -> Iterator[None]:
    """Within the block (this thread or task), ``wait_training_lock`` does not wait for a training
    lock another process holds: it raises ``TrainingLockBusy`` at once."""
    token = _BUSY_RAISES.set(True)
    try:
        yield
    finally:
        _BUSY_RAISES.reset(token)


@contextlib.contextmanager
def wait_training_lock(path: str | os.PathLike, what: str, *, log: logging.Logger | None = None) -> Iterator[float]:
    """Hold a training lock (`lottery.paths.Workdir.training_lock`) for the block; yields the seconds
    waited. Another process holding it is waited for, bounded by ``LOTTERY_TRAINING_LOCK_TIMEOUT``
    when set (else by nothing), or inside ``busy_raises()`` raises ``TrainingLockBusy``. A thread
    that holds it already gets it at once (and keeps it until its outer block ends)."""
    log = log or logging.getLogger("lottery")
    key, held = os.path.abspath(path), _held_here()
    if key in held:
        yield 0.0
        return
    if _BUSY_RAISES.get():
        acquire = _take_or_raise
    else:
        timeout = lock_timeout(math.inf, TRAINING_LOCK_TIMEOUT_ENV)
        acquire = lambda f, p: _acquire(f, p, timeout, log, TRAINING_LOCK_TIMEOUT_ENV)  # noqa: E731
    with _locked(Path(path), what, log, acquire) as waited:
        held.add(key)
        try:
            yield waited
        finally:
            held.discard(key)


def hold_training_locks(held: contextlib.ExitStack, units: Iterable[tuple[T, str | os.PathLike, str]], *,
                        log: logging.Logger | None = None) -> tuple[list[T], TrainingLockBusy | None]:
    """Take the training lock of each (unit, lock path, what) in turn, held until ``held`` closes:
    the units whose lock this process holds, and, inside ``busy_raises()``, one ``TrainingLockBusy``
    for those other processes hold (None when there are none). Outside it every lock is waited for."""
    claimed, busy = [], []
    for unit, path, what in units:
        try:
            held.enter_context(wait_training_lock(path, what, log=log))
        except TrainingLockBusy as exc:
            busy.extend(exc.held)
            continue
        claimed.append(unit)
    return claimed, TrainingLockBusy(busy) if busy else None


def training_lock_poll_s() -> float:
    """How long a DAG task that gave its worker back waits before it looks again:
    ``LOTTERY_TRAINING_LOCK_POLL_S`` seconds, else 30."""
    return lock_timeout(DEFAULT_TRAINING_LOCK_POLL_S, TRAINING_LOCK_POLL_ENV)


def _held_here() -> set[str]:
    if not hasattr(_held, "paths"):
        _held.paths = set()
    return _held.paths


@contextlib.contextmanager
def _locked(path: Path, what: str, log: logging.Logger, acquire: Callable) -> Iterator[float]:
    """Hold the flock on ``path`` (taken by ``acquire(file, path)``, which returns the seconds it
    waited) with the holder recorded, for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        started = time.monotonic()
        waited = acquire(f, path)
        _record_holder(f, what)
        if waited:
            log.info("got the lock %s after waiting %.1f s", path, waited)
        try:
            yield waited
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(f.fileno(), 0)
            fcntl.flock(f, fcntl.LOCK_UN)
            log.debug("released %s after %.1f s", path, time.monotonic() - started)


def _take_or_raise(f, path: Path) -> float:
    """Take the flock if it is free (0.0 s waited); else ``TrainingLockBusy`` naming the holder."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except BlockingIOError:
        raise TrainingLockBusy([(_holder(path), path)]) from None


def _acquire(f, path: Path, timeout: float, log: logging.Logger, setting: str) -> float:
    """Take the flock, waiting up to ``timeout`` s; the seconds waited (0.0 when it was free)."""
    started = time.monotonic()
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except BlockingIOError:
        pass
    holder = _holder(path)
    bound = f"waiting up to {timeout:.0f} s" if math.isfinite(timeout) else "no time limit"
    log.info("waiting for %s to finish (lock %s; %s, %s)", holder, path, bound, setting)
    while True:
        time.sleep(POLL_S)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return time.monotonic() - started
        except BlockingIOError:
            if time.monotonic() - started > timeout:
                raise LockTimeout(f"waited {timeout:.0f} s for {holder} to release {path}; it is still running: "
                                  f"wait for it and run again, or raise {setting}") from None
