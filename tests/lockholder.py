"""Test helper: another process holding a lock file's flock, as a concurrent writer would."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HOLD = """
import fcntl, json, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.write(json.dumps({"what": "the test's holder", "pid": os.getpid(), "host": "here", "since": time.time()})); f.flush()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    """A process holding the flock on ``path`` for ``seconds`` (returns once it holds it); kill it to release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
