"""Supervision with the real make run (scheduler + LocalExecutor + api-server + dag-processor
on a throwaway home, tiny data): components and task processes SIGKILLed one after another in one
run, then a second run stopped with SIGTERM. Each fault's figures are printed (docs/reliability.md).

0. the api-server, while tickets train: restarted (one line), and no ticket in training retried
   (the task supervisors' calls to its execution API retry meanwhile);
1. training task processes, mid-ticket: Airflow retries them and each ticket resumes from its epoch
   checkpoint;
2. the task supervisors (the LocalExecutor workers) of training tasks: each task process stops
   itself (PR_SET_PDEATHSIG, plugins/lottery_lifeline.py); after the heartbeat timeout the ticket
   is retried and resumes;
3. the scheduler, while tickets train: restarted (one line); its LocalExecutor workers finish the
   tasks they were supervising, so nothing is lost;
4. the dag-processor: restarted;
the run then succeeds, every ticket finished before a fault untouched (result.json mtimes), and no
process of the run is left. A second run, stopped with SIGTERM while a ticket trains, stops every
process it started. About 4 minutes for both on a 2-core machine.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from lottery.deploy import airflow_home
from lottery.deploy.api import Api
from lottery.files import json_or
from tests.helpers import event_time, log_events, start_make_run, tiny_run, wait_for

pytestmark = pytest.mark.slow

# Tickets of ~5-20 s each (12 short epochs: an epoch checkpoint exists mid-ticket), two
# training task instances at a time (tickets_per_task 2: 8 instances of 2 tickets).
CONF = tiny_run(dataset_limit=2000, training_steps="12ep", sparsities=[0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95],
                 controls=False, tickets_per_task=2, drop=("control_sparsities",))


class Probe:
    """What the test sees of a running make run: components, task processes, tickets, logs."""

    def __init__(self, home: Path, art: Path, out: Path, proc: subprocess.Popen):
        self.home, self.art, self.out, self.proc = home, art, out, proc
        self.sessions: set[int] = set()  # every component is a session leader; its processes keep the session

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.1):
        def check():
            self.note_components()
            value = predicate()
            if not value and self.proc.poll() is not None:
                pytest.fail(f"make run ended (exit {self.proc.returncode}) while waiting for {what}:\n{self.text()[-4000:]}")
            return value

        return wait_for(check, timeout, what, interval=interval, state=lambda: "\n" + self.text()[-4000:])

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def note_components(self) -> dict[str, int]:
        pids = json_or(self.home / airflow_home.COMPONENTS_FILE, {}).get("pids", {})
        self.sessions.update(pids.values())
        return pids

    def component(self, name: str) -> int:
        return self.note_components().get(name, 0)

    def kill_component(self, name: str) -> int:
        """SIGKILL component ``name``; its pid."""
        pid = self.component(name)
        os.kill(pid, signal.SIGKILL)
        return pid

    def restarted(self, name: str, pid: int) -> str:
        """Wait for the supervisor's restart line of ``name`` (killed as ``pid``), then for its new
        pid; the line."""
        line = self.wait(lambda: re.search(rf"{name} died \(exit -9\), restarting it \(1/3\)(; log: \S+)?", self.text()),
                         30, f"the {name}'s restart line")
        self.wait(lambda: self.component(name) not in (0, pid), 10, f"the new {name}'s pid")
        return line.group(0)

    def ours(self) -> list[psutil.Process]:
        """Every live process of the components this run started (their environment is no use:
        setproctitle writes over it)."""
        found = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) in self.sessions and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (OSError, psutil.Error):
                pass
        return found

    def tickets(self) -> list[Path]:
        return sorted(self.art.glob("*/tickets/*"))

    def in_training(self) -> set[str]:
        """Tickets mid-training: an epoch checkpoint, no result, and at least 4 of 12 epochs to go (~2 s)."""
        def epochs(ticket: Path) -> int:
            try:
                return len((ticket / "metrics.csv").read_text().splitlines()) - 1
            except OSError:
                return 0
        return {t.name for t in self.tickets()
                if (t / "checkpoint.npz").exists() and not (t / "result.json").exists() and epochs(t) <= 8}

    def finished(self) -> dict[str, int]:
        return {t.name: (t / "result.json").stat().st_mtime_ns for t in self.tickets() if (t / "result.json").exists()}

    def task_processes(self) -> list[psutil.Process]:
        """Airflow's task processes on this home (title ``airflow worker -- <task instance id>``)."""
        found = []
        for p in self.ours():
            title = " ".join(_cmdline(p))
            if re.fullmatch(r"airflow worker -- [0-9a-f-]{36}", title.strip()):
                found.append(p)
        return found

    def task_logs(self) -> list[Path]:
        return list(self.home.glob("logs/dag_id=*/run_id=*/task_id=late_reset/**/attempt=*.log"))

    def training_under_scheduler(self) -> dict[psutil.Process, str]:
        """Task processes supervised by a LocalExecutor worker of the live scheduler, and the ticket
        each one is training (mid-training, see ``in_training``), from its task log."""
        scheduler, training, found = self.component("scheduler"), self.in_training(), {}
        logs = {log: log.read_text(errors="replace") for log in self.task_logs()}
        for p in self.task_processes():
            try:
                if p.parent().ppid() != scheduler:
                    continue
            except (psutil.Error, AttributeError):
                continue
            words = " ".join(_cmdline(p)).split()
            if not words:  # it ended since it was listed
                continue
            ti = words[-1]
            for text in (text for text in logs.values() if ti in text):
                names = re.findall(r"retrain (\S+) epoch \d+/\d+", text)
                if names and names[-1] in training:
                    found[p] = names[-1]
        return found

    def resumes(self) -> dict[str, list[float]]:
        """Ticket -> when (epoch seconds, from the task logs) each retry resumed it from its checkpoint."""
        seen: dict[str, list[float]] = {}
        for log in self.task_logs():
            for event in log_events(log.read_text(errors="replace")):
                if "resuming from the checkpoint" in str(event.get("event", "")):
                    name = re.match(r"retrain (\S+): resuming", event["event"]).group(1)
                    seen.setdefault(name, []).append(event_time(event))
        return seen

    def resumed_after(self, names: set[str], since: float) -> dict[str, float]:
        """Seconds from ``since`` (epoch seconds) to the first resume of each ticket after it."""
        out = {}
        for name, times in self.resumes().items():
            later = [t - since for t in times if t >= since]
            if name in names and later:
                out[name] = round(min(later), 1)
        return out


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def kill_mid_ticket(probe: Probe, kill) -> tuple[set[str], dict[str, int], float]:
    """Once tickets train, call ``kill()``; the tickets then mid-training, the finished ones, the time."""
    probe.wait(probe.in_training, 900, "a ticket mid-training (an epoch checkpoint, no result)", interval=0.05)
    training, finished = probe.in_training(), probe.finished()
    kill()
    return training, finished, time.monotonic()


def test_components_and_task_processes_killed_in_one_run(tmp_path):
    home, art, out = tmp_path / "home", tmp_path / "art", tmp_path / "make-run.log"
    proc = start_make_run(home, {**CONF, "artifact_root": str(art)}, out)
    probe, figures = Probe(home, art, out, proc), {}
    try:
        # 0. the api-server, while tickets train: restarted on its port; the task supervisors' calls to
        # its execution API retry meanwhile, so no ticket in training is lost or retried
        killed = {}
        lost0, before0, _ = kill_mid_ticket(probe, lambda: killed.update(api=probe.kill_component("api-server")))
        t0 = time.time()
        probe.restarted("api-server", killed["api"])
        figures["api-server SIGKILL -> restarted (s)"] = round(time.time() - t0, 1)

        # 1. task processes (supervised by the live scheduler's workers) mid-ticket
        victims = probe.wait(probe.training_under_scheduler, 900, "a task process mid-ticket", interval=0.05)
        before1 = probe.finished()
        for p in victims:
            p.send_signal(signal.SIGKILL)
        t1, lost1 = time.time(), set(victims.values())
        retried0 = {n: [round(t - t0, 1) for t in ts if t0 <= t < t1] for n, ts in probe.resumes().items() if n in lost0}
        figures["api-server SIGKILL: tickets in training retried"] = retried0 = {n: ts for n, ts in retried0.items() if ts}

        # 2. the supervisors (LocalExecutor workers) of other task processes, mid-ticket: the tasks stop themselves
        victims = probe.wait(probe.training_under_scheduler, 600, "a task process mid-ticket", interval=0.05)
        before2 = probe.finished()
        for p in victims:
            p.parent().send_signal(signal.SIGKILL)
        t2, lost2 = time.time(), set(victims.values())
        _, left = psutil.wait_procs(list(victims), timeout=15)
        assert not left, f"task processes outlived their supervisor: {left}"
        figures["supervisor SIGKILL -> task process gone (s)"] = round(time.time() - t2, 1)

        # 3. the scheduler, while tickets train. First the tickets of fault 2 back in training: their task
        # instances wait for the heartbeat check of the scheduler that queued them, and a restarted
        # scheduler leaves them to the orphan check, every 300 s (measured: 333 s; docs/reliability.md)
        probe.wait(lambda: set(probe.resumed_after(lost2, t2)) == lost2, 300, "the tickets of fault 2 back in training")
        probe.wait(lambda: probe.in_training() - lost1 - lost2, 600, "a ticket of no earlier fault mid-training", interval=0.05)
        training, before3, _ = kill_mid_ticket(probe, lambda: killed.update(scheduler=probe.kill_component("scheduler")))
        t3, lost3 = time.time(), set(training) - lost1 - lost2
        line = probe.restarted("scheduler", killed["scheduler"])
        figures["scheduler SIGKILL -> restarted (s)"] = round(time.time() - t3, 1)
        assert re.search(r"; log: \S+scheduler.log$", line), line
        print(line)

        # 4. the dag-processor
        probe.restarted("dag-processor", probe.kill_component("dag-processor"))

        rc = proc.wait(900)
        text = probe.text()
        assert rc == 0 and "SUCCESS" in text, text[-5000:]
        figures["task process SIGKILL -> ticket trains again (s)"] = took1 = probe.resumed_after(lost1, t1)
        figures["supervisor SIGKILL -> ticket trains again (s)"] = took2 = probe.resumed_after(lost2, t2)
        figures["scheduler SIGKILL: tickets in training retried"] = retried3 = probe.resumed_after(lost3, t3)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        print(probe.text()[-3000:])
        print("figures:", json.dumps(figures))
    assert lost0 and not retried0, figures  # the api-server's death cost no ticket anything
    assert set(took1) == lost1 and set(took2) == lost2, figures  # each resumed from its checkpoint
    assert lost3 and not retried3, figures  # the scheduler's workers finished what they supervised
    assert len(probe.finished()) == 16
    after = probe.finished()
    for snapshot in (before0, before1, before2, before3):  # nothing finished before a fault was trained again
        assert {n: after[n] for n in snapshot} == snapshot
    assert len(probe.sessions) == 6  # three components, each restarted once
    assert not probe.ours(), [(p.pid, _cmdline(p)) for p in probe.ours()]


def test_sigterm_to_make_run_stops_every_process(tmp_path):
    home, art, out = tmp_path / "home", tmp_path / "art", tmp_path / "make-run.log"
    proc = start_make_run(home, {**CONF, "artifact_root": str(art), "sparsities": [0.5]}, out)
    probe = Probe(home, art, out, proc)
    try:
        probe.wait(probe.in_training, 900, "a ticket mid-training", interval=0.2)
        tasks = probe.task_processes()
        assert tasks
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        print(probe.text()[-3000:])
    print(f"figures: make run stopped {took:.1f}s after SIGTERM with {len(tasks)} task process(es) running")
    assert rc == 130 and "interrupted: stopping Airflow" in probe.text()
    assert not probe.ours(), [(p.pid, _cmdline(p)) for p in probe.ours()]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tasks)
