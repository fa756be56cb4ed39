"""The Spark job resumes at shard granularity: a job SIGKILLed mid-run and run again writes only
what was missing, and its output is byte for byte that of an uninterrupted run; a changed input
starts over. Plus the chunk plan and the checks of what a killed run left (no Spark).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lottery.data.manifest import read_manifest
from lottery.files import read_json
from spark_jobs.preprocess import chunks
from spark_jobs.preprocess.images import Transform
from spark_jobs.preprocess.sharding import SPLITS, ShardPlan, shard_key
from tests.test_spark_preprocess import JOB, check, leftovers, spark_env, spark_submit, spark_submit_cmd

CLASSES = ("n01440764", "n01443537", "n02102040")


def _plan(counts=(3, 2), per_shard=(2, 3, 1, 4, 2)) -> chunks.ChunkPlan:
    return chunks.ChunkPlan(ShardPlan.of(SPLITS, counts), per_shard)


def test_chunks_cut_each_shard_in_key_order():
    """Concatenating a shard's chunks in order gives its files sorted by key: so a shard made of
    fragments is the shard one sorted pass writes."""
    plan = _plan()
    rels = [f"train/c/{i}.jpg" for i in range(3000)] + [f"val/c/{i}.jpg" for i in range(1000)]
    by_shard: dict[int, list] = {}
    for rel in rels:
        split = rel.split("/")[0]
        key = shard_key(rel)
        c = plan.chunk(split, key)
        p, _ = plan.locate(c)
        assert p == plan.shards.partition(split, key)
        by_shard.setdefault(p, []).append((c, key))
    for p, items in by_shard.items():
        in_chunk_order = [key for _, key in sorted(items)]
        assert in_chunk_order == sorted(key for _, key in items)
        assert {c for c, _ in items} == set(range(plan.first_chunk(p), plan.first_chunk(p) + plan.per_shard[p]))
    assert chunks.ChunkPlan.from_dict(plan.to_dict(), SPLITS) == plan


def test_plan_chunks_sizes():
    shards = ShardPlan.of(SPLITS, (2, 1))
    plan = chunks.plan_chunks(shards, {"train": 60000, "val": 100}, min_chunks=6)
    assert plan.per_shard == (118, 118, 2)      # ~256 files each; at least 2 per shard for 6 in all
    assert chunks.plan_chunks(ShardPlan.of(SPLITS, (1, 1)), {"train": 10}, 1).per_shard == (1, 1)


def _write_chunk(partial: Path, plan, p: int, j: int, payload: bytes) -> None:
    path = chunks.fragment_path(str(partial), plan, p, j)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    from lottery.files import write_json

    write_json(chunks.chunk_result_path(str(partial), plan, p, j),
               {"fragment": {"file": path.name, "records": 1, "sha256": hashlib.sha256(payload).hexdigest(),
                             "bytes": len(payload)},
                "per_class": [1, 0], "skipped": [], "hist": [[0] * 256], "conversions": {}},
               sealed=True)


def test_what_a_killed_run_left_is_kept_only_when_it_matches_its_result(tmp_path):
    plan = _plan(counts=(1, 1), per_shard=(3, 1))
    for j, payload in enumerate((b"a" * 10, b"b" * 20, b"c" * 30)):
        _write_chunk(tmp_path, plan, 0, j, payload)
    chunks.fragment_path(str(tmp_path), plan, 0, 1).write_bytes(b"B" * 20)   # same size, other bytes
    chunks.fragment_path(str(tmp_path), plan, 0, 2).unlink()                 # its result without it
    assert chunks.keep_finished(str(tmp_path), plan, 0) == (False, 1)
    assert [chunks.chunk_result_path(str(tmp_path), plan, 0, j).is_file() for j in range(3)] == [True, False, False]

    # a shard and its result: kept, and fragments a kill left beside it are removed
    _write_chunk(tmp_path, plan, 1, 0, b"v" * 5)
    shard = chunks.assemble_shard(str(tmp_path), plan, 1)
    assert (tmp_path / shard["entry"]["file"]).read_bytes() == b"v" * 5
    assert not chunks.fragment_path(str(tmp_path), plan, 1, 0).exists()
    _write_chunk(tmp_path, plan, 1, 0, b"v" * 5)
    assert chunks.keep_finished(str(tmp_path), plan, 1) == (True, 1)
    assert not chunks.fragment_path(str(tmp_path), plan, 1, 0).exists()
    # a damaged shard is not kept
    (tmp_path / shard["entry"]["file"]).write_bytes(b"w" * 5)
    assert chunks.keep_finished(str(tmp_path), plan, 1) == (False, 0)
    assert not chunks.shard_result_path(str(tmp_path), plan, 1).exists()


def test_assembly_refuses_a_fragment_that_changed(tmp_path):
    plan = _plan(counts=(1, 1), per_shard=(2, 1))
    _write_chunk(tmp_path, plan, 0, 0, b"x" * 8)
    _write_chunk(tmp_path, plan, 0, 1, b"y" * 8)
    chunks.fragment_path(str(tmp_path), plan, 0, 1).write_bytes(b"z" * 8)
    with pytest.raises(Exception, match="changed while the job was running"):
        chunks.assemble_shard(str(tmp_path), plan, 0)
    assert not (tmp_path / chunks.shard_file(plan, 0)).exists()


# ---------------------------------------------------------------------------------------------
# the real job, killed and run again
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """3 classes of 600 noisy 96x96 JPEGs: decoding a chunk takes long enough to kill between shards."""
    root = tmp_path_factory.mktemp("resume") / "input"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        d = root / "train" / name
        d.mkdir(parents=True)
        for i in range(600):
            pixels = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
            pixels[..., c] = 255 - pixels[..., c] // 4
            Image.fromarray(pixels).save(d / f"{name}_{i}.JPEG", quality=90)
    return root


JOB_ARGS = ("--image-size", "64", "--encoding", "png", "--num-shards", "6", "--progress-interval", "0")


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tfrecord"))}


def _run_until_some_shards_are_done(root: Path, out: Path, at_least: int = 1) -> set[str]:
    """Start the job on one core, SIGKILL spark-submit (and so its executor) once ``at_least``
    shards are finished; returns the finished shards' names."""
    done = out.with_name(out.name + ".partial") / "done"
    proc = subprocess.Popen(spark_submit_cmd("--input", root, "--output", out, *JOB_ARGS, master="local[1]"),
                            env=spark_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if done.is_dir() and len(list(done.glob("*.json"))) >= at_least:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {p.name[:-len(".json")] for p in done.glob("*.json")}


@pytest.mark.slow
def test_a_killed_job_run_again_writes_only_the_missing_shards(photos, tmp_path):
    whole = tmp_path / "whole"
    check(spark_submit("--input", photos, "--output", whole, *JOB_ARGS))
    expected = _shards(whole)
    assert len(expected) == 12

    out = tmp_path / "resumed"
    finished = _run_until_some_shards_are_done(photos, out)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and 1 <= len(finished) < 12, finished
    before = {name: (partial / name).stat().st_mtime_ns for name in finished}

    proc = check(spark_submit("--input", photos, "--output", out, *JOB_ARGS))
    assert "resuming the interrupted run" in proc.stdout
    assert f"resuming: {len(finished)} of 12 shards" in proc.stdout
    assert _shards(out) == expected                       # byte for byte the uninterrupted output
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == before   # not written again
    assert read_manifest(out)["splits"] == read_manifest(whole)["splits"]
    assert read_manifest(out)["dataset_id"] == read_manifest(whole)["dataset_id"]
    assert leftovers(out) == []


@pytest.mark.slow
def test_a_killed_job_whose_input_changed_starts_over(photos, tmp_path):
    root = tmp_path / "input"
    subprocess.run(["cp", "-a", str(photos), str(root)], check=True)
    out = tmp_path / "out"
    _run_until_some_shards_are_done(root, out)
    state = read_json(out.with_name(out.name + ".partial") / "resume.json", sealed=True)

    extra = root / "train" / CLASSES[0] / "added.JPEG"
    Image.fromarray(np.full((96, 96, 3), random.Random(1).randrange(256), np.uint8)).save(extra)
    proc = check(spark_submit("--input", root, "--output", out, *JOB_ARGS))
    assert "starting over" in proc.stdout and "the input changed since" in proc.stdout
    assert state["input_fingerprint"][:12] in proc.stdout
    manifest = read_manifest(out)
    assert manifest["input_fingerprint"]["files"] == 1801
    assert manifest["input_fingerprint"]["sha256"] != state["input_fingerprint"]
    assert sum(s["count"] for s in manifest["splits"].values()) == 1801
    assert leftovers(out) == []


def test_a_transform_survives_the_resume_record():
    for t in (Transform(channels=3, size=None, native=(64, 48)), Transform(channels=1, size=32, encoding="raw")):
        assert Transform.from_dict(json.loads(json.dumps(t.to_dict()))) == t


@pytest.mark.slow
def test_the_dag_tasks_retry_resumes_a_killed_job(photos, tmp_path, monkeypatch):
    """The DAG's preprocess task (PreprocessOperator, as its retry runs it) after a killed job:
    the finished shards are kept as they are, the rest is written, the output is the whole one."""
    from lottery.dag.preprocess import PreprocessOperator

    out = tmp_path / "data"
    finished = _run_until_some_shards_are_done(photos, out)
    partial = out.with_name(out.name + ".partial")
    before = {name: (partial / name).stat().st_mtime_ns for name in finished}

    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps({"conn_type": "spark", "host": "local[2]"}))
    env = spark_env()
    PreprocessOperator(task_id="preprocess", conn_id="spark_default", application=str(JOB),
                       application_args=["--input", str(photos), "--output", str(out), *JOB_ARGS],
                       env_vars={k: env[k] for k in ("PATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_LOCAL_IP")},
                       conf={"spark.ui.enabled": "false", "spark.driver.memory": "1g"}).execute({"run_id": "test"})
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == before
    manifest = read_manifest(out)
    assert sum(s["count"] for s in manifest["splits"].values()) == 1800 and not manifest["skipped"]
    assert leftovers(out) == []
