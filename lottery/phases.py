"""Where a training process's seconds go, for the benchmarks: the engine names its phases
(``with phase("epochs", "retrain sp80.000__1ep")``: a phase of one unit of work) and records
nothing; a listener, when one is attached, gets ``(unit, phase, seconds)`` at each phase's end:
in-process with `listening`, or in every training process (the Airflow tasks of a DAG run) with
``LOTTERY_PHASE_LISTENER=module:function``, as ``PYTHONBREAKPOINT`` names a hook.

Phases: ``imports``, ``data_open``, ``build_compile`` (a group's shared costs, charged to its first
ticket), ``start`` (rewind or resume, mask), ``epochs``, ``eval``, ``write`` (metrics,
checkpoints, the model).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time
from typing import Callable, Iterator

LISTENER_ENV = "LOTTERY_PHASE_LISTENER"
Listener = Callable[[str, str, float], None]
_attached: list[Listener] = []


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener(unit, phase, seconds)`` at the end of every phase of the block."""
    _attached.append(listener)
    try:
        yield
    finally:
        _attached.remove(listener)


@contextlib.contextmanager
def phase(name: str, unit: str) -> Iterator[None]:
    """Time the block as phase ``name`` of ``unit`` for the attached listeners (none: nothing to do)."""
    listeners = _listeners()
    if not listeners:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        for listener in listeners:
            listener(unit, name, seconds)


def _listeners() -> list[Listener]:
    named = os.environ.get(LISTENER_ENV, "").strip()
    return [*_attached, _load(named)] if named else list(_attached)


@functools.cache
def _load(named: str) -> Listener:
    module, _, function = named.partition(":")
    if not function:
        raise ValueError(f"{LISTENER_ENV}={named!r}: expected module:function")
    return getattr(importlib.import_module(module), function)
