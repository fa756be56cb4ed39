"""The output directory: one job at a time, a staging sibling, the atomic swap, "up to date".

The job writes into `DATA_DIR.staging-<hex>` and `lottery.files.publish_dir` swaps it in (the old
copy goes aside as `DATA_DIR.old-<hex>` and is deleted); `remove_stale` deletes what an
interrupted run left behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from lottery.data.manifest import MANIFEST_NAME, read_manifest

from .errors import InputError

log = logging.getLogger("preprocess_images")


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """One job at a time per output (an flock on a hidden sibling file)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_path = output.parent / f".{output.name}.lock"
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another preprocessing job is writing {output} (lock {lock_path})") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def staging_dirs(output: Path) -> list[Path]:
    """Leftovers of earlier runs: DATA_DIR.staging-* and DATA_DIR.old-* siblings."""
    if not output.parent.is_dir():
        return []
    pat = re.compile(re.escape(output.name) + r"\.(staging|old)-[0-9a-f]+$")
    return sorted(p for p in output.parent.iterdir() if pat.match(p.name))


def remove_stale(output: Path) -> None:
    for p in staging_dirs(output):
        log.warning("removing %s left behind by an interrupted run", p)
        shutil.rmtree(p, ignore_errors=True)


def new_staging_dir(output: Path) -> Path:
    """A fresh, empty `DATA_DIR.staging-<hex>` beside the output."""
    staging = output.with_name(f"{output.name}.staging-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    return staging


def up_to_date(output: Path, input_fp: str, options: dict) -> dict | None:
    """The existing manifest when it was made from the same input and options and every shard
    is there with its size; else None."""
    if not (output / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(output)
    except Exception as e:  # unreadable or old format: rebuild
        log.info("existing %s is not usable (%s): rebuilding", output / MANIFEST_NAME, e)
        return None
    if (manifest.get("input_fingerprint") or {}).get("sha256") != input_fp:
        log.info("input changed since %s was written: rebuilding", output)
        return None
    if manifest.get("options") != options:
        log.info("options changed since %s was written: rebuilding", output)
        return None
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            p = output / shard["file"]
            if not p.is_file() or p.stat().st_size != shard["bytes"]:
                log.info("%s is missing or has the wrong size: rebuilding", p)
                return None
    return manifest
