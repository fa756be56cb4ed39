"""The decode stage's units of work, on disk: chunks of a shard, their fragments, the shard assembled.

A shard is cut into chunks by ranges of its files' shard keys (`ChunkPlan`), so no list of files is
needed to plan them. A chunk task reads its files by path, decodes them and writes their records,
sorted by key, to a fragment. A shard is its fragments concatenated in chunk order: byte for byte
what one sorted pass over the shard's files would write, whatever the number of chunks.

Everything is kept in the job's partial directory (`publish.partial_dir`) until it is published:

    chunks/<shard file>.<j>.tfrecord   a fragment             chunks/<shard file>.<j>.json   its result
    <shard file>                       a finished shard       done/<shard file>.json         its result

A result (sealed JSON) is written after its file and vouches for it (size and sha256): a file
without a result is redone, and a killed job run again keeps every result whose file matches.
Pure functions of the file system (no Spark): the executors run them, the tests call them.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from lottery.data.manifest import shard_name
from lottery.data.tfrecord import write_shard
from lottery.errors import CorruptArtifactError
from lottery.files import atomic_path, file_damage, read_json, write_json

from .errors import DataError
from .images import BadImage, HistogramStats, Transform, encode_record, transform_image
from .sharding import ShardPlan

# About this many files per chunk: small tasks balance the cores and bound what a kill loses.
FILES_PER_CHUNK = 256
_COPY_BLOCK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """The shard plan, and how many chunks each shard partition is cut into."""
    shards: ShardPlan
    per_shard: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.per_shard)

    @functools.cached_property
    def _first_chunks(self) -> tuple[int, ...]:
        """The first chunk of each shard (computed once: `chunk` runs for every input file)."""
        return tuple(itertools.accumulate(self.per_shard, initial=0))[:-1]

    def first_chunk(self, p: int) -> int:
        return self._first_chunks[p]

    def chunk(self, split: str, key: str) -> int:
        """The chunk of a file: its shard's range of keys cut into equal parts (monotone in the key)."""
        p, x = self.shards.place(split, key)
        k = self.per_shard[p]
        return self._first_chunks[p] + min(max(int(x * k), 0), k - 1)

    def locate(self, c: int) -> tuple[int, int]:
        """(shard partition, index of the chunk in its shard) of chunk ``c``."""
        if not 0 <= c < self.total:
            raise IndexError(c)
        p = bisect.bisect_right(self._first_chunks, c) - 1
        return p, c - self._first_chunks[p]

    def to_dict(self) -> dict:
        return {"shard_counts": list(self.shards.counts), "chunks_per_shard": list(self.per_shard)}

    @classmethod
    def from_dict(cls, d: dict, splits: tuple[str, ...]) -> "ChunkPlan":
        return cls(ShardPlan.of(splits, tuple(d["shard_counts"])), tuple(d["chunks_per_shard"]))


def plan_chunks(shards: ShardPlan, files_per_split: dict[str, int], min_chunks: int) -> ChunkPlan:
    """About `FILES_PER_CHUNK` files per chunk, and at least ``min_chunks`` chunks in all."""
    at_least = math.ceil(min_chunks / shards.total)
    per_shard = []
    for split, n in zip(shards.splits, shards.counts):
        per_file = math.ceil(files_per_split.get(split, 0) / n / FILES_PER_CHUNK)
        per_shard += [max(1, per_file, at_least)] * n
    return ChunkPlan(shards, tuple(per_shard))


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------

def shard_file(plan: ChunkPlan, p: int) -> str:
    return shard_name(*plan.shards.shard_of(p))


def fragment_path(partial: str, plan: ChunkPlan, p: int, j: int) -> Path:
    return Path(partial) / "chunks" / f"{shard_file(plan, p)}.{j:05d}.tfrecord"


def chunk_result_path(partial: str, plan: ChunkPlan, p: int, j: int) -> Path:
    return Path(partial) / "chunks" / f"{shard_file(plan, p)}.{j:05d}.json"


def shard_result_path(partial: str, plan: ChunkPlan, p: int) -> Path:
    return Path(partial) / "done" / f"{shard_file(plan, p)}.json"


def _claim_path(partial: str, plan: ChunkPlan, p: int) -> Path:
    return Path(partial) / "claims" / shard_file(plan, p)


def _read_result(path: Path) -> dict | None:
    try:
        return read_json(path, sealed=True)
    except (FileNotFoundError, CorruptArtifactError):
        return None


# ---------------------------------------------------------------------------------------------
# what an interrupted run left: kept when it matches its result
# ---------------------------------------------------------------------------------------------

def keep_finished(partial: str, plan: ChunkPlan, p: int) -> tuple[bool, int]:
    """Whether shard ``p`` is finished and intact, else how many of its chunks are; what does not
    match its result is deleted (it is redone)."""
    result = _read_result(shard_result_path(partial, plan, p))
    shard = Path(partial) / shard_file(plan, p)
    if result is not None and file_damage(shard, result["entry"], "its result") is None:
        for j in range(plan.per_shard[p]):   # left by a job killed while it cleaned up
            fragment_path(partial, plan, p, j).unlink(missing_ok=True)
            chunk_result_path(partial, plan, p, j).unlink(missing_ok=True)
        return True, plan.per_shard[p]
    shard_result_path(partial, plan, p).unlink(missing_ok=True)
    kept = 0
    for j in range(plan.per_shard[p]):
        result = _read_result(chunk_result_path(partial, plan, p, j))
        if result is not None and file_damage(fragment_path(partial, plan, p, j), result["fragment"],
                                              "its result") is None:
            kept += 1
        else:
            chunk_result_path(partial, plan, p, j).unlink(missing_ok=True)
    return False, kept


# ---------------------------------------------------------------------------------------------
# a chunk: decode its files into a fragment
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChunkJob:
    """What every chunk task needs (shipped to the executors once per task)."""
    partial: str
    root: str
    plan: ChunkPlan
    t: Transform
    num_classes: int
    finished_shards: frozenset


def run_chunk(job: ChunkJob, c: int, items: Iterable[tuple[str, str, str, int]]) -> dict:
    """Decode the files of chunk ``c`` ((key, rel, split, label) each) into its fragment, unless
    that or its whole shard is already there; then assemble the shard if this was its last chunk.
    Returns what the driver counts: files done and what was reused."""
    p, j = job.plan.locate(c)
    if p in job.finished_shards:
        return {"chunk": c, "files": 0, "reused": "shard"}
    result_path = chunk_result_path(job.partial, job.plan, p, j)
    if result_path.is_file():     # checked by keep_finished before the stage
        done = {"chunk": c, "files": 0, "reused": "chunk"}
    else:
        files = _decode_chunk(job, p, j, sorted(items))
        done = {"chunk": c, "files": files, "reused": None}
    if _last_chunk_done(job, p) and _claim(job, p):
        assemble_shard(job.partial, job.plan, p)
    return done


def _decode_chunk(job: ChunkJob, p: int, j: int, items: list) -> int:
    per_class = [0] * job.num_classes
    skipped: list[dict] = []
    stats = HistogramStats(job.t.channels)
    conversions: Counter = Counter()

    def records():
        for _key, rel, split, label in items:
            try:
                with open(os.path.join(job.root, rel), "rb") as f:
                    data = f.read()
                pixels = transform_image(data, job.t, conversions, name=rel)
            except BadImage as e:
                skipped.append({"path": rel, "reason": e.reason})
                continue
            except OSError as e:
                skipped.append({"path": rel, "reason": f"unreadable: {e.strerror or e}"})
                continue
            if split == "train":
                stats.update(pixels)
            per_class[label] += 1
            yield encode_record(pixels, label, rel, job.t)

    entry = write_shard(fragment_path(job.partial, job.plan, p, j), records())   # transform_image mutes Pillow
    write_json(chunk_result_path(job.partial, job.plan, p, j),
               {"fragment": entry, "per_class": per_class, "skipped": skipped, "hist": stats.hist.tolist(),
                "conversions": dict(conversions)}, sealed=True)
    return len(items)


def _last_chunk_done(job: ChunkJob, p: int) -> bool:
    return all(chunk_result_path(job.partial, job.plan, p, j).is_file() for j in range(job.plan.per_shard[p]))


def _claim(job: ChunkJob, p: int) -> bool:
    """One task assembles a shard: the first to create its claim (the driver clears claims first)."""
    path = _claim_path(job.partial, job.plan, p)
    path.parent.mkdir(exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def clear_claims(partial: str) -> None:
    claims = Path(partial) / "claims"
    if claims.is_dir():
        for path in claims.iterdir():
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# a shard: its fragments concatenated
# ---------------------------------------------------------------------------------------------

def assemble_shard(partial: str, plan: ChunkPlan, p: int) -> dict:
    """Write shard ``p`` from its fragments (each checked against its result as it is copied),
    then its result; then delete the fragments. Returns the result."""
    name = shard_file(plan, p)
    split, index, count = plan.shards.shard_of(p)
    results = []
    for j in range(plan.per_shard[p]):
        result = _read_result(chunk_result_path(partial, plan, p, j))
        if result is None:
            raise DataError(f"chunk {j} of {name} has no readable result in {partial}: run the job again")
        results.append(result)
    digest, size, records = hashlib.sha256(), 0, 0
    with atomic_path(Path(partial) / name) as tmp:
        with open(tmp, "wb") as out:
            for j, result in enumerate(results):
                size += _append(fragment_path(partial, plan, p, j), result["fragment"], out, digest)
                records += result["fragment"]["records"]
    merged = sum_results(results)
    shard = {"split": split, "index": index, "count": count,
             "entry": {"file": name, "records": records, "sha256": digest.hexdigest(), "bytes": size}, **merged}
    write_json(shard_result_path(partial, plan, p), shard, sealed=True)
    for j in range(plan.per_shard[p]):
        fragment_path(partial, plan, p, j).unlink(missing_ok=True)
        chunk_result_path(partial, plan, p, j).unlink(missing_ok=True)
    return shard


def _append(fragment: Path, record: dict, out, digest) -> int:
    own = hashlib.sha256()
    size = 0
    with open(fragment, "rb") as f:
        while block := f.read(_COPY_BLOCK):
            own.update(block)
            digest.update(block)
            out.write(block)
            size += len(block)
    if own.hexdigest() != record["sha256"] or size != record["bytes"]:
        raise DataError(f"{fragment} changed while the job was running (it no longer matches its result): "
                        f"run the job again")
    return size


def sum_results(results: list[dict]) -> dict:
    """The counts of several results together (at least one): a shard's from its chunks', the
    job's from its shards'."""
    return {"per_class": np.sum([r["per_class"] for r in results], axis=0).tolist(),
            "skipped": [s for r in results for s in r["skipped"]],
            "hist": np.sum([r["hist"] for r in results], axis=0).tolist(),
            "conversions": dict(sum((Counter(r["conversions"]) for r in results), Counter()))}


def shard_results(partial: str, plan: ChunkPlan) -> list[dict]:
    """The results of every shard, in partition order; DataError naming a shard that has none."""
    out = []
    for p in range(plan.shards.total):
        result = _read_result(shard_result_path(partial, plan, p))
        if result is None:
            raise DataError(f"shard {shard_file(plan, p)} was not written in {partial}: run the job again")
        out.append(result)
    return out
