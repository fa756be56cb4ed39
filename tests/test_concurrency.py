"""Runs sharing one artifact root, the parts that need no scheduler: a writer of
shared data is waited for (bounded, logged), "already up to date" needs no Spark, and the data
shards are checked where they are opened. About 15 s. The three runs at once with the real
scheduler: tests/test_concurrent_runs.py.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import use_test_home  # noqa: E402  (before airflow is imported)

HOME = use_test_home()

from lottery.dag.preprocess import PreprocessOperator  # noqa: E402  (Airflow sets up its logging now, not under caplog)
from lottery.errors import CorruptDataError  # noqa: E402
from lottery.data.manifest import read_manifest, write_manifest  # noqa: E402
from lottery.data.verify import STAMP_NAME, verify_shards  # noqa: E402
from lottery.locks import LockTimeout, lock_path, wait_lock  # noqa: E402
from tests.datasets import make_synthetic_shards  # noqa: E402
from tests.lockholder import hold_lock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "spark_jobs" / "preprocess_images.py"

# ---- the lock -----------------------------------------------------------------------------------
def test_a_waiter_waits_for_the_holder_and_says_how_long(tmp_path, caplog):
    path = tmp_path / ".data.lock"
    holder = hold_lock(path, 1.5)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="lottery"):
        with wait_lock(path, "writing data", timeout=30) as waited:
            elapsed = time.monotonic() - started
            assert json.loads(path.read_text())["what"] == "writing data"  # the next waiter's log names us
    holder.wait()
    assert 1.0 < waited <= elapsed < 10
    assert "waiting for the test's holder (pid" in caplog.text and "LOTTERY_DATA_LOCK_TIMEOUT" in caplog.text
    assert f"got the lock {path} after waiting {waited:.1f} s" in caplog.text
    assert path.read_text() == ""  # released: no holder recorded
    with wait_lock(path, "again", timeout=0) as waited:  # free: taken at once
        assert waited == 0.0


def test_a_wait_is_bounded_and_names_the_holder(tmp_path, monkeypatch):
    path = tmp_path / ".data.lock"
    holder = hold_lock(path, 30)
    try:
        monkeypatch.setenv("LOTTERY_DATA_LOCK_TIMEOUT", "0.6")  # the deployment's bound
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=r"waited 1 s for the test's holder .* raise LOTTERY_DATA_LOCK_TIMEOUT"):
            with wait_lock(path, "writing data"):
                pytest.fail("got a lock that is held")
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


def test_concurrent_fashion_mnist_exports_write_once(tmp_path, caplog):
    from lottery.data.fetch import export_fashion_mnist

    out = tmp_path / "sources" / "fashion_mnist-n20"
    results: list[dict] = []
    with caplog.at_level(logging.INFO, logger="lottery.data"):
        threads = [threading.Thread(target=lambda: results.append(export_fashion_mnist(out, limit=20, progress=False)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 3 and sorted(r["already_exported"] for r in results) == [False, True, True]
    assert caplog.text.count("exported Fashion-MNIST to") == 1  # written once; the others waited and found it
    assert sorted(p.name for p in out.parent.iterdir()) == [".fashion_mnist-n20.lock", "fashion_mnist-n20"]


# ---- shards checked where the data is opened -----------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit flipped in a record's image bytes, same size
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("reader", ["SplitReader", "ShardedDataset"])
def test_a_damaged_shard_is_refused_naming_it(tmp_path, how, reader):
    if reader == "ShardedDataset":
        from lottery.data.pipeline import ShardedDataset as Reader
    else:
        from lottery.data.epochs import SplitReader as Reader
    data = make_synthetic_shards(tmp_path, 64, 16)
    Reader(data, "train", cache=True)  # intact: opens (and records the verified shards)
    shard = data / "train-00001-of-00002.tfrecord"
    _damage(shard, how)
    why = "bytes, manifest.json says" if how == "truncated" else "its sha256 differs from manifest.json"
    with pytest.raises(CorruptDataError, match=f"{shard}: damaged shard of split 'train': .*{why}") as err:
        Reader(data, "train", cache=True)
    assert "clear the run's preprocess task (with downstream)" in str(err.value) and str(data) in str(err.value)
    Reader(data, "val")  # the other split is intact and still opens


def test_verified_shards_are_hashed_once_per_file_version(tmp_path):
    data = make_synthetic_shards(tmp_path, 64, 16)
    manifest = read_manifest(data)
    first = verify_shards(data, manifest, ["train", "val"])
    assert (first["shards"], first["hashed"]) == (3, 3) and (data / STAMP_NAME).is_file()
    assert verify_shards(data, manifest, ["train", "val"])["hashed"] == 0  # the next open: sizes and stat only
    shard = data / "val-00000-of-00001.tfrecord"
    shard.write_bytes(shard.read_bytes())  # rewritten, same bytes: a new file version, hashed again
    assert verify_shards(data, manifest, ["train", "val"])["hashed"] == 1
    _damage(shard, "flipped")
    with pytest.raises(CorruptDataError, match="val-00000-of-00001.tfrecord: damaged shard"):
        verify_shards(data, manifest, ["val"])
    (data / STAMP_NAME).write_text("{not json")  # a damaged record is only a cache: everything hashed again
    with pytest.raises(CorruptDataError, match="val-00000"):
        verify_shards(data, manifest, ["train", "val"])


# ---- "already up to date" without Spark -----------------------------------------------------------
def preprocessed(tmp_path: Path) -> tuple[list[str], Path]:
    """An image folder and its data set as the Spark job would leave it (manifest with the job's options
    and input fingerprint); returns the job's arguments and the output."""
    from lottery.data.fetch import export_fashion_mnist
    from spark_jobs.preprocess.args import effective_options, parse_args, validate
    from spark_jobs.preprocess.listing import local_fingerprint

    src = tmp_path / "sources" / "fm"
    export_fashion_mnist(src, limit=20, progress=False)
    out = tmp_path / "data" / "fm-28px"
    make_synthetic_shards(out.parent, 20, 20, shape=(28, 28, 1), num_classes=10, name=out.name)
    argv = ["--input", str(src), "--output", str(out), "--image-size", "28", "--channels", "1", "--encoding", "png"]
    cfg = validate(parse_args(argv))
    manifest = read_manifest(out)
    manifest["options"] = effective_options(cfg)
    manifest["input_fingerprint"] = {"sha256": local_fingerprint(cfg)}
    write_manifest(out, manifest)
    return argv, out


def test_up_to_date_is_checked_without_spark_and_sees_damage(tmp_path, caplog):
    from spark_jobs.preprocess.args import effective_options, parse_args, validate
    from spark_jobs.preprocess.job import already_up_to_date

    argv, out = preprocessed(tmp_path)
    cfg = validate(parse_args(argv))
    with caplog.at_level(logging.INFO, logger="preprocess_images"):
        assert already_up_to_date(cfg, effective_options(cfg))
        assert "already up to date" in caplog.text
        _damage(out / "train-00000-of-00002.tfrecord", "flipped")
        assert not already_up_to_date(cfg, effective_options(cfg))
    assert "train-00000-of-00002.tfrecord: damaged shard of split 'train': its sha256 differs" in caplog.text
    assert "rebuilding" in caplog.text


def test_the_preprocess_task_waits_for_another_run_then_starts_no_spark(tmp_path, caplog):
    """The DAG's preprocess task on data that another run is writing: it waits for that run's
    task lock, finds the data up to date, and returns without spark-submit (no hook, no JVM)."""
    argv, out = preprocessed(tmp_path)
    task = PreprocessOperator(task_id="preprocess", application=str(JOB), application_args=argv)
    holder = hold_lock(lock_path(out, "task.lock"), 1.5)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="lottery.dag"):
        task.execute({"run_id": "test"})
    holder.wait()
    assert 1.0 < time.monotonic() - started < 15
    assert task._hook is None  # spark-submit was never prepared
    log = caplog.text
    assert "waiting for the test's holder" in log
    assert float(re.search(r"after waiting (\d+\.\d) s for another run", log).group(1)) >= 1.0  # the holder's 1.5 s
    assert "is already up to date" in log and "Spark not started" in log
