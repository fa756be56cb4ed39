"""Data worker processes for the numpy (JAX-path) input pipeline: decode + augment in parallel.

`WorkerPool` starts processes that import no Keras or TensorFlow and feeds them *tasks*: a chunk
of a batch as record positions and their augmentation parameters. A worker reads and checks the
records itself, decodes and augments them, and writes the float32 batch into a shared memory block
(a `memfd` handed over with `SCM_RIGHTS`); the labels come back on its socket. Every batch is split
over all workers, and `run` yields the batches in task order: each value depends only on its
positions and parameters, whatever the worker count.

A worker's exception is raised in the parent (as its own type when it unpickles); a dead worker is a
`RuntimeError` naming its pid. Workers ignore SIGINT, exit at end of file on their socket, and a
watchdog ends each within `WATCHDOG_S` once its parent is gone (SIGKILL of the parent).
"""
from __future__ import annotations

import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import NoReturn
from multiprocessing.connection import Connection, wait

import numpy as np

from lottery.errors import LotteryError

log = logging.getLogger("lottery.data")

WATCHDOG_S = 0.2
WORKERS_ENV = "LOTTERY_DATA_WORKERS"


def default_workers() -> int:
    """`LOTTERY_DATA_WORKERS`, else the threads this task was given (`runtime.configure_threads`:
    the cores divided among the tasks that run at once), else the cores this process may use."""
    if os.environ.get(WORKERS_ENV, "").strip():
        return max(0, int(os.environ[WORKERS_ENV]))
    from . import runtime

    if runtime.data_threads():
        return int(runtime.data_threads())
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class WorkerError(LotteryError, RuntimeError):
    """A data worker failed in a way that is not an exception of its own (it died; transient: retried)."""


class WorkerPool:
    """`n` worker processes over the shards `files` of one split (see the module docstring)."""

    def __init__(self, files, *, encoding: str, shape, scale, offset, workers: int, depth: int = 2):
        if workers < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {workers}")
        self.init = {"files": [str(f) for f in files], "encoding": encoding, "shape": tuple(int(v) for v in shape),
                     "scale": np.asarray(scale, np.float32), "offset": np.asarray(offset, np.float32)}
        self.workers, self.depth = int(workers), int(depth)
        self._procs: list[subprocess.Popen] = []
        self._socks: list[socket.socket] = []
        self._conns: list[Connection] = []
        self._inflight: list[int] = []
        self._memory: tuple[int, mmap.mmap, np.ndarray] | None = None
        self._slot_shape: tuple[int, ...] | None = None
        self._next_task = 0
        self._generation = 0
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._socks, self._conns)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # ------------------------------------------------------------------ processes and memory
    def _start(self) -> None:
        if not self._finalizer.alive:  # restarted after close(): stopped at exit again
            self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._socks, self._conns)
        for _ in range(self.workers):
            parent_end, child_end = socket.socketpair()
            proc = subprocess.Popen([sys.executable, "-m", "lottery.data.workers", str(os.getpid()),
                                     str(child_end.fileno())], pass_fds=(child_end.fileno(),),
                                    stdin=subprocess.DEVNULL)
            child_end.close()
            self._procs.append(proc)
            self._socks.append(parent_end)
            self._conns.append(Connection(os.dup(parent_end.fileno())))
            self._inflight.append(0)
            self._conns[-1].send(("init", self.init))
        log.info("started %d data workers: pids %s", self.workers, self.pids)

    def _ensure(self, slot_shape: tuple[int, ...]) -> np.ndarray:
        """Running workers and shared slots of `slot_shape` (float32): the slots as one array."""
        if not self._procs:
            self._start()
        if self._memory is None or self._slot_shape != slot_shape:
            self._drain()
            nbytes = max(int(np.prod(slot_shape)) * 4 * self.workers * self.depth, mmap.PAGESIZE)
            fd = os.memfd_create("lottery-batches")
            os.ftruncate(fd, nbytes)
            mem = mmap.mmap(fd, nbytes)
            for conn, sock in zip(self._conns, self._socks):
                conn.send(("map", nbytes, slot_shape))
                socket.send_fds(sock, [b"m"], [fd])
            if self._memory is not None:
                os.close(self._memory[0])
            slots = np.frombuffer(mem, np.float32, int(np.prod(slot_shape)) * self.workers * self.depth)
            self._memory = (fd, mem, slots.reshape(self.workers * self.depth, *slot_shape))
            self._slot_shape = slot_shape
        return self._memory[2]

    def close(self) -> None:
        """Stop the workers (also done at exit and when the pool is garbage collected)."""
        self._finalizer()
        self._procs.clear()
        self._socks.clear()
        self._conns.clear()
        self._inflight.clear()
        if self._memory is not None:
            os.close(self._memory[0])
            self._memory = None

    # ------------------------------------------------------------------ running tasks
    def _receive(self, w: int):
        """The next message of worker `w`; a dead worker is a `WorkerError`."""
        try:
            message = self._conns[w].recv()
        except (EOFError, OSError):
            self._died(w)
        self._inflight[w] -= 1
        return message

    def _send(self, w: int, message: tuple) -> None:
        """Send worker `w` a message; a dead worker (broken pipe) is a `WorkerError`."""
        try:
            self._conns[w].send(message)
        except OSError:
            self._died(w)

    def _died(self, w: int) -> NoReturn:
        proc = self._procs[w]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self.close()
        raise WorkerError(f"data worker pid {proc.pid} died (exit status {code})") from None

    def _drain(self) -> None:
        """Wait for (and drop) the results of an abandoned run."""
        for w, count in enumerate(self._inflight):
            for _ in range(count):
                self._receive(w)

    def _wait(self) -> int:
        """The index of a worker with a message, checking every second that none has died."""
        busy = {self._conns[w]: w for w in range(self.workers) if self._inflight[w]}
        while True:
            ready = wait(list(busy), timeout=1.0)
            if ready:
                return busy[ready[0]]
            for w in busy.values():
                if self._procs[w].poll() is not None:
                    self._receive(w)  # raises

    def run(self, tasks: Iterable[tuple], batch_shape: tuple[int, ...]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield `(float32 batch, int32 labels)` for each task `(shards, records, augmentation,
        params)` in order; a batch with fewer positions than `batch_shape[0]` is cut to its size."""
        slots = self._ensure(tuple(batch_shape))
        self._drain()
        self._generation += 1
        generation = self._generation
        free = list(range(len(slots)))
        tasks = enumerate(tasks)
        pending: dict[int, tuple[int, int, int]] = {}  # task id -> (batch number, slot, first row)
        partial: dict[int, list] = {}  # batch number -> [chunks outstanding, labels]
        done: dict[int, tuple[int, int, np.ndarray]] = {}  # batch number -> (slot, size, labels)
        exhausted, wanted = False, 0
        while True:
            if generation != self._generation:
                raise RuntimeError("this batch stream was superseded by another one on the same data set")
            while free and not exhausted:
                item = next(tasks, None)
                if item is None:
                    exhausted = True
                    break
                self._submit(item, free.pop(), pending, partial)
            if wanted in done:
                slot, size, labels = done.pop(wanted)
                batch = slots[slot][:size].copy()
                free.append(slot)
                wanted += 1
                yield batch, labels
                continue
            if not pending:
                return
            self._collect(self._wait(), pending, partial, done)

    def _submit(self, item, slot: int, pending: dict, partial: dict) -> None:
        """Send one batch as up to `workers` chunks (so that every worker helps with the first
        batch of a stream), each to the worker with the fewest tasks in flight."""
        number, (shards, records, augmentation, params) = item
        shards, records = np.asarray(shards), np.asarray(records)
        n = len(shards)
        chunk = max(1, -(-n // self.workers))
        partial[number] = [0, np.empty(n, np.int32)]
        for start in range(0, n, chunk):
            at = slice(start, start + chunk)
            w = min(range(self.workers), key=lambda i: self._inflight[i])
            task_id = self._next_task
            self._next_task += 1
            self._send(w, ("task", task_id, slot, start, augmentation, shards[at], records[at],
                           None if params is None else params[at]))
            self._inflight[w] += 1
            pending[task_id] = (number, slot, start)
            partial[number][0] += 1

    def _collect(self, w: int, pending: dict, partial: dict, done: dict) -> None:
        kind, task_id, payload = self._receive(w)
        number, slot, start = pending.pop(task_id)
        if kind == "error":
            raise _unpickle_error(payload)
        entry = partial[number]
        entry[1][start:start + len(payload)] = payload
        entry[0] -= 1
        if entry[0] == 0:
            del partial[number]
            done[number] = (slot, len(entry[1]), entry[1])


def _unpickle_error(payload: tuple[bytes | None, str]) -> BaseException:
    blob, text = payload
    if blob is not None:
        try:
            return pickle.loads(blob)
        except Exception:  # an exception type that does not unpickle: keep its text
            pass
    return WorkerError(text)


def _shutdown(procs: list[subprocess.Popen], socks: list[socket.socket], conns: list[Connection]) -> None:
    for end in [*conns, *socks]:
        try:
            end.close()  # the worker reads end of file and exits
        except OSError:
            pass
    deadline = time.monotonic() + 2.0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- the worker process
class _Worker:
    """One worker's state: the split's shards (opened and indexed on first use), the slots."""

    def __init__(self, init: dict):
        self.files = init["files"]
        self.encoding, self.shape = init["encoding"], init["shape"]
        self.scale, self.offset = init["scale"], init["offset"]
        self.open: dict[int, tuple] = {}
        self.slots: np.ndarray | None = None

    def map(self, fd: int, nbytes: int, slot_shape) -> None:
        mem = mmap.mmap(fd, nbytes)
        os.close(fd)
        count = nbytes // (int(np.prod(slot_shape)) * 4)
        self.slots = np.frombuffer(mem, np.float32, count * int(np.prod(slot_shape))).reshape(count, *slot_shape)

    def shard(self, i: int):
        if i not in self.open:
            from .tfrecord import record_offsets

            path = self.files[i]
            self.open[i] = (open(path, "rb"), path, record_offsets(path))
        return self.open[i]

    def task(self, slot: int, start: int, augmentation: str, shards, records, params) -> np.ndarray:
        from lottery.errors import DataFormatError
        from .hostaug import decode_augment_into
        from .tfrecord import read_record_at

        out = self.slots[slot][start:start + len(shards)]
        labels = np.empty(len(shards), np.int32)
        for j, (s, r) in enumerate(zip(shards.tolist(), records.tolist())):
            f, path, offsets = self.shard(s)
            if r >= len(offsets):
                raise DataFormatError(f"{path}: has {len(offsets)} records, the manifest lists more", path=path)
            record = read_record_at(f, path, offsets[r])
            try:
                labels[j] = decode_augment_into(record, out[j], encoding=self.encoding, shape=self.shape,
                                                augmentation=augmentation, param=None if params is None else params[j],
                                                scale=self.scale, offset=self.offset)
            except Exception as exc:
                raise DataFormatError(f"{path}: record at byte offset {offsets[r]}: {exc}", path=path) from exc
        return labels


def _watchdog(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_S)
    os._exit(0)


def _error_payload(exc: BaseException) -> tuple[bytes | None, str]:
    text = f"{type(exc).__name__}: {exc}"
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, text


def worker_main(parent: int, fd: int) -> None:
    """The loop of one worker process: init, then map / task messages until end of file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent:
        return
    threading.Thread(target=_watchdog, args=(parent,), daemon=True).start()
    sock = socket.socket(fileno=fd)
    conn = Connection(os.dup(fd))
    worker = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "init":
            worker = _Worker(message[1])
        elif message[0] == "map":
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            worker.map(fds[0], message[1], message[2])
        else:
            _, task_id, slot, start, augmentation, shards, records, params = message
            try:
                reply = ("ok", task_id, worker.task(slot, start, augmentation, shards, records, params))
            except Exception as exc:
                reply = ("error", task_id, _error_payload(exc))
            try:
                conn.send(reply)
            except OSError:  # the parent closed the pool (or died) with this task in flight
                return


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]))
