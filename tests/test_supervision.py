"""The process supervisor of make run / make ui (lottery.deploy.supervisor) and the task lifeline
(lottery.deploy.lifeline), with real processes: a dead component is restarted up to its limit,
stop() reaches processes that left the component's process group (as Airflow's task processes do),
a LocalExecutor worker left by a dead scheduler is stopped once idle, the scheduler's own helpers
(forks under its command line) at once, and a process that asked for a lifeline stops when its
parent is SIGKILLed. A few seconds in all; the same faults with the real
scheduler are in tests/test_supervision_airflow.py."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lottery.deploy.supervisor import (SWEEP_GRACE_S, ComponentFailed, HomeBusy, Supervisor, alive, free_port,
                                      stack_processes)
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def wait_for(predicate, timeout=15.0, what="condition"):
    return helpers.wait_for(predicate, timeout, what, interval=0.05)


def child_script(tmp_path: Path, pid_file: str, title: str = "", session: bool = True) -> list[str]:
    """A component that starts one child in a session of its own (as Airflow's task supervisor puts a
    task in a process group of its own), writes the child's pid, and sleeps."""
    child = "import time\n"
    if title:  # a LocalExecutor worker: its title, and SIGTERM ignored (the scheduler's handler does nothing in it)
        child += f"import setproctitle, signal; setproctitle.setproctitle({title!r}); signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    child += "time.sleep(120)\n"
    code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session={session})\n"
        f"open({str(tmp_path / pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    return [sys.executable, "-c", code]


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text(), what=str(path)))


def test_a_dead_component_is_restarted_up_to_its_limit(tmp_path):
    lines = []
    sup = Supervisor(tmp_path, restart_limit=2, restart_window=60, say=lines.append)
    try:
        sup.start("sleeper", SLEEP, dict(os.environ), restart=True)
        for n in (1, 2):
            old = sup.procs["sleeper"].pid
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: sup.procs["sleeper"].poll() is not None, what="the SIGKILL")
            sup.watch()
            assert lines[-1] == f"sleeper died (exit -9), restarting it ({n}/2); log: {tmp_path / 'sleeper.log'}"
            assert sup.procs["sleeper"].pid != old and sup.procs["sleeper"].poll() is None
        assert "restarted by lottery.deploy.supervisor" in (tmp_path / "sleeper.log").read_text()
        os.kill(sup.procs["sleeper"].pid, signal.SIGKILL)
        wait_for(lambda: sup.procs["sleeper"].poll() is not None, what="the SIGKILL")
        with pytest.raises(ComponentFailed, match=r"sleeper died \(exit -9\) 3 times within 1 min; not restarting "
                                                  rf"it again; log: {tmp_path / 'sleeper.log'}"):
            sup.watch()
        assert sup.dead() == [f"sleeper (exit -9, see {tmp_path / 'sleeper.log'})"]
        assert len(lines) == 2
        # `up` on a cluster with a component past its limit starts it again, with a fresh budget
        assert sup.revive() == ["sleeper"] and sup.procs["sleeper"].poll() is None
        assert lines[-1].startswith("sleeper was down (exit -9): starting it again")
        os.kill(sup.procs["sleeper"].pid, signal.SIGKILL)
        wait_for(lambda: sup.procs["sleeper"].poll() is not None, what="the SIGKILL")
        sup.watch()
        assert lines[-1].startswith("sleeper died (exit -9), restarting it (1/2)") and not sup.dead()
        assert sup.revive() == []
    finally:
        sup.stop(timeout=5)


def test_a_second_supervisor_of_a_home_is_refused_and_the_next_one_stops_leftovers(tmp_path):
    """The home's lock: a live supervisor's home is refused; once it is gone (and its reaper with
    it, so nothing stopped its components), the next supervisor stops what it left, naming it."""
    lines = []
    first = Supervisor(tmp_path / "logs", home=tmp_path, say=lines.append)
    first.start("sleeper", SLEEP, dict(os.environ))
    leftover = first.procs["sleeper"].pid
    with pytest.raises(HomeBusy, match=rf"another process \(pid {os.getpid()}\) supervises the components on {tmp_path}"):
        Supervisor(tmp_path / "logs", home=tmp_path).claim()
    # as if this supervisor and its reaper were SIGKILLed: the lock is free, the component runs on
    first._reaper.kill()
    first._reaper.wait()
    first._lock.close()
    second = Supervisor(tmp_path / "logs", home=tmp_path, say=lines.append)
    try:
        assert [line.split(" (")[0] for line in second.claim()] == [f"pid {leftover}"]
        assert lines[-1].startswith(f"stopped 1 processes left running on {tmp_path} by an earlier supervisor: pid {leftover}")
        wait_for(lambda: first.procs["sleeper"].poll() is not None, what="the leftover's end")
    finally:
        second.stop(timeout=5)
        first.procs["sleeper"].kill()


def test_the_reaper_stops_the_components_when_their_supervisor_dies(tmp_path):
    """A supervisor in a child process, SIGKILLed: its reaper stops its component, and the child
    the component put in a session of its own, found through the stack tag."""
    code = (
        "import os, sys, time\n"
        "from lottery.deploy.supervisor import Supervisor\n"
        f"sup = Supervisor({str(tmp_path)!r})\n"
        f"sup.start('parent', {child_script(tmp_path, 'child.pid')!r}, dict(os.environ))\n"
        f"open({str(tmp_path / 'component.pid')!r}, 'w').write(str(sup.procs['parent'].pid))\n"
        "time.sleep(120)\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    component, child = read_pid(tmp_path / "component.pid"), read_pid(tmp_path / "child.pid")
    supervisor.kill()
    supervisor.wait()
    wait_for(lambda: not alive(component) and not alive(child), timeout=SWEEP_GRACE_S + 10, what="the reaper's sweep")
    wait_for(lambda: (tmp_path / "supervisor.log").read_text().count("reaper: the supervisor of") == 2,
             what="the reaper's lines")


def test_a_component_started_without_restart_stays_dead(tmp_path):
    sup = Supervisor(tmp_path, say=lambda line: pytest.fail(line))
    try:
        sup.start("once", SLEEP, dict(os.environ))
        sup.procs["once"].kill()
        sup.procs["once"].wait()
        sup.watch()
        assert sup.dead() and sup.procs["once"].poll() is not None
    finally:
        sup.stop(timeout=5)


def test_stop_reaches_processes_that_left_the_group_even_of_a_dead_component(tmp_path):
    """Airflow's task processes leave their component's process group: stop() still stops them,
    also those of a component that died before (its children are re-parented, out of reach)."""
    sup = Supervisor(tmp_path)
    sup.start("live", child_script(tmp_path, "live.pid"), dict(os.environ))
    sup.start("dies", child_script(tmp_path, "dies.pid"), dict(os.environ))
    live_child, dead_child = read_pid(tmp_path / "live.pid"), read_pid(tmp_path / "dies.pid")
    assert os.getpgid(live_child) != sup.procs["live"].pid  # out of the group, as a task process is
    sup.watch()  # sees both children
    sup.procs["dies"].kill()
    sup.procs["dies"].wait()
    sup.watch()
    assert alive(dead_child)  # an orphan now; killpg of its old component would miss it
    started = time.monotonic()
    sup.stop(timeout=5)
    assert not alive(live_child) and not alive(dead_child)
    assert time.monotonic() - started < 5  # SIGTERM was enough


def test_a_dead_schedulers_worker_is_kept_while_busy_and_stopped_once_idle(tmp_path):
    """A LocalExecutor worker left by a SIGKILLed scheduler may still supervise a task: it is kept
    (the task finishes); an idle one (its title says <idle>) waits for work that cannot come: stopped."""
    sup = Supervisor(tmp_path, say=lambda line: None)
    try:
        sup.start("scheduler", child_script(tmp_path, "idle.pid", title="airflow worker -- LocalExecutor: <idle>",
                                            session=False), dict(os.environ), restart=True)
        idle = read_pid(tmp_path / "idle.pid")
        wait_for(lambda: "<idle>" in " ".join(psutil.Process(idle).cmdline()), what="the title")
        sup.watch()
        sup.procs["scheduler"].kill()
        sup.procs["scheduler"].wait()
        sup.watch()  # restarts the scheduler; the worker is idle ...
        assert alive(idle)
        time.sleep(0.2)
        sup.watch()  # ... and still idle: stopped
        wait_for(lambda: not alive(idle), timeout=5, what="the idle worker to stop")
        busy = read_pid(tmp_path / "idle.pid")  # the restarted scheduler's worker: busy (not idle) this time
        assert busy != idle
    finally:
        sup.stop(timeout=2)
    wait_for(lambda: not alive(busy), timeout=5, what="the busy worker to stop with the rest")


# A component as Airflow's scheduler is: its own port and a database connection, then a helper forked
# under the same command line (multiprocessing's fork, as for the health-check server) that inherits both.
WITH_HELPER = """
import os, socket, sys, time
port, database = int(sys.argv[1]), int(sys.argv[2])
server = socket.create_server(("127.0.0.1", port))
connection = socket.create_connection(("127.0.0.1", database))
if os.fork() == 0:
    time.sleep(120)
    os._exit(0)
print("serving", flush=True)
time.sleep(120)
"""


def test_a_dead_components_own_helpers_are_stopped_before_it_starts_again(tmp_path):
    """Left running, the helper would keep the dead component's port (the new one could not bind it)
    and its database connection open, with any lock its transaction held."""
    database = socket.create_server(("127.0.0.1", 0))
    database.settimeout(15)
    port = free_port()
    sup = Supervisor(tmp_path, say=lambda line: None)
    try:
        sup.start("scheduler", [sys.executable, "-c", WITH_HELPER, str(port), str(database.getsockname()[1])],
                  dict(os.environ), restart=True)
        first, _ = database.accept()
        wait_for(lambda: "serving" in sup.log("scheduler").read_text(), what="the first start")
        sup.watch()
        [helper] = sup.below["scheduler"]
        sup.procs["scheduler"].kill()
        sup.procs["scheduler"].wait()
        sup.watch()  # the helper is stopped, then the component restarted
        assert not alive(helper)
        first.settimeout(5)
        assert first.recv(1) == b""  # the dead component's connection ended (its server's session with it)
        second, _ = database.accept()
        wait_for(lambda: sup.log("scheduler").read_text().count("serving") == 2, what="the second start")
        assert sup.procs["scheduler"].poll() is None and "Address already in use" not in sup.log("scheduler").read_text()
        first.close(), second.close()
    finally:
        sup.stop(timeout=5)
        database.close()


LIFELINE_PARENT = """
import subprocess, sys, time
code = '''
import os, sys, time
if sys.argv[1] == "lifeline":
    from lottery.deploy.lifeline import stop_with_parent
    assert stop_with_parent()
print("ready", flush=True)
time.sleep(60)
'''
child = subprocess.Popen([sys.executable, "-c", code, sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("lifeline", [True, False], ids=["lifeline", "without"])
def test_a_process_with_a_lifeline_stops_when_its_parent_is_killed(lifeline):
    """The control (no lifeline) survives its parent's SIGKILL: the orphan the lifeline prevents."""
    parent = subprocess.Popen([sys.executable, "-c", LIFELINE_PARENT, "lifeline" if lifeline else "none"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = int(parent.stdout.readline())
    created = psutil.Process(child).create_time()
    try:
        parent.kill()
        parent.wait()
        killed = time.monotonic()
        if lifeline:
            wait_for(lambda: not alive(child, created), timeout=5, what="the child to stop")
            assert time.monotonic() - killed < 2
        else:
            time.sleep(1)
            assert alive(child, created)
    finally:
        if alive(child, created):
            os.kill(child, signal.SIGKILL)


def test_a_recorded_session_whose_id_was_reused_is_left_alone():
    """A stale record names a session id that a later, unrelated session leader now has: the sweep
    must not take that session for the stack's."""
    other = subprocess.Popen(SLEEP, start_new_session=True)
    try:
        started = psutil.Process(other.pid).create_time()
        assert [p.pid for p in stack_processes("no such tag", {other.pid: started})] == [other.pid]
        assert not list(stack_processes("no such tag", {other.pid: started - 100}))
    finally:
        other.kill()
        other.wait()
