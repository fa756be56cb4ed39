"""bench/spark_preprocess.py and its corpus (bench/imagenet_like.py), without Spark: the corpus's
layout, labels and odd files, a smaller corpus linked from a larger one, the plain loop's shards,
the process roles, the scaling fit and the report. (The benchmark itself checks that the plain
loop's shards are byte-identical to the Spark job's.)"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from PIL import Image

from bench import imagenet_like, spark_preprocess as bench
from lottery.data.example import decode_example
from lottery.data.tfrecord import read_records
from spark_jobs.preprocess import images
from spark_jobs.preprocess.labels import resolve_val_labels
from spark_jobs.preprocess.sharding import SPLITS, ShardPlan

COUNT = 60


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_cache")


@pytest.fixture(scope="module")
def corpus(cache) -> imagenet_like.Corpus:
    return imagenet_like.ensure_corpus(cache, COUNT, procs=1)


def test_corpus_has_imagenet_layout_labels_and_odd_files(corpus):
    root = corpus.root
    classes = sorted(os.listdir(root / "train"))
    assert all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes)
    train = [p for p in (root / "train").rglob("*") if p.is_file()]
    val = sorted(os.listdir(root / "val"))
    assert len(train) + len(val) == COUNT and len(val) == COUNT // imagenet_like.VAL_EVERY
    assert all(p.name.startswith(p.parent.name + "_") and p.suffix == ".JPEG" for p in train)
    assert val[0] == "ILSVRC2012_val_00000001.JPEG"

    lines = corpus.labels.read_text().splitlines()
    assert lines[0] == "ImageId,PredictionString"
    assert lines[1].startswith("ILSVRC2012_val_00000001,n")
    labels = resolve_val_labels(corpus.labels, root / "val", classes)
    assert sorted(labels) == val
    for i in range(COUNT):   # each val image has the class its spec says
        s = imagenet_like.spec(i, imagenet_like.wnids())
        if s.val_id:
            assert labels[s.val_id + ".JPEG"] == s.wnid

    modes = {}
    for i in (3, 7, 11):
        s = imagenet_like.spec(i, imagenet_like.wnids())
        with Image.open(root / s.rel) as im:
            modes[s.kind] = (im.format, im.mode)
    assert modes == {"gray": ("JPEG", "L"), "cmyk": ("JPEG", "CMYK"), "png": ("PNG", "RGB")}
    info = corpus.info
    assert (info["count"], info["gray"], info["cmyk"], info["png"], info["val"]) == (COUNT, 1, 1, 1, len(val))
    assert 30 < info["mean_kb"] < 300


def test_smaller_corpus_is_the_first_images_of_the_larger_linked(cache, corpus):
    small = imagenet_like.ensure_corpus(cache, 30, procs=1)
    assert small.info["linked_from"] == str(corpus.home)
    rows = imagenet_like.read_index(small.home)
    assert [r[0] for r in rows] == list(range(30))
    assert all(os.path.samefile(small.root / r[1], corpus.root / r[1]) for r in rows)
    val_ids = [line.split(",")[0] for line in small.labels.read_text().splitlines()[1:]]
    assert val_ids == ["ILSVRC2012_val_00000001"]
    assert imagenet_like.ensure_corpus(cache, 30, procs=1).info == small.info   # cached


def test_plain_loop_writes_every_shard_of_the_plan_in_key_order(corpus, tmp_path):
    classes = sorted(os.listdir(corpus.root / "train"))
    t = images.Transform(channels=3, size=32, encoding="jpeg", jpeg_quality=90)
    plan = ShardPlan.of(SPLITS, (3, 1))
    res = bench.run_plain(corpus, tmp_path / "out", 2, t, plan, classes)
    assert res["files"] == COUNT
    assert sorted(res["entries"]) == [("train", 0), ("train", 1), ("train", 2), ("val", 0)]
    ids = []
    for (split, i), entry in sorted(res["entries"].items()):
        records = [decode_example(r) for r in read_records(tmp_path / "out" / entry["file"])]
        assert len(records) == entry["records"]
        keys = [bench.shard_key(r["image_id"]) for r in records]
        assert keys == sorted(keys)
        ids += [r["image_id"] for r in records]
    assert len(ids) == COUNT and sum(i.startswith("val/") for i in ids) == COUNT // imagenet_like.VAL_EVERY
    assert set(res["memory_kb"]) >= {"plain loop parent", "plain loop worker"}
    assert all(v > 0 for v in res["memory_kb"].values())


def test_roles_of_spark_processes():
    py = "/venv/bin/python3"
    daemon = [py, "-m", "pyspark.daemon"]
    assert bench.role_of(daemon, ["/usr/bin/java", "org.apache.spark.deploy.SparkSubmit"]) == "Python daemon"
    assert bench.role_of(daemon, daemon) == "Python worker"
    assert bench.role_of([py, "/repo/spark_jobs/preprocess_images.py", "--input", "x"], []) == "Python driver"
    assert bench.role_of(["/jdk/bin/java", "-cp", "x", "org.apache.spark.deploy.SparkSubmit"], []) == "driver JVM"
    assert bench.role_of(["java", "org.apache.spark.executor.CoarseGrainedExecutorBackend"], []) == "executor JVM"
    assert bench.role_of(["bash", "spark-class"], []) == "other"


def test_scaling_fit_goes_through_both_runs_and_clamps():
    fit = bench.ScalingFit.from_two(0.010, 0.006)
    assert fit.per_image(1) == pytest.approx(0.010) and fit.per_image(2) == pytest.approx(0.006)
    assert (fit.serial, fit.parallel) == pytest.approx((0.002, 0.008))
    assert bench.ScalingFit.from_two(0.010, 0.004).serial == 0.0      # better than linear: linear
    assert bench.ScalingFit.from_two(0.010, 0.012).parallel == 0.0    # slower with 2: no scaling
    assert bench.hours(3 * 3600 + 5 * 60) == "3 h 05 min" and bench.hours(59) == "1 min"


def _run(work_s: float, files: int = 1000, **extra) -> dict:
    return {"files": files, "wall_s": work_s + 5, "work_s": work_s, "startup_s": 5.0, "session_s": 3.0,
            "cpu_s": 2 * work_s + 8, "cpu_after_s": 2 * work_s, "steady_ips": files / work_s * 1.1,
            "stages": {"listing_s": 1.0, "probe_s": 0.5, "process_s": work_s - 2},
            "memory_kb": {"driver JVM": 400_000, "Python driver": 150_000, "Python worker": 80_000,
                          "all processes together (sum of RSS)": 700_000}, **extra}


def _plain(wall_s: float, files: int = 1000) -> dict:
    return {"files": files, "wall_s": wall_s, "cpu_s": 2 * wall_s, "steady_ips": files / wall_s,
            "memory_kb": {"plain loop parent": 50_000, "plain loop worker": 45_000,
                          "all processes together (sum of RSS)": 140_000}}


def test_report_has_every_section():
    args = argparse.Namespace(count=1000, cores=2, memory_sizes=[300, 1000], cluster_count=500, jvm_options="",
                              image_size=224, jpeg_quality=95)
    cluster = {1: _run(10.0, 500), 2: _run(6.0, 500)}
    res = {"args": args, "load": "1.0 / 1.0 / 1.0", "repeat": 1, "machine": "2 CPUs", "spark_version": "4.x",
           "date": "2026-01-01", "corpus": imagenet_like.summarize([(0, "train/n1/n1_1.JPEG", 100_000, 400, 350, "rgb"),
                                                                    (1, "val/v.JPEG", 120_000, 300, 500, "cmyk")])
           | {"count": 1000}, "cores": 2, "spark": _run(4.0), "plain": _plain(2.0), "identical": True,
           "by_size": {300: {"spark": _run(2.0, 300), "plain": _plain(1.0, 300)},
                       1000: {"spark": _run(4.0), "plain": _plain(2.0)}},
           "cluster": cluster}
    res["fit"], res["steady_fit"] = bench.fit_cluster(cluster)
    text = bench.report(res)
    for heading in ("### Peak memory at 300 and 1000 images", "### Scaling on a loopback standalone cluster",
                    "### Projection: the whole of ImageNet"):
        assert heading in text
    assert "Throughput after start-up, Spark / plain: **0.50**" in text
    assert "| JVM (local mode: driver and executor) | 391 | 391 | 1.00 |" in text
    assert "| standalone, 64 executors of 1 core |" in text
    assert "t(N) = a + b/N" in text and "lower bound on the scaling" in text
