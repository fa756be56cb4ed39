"""Stages 2 and 3: probe a sample (channels, native size, record size), plan the shards, then
decode + transform + encode on the executors, shuffle to one partition per shard and write each
shard from the executor task that owns it (only small metadata rows come back to the driver).
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from lottery.data.manifest import shard_name
from lottery.data.tfrecord import write_shard

from .args import JobConfig
from .errors import DataError
from .images import BadImage, HistogramStats, Transform, encode_record, mode_channels, sniff_format, transform_image
from .listing import PARTITIONS_PER_CORE
from .sharding import SPLITS, ShardPlan, assign, shard_key
from .spark import Progress, content_rdd, partial

log = logging.getLogger("preprocess_images")

SIZE_SAMPLE = 64    # files fully transformed to estimate the record size
# Decode stage input partitions: about this many files each, none bigger than this.
FILES_PER_PARTITION = 256
MAX_PARTITION_BYTES = 64 << 20


def _probe_header(rel: str, root: str) -> tuple[str, Any]:
    from PIL import Image

    try:
        with open(os.path.join(root, rel), "rb") as f:
            head = f.read(16)
            fmt = sniff_format(head)
            if fmt is None:
                return ("bad", None)
            f.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(f, formats=[fmt]) as im:
                    return ("ok", (im.mode, im.size))
    except Exception:
        return ("bad", None)


def _probe_size(rel: str, root: str, t: Transform) -> int | None:
    try:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        pixels = transform_image(data, t)
        return len(encode_record(pixels, 0, rel, t)) + 16   # + TFRecord framing
    except Exception:
        return None


def decide_transform(spark, cfg: JobConfig, sample: list[str]) -> tuple[Transform, dict]:
    a = cfg.args
    info: dict[str, Any] = {}
    channels, native = a.channels, None
    if a.channels is None or a.image_size is None:
        sc = spark.sparkContext
        root = str(cfg.root)
        n = max(1, min(len(sample), sc.defaultParallelism * 2))
        res = sc.parallelize(sample, n).map(lambda rel: _probe_header(rel, root)).collect()
        ok = [v for status, v in res if status == "ok"]
        gray = sum(1 for mode, _ in ok if mode_channels(mode) == 1)
        info["header_sample"] = {"files": len(sample), "readable": len(ok), "gray": gray, "color": len(ok) - gray}
        if not ok:
            raise DataError(f"none of the {len(sample)} sampled input files is a readable JPEG or PNG")
        if channels is None:
            channels = 1 if gray > len(ok) - gray else 3
            info["channels"] = (f"{channels} (majority of a header sample: {gray} grayscale, "
                                f"{len(ok) - gray} color of {len(ok)} readable files)")
        if a.image_size is None:
            sizes = Counter(tuple(size) for _, size in ok)
            if len(sizes) > 1:
                top = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(5))
                raise DataError(f"the images have different sizes (sample of {len(ok)}: {top}): "
                                f"pass --image-size S to resize them")
            native = next(iter(sizes))
    t = Transform(channels=channels, size=a.image_size, resize=a.resize, native=native,
                  encoding=a.encoding, jpeg_quality=a.jpeg_quality)
    return t, info


def estimate_record_bytes(spark, cfg: JobConfig, t: Transform, sample: list[str]) -> float:
    h, w, c = t.shape
    if t.encoding == "raw":
        return h * w * c + 120.0
    sc = spark.sparkContext
    root = str(cfg.root)
    few = sample[:SIZE_SAMPLE]
    n = max(1, min(len(few), sc.defaultParallelism * 2))
    sizes = [s for s in sc.parallelize(few, n).map(lambda rel: _probe_size(rel, root, t)).collect() if s]
    if not sizes:
        return h * w * c + 120.0
    return float(sum(sizes)) / len(sizes)

def plan_shards(cfg: JobConfig, listing: dict, record_bytes: float) -> ShardPlan:
    a = cfg.args
    counts = []
    for split in SPLITS:
        n = sum(v for (s, _), v in listing["by_class"].items() if s == split)
        if a.num_shards is not None:
            k = a.num_shards
        else:
            k = math.ceil(n * record_bytes / (a.shard_mb * (1 << 20)))
        counts.append(max(1, min(k, max(n, 1))))
    offsets = tuple(sum(counts[:i]) for i in range(len(counts)))
    return ShardPlan(SPLITS, tuple(counts), offsets)

def _rel_of(path: str, prefix: str) -> str:
    if not path.startswith(prefix):
        raise ValueError(f"file {path} is not under the input root {prefix}")
    return path[len(prefix):]

def _decode_partition(rows: Iterable, *, prefix: str, derived_val: bool, val_fraction: float, seed: int,
                      class_index: dict, t: Transform, plan: ShardPlan, counter) -> Iterator:
    stats = HistogramStats(t.channels)
    done = 0
    for path, content in rows:
        rel = _rel_of(path, prefix)
        split, cls = assign(rel, derived_val=derived_val, val_fraction=val_fraction, seed=seed)
        key = shard_key(rel)
        p = plan.partition(split, key)
        label = class_index.get(cls) if cls is not None else None
        done += 1
        if label is None:
            where = "not inside a class folder" if cls is None else f"unknown class folder {cls!r}"
            yield (p, key, rel), ("skip", f"outside-class: {where}")
            continue
        try:
            pixels = transform_image(content if isinstance(content, bytes) else bytes(content), t)
        except BadImage as e:
            yield (p, key, rel), ("skip", e.reason)
            continue
        record = encode_record(pixels, label, rel, t)
        if split == "train":
            stats.update(pixels)
        yield (p, key, rel), ("rec", label, record)
    counter.add(done)
    if stats.images:
        st = stats.to_channel_stats()
        yield (0, "", ""), ("stats", st.to_dict(), stats.images)


def _write_partition(p: int, rows: Iterable, *, staging: str, plan: ShardPlan, num_classes: int) -> Iterator[dict]:
    split, index, count = plan.shard_of(p)
    per_class = [0] * num_classes
    skipped: list[dict] = []
    stats: list[dict] = []

    def recs() -> Iterator[bytes]:
        for (_, _, rel), value in rows:
            kind = value[0]
            if kind == "rec":
                per_class[value[1]] += 1
                yield value[2]
            elif kind == "skip":
                skipped.append({"path": rel, "reason": value[1]})
            elif kind == "stats":
                stats.append(value[1])

    entry = write_shard(os.path.join(staging, shard_name(split, index, count)), recs())
    yield {"split": split, "index": index, "count": count, "entry": entry, "per_class": per_class,
           "skipped": skipped, "stats": stats}


def process(spark, df, cfg: JobConfig, t: Transform, plan: ShardPlan, staging: Path,
            listing: dict) -> tuple[list[dict], list]:
    """Stage 3; returns the shard rows (split order, then shard index) and the progress timeline."""
    sc = spark.sparkContext
    a = cfg.args
    # Input partitions: enough to keep every core busy (and balanced), none too big.
    dp = sc.defaultParallelism
    n_files = max(1, listing["readable"])
    target = max(dp * PARTITIONS_PER_CORE, math.ceil(listing["readable"] / FILES_PER_PARTITION),
                 math.ceil(listing["bytes"] / MAX_PARTITION_BYTES))
    target = min(target, n_files)
    spark.conf.set("spark.sql.files.openCostInBytes", str(4096))
    spark.conf.set("spark.sql.files.minPartitionNum", str(target))
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(MAX_PARTITION_BYTES))

    counter = sc.accumulator(0)
    prefix = "file:" + str(cfg.root) + "/"
    decode = partial(_decode_partition, prefix=prefix, derived_val=cfg.derived_val,
                     val_fraction=a.val_fraction, seed=a.seed,
                     class_index={c: i for i, c in enumerate(cfg.classes)}, t=t, plan=plan, counter=counter)
    write_kw = {"staging": str(staging), "plan": plan, "num_classes": len(cfg.classes)}

    content = content_rdd(spark, df)
    n_in = content.getNumPartitions()
    log.info("decode: %d input partitions on %d cores -> %d shard partitions", n_in, dp, plan.total)
    pairs = content.mapPartitions(decode)
    shards = pairs.repartitionAndSortWithinPartitions(
        numPartitions=plan.total, partitionFunc=lambda k: k[0], keyfunc=lambda k: k)
    written = shards.mapPartitionsWithIndex(lambda p, rows: _write_partition(p, rows, **write_kw))
    sc.setJobGroup("preprocess-write", "decode, resize, encode and write shards")
    progress = Progress(sc, "preprocess-write", "decode+write", a.progress_interval, counter, listing["readable"])
    with progress:
        results = written.collect()
    progress.sample()
    return sorted(results, key=lambda r: (SPLITS.index(r["split"]), r["index"])), progress.timeline
