"""Stage 1, listing: a parallel walk of the class folders on the executors.

Counts, the input fingerprint (relative path, size and mtime of every file), the files skipped
at listing time and a deterministic sample for the probes; no file contents are read. (Spark's
own file index skips zero-byte files and names starting with "_" or ".", which must be reported.)
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import stat
from typing import Iterable, Iterator

from .args import JobConfig, visible_dirs
from .sharding import SPLITS, assign, shard_key

# The probe sample: the files with the smallest hashes of their relative paths.
HEADER_SAMPLE = 1000
# Parallel tasks per core of the listing and decode stages (small tasks balance the load).
PARTITIONS_PER_CORE = 3


def _new_listing() -> dict:
    return {"files": 0, "bytes": 0, "fp": 0, "readable": 0, "by_split": {}, "by_class": {}, "outside": 0,
            "skipped": [], "sample": []}


class _Lister:
    """Accumulates the listing of some files: counts, fingerprint, listing-time skips, sample."""

    def __init__(self, *, derived_val: bool, val_fraction: float, seed: int, class_set: frozenset,
                 sample_size: int, val_labels: dict[str, str] | None = None):
        self.kw = {"derived_val": derived_val, "val_fraction": val_fraction, "seed": seed,
                   "val_labels": val_labels}
        self.class_set, self.sample_size = class_set, sample_size
        self.agg = _new_listing()
        self.heap: list[tuple[str, str]] = []   # negated keys: a max-heap of the smallest keys

    def place(self, rel: str, size: int) -> tuple[str, str | None, str | None]:
        """(split, class, why it is skipped or None) of one file: the rules of the listing, which
        the decode stage applies again to the files it reads (`files_to_decode`)."""
        split, cls = assign(rel, **self.kw)
        if cls is None or cls not in self.class_set:
            where = ("not inside a class folder and not in the val label file"
                     if self.kw["val_labels"] is not None and split == "val" else "not inside a class folder")
            return split, cls, f"outside-class: {where}"
        if any(part.startswith("_") for part in rel.split("/")[2:]):
            return split, cls, "ignored-name: Spark does not read names starting with '_'"
        if size == 0:
            return split, cls, "empty: zero-byte file"
        return split, cls, None

    def add(self, rel: str, size: int, mtime_ns: int) -> None:
        """Count one file."""
        agg = self.agg
        agg["files"] += 1
        agg["bytes"] += size
        digest = hashlib.sha256(f"{rel}\0{size}\0{mtime_ns}".encode("utf-8")).digest()
        agg["fp"] = (agg["fp"] + int.from_bytes(digest[:16], "big")) % (1 << 128)
        split, cls, skipped = self.place(rel, size)
        s = agg["by_split"].setdefault(split, [0, 0])
        s[0] += 1
        s[1] += size
        if skipped is not None:
            if skipped.startswith("outside-class"):
                agg["outside"] += 1
            agg["skipped"].append({"path": rel, "reason": skipped})
            return
        agg["readable"] += 1
        agg["by_class"][(split, cls)] = agg["by_class"].get((split, cls), 0) + 1
        item = (_neg_hex(shard_key(rel)), rel)
        if len(self.heap) < self.sample_size:
            heapq.heappush(self.heap, item)
        elif item > self.heap[0]:
            heapq.heapreplace(self.heap, item)

    def result(self) -> dict:
        self.agg["sample"] = sorted((_neg_hex(k), rel) for k, rel in self.heap)
        return self.agg


def _files_under(rel_dir: str, root: str) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, stat) of the regular files under a folder, recursively and in sorted order,
    following links like Spark's listing does; hidden names are ignored."""
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, rel_dir), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue   # vanished or a dangling link: Spark cannot read it either
            if stat.S_ISREG(st.st_mode):
                yield os.path.relpath(full, root).replace(os.sep, "/"), st


def _files_directly_in(rel_dir: str, root: str) -> Iterator[tuple[str, os.stat_result]]:
    for e in sorted(os.scandir(os.path.join(root, rel_dir)), key=lambda e: e.name):
        if not e.name.startswith(".") and e.is_file():
            yield f"{rel_dir}/{e.name}", e.stat()


def _walk_partition(rel_dirs: Iterable[str], *, root: str, lister_kw: dict) -> Iterator[dict]:
    """Walk some class folders."""
    lister = _Lister(**lister_kw)
    for rel_dir in rel_dirs:
        for rel, st in _files_under(rel_dir, root):
            lister.add(rel, st.st_size, st.st_mtime_ns)
    yield lister.result()


def _neg_hex(h: str) -> str:
    """Order-reversing map of a hex string (for a max-heap of the smallest keys)."""
    return h.translate(str.maketrans("0123456789abcdef", "fedcba9876543210"))


def _merge_listing(a: dict, b: dict, sample_size: int = HEADER_SAMPLE) -> dict:
    out = {"files": a["files"] + b["files"], "bytes": a["bytes"] + b["bytes"],
           "fp": (a["fp"] + b["fp"]) % (1 << 128), "readable": a["readable"] + b["readable"],
           "outside": a["outside"] + b["outside"], "skipped": a["skipped"] + b["skipped"],
           "by_split": dict(a["by_split"]), "by_class": dict(a["by_class"])}
    for k, (n, nb) in b["by_split"].items():
        s = out["by_split"].get(k, [0, 0])
        out["by_split"][k] = [s[0] + n, s[1] + nb]
    for k, n in b["by_class"].items():
        out["by_class"][k] = out["by_class"].get(k, 0) + n
    out["sample"] = heapq.nsmallest(sample_size, heapq.merge(a["sample"], b["sample"]))
    return out


def class_dirs(cfg: JobConfig) -> list[str]:
    """Relative paths of the class folders to read: train/<c> and val/<c> (none in a flat val/:
    its files are listed by `_top_level`)."""
    dirs = [f"train/{c}" for c in cfg.classes]
    if cfg.has_val_dir:
        dirs += [f"val/{c}" for c in visible_dirs(cfg.root / "val")]
    return dirs


def lister_kwargs(cfg: JobConfig) -> dict:
    """How a `_Lister` places and counts the files of this job (also what `files_to_decode` takes)."""
    a = cfg.args
    return {"derived_val": cfg.derived_val, "val_fraction": a.val_fraction, "seed": a.seed,
            "class_set": frozenset(cfg.classes), "sample_size": HEADER_SAMPLE, "val_labels": cfg.val_labels}


def _top_level(cfg: JobConfig, lister_kw: dict) -> dict:
    """Files directly in train/ or val/ (not in a class folder), on the driver: few and cheap, or the
    images of a flat val/ (counted in their labelled classes)."""
    top = _Lister(**lister_kw)
    for split in SPLITS:
        d = cfg.root / split
        if not d.is_dir():
            continue
        for rel, st in _files_directly_in(split, str(cfg.root)):
            top.add(rel, st.st_size, st.st_mtime_ns)
    return top.result()


def _finish(listing: dict) -> dict:
    """The fingerprint of the merged listing; the sample as relative paths; skips sorted."""
    fp = hashlib.sha256(json.dumps([listing["files"], listing["bytes"], f"{listing['fp']:032x}"])
                        .encode("ascii")).hexdigest()
    listing["fingerprint"] = fp
    listing["sample"] = [rel for _, rel in listing["sample"]]
    listing["skipped"].sort(key=lambda s: s["path"])
    return listing


def list_inputs(spark, cfg: JobConfig) -> dict:
    """Listing, fingerprint, counts and the probe sample of the input (no file contents read)."""
    lister_kw = lister_kwargs(cfg)
    dirs = class_dirs(cfg)
    sc = spark.sparkContext
    root = str(cfg.root)
    n = max(1, min(len(dirs), sc.defaultParallelism * PARTITIONS_PER_CORE))
    # The class folders' files are never directly in val/: the executors need no val labels.
    walk_kw = {**lister_kw, "val_labels": None}
    walked = sc.parallelize(dirs, n).mapPartitions(
        lambda part: _walk_partition(part, root=root, lister_kw=walk_kw))
    return _finish(_merge_listing(_top_level(cfg, lister_kw), walked.fold(_new_listing(), _merge_listing)))


def local_fingerprint(cfg: JobConfig) -> str:
    """The input fingerprint of `list_inputs`, walked in this process (no Spark): what the
    "already up to date" check compares before a Spark session is started."""
    lister_kw = lister_kwargs(cfg)
    walked = next(_walk_partition(class_dirs(cfg), root=str(cfg.root), lister_kw=lister_kw))
    return _finish(_merge_listing(_top_level(cfg, lister_kw), walked))["fingerprint"]


def decode_units(cfg: JobConfig) -> list[str]:
    """What the decode stage walks: the class folders, and a flat val/ (its files only) when it has
    labels. Files directly in train/, or in a val/ without labels, are skipped at listing."""
    return class_dirs(cfg) + (["val/"] if cfg.val_labels is not None else [])


def files_to_decode(units: Iterable[str], *, root: str, lister_kw: dict) -> Iterator[tuple[str, str, str]]:
    """(relative path, split, class) of every file of some `decode_units` that the listing counts as
    readable: the same rules, applied again by the executors that decode them."""
    lister = _Lister(**lister_kw)
    for unit in units:
        files = _files_directly_in(unit.rstrip("/"), root) if unit.endswith("/") else _files_under(unit, root)
        for rel, st in files:
            split, cls, skipped = lister.place(rel, st.st_size)
            if skipped is None:
                yield rel, split, cls
