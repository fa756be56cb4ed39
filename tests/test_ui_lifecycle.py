"""`make ui` started and stopped as users do, with the real make: every port on loopback, and no
Airflow process outlives it, however it ends.

1. while it runs, every listening socket of its processes is on 127.0.0.1 (or ::1);
2. its supervisor SIGKILLed: the reaper stops every component within 10 s;
3. its supervisor and reaper SIGKILLed together: the components stay (nothing could stop them),
   and the next `make ui` on the same home stops them, naming them, and starts;
4. SIGTERM to `make ui`'s whole process group (what `timeout`, a service manager or
   `kill -- -PGID` send; make forwards a second one): no Airflow process is left after 15 s.

"Airflow process" here is any process whose environment names the test's home as AIRFLOW_HOME, or
that is in the session of a process seen below `make ui` (a process that retitles itself, as the
api-server and the LocalExecutor's workers do, overwrites its environment), independently of the
supervisor's own bookkeeping.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from lottery.deploy.constants import REPO
from lottery.deploy.supervisor import free_port
from tests.helpers import listening, wait_for, without_test_airflow

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


SESSIONS: set[int] = set()  # of the processes seen below each make ui


def airflow_processes(home: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) in SESSIONS or p.environ().get("AIRFLOW_HOME") == str(home):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return out


class MakeUi:
    def __init__(self, home: Path, out: Path):
        self.home, self.out, self.port = home, out, free_port()
        env = without_test_airflow(os.environ)
        env.pop("MAKEFLAGS", None)
        self.proc = subprocess.Popen(
            ["make", "-s", "ui", f"LOTTERY_AIRFLOW_HOME={home}", f"UI_PORT={self.port}"], cwd=REPO, env=env,
            stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"make ui ended (exit {self.proc.returncode}):\n{self.text()[-3000:]}")
            return "Airflow UI:" in self.text()

        wait_for(ready, 600, "make ui's welcome", interval=1, state=lambda: self.text()[-3000:])
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            if "lottery.deploy" not in " ".join(p.cmdline()):  # the components, not the supervisor or reaper
                SESSIONS.add(os.getsid(p.pid))

    def supervisor(self) -> psutil.Process:
        """The Python process below make: the supervisor."""
        return next(p for p in psutil.Process(self.proc.pid).children() if "lottery.deploy.ui" in " ".join(p.cmdline()))

    def reaper(self) -> psutil.Process:
        return next(p for p in self.supervisor().children() if "lottery.deploy.supervisor" in " ".join(p.cmdline()))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def gone_within(home: Path, seconds: float) -> float:
    """Seconds until no Airflow process of ``home`` is left (the test fails after ``seconds``)."""
    t0 = time.monotonic()
    wait_for(lambda: not airflow_processes(home), seconds, f"every Airflow process of {home} to end", interval=0.2,
             state=lambda: describe(airflow_processes(home)))
    return time.monotonic() - t0


@pytest.mark.timeout(1500)
def test_make_ui_binds_loopback_and_leaves_nothing_behind(tmp_path):
    home = tmp_path / "home"
    uis = []
    try:
        # 1. ports, then 2. the supervisor SIGKILLed: the reaper stops the components
        ui = MakeUi(home, tmp_path / "ui-1.log")
        uis.append(ui)
        ui.wait_ready()
        procs = airflow_processes(home)
        sockets = listening(procs)
        assert any(port == ui.port for _, port, _ in sockets), sockets
        assert all(address in LOOPBACK for address, _, _ in sockets), sockets
        ui.supervisor().kill()
        reaped_s = gone_within(home, 10)

        # 3. supervisor and reaper SIGKILLed: the next make ui stops the leftovers, naming them
        ui = MakeUi(home, tmp_path / "ui-2.log")
        uis.append(ui)
        ui.wait_ready()
        reaper, supervisor = ui.reaper(), ui.supervisor()
        reaper.kill()
        wait_for(lambda: not reaper.is_running() or reaper.status() == psutil.STATUS_ZOMBIE, 10, "the reaper's end")
        supervisor.kill()
        time.sleep(3)
        left = airflow_processes(home)
        assert any(re.search(r"api[-_]server", " ".join(p.cmdline())) for p in left), describe(left)
        ui.kill()

        ui = MakeUi(home, tmp_path / "ui-3.log")
        uis.append(ui)
        ui.wait_ready()
        line = re.search(r"stopped (\d+) processes left running on .* by an earlier supervisor", ui.text())
        assert line and int(line.group(1)) >= 3, ui.text()[-3000:]
        assert not any(p.pid in {q.pid for q in left} for p in airflow_processes(home))

        # 4. SIGTERM to the whole process group
        t0 = time.monotonic()
        os.killpg(ui.proc.pid, signal.SIGTERM)
        gone_s = gone_within(home, 15)
        ui.proc.wait(30)
        stopped_s = time.monotonic() - t0
        assert "Traceback" not in ui.text(), ui.text()[-3000:]
    finally:
        for ui in uis:
            ui.kill()
        for p in airflow_processes(home):
            p.kill()
    print(f"\nfigures: make ui's supervisor SIGKILLed: every component gone {reaped_s:.1f} s later; SIGTERM to its "
          f"process group: every Airflow process gone after {gone_s:.1f} s, make ended after {stopped_s:.1f} s; "
          f"listening: {sorted({(a, p) for a, p, _ in sockets})}")
