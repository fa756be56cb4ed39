"""Waiting for a writer of shared data: an flock held for the write, waited for with a bound.

Runs that share an artifact root share its data: the first one writes it, the others wait for it
and then find it done. ``wait_lock`` polls a non-blocking flock, so the wait is bounded and its log
line can name the holder (recorded in the lock file). A killed writer never blocks anyone.

Writing data takes minutes (``LOTTERY_DATA_LOCK_TIMEOUT``, 30 min by default); a training takes
hours: waiting for one (``wait_training_lock``) is bounded by ``LOTTERY_TRAINING_LOCK_TIMEOUT`` when
set, else only by the task's own ``execution_timeout``, as any Airflow task waiting for its input.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from lottery.errors import LotteryError

# How long a run waits for another run writing the same data (seconds); the env var wins.
LOCK_TIMEOUT_ENV = "LOTTERY_DATA_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 1800.0
# How long a run waits for another run training the same unit (seconds; unset: no bound).
TRAINING_LOCK_TIMEOUT_ENV = "LOTTERY_TRAINING_LOCK_TIMEOUT"
POLL_S = 0.5


class LockTimeout(LotteryError, TimeoutError):
    """Another process held the lock for longer than the wait allows (transient: retried)."""


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        started = time.monotonic()
        waited = _acquire(f, path, timeout, log, setting)
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


def wait_training_lock(path: str | os.PathLike, what: str, *, log: logging.Logger | None = None):
    """`wait_lock` for a training lock (`lottery.paths.Workdir.training_lock`): bounded by
    ``LOTTERY_TRAINING_LOCK_TIMEOUT`` when set, else by nothing but the task's own timeout."""
    timeout = lock_timeout(math.inf, TRAINING_LOCK_TIMEOUT_ENV)
    return wait_lock(path, what, timeout=timeout, log=log, setting=TRAINING_LOCK_TIMEOUT_ENV)


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
