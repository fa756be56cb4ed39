"""Several tickets in one process (`retrain`): the same results as one process per ticket,
resumable and idempotent ticket by ticket, bad groups refused before any training.

Real TensorFlow and Keras on the CPU, a tiny learnable data set, short schedules.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lottery.config import ExperimentConfig
from lottery.dense import run_dense
from lottery.late_reset import retrain
from lottery.masks import make_masks
from tests.helpers import kill_at, tiny_training, wait_for
from tests.lockholder import hold_lock
from tests.test_experiment import data_dir  # noqa: F401  (the fixture: 256 + 96 images, 8x8x1, 3 classes)

ROOT = Path(__file__).resolve().parents[1]

# 256 images / batch 32 = 8 iterations per epoch; 3 epochs; tickets rewind to 1ep: 2 epochs each.
TINY = tiny_training(sparsities=[0.5, 0.8, 0.9])
# What differs between two identical trainings: the clock.
CLOCK = ("images_per_s", "wall_s")


@pytest.fixture(scope="module")
def masked_workdir(tmp_path_factory, data_dir):
    """A dense run and its masks, no ticket: copy it before training tickets in it."""
    workdir = tmp_path_factory.mktemp("exp") / "w"
    run_dense(ExperimentConfig.from_dict(TINY), data_dir, workdir, threads=1)
    make_masks(workdir)
    return workdir


@pytest.fixture
def fresh(tmp_path, masked_workdir):
    """A private copy of the masked work directory."""
    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(masked_workdir, target)
        return target
    return copy


def _weights(path: Path) -> list[np.ndarray]:
    import keras

    model = keras.models.load_model(path, compile=False)
    return [np.asarray(v) for v in model.weights]


def assert_same_ticket(a: Path, b: Path) -> None:
    """Two ticket directories hold the same training: curves, accuracies, weights bit for bit."""
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    for key in ("val_accuracy", "best_val_accuracy", "best_epoch", "remaining", "rewind_step", "control"):
        assert ra[key] == rb[key], (a.name, key)
    assert len(ra["curve"]) == len(rb["curve"]) > 0
    for x, y in zip(ra["curve"], rb["curve"]):
        assert {k: v for k, v in x.items() if k not in CLOCK} == {k: v for k, v in y.items() if k not in CLOCK}, a.name
    for x, y in zip(_weights(a / "model.keras"), _weights(b / "model.keras")):
        np.testing.assert_array_equal(x, y, err_msg=a.name)
    assert not (a / "checkpoint.npz").exists() and not (b / "checkpoint.npz").exists()


@pytest.mark.parametrize("control", [None, "random_prune", "random_reinit"])
def test_a_group_trains_each_ticket_as_it_trains_alone(fresh, control):
    """One process, one compiled model, three tickets in turn == each ticket in its own model."""
    group, alone = fresh("group"), fresh("alone")
    results = retrain(group, "all", "1ep", control=control, threads=1)
    assert [r["mask_id"] for r in results] == ["sp50.000", "sp80.000", "sp90.000"]
    assert not any(r["skipped"] for r in results)
    for index in (2, 0, 1):  # another order, each in a fresh model
        retrain(alone, index, "1ep", control=control, threads=1)
    for r in results:
        name = Path(r["ticket"]).name
        assert_same_ticket(group / "tickets" / name, alone / "tickets" / name)
    if control == "random_prune":
        for r in results:
            name = Path(r["ticket"]).name
            assert (group / "tickets" / name / "mask.npz").read_bytes() == (alone / "tickets" / name / "mask.npz").read_bytes()


def test_phases_are_measured_by_a_listener_and_the_shared_costs_go_to_the_first_ticket(fresh):
    """Where the seconds go is measured outside the engine (`lottery.phases`): nothing in result.json
    but its wall time, counted from the group's start."""
    from lottery.phases import listening

    seen = []
    with listening(lambda unit, name, seconds: seen.append((unit, name, seconds))):
        results = retrain(fresh("w"), [1, 2], "1ep", threads=1)
    first, second = (f"retrain {Path(r['ticket']).name}" for r in results)
    phases = {(unit, name) for unit, name, _ in seen}
    shared = ("imports", "data_open", "build_compile")
    assert {(first, name) for name in shared} <= phases and not {(second, name) for name in shared} & phases
    for unit in (first, second):
        assert {(unit, name) for name in ("start", "epochs", "eval", "write")} <= phases, (unit, phases)
    assert all(seconds >= 0 for *_, seconds in seen) and sum(s for u, n, s in seen if n == "epochs") > 0
    records = [json.loads((Path(r["ticket"]) / "result.json").read_text()) for r in results]
    assert not any("timings" in r for r in records + results)
    assert 0 < records[0]["wall_s"] < records[1]["wall_s"], "wall_s counts from the group's start"
    assert [r["wall_s"] for r in results] == [r["wall_s"] for r in records]


def test_switching_tickets_does_not_retrace(fresh, monkeypatch):
    """The mask is state of the compiled step: every ticket of a group runs the same train function,
    traced once (the Python train step runs only while the step is traced)."""
    import keras

    from lottery import training

    traces, seen = [], []
    original_step, original_run = keras.Model.train_step, training.TrainingRun.run

    def train_step(self, *args):  # (data) on TensorFlow, (state, data) on JAX
        traces.append(len(seen))  # how many tickets had finished when this trace happened
        return original_step(self, *args)

    def run(self, start_step):
        history = original_run(self, start_step)
        seen.append((id(self.model), self.model.train_function))
        return history

    monkeypatch.setattr(keras.Model, "train_step", train_step)
    monkeypatch.setattr(training.TrainingRun, "run", run)
    workdir = fresh("w")
    retrain(workdir, "all", "1ep", threads=1)
    assert len(seen) == 3
    assert len({model for model, _ in seen}) == 1, "one model for the group"
    assert all(fn is seen[0][1] for _, fn in seen), "one train function for the group"
    assert traces and set(traces) == {0}, f"traced during the first ticket only: {traces}"
    # ... and each ticket trained with its own mask: its pruned weights are zero, its kept ones are not
    from lottery.models import prunable_weights
    from lottery.pruning import load_mask

    import keras

    for mask_id in ("sp50.000", "sp90.000"):
        mask, _ = load_mask(workdir / "masks" / f"{mask_id}.npz")
        model = keras.models.load_model(workdir / "tickets" / f"{mask_id}__1ep" / "model.keras", compile=False)
        weights = {p: np.asarray(v) for p, v in prunable_weights(model).items()}
        assert all(np.all(weights[p][~keep] == 0.0) for p, keep in mask.items())
        assert sum(np.count_nonzero(weights[p][keep]) for p, keep in mask.items()) > 0.9 * sum(k.sum() for k in mask.values())


def test_a_group_with_tickets_done_trains_only_the_rest(fresh, caplog):
    workdir = fresh("w")
    first = retrain(workdir, ["sp80.000"], "1ep", threads=1)[0]
    done = Path(first["ticket"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    caplog.clear()  # only the group's lines (an earlier test may have left the logger at INFO)
    with caplog.at_level("INFO", logger="lottery"):
        results = retrain(workdir, "all", "1ep", threads=1)
    assert [r["skipped"] for r in results] == [False, True, False]
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == mtimes, "the done ticket is untouched"
    assert "retrain sp80.000__1ep: already done" in caplog.text
    assert "retrain sp80.000__1ep: start" not in caplog.text
    starts = [line for line in caplog.text.splitlines() if ": start  mask" in line]
    ends = [line for line in caplog.text.splitlines() if ": done in" in line]
    epochs = [line for line in caplog.text.splitlines() if " epoch " in line]
    assert len(starts) == len(ends) == 2 and len(epochs) == 4, "a start and an end line per ticket, one per epoch"
    again = retrain(workdir, "all", "1ep", threads=1)
    assert all(r["skipped"] for r in again)


# ---- another run of the same config (the same work directory) at the same time -------------------
def _in_thread(function, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}
    def target():
        try:
            out["result"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001  (the test re-raises it)
            out["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _wait_for_log(caplog, text: str, thread: threading.Thread, timeout: float = 60) -> None:
    def logged() -> bool:
        assert thread.is_alive() or text in caplog.text, f"no {text!r} in the log:\n{caplog.text[-3000:]}"
        return text in caplog.text
    wait_for(logged, timeout, f"{text!r} in the log", interval=0.05, state=lambda: caplog.text[-3000:])


def test_a_ticket_another_process_trains_is_waited_for_not_trained_twice(fresh, caplog, monkeypatch):
    """A group meets a ticket whose training lock another process holds (another run of this
    config): it waits, and when that process has finished the ticket, takes its result and trains
    only the rest. The wait outlasts the data-lock bound: a training is not bounded by it."""
    monkeypatch.setenv("LOTTERY_DATA_LOCK_TIMEOUT", "0.5")
    monkeypatch.delenv("LOTTERY_TRAINING_LOCK_TIMEOUT", raising=False)
    workdir, other = fresh("w"), fresh("other")
    retrain(other, "sp80.000", "1ep", threads=1)  # what the other process will have made
    lock = workdir / ".locks" / "sp80.000__1ep.train.lock"
    holder = hold_lock(lock, 600)
    caplog.clear()  # only this group's lines (an earlier test may have left the logger at INFO)
    try:
        with caplog.at_level("INFO", logger="lottery"):
            thread, out = _in_thread(retrain, workdir, [1, 2], "1ep", threads=1)
            _wait_for_log(caplog, "waiting for the test's holder", thread)
            time.sleep(1.5)  # three times the data-lock bound
            shutil.copytree(other / "tickets" / "sp80.000__1ep", workdir / "tickets" / "sp80.000__1ep")
            done = {p.name: p.stat().st_mtime_ns for p in (workdir / "tickets" / "sp80.000__1ep").iterdir()}
            holder.kill()  # the other process has finished
            thread.join(120)
    finally:
        holder.kill()
    assert "error" not in out, out.get("error")
    assert [r["skipped"] for r in out["result"]] == [True, False]
    assert f"got the lock {lock} after waiting" in caplog.text
    assert "no time limit, LOTTERY_TRAINING_LOCK_TIMEOUT)" in caplog.text
    assert "retrain sp80.000__1ep: already done" in caplog.text and "retrain sp80.000__1ep: start" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (workdir / "tickets" / "sp80.000__1ep").iterdir()} == done
    alone = fresh("alone")
    retrain(alone, "sp90.000", "1ep", threads=1)
    assert_same_ticket(workdir / "tickets" / "sp90.000__1ep", alone / "tickets" / "sp90.000__1ep")


def test_a_dense_run_another_process_trains_is_waited_for_not_trained_twice(fresh, data_dir, caplog, monkeypatch):
    monkeypatch.setenv("LOTTERY_DATA_LOCK_TIMEOUT", "0.5")  # a training wait is not bounded by it
    monkeypatch.delenv("LOTTERY_TRAINING_LOCK_TIMEOUT", raising=False)
    workdir = fresh("w")
    result = workdir / "dense" / "result.json"
    finished = result.read_bytes()
    result.unlink()  # not done yet: the other process is training it
    mtimes = {p.name: p.stat().st_mtime_ns for p in (workdir / "dense").iterdir()}
    holder = hold_lock(workdir / ".locks" / "dense.train.lock", 600)
    caplog.clear()
    try:
        with caplog.at_level("INFO", logger="lottery"):
            thread, out = _in_thread(run_dense, ExperimentConfig.from_dict(TINY), data_dir, workdir, threads=1)
            _wait_for_log(caplog, "waiting for the test's holder", thread)
            time.sleep(1.5)  # three times the data-lock bound
            result.write_bytes(finished)  # the other process has finished
            holder.kill()
            thread.join(120)
    finally:
        holder.kill()
    assert "error" not in out, out.get("error")
    assert out["result"]["skipped"] is True and "dense: already done" in caplog.text and "dense: start" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (workdir / "dense").iterdir() if p.name != "result.json"} == mtimes


def test_a_training_wait_is_bounded_by_its_own_setting(fresh, monkeypatch):
    """``LOTTERY_TRAINING_LOCK_TIMEOUT`` bounds the wait for another run's training, and the error
    names it; a generous data-lock bound does not lengthen it."""
    from lottery.locks import LockTimeout

    monkeypatch.setenv("LOTTERY_DATA_LOCK_TIMEOUT", "600")
    monkeypatch.setenv("LOTTERY_TRAINING_LOCK_TIMEOUT", "0.6")
    workdir = fresh("w")
    holder = hold_lock(workdir / ".locks" / "sp80.000__1ep.train.lock", 600)
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=r"waited 1 s for the test's holder .* raise LOTTERY_TRAINING_LOCK_TIMEOUT"):
            retrain(workdir, [1], "1ep", threads=1)
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
    assert not (workdir / "tickets" / "sp80.000__1ep").exists()


@pytest.mark.parametrize("damage", ["truncate model", "flip a byte of the metrics", "delete model", "truncate result"])
def test_a_damaged_ticket_is_named_and_trained_again(fresh, caplog, damage):
    workdir = fresh("w")
    first, other = retrain(workdir, "all", "1ep", threads=1)[:2]
    ticket, untouched = Path(first["ticket"]), Path(other["ticket"])
    result = json.loads((ticket / "result.json").read_text())
    assert set(result["files"]) == {"model.keras", "metrics.csv"}, "the result vouches for the ticket's files"
    model, metrics = ticket / "model.keras", ticket / "metrics.csv"
    if damage == "truncate model":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "flip a byte of the metrics":  # same size: only the sha256 tells
        data = bytearray(metrics.read_bytes())
        data[10] ^= 1
        metrics.write_bytes(bytes(data))
    elif damage == "delete model":
        model.unlink()
    else:
        (ticket / "result.json").write_text((ticket / "result.json").read_text()[:40])
    mtimes = {p.name: p.stat().st_mtime_ns for p in untouched.iterdir()}
    caplog.clear()
    with caplog.at_level("INFO", logger="lottery"):
        again = retrain(workdir, "all", "1ep", threads=1)
    assert [r["skipped"] for r in again] == [False, True, True]
    assert f"retrain {ticket.name}: damaged, training it again: " in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in untouched.iterdir()} == mtimes, "intact tickets are untouched"
    retrained = json.loads((ticket / "result.json").read_text())
    assert retrained["val_accuracy"] == result["val_accuracy"], "the same training again, bit for bit"
    assert [{k: v for k, v in row.items() if k not in CLOCK} for row in retrained["curve"]] == \
        [{k: v for k, v in row.items() if k not in CLOCK} for row in result["curve"]]
    assert all(r["skipped"] for r in retrain(workdir, "all", "1ep", threads=1))


@pytest.mark.parametrize("masks,control,message", [
    ([0, "sp50.000"], None, r"mask sp50.000 is named twice in the group \(as 0 and 'sp50.000'\)"),
    (["1", 1], None, "mask sp80.000 is named twice"),
    ([0, "sp12.000"], None, r"unknown mask 'sp12.000'"),
    ([0, 7], None, "mask index 7 is out of range"),
    ([], None, "names no mask"),
    ([0, 1], ["random_prune", None], r"a group mixes controls \(none \(ticket\), random_prune\)"),
    ([0, 1], ["random_prune", "random_reinit"], r"mixes controls \(random_prune, random_reinit\)"),
    ([0, 1], "random_shuffle", "unknown control 'random_shuffle'"),
])
def test_bad_groups_are_refused_before_any_training(fresh, masks, control, message):
    workdir = fresh("w")
    with pytest.raises(ValueError, match=message):
        retrain(workdir, masks, "1ep", control=control, threads=1)
    assert not (workdir / "tickets").exists(), "nothing trained, nothing written"


def test_the_cli_refuses_a_bad_group_naming_the_value(fresh, capsys):
    from lottery.cli import main

    workdir = fresh("w")
    assert main(["retrain", "--workdir", str(workdir), "--mask", "0,2,0", "--rewind", "1ep"]) == 2
    assert "mask sp50.000 is named twice" in capsys.readouterr().err
    assert main(["retrain", "--workdir", str(workdir), "--mask", "0,1", "--rewind", "1ep",
                 "--control", "random_prune,random_reinit"]) == 2
    assert "mixes controls" in capsys.readouterr().err
    assert not (workdir / "tickets").exists()


def _cli(workdir: Path, *args: str) -> tuple[list[str], dict]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the session's backend, `make run`'s
    return [sys.executable, "-m", "lottery", "retrain", "--workdir", str(workdir), "--threads", "1", *args], env


@pytest.fixture(scope="module")
def group_process(tmp_path_factory, masked_workdir):
    """(work directory, completed process): every ticket at 1ep trained by one `retrain` process."""
    workdir = tmp_path_factory.mktemp("group") / "w"
    shutil.copytree(masked_workdir, workdir)
    cmd, env = _cli(workdir, "--mask", "0,1,2", "--rewind", "1ep")
    return workdir, subprocess.run(cmd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_one_process_per_ticket_and_one_group_process_agree_bit_for_bit(fresh, group_process):
    """The acceptance test: `retrain --mask 0,1,2` == three `retrain --mask i` processes."""
    (group, run), alone = group_process, fresh("alone")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["mask_id"] for r in json.loads(run.stdout)] == ["sp50.000", "sp80.000", "sp90.000"]
    for index in ("2", "0", "1"):
        cmd, env = _cli(alone, "--mask", index, "--rewind", "1ep")
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads(run.stdout)["skipped"] is False
    for name in ("sp50.000__1ep", "sp80.000__1ep", "sp90.000__1ep"):
        assert_same_ticket(group / "tickets" / name, alone / "tickets" / name)


@pytest.mark.slow
def test_a_killed_group_reruns_only_its_missing_tickets(fresh, group_process):
    """SIGKILL once the first ticket is done and the second has an epoch checkpoint; the rerun
    leaves the first untouched, resumes the second, trains the third: all as an unbroken group."""
    killed = fresh("killed")
    cmd, env = _cli(killed, "--mask", "all", "--rewind", "1ep")
    tickets = killed / "tickets"
    kill_at(cmd, env, tickets / "sp80.000__1ep" / "checkpoint.npz", tickets / "sp50.000__1ep" / "result.json")
    assert (tickets / "sp80.000__1ep" / "checkpoint.npz").exists(), "not killed mid-way: make the epochs longer"
    assert not (tickets / "sp80.000__1ep" / "result.json").exists() and not (tickets / "sp90.000__1ep").exists()
    done = tickets / "sp50.000__1ep"
    mtimes = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [r["skipped"] for r in json.loads(rerun.stdout)] == [True, False, False]
    assert "retrain sp80.000__1ep: resuming from the checkpoint" in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == mtimes, "the finished ticket is untouched"
    whole, _ = group_process
    for name in ("sp50.000__1ep", "sp80.000__1ep", "sp90.000__1ep"):
        assert_same_ticket(tickets / name, whole / "tickets" / name)


def test_a_group_that_cannot_open_its_data_reports_every_ticket(fresh, tmp_path):
    workdir = fresh("w")
    with pytest.raises(Exception, match="manifest"):
        retrain(workdir, [0, 2], "1ep", threads=1, data_dir=tmp_path / "no-such-data")
    for name in ("sp50.000__1ep", "sp90.000__1ep"):
        error = json.loads((workdir / "tickets" / name / "error.json").read_text())
        assert "no-such-data" in error["error"], error["error"]
    assert not (workdir / "tickets" / "sp80.000__1ep").exists()


def test_a_group_with_nothing_to_do_imports_no_keras(fresh):
    """The DAG reruns done groups: that costs no Keras import."""
    workdir = fresh("w")
    retrain(workdir, [1], "1ep", threads=1)
    code = ("import sys; from lottery.late_reset import retrain; "
            f"r = retrain({str(workdir)!r}, ['sp80.000'], '1ep'); "
            "assert r[0]['skipped'] and 'keras' not in sys.modules, sorted(m for m in sys.modules if 'keras' in m)[:3]")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
