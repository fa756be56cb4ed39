"""Fault injection on the artifacts: each kind truncated, or one bit flipped (same size), then its
unit rerun through the CLI (`lottery.cli.main`, in this process); and a full disk during a
checkpoint write (a real size-limited tmpfs where mounting is allowed, an injected ENOSPC always).

Each case asserts that the damage is named in the log, that nothing damaged is used (the unit's
outputs equal the clean run's bit for bit, or the unit fails naming the damaged input), and that
nothing intact is recomputed (every other file keeps its mtime).

Real TensorFlow and Keras on the CPU, a tiny learnable data set, 3-epoch schedules.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lottery import cli
from lottery.files import arrays_damage, load_arrays
from tests.datasets import make_synthetic_shards
from tests.helpers import tiny_training

ROOT = Path(__file__).resolve().parents[1]

# 256 images / batch 32 = 8 iterations per epoch, 3 epochs; tickets rewind to 0it.
TINY = tiny_training(rewind_points=["0it", "3it", "1ep"])
CLOCK = ("images_per_s", "wall_s", "timings")  # what differs between two identical trainings
WHERE = ("workdir", "ticket")  # a result's own directory (the copies live elsewhere)
TICKET = "tickets/sp50.000__0it"


class Interrupted(BaseException):
    """Stands in for a kill right after an epoch checkpoint was written."""


def _cli(*args) -> int:
    return cli.main([str(a) for a in args])


def _dense(data_dir, workdir) -> int:
    return _cli("dense", "--config", workdir.parent / "cfg.json", "--data", data_dir, "--workdir", workdir, "--threads", 1)


def _tickets(workdir, *extra) -> int:
    return _cli("retrain", "--workdir", workdir, "--mask", "0,1", "--rewind", "0it", "--threads", 1, *extra)


def _control(workdir) -> int:
    return _cli("retrain", "--workdir", workdir, "--mask", "0", "--rewind", "0it", "--control", "random_prune", "--threads", 1)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """(data directory, a finished work directory): the dense run, its masks, two tickets at 0it and
    a random_prune control; a pristine copy: copy it before damaging it."""
    root = tmp_path_factory.mktemp("faults")
    data_dir = make_synthetic_shards(root, 256, 96, shape=(8, 8, 1), num_classes=3)
    workdir = root / "clean" / "w"
    workdir.parent.mkdir()
    (workdir.parent / "cfg.json").write_text(json.dumps(TINY))
    assert _dense(data_dir, workdir) == 0
    assert _cli("masks", "--workdir", workdir) == 0
    assert _tickets(workdir) == 0 and _control(workdir) == 0
    return data_dir, workdir


def _interrupt_after_first_epoch(run):
    """Run ``run()`` and stop it (like a kill) right after its first epoch checkpoint is written."""
    from lottery import training

    real = training.save_checkpoint

    def save_then_stop(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if Path(path).name == "checkpoint.npz":
            raise Interrupted()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            run()


@pytest.fixture(scope="module")
def interrupted(clean, tmp_path_factory):
    """Work directories left by a killed run: the dense run after its first epoch (``dense``), and
    the ticket sp50.000__0it after its first epoch, everything else done (``ticket``)."""
    data_dir, done = clean
    root = tmp_path_factory.mktemp("interrupted")
    dense = root / "dense" / "w"
    dense.parent.mkdir()
    shutil.copy(done.parent / "cfg.json", dense.parent / "cfg.json")
    _interrupt_after_first_epoch(lambda: _dense(data_dir, dense))
    assert (dense / "dense" / "checkpoint.npz").exists() and not (dense / "dense" / "result.json").exists()
    ticket = root / "ticket" / "w"
    shutil.copytree(done, ticket)
    shutil.rmtree(ticket / TICKET)
    _interrupt_after_first_epoch(lambda: _tickets(ticket))
    (ticket / TICKET / "error.json").unlink()  # a killed process leaves no note
    assert (ticket / TICKET / "checkpoint.npz").exists() and not (ticket / TICKET / "result.json").exists()
    return {"dense": dense, "ticket": ticket}


# ---- comparing work directories ------------------------------------------------------------------
def _mtimes(workdir: Path) -> dict[str, int]:
    """Every artifact's mtime (not the training locks': taking one writes its holder into it)."""
    return {p.relative_to(workdir).as_posix(): p.stat().st_mtime_ns for p in workdir.rglob("*")
            if p.is_file() and p.parent.name != ".locks"}


def _content(path: Path):
    """What must be the same bit for bit after a recomputation (not the clock, not zip dates)."""
    if path.suffix == ".keras":
        import keras

        return [np.asarray(w) for w in keras.models.load_model(path, compile=False).weights]
    if path.name == "result.json":
        result = json.loads(path.read_text())
        result.pop("checksum", None)
        curve = [{k: v for k, v in row.items() if k not in CLOCK} for row in result["curve"]]
        return {**{k: v for k, v in result.items() if k not in (*CLOCK, *WHERE, "curve", "files")}, "curve": curve}
    if path.suffix == ".csv":
        import csv

        return [{k: v for k, v in row.items() if k not in CLOCK} for row in csv.DictReader(path.open())]
    return path.read_bytes()


def _assert_same(path: Path, clean_path: Path) -> None:
    a, b = _content(path), _content(clean_path)
    if isinstance(a, list) and a and isinstance(a[0], np.ndarray):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), path
    elif isinstance(a, dict) and a and all(isinstance(v, np.ndarray) for v in a.values()):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), path
    else:
        assert a == b, path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only a checksum tells
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "one bit flipped": _flip_a_bit}

# kind: (the file damaged, the work directory it is damaged in, the unit rerun, what that unit may
# rewrite (prefixes; the rest keeps its mtime), and "recomputed" or the damaged input is "refused")
DENSE_OUT = ("dense/final.keras", "dense/metrics.csv", "dense/result.json", "run.json")
KINDS = {
    "dense final.keras": ("dense/final.keras", "clean", "dense", DENSE_OUT, "recomputed"),
    "dense metrics.csv": ("dense/metrics.csv", "clean", "dense", DENSE_OUT, "recomputed"),
    "dense result.json": ("dense/result.json", "clean", "dense", DENSE_OUT, "recomputed"),
    "rewind checkpoint": ("dense/rewind/3it.npz", "clean", "dense", (*DENSE_OUT, "dense/rewind/3it."), "recomputed"),
    "rewind checkpoint's record": ("dense/rewind/3it.json", "clean", "dense", (*DENSE_OUT, "dense/rewind/3it."), "recomputed"),
    "rewind checkpoint read by a ticket": ("dense/rewind/3it.npz", "clean", "ticket at 3it", ("tickets/sp50.000__3it",), "refused"),
    "dense resume checkpoint": ("dense/checkpoint.npz", "dense", "dense", ("dense/", "run.json"), "recomputed"),
    "mask": ("masks/sp50.000.npz", "clean", "masks", ("masks/sp50.000.",), "recomputed"),
    "mask report": ("masks/sp50.000.json", "clean", "masks", ("masks/sp50.000.",), "recomputed"),
    "mask read by a ticket": ("masks/sp50.000.npz", "clean", "ticket at 1ep", ("tickets/sp50.000__1ep",), "refused"),
    "ticket model.keras": (f"{TICKET}/model.keras", "clean", "tickets", (TICKET,), "recomputed"),
    "ticket metrics.csv": (f"{TICKET}/metrics.csv", "clean", "tickets", (TICKET,), "recomputed"),
    "ticket result.json": (f"{TICKET}/result.json", "clean", "tickets", (TICKET,), "recomputed"),
    "control's random mask": (f"{TICKET}__random_prune/mask.npz", "clean", "control", (f"{TICKET}__random_prune",), "recomputed"),
    "ticket resume checkpoint": (f"{TICKET}/checkpoint.npz", "ticket", "tickets", (TICKET,), "recomputed"),
}
UNITS = {
    "dense": lambda data_dir, w: _dense(data_dir, w),
    "masks": lambda data_dir, w: _cli("masks", "--workdir", w),
    "tickets": lambda data_dir, w: _tickets(w),
    "control": lambda data_dir, w: _control(w),
    "ticket at 3it": lambda data_dir, w: _cli("retrain", "--workdir", w, "--mask", "0", "--rewind", "3it", "--threads", 1),
    "ticket at 1ep": lambda data_dir, w: _cli("retrain", "--workdir", w, "--mask", "0", "--rewind", "1ep", "--threads", 1),
}


def _copy(source: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "w"
    shutil.copytree(source.parent, workdir.parent, dirs_exist_ok=True)  # the config beside it too
    return workdir


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_artifact_is_named_and_never_used(kind, damage, clean, interrupted, tmp_path, caplog, capsys):
    data_dir, done = clean
    name, where, unit, may_change, outcome = KINDS[kind]
    workdir = _copy(done if where == "clean" else interrupted[where], tmp_path / "case")
    before = _mtimes(workdir)
    DAMAGE[damage](workdir / name)
    with caplog.at_level("INFO", logger="lottery"):
        status = UNITS[unit](data_dir, workdir)
    log = caplog.text + capsys.readouterr().err
    damaged_name = Path(name).name
    if outcome == "refused":
        assert status == 2, f"the unit must fail when its input {name} is damaged"
        assert f"{damaged_name}" in log and ("sha256" in log or "damaged" in log or "corrupted" in log), log[-2000:]
        error = json.loads((workdir / may_change[0] / "error.json").read_text())["error"]
        assert damaged_name in error and not (workdir / may_change[0] / "result.json").exists()
    else:
        assert status == 0, log[-3000:]
        assert "damaged" in log and damaged_name in log, f"the damage to {name} is not named:\n{log[-3000:]}"
        assert "resuming" not in log, "a damaged resume checkpoint was used"
        for rel in _unit_outputs(done, may_change):
            _assert_same(workdir / rel, done / rel)
    after = _mtimes(workdir)
    untouched = {rel: t for rel, t in before.items() if rel != name and not rel.startswith(may_change)}
    assert {rel: after.get(rel) for rel in untouched} == untouched, "an intact artifact was rewritten"


def _unit_outputs(done: Path, may_change: tuple[str, ...]) -> list[str]:
    """The files of the clean run that the unit makes (those it may rewrite), to compare."""
    files = [rel for rel in _mtimes(done) if rel.startswith(may_change) and rel != "run.json"]
    assert files, may_change
    return files


def test_an_intact_resume_checkpoint_is_used(clean, interrupted, tmp_path, caplog):
    """The other side of the resume cases above: undamaged, the killed runs resume (and end as the
    clean run did), so a damaged checkpoint that were used would show."""
    data_dir, done = clean
    dense = _copy(interrupted["dense"], tmp_path / "dense")
    ticket = _copy(interrupted["ticket"], tmp_path / "ticket")
    with caplog.at_level("INFO", logger="lottery"):
        assert _dense(data_dir, dense) == 0 and _tickets(ticket) == 0
    assert "dense: resuming from the checkpoint at step 8" in caplog.text
    assert "retrain sp50.000__0it: resuming from the checkpoint at step 8" in caplog.text
    for rel in ("dense/final.keras", "dense/result.json", "dense/metrics.csv"):
        _assert_same(dense / rel, done / rel)
    for rel in ("model.keras", "result.json", "metrics.csv"):
        _assert_same(ticket / TICKET / rel, done / TICKET / rel)


def test_every_single_bit_flip_of_a_sealed_result_is_refused(tmp_path):
    """Byte by byte, bit by bit: a flip that leaves valid JSON (a digit, even one that parses to the
    same float; the seal's own name) is refused all the same."""
    from lottery.errors import CorruptArtifactError
    from lottery.files import read_json, write_json

    path = tmp_path / "result.json"
    write_json(path, {"val_accuracy": 0.48071234567890123, "curve": [{"epoch": 1}], "files": {"m": {"sha256": "ab" * 32}}},
               sealed=True)
    clean = path.read_bytes()
    accepted = []
    for i in range(len(clean)):
        for bit in range(8):
            damaged = bytearray(clean)
            damaged[i] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            try:
                read_json(path)
                accepted.append((i, bit))
            except CorruptArtifactError:
                pass
    assert accepted == [], f"{len(accepted)} of {8 * len(clean)} flips read as good"
    path.write_bytes(clean)
    assert read_json(path)["val_accuracy"] == 0.48071234567890123


def test_a_result_without_its_seal_is_refused(tmp_path, caplog):
    """Every result is written sealed: one without its seal is damaged, however good it looks."""
    from lottery.errors import CorruptArtifactError
    from lottery.files import intact_result, read_json, write_json

    path = tmp_path / "result.json"
    result = {"val_accuracy": 0.5, "files": {}, "arrays": []}
    write_json(path, result)
    with pytest.raises(CorruptArtifactError, match="result.json has no checksum"):
        read_json(path, sealed=True)
    with caplog.at_level("INFO", logger="lottery"):
        assert intact_result(path, "dense") is None
    assert "dense: damaged, training it again: result.json: " in caplog.text and "has no checksum" in caplog.text
    assert not path.exists(), "nothing reads it as done while the unit is recomputed"
    write_json(path, result, sealed=True)
    assert intact_result(path, "dense") == result


def test_every_single_bit_flip_of_a_checkpoint_is_refused(tmp_path):
    """Its record's sha256 covers the zip's headers too (a CRC-32 per member covers only the
    members: a flipped date in a header reads back as good)."""
    from lottery.errors import CorruptArtifactError
    from lottery.files import save_arrays

    path = tmp_path / "checkpoint.npz"
    save_arrays(path, {"w": np.arange(6, dtype=np.float32)}, {"step": 3})
    clean = path.read_bytes()
    accepted = []
    for i in range(len(clean)):  # one bit of each byte, a different one from byte to byte
        damaged = bytearray(clean)
        damaged[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(damaged))
        try:
            load_arrays(path)
            accepted.append(i)
        except CorruptArtifactError:
            pass
    assert accepted == [], f"{len(accepted)} of {len(clean)} flips read as good"
    path.write_bytes(clean)
    (tmp_path / "checkpoint.json").unlink()
    with pytest.raises(CorruptArtifactError, match=r"checkpoint.npz: its record checkpoint.json is missing"):
        load_arrays(path)  # nothing vouches for it: refused, not trusted on its CRC-32s
    assert "checkpoint.json is missing" in arrays_damage(path)


# ---- a full disk during a checkpoint write -----------------------------------------------------
def _assert_stopped_cleanly(workdir: Path) -> None:
    """After a failed epoch-2 checkpoint write: no temporary file left, the epoch-1 checkpoint intact."""
    dense = workdir / "dense"
    assert [p.name for p in dense.rglob("*") if ".tmp" in p.name] == []
    assert arrays_damage(dense / "checkpoint.npz") is None
    assert load_arrays(dense / "checkpoint.npz")[1]["step"] == 8, "the previous checkpoint (epoch 1) is kept"
    assert not (dense / "result.json").exists() and not (dense / "final.keras").exists()


def _assert_dense_as_clean(workdir: Path, done: Path) -> None:
    for rel in ("dense/final.keras", "dense/result.json", "dense/metrics.csv", "dense/rewind/0it.npz",
                "dense/rewind/3it.npz", "dense/rewind/1ep.npz"):
        _assert_same(workdir / rel, done / rel)
    assert not (workdir / "dense" / "checkpoint.npz").exists()


class _FullDisk:
    """A file on a device that fills up after ``room`` more bytes."""

    def __init__(self, file, room: int):
        self._file, self._room = file, room

    def write(self, data) -> int:
        if len(data) > self._room:
            self._file.write(bytes(data[: self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def test_disk_full_during_a_checkpoint_write_injected(clean, tmp_path, monkeypatch, caplog):
    """ENOSPC after 4 KiB of the second epoch checkpoint (the low-level write of `save_arrays`)."""
    import builtins

    from lottery import files

    data_dir, done = clean
    workdir = _copy(done, tmp_path / "full")
    shutil.rmtree(workdir)
    opened = []

    def filling_open(file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.startswith(".checkpoint.npz."):
            opened.append(file)
            if len(opened) == 2:
                return _FullDisk(handle, 4096)
        return handle

    monkeypatch.setattr(files, "open", filling_open, raising=False)
    with pytest.raises(OSError) as failure:
        _dense(data_dir, workdir)
    assert failure.value.errno == errno.ENOSPC and len(opened) == 2
    assert str(workdir / "dense" / "checkpoint.npz") in str(failure.value) and "no space left" in str(failure.value)
    _assert_stopped_cleanly(workdir)
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="lottery"):
        assert _dense(data_dir, workdir) == 0
    assert "dense: resuming from the checkpoint at step 8" in caplog.text
    _assert_dense_as_clean(workdir, done)


@pytest.fixture
def small_filesystem(tmp_path):
    """A function that (re)mounts a tmpfs of the given size at ``tmp_path/small``; unmounted after.
    Skips where mounting is not allowed (the injected ENOSPC test covers the same code)."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = []

    def limit(size: int) -> Path:
        options = f"remount,size={size}" if mounted else f"size={size}"
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "lottery-test", str(mount)], capture_output=True, text=True)
        if run.returncode != 0:
            if not mounted:
                pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip()}); the injected ENOSPC test covers this")
            raise AssertionError(f"remount failed: {run.stderr}")
        mounted.append(size)
        return mount

    yield limit
    if mounted:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_during_a_checkpoint_write_on_a_small_tmpfs(clean, small_filesystem, tmp_path):
    """The dense CLI in its own process on a tmpfs with room for its first epoch checkpoint (beside
    the three rewind checkpoints) but not for the second one's temporary copy; then more room."""
    data_dir, done = clean
    size = (done / "dense" / "rewind" / "0it.npz").stat().st_size
    room = -(-int(4.5 * size) // 4096) * 4096  # 3 rewinds + 1 checkpoint + small files fit; a 5th copy does not
    workdir = small_filesystem(room) / "w"
    command = [sys.executable, "-m", "lottery", "dense", "--config", str(done.parent / "cfg.json"), "--data", str(data_dir),
               "--workdir", str(workdir), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    full = subprocess.run(command, env=env, capture_output=True, text=True)
    assert full.returncode != 0, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    print(f"tmpfs of {room:,} bytes (a checkpoint: {size:,}):", last)
    assert "no space left" in last and str(workdir / "dense" / "checkpoint.npz") in last, full.stderr[-3000:]
    _assert_stopped_cleanly(workdir)
    small_filesystem(64 << 20)
    again = subprocess.run(command, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "dense: resuming from the checkpoint at step 8" in again.stderr
    _assert_dense_as_clean(workdir, done)


def test_a_failure_note_that_cannot_be_written_does_not_hide_the_failure(clean, tmp_path, monkeypatch, caplog):
    """On a full disk the ticket's error.json cannot be written either: the ticket's own error
    (here a damaged mask) is what surfaces, and the lost note is logged."""
    from lottery import late_reset, ticket
    from lottery.errors import CorruptArtifactError

    data_dir, done = clean
    workdir = _copy(done, tmp_path / "case")
    _truncate(workdir / "masks" / "sp50.000.npz")
    real = ticket.write_json

    def no_room_for_notes(path, *args, **kwargs):
        if Path(path).name == "error.json":
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ticket, "write_json", no_room_for_notes)
    with caplog.at_level("INFO", logger="lottery"), pytest.raises(CorruptArtifactError, match="sp50.000.npz"):
        late_reset.retrain(workdir, [0], "1ep", threads=1)
    assert "retrain sp50.000__1ep: could not record the failure" in caplog.text
    assert not (workdir / "tickets" / "sp50.000__1ep" / "error.json").exists()
