"""Stages 2 and 3: probe a sample (channels, native size, record size), plan the shards and their
chunks, then decode + transform + encode on the executors, each task reading the files of one chunk
by path and writing its fragment; a shard is assembled from its fragments by the task that
finishes its last chunk (`chunks`). Only paths cross the shuffle, and only small counts come back
to the driver.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from .args import JobConfig
from .chunks import (ChunkJob, ChunkPlan, assemble_shard, clear_claims, keep_finished, plan_chunks, run_chunk,
                     shard_result_path, shard_results)
from .errors import DataError
from .images import Transform, encode_record, mode_channels, sniff_format, transform_image
from .listing import PARTITIONS_PER_CORE, decode_units, files_to_decode, lister_kwargs
from .sharding import SPLITS, ShardPlan, shard_key
from .spark import Progress
from .spark import partial as bind

log = logging.getLogger("preprocess_images")

SIZE_SAMPLE = 64    # files fully transformed to estimate the record size


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


def _files_per_split(listing: dict) -> dict[str, int]:
    return {split: sum(v for (s, _), v in listing["by_class"].items() if s == split) for split in SPLITS}


def plan_shards(cfg: JobConfig, listing: dict, record_bytes: float) -> ShardPlan:
    a = cfg.args
    counts = []
    for split, n in _files_per_split(listing).items():
        if a.num_shards is not None:
            k = a.num_shards
        else:
            k = math.ceil(n * record_bytes / (a.shard_mb * (1 << 20)))
        counts.append(max(1, min(k, max(n, 1))))
    return ShardPlan.of(SPLITS, tuple(counts))


def plan_work(cfg: JobConfig, listing: dict, record_bytes: float, cores: int) -> ChunkPlan:
    """The shards, cut into chunks: enough for every core to stay busy until the end."""
    shards = plan_shards(cfg, listing, record_bytes)
    return plan_chunks(shards, _files_per_split(listing), cores * PARTITIONS_PER_CORE)


def keep_finished_work(spark, partial: Path, plan: ChunkPlan) -> frozenset:
    """What an interrupted run finished and is intact (checked in parallel: it is read in full);
    returns the finished shards and logs what is reused."""
    sc = spark.sparkContext
    sc.setJobGroup("preprocess-resume", "check what an interrupted run finished")
    total = plan.shards.total
    where = str(partial)
    kept = sc.parallelize(range(total), max(1, min(total, sc.defaultParallelism * PARTITIONS_PER_CORE))) \
        .map(lambda p: (p, keep_finished(where, plan, p))).collect()
    shards = frozenset(p for p, (done, _) in kept if done)
    chunks = sum(n for p, (done, n) in kept if not done)
    log.info("resuming: %d of %d shards and %d of the other shards' %d chunks are finished and intact; "
             "the rest is written now", len(shards), total, chunks,
             sum(plan.per_shard[p] for p in range(total) if p not in shards))
    return shards


def _chunk_items(units: Iterable[str], *, root: str, lister_kw: dict, val_labels, plan: ChunkPlan,
                 class_index: dict) -> Iterator[tuple[int, tuple[str, str, str, int]]]:
    kw = {**lister_kw, "val_labels": val_labels.value if val_labels is not None else None}
    for rel, split, cls in files_to_decode(units, root=root, lister_kw=kw):
        key = shard_key(rel)
        yield plan.chunk(split, key), (key, rel, split, class_index[cls])


def process(spark, cfg: JobConfig, t: Transform, plan: ChunkPlan, partial: Path, listing: dict,
            finished_shards: frozenset) -> tuple[list[dict], list]:
    """Stage 3; returns the shard results (partition order) and the progress timeline."""
    sc = spark.sparkContext
    a = cfg.args
    root = str(cfg.root)
    units = decode_units(cfg)
    # The labels of a flat val/ (50,000 for ImageNet) go to each executor once, not with each task.
    val_labels = sc.broadcast(cfg.val_labels) if cfg.val_labels is not None else None
    lister_kw = {**lister_kwargs(cfg), "val_labels": None}
    items = bind(_chunk_items, root=root, lister_kw=lister_kw, val_labels=val_labels, plan=plan,
                 class_index={c: i for i, c in enumerate(cfg.classes)})
    job = ChunkJob(partial=str(partial), root=root, plan=plan, t=t, num_classes=len(cfg.classes),
                   finished_shards=finished_shards)
    counter = sc.accumulator(0)

    def chunk_task(c: int, rows: Iterator) -> Iterator[dict]:
        done = run_chunk(job, c, (item for _, item in rows))
        counter.add(done["files"])
        yield done

    clear_claims(job.partial)
    n_walk = max(1, min(len(units), sc.defaultParallelism * PARTITIONS_PER_CORE))
    log.info("decode: %d chunks in %d shards on %d cores (%d shards already finished)", plan.total,
             plan.shards.total, sc.defaultParallelism, len(finished_shards))
    chunks = (sc.parallelize(units, n_walk).mapPartitions(items)
              .partitionBy(plan.total, lambda c: c)
              .mapPartitionsWithIndex(chunk_task))
    sc.setJobGroup("preprocess-write", "decode, resize, encode and write shards")
    progress = Progress(sc, "preprocess-write", "decode+write", a.progress_interval, counter,
                        listing["readable"])
    with progress:
        chunks.collect()
    progress.sample()
    _assemble_unclaimed(spark, job)
    return shard_results(job.partial, plan), progress.timeline


def _assemble_unclaimed(spark, job: ChunkJob) -> None:
    """Shards whose last chunk's task did not assemble them (it failed and was retried): now."""
    missing = [p for p in range(job.plan.shards.total)
               if p not in job.finished_shards and not shard_result_path(job.partial, job.plan, p).is_file()]
    if missing:
        log.info("assembling %d shards whose last chunk's task did not", len(missing))
        sc = spark.sparkContext
        sc.setJobGroup("preprocess-assemble", "assemble shards from their fragments")
        sc.parallelize(missing, len(missing)).foreach(
            lambda p: assemble_shard(job.partial, job.plan, p))
