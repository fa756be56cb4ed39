"""A task process stops when the Airflow task supervisor that forked it is gone (issue 11, fault 3).

Airflow's task supervisor (a LocalExecutor worker, a Celery pool process) forks the task process
and puts it in a process group of its own. When the supervisor is SIGKILLed, nothing tells the task:
it trained on as an orphan, wrote its result after everything else had stopped, and on a GPU box
held a GPU that nothing accounted for. Here the task process asks Linux for a signal when its parent
dies (``prctl(PR_SET_PDEATHSIG, SIGTERM)``): Airflow's task runner then stops the task as on any
SIGTERM, and the retry resumes from the last epoch checkpoint.

``plugins/lottery_lifeline.py`` calls ``stop_with_parent`` as the task runner starts (its
``on_starting`` listener hook, which only a forked task process reaches: ``dag.test()`` runs in
the caller's process and is left alone). Linux sends the signal when the *thread* that forked the
process ends; Airflow forks from its supervisor's main thread, which lives as long as the process.
A no-op elsewhere (macOS, Windows).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have ``sig`` sent to this process when its parent dies (and now, if it already has).
    True when the kernel took the request."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
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
        os.kill(os.getpid(), sig)
    return True
