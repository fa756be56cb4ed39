"""Shards checked against the manifest where the data is opened: sizes always, sha256 once per file version.

Every ticket group opens the data in a new process, so hashing every shard at every open would cost
each process a full read of the data set (Fashion-MNIST: cheap; ImageNet: minutes). A shard whose
sha256 matched (`manifest.check_shard`) is recorded in ``<data_dir>/.verified.json`` under its file version, (size,
mtime_ns, ctime_ns, inode): any write to the file, a replacement or a ``touch`` changes that
version (the ctime cannot be set back from user space), and the shard is hashed again. A read-only
data directory keeps no record and is hashed at every open.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

from lottery.files import json_or, write_text

from .manifest import check_shard, shard_version

log = logging.getLogger("lottery.data")

STAMP_NAME = ".verified.json"


def _read_stamp(data_dir: Path, dataset_id: str) -> dict:
    stamp = json_or(data_dir / STAMP_NAME, {})
    if not isinstance(stamp, dict) or stamp.get("dataset_id") != dataset_id or not isinstance(stamp.get("shards"), dict):
        return {}
    return stamp["shards"]


def _write_stamp(data_dir: Path, dataset_id: str, shards: dict) -> None:
    """Atomically (several processes may verify at once: the last complete record wins)."""
    path = data_dir / STAMP_NAME
    try:
        write_text(path, json.dumps({"dataset_id": dataset_id, "shards": shards}))
    except OSError as exc:  # a read-only data directory: hash at every open
        log.info("not recording verified shards in %s (%s): they are hashed at every open", path, exc)


def verify_shards(data_dir: str | os.PathLike, manifest: Mapping, splits: Iterable[str]) -> dict:
    """Check every shard of ``splits``: present, the manifest's size, and its sha256 unless this file
    version was verified before. Returns ``{"shards", "hashed", "bytes_hashed", "seconds"}``."""
    data_dir, started = Path(data_dir), time.perf_counter()
    recorded = _read_stamp(data_dir, manifest["dataset_id"])
    fresh = dict(recorded)
    hashed = bytes_hashed = shards = 0
    for split in splits:
        for entry in manifest["splits"][split]["shards"]:
            shards += 1
            version = check_shard(data_dir / entry["file"], entry, split, recorded.get(entry["file"]))
            if recorded.get(entry["file"]) != version:
                fresh[entry["file"]] = version
                hashed += 1
                bytes_hashed += entry["bytes"]
    if fresh != recorded:
        _write_stamp(data_dir, manifest["dataset_id"], fresh)
    seconds = time.perf_counter() - started
    if hashed:
        log.info("verified %d of %d shards of %s (%.1f MB hashed in %.2f s)", hashed, shards, data_dir,
                 bytes_hashed / 1e6, seconds)
    return {"shards": shards, "hashed": hashed, "bytes_hashed": bytes_hashed, "seconds": seconds}


def record_written(data_dir: str | os.PathLike, manifest: Mapping) -> None:
    """Record the shards a writer just hashed while writing them (the manifest's sha256) as verified,
    so that the first open of a large data set does not read it all again."""
    data_dir = Path(data_dir)
    shards = {entry["file"]: shard_version((data_dir / entry["file"]).stat(), entry["sha256"])
              for split in manifest["splits"].values() for entry in split["shards"]}
    _write_stamp(data_dir, manifest["dataset_id"], shards)
