"""A task process stops when the Airflow task supervisor that forked it is gone.

Airflow's task supervisor forks the task process into a process group of its own; when the
supervisor is SIGKILLed nothing tells the task, which would train on as an orphan (holding a GPU
nothing accounts for). So the task process asks Linux for a signal when its parent dies
(``PR_SET_PDEATHSIG``) and its handler SIGKILLs the task's process group. Not SIGTERM: Airflow's
task runner leaves the exit on SIGTERM to its supervisor, which is gone. The retry resumes from the
last epoch checkpoint.

``plugins/lottery_lifeline.py`` calls ``stop_with_parent`` as a forked task process starts
(``dag.test()`` runs in the caller's process and is left alone). Linux signals when the forking
*thread* ends: Airflow forks from its supervisor's main thread. A no-op off Linux.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_parent(sig: int = signal.SIGUSR2) -> bool:
    """Stop this process (and its process group, when it leads one) when its parent dies: Linux
    sends ``sig``, whose handler SIGKILLs them. True when the kernel took the request."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    signal.signal(sig, _parent_died)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this task will not stop with its supervisor",
                        ctypes.get_errno())
            return False
    except (OSError, AttributeError) as exc:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable (%s): this task will not stop with its supervisor", exc)
        return False
    if parent == 1 or os.getppid() != parent:  # the parent died before the request took effect
        log.error("the task supervisor (pid %d) is already gone: stopping this task", parent)
        _parent_died(sig, None)
    return True


def _parent_died(signum, frame) -> None:
    """SIGKILL the process group this process leads (Airflow puts each task in one of its own:
    the operator's children go too), or else this process alone."""
    me = os.getpid()
    if os.getpgrp() == me:
        os.killpg(me, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)
