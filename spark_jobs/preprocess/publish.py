"""The output directory: one job at a time (the others wait), a staging sibling, the atomic swap,
"up to date" (no Spark needed).

The job writes into `DATA_DIR.staging-<hex>` and `lottery.files.publish_dir` swaps it in (the old
copy goes aside as `DATA_DIR.old-<hex>` and is deleted); `remove_stale` deletes what an
interrupted run left behind.
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from lottery.errors import CorruptDataError
from lottery.data.manifest import MANIFEST_NAME, read_manifest
from lottery.data.verify import verify_shards
from lottery.locks import LockTimeout, lock_path, wait_lock

from .errors import InputError

log = logging.getLogger("preprocess_images")


@contextlib.contextmanager
def output_lock(output: Path, timeout: float | None = None) -> Iterator[float]:
    """One job at a time per output (an flock on the hidden sibling ``.<name>.lock``): a job that
    finds another writing waits for it (up to ``timeout`` s, logged) and yields the seconds waited."""
    try:
        with wait_lock(lock_path(output), f"preprocessing job writing {output}", timeout=timeout, log=log) as waited:
            yield waited
    except LockTimeout as e:
        raise InputError(f"another preprocessing job is writing {output}: {e}") from None


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


def up_to_date(output: Path, input_fingerprint: Callable[[], str], options: dict) -> dict | None:
    """The existing manifest when it was made with the same options from the same input and every
    shard is intact (size, and sha256 once per file version: lottery.data.verify); else None.
    Needs no Spark: ``input_fingerprint()`` (a walk of the input, listing.local_fingerprint) is
    called last, only when everything else matches."""
    if not (output / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(output)
    except Exception as e:  # unreadable or old format: rebuild
        log.info("existing %s is not usable (%s): rebuilding", output / MANIFEST_NAME, e)
        return None
    if manifest.get("options") != options:
        log.info("options changed since %s was written: rebuilding", output)
        return None
    try:
        verify_shards(output, manifest, manifest["splits"])
    except (OSError, CorruptDataError) as e:
        log.warning("%s: rebuilding", str(e).split("; ")[0])
        return None
    if (manifest.get("input_fingerprint") or {}).get("sha256") != input_fingerprint():
        log.info("input changed since %s was written: rebuilding", output)
        return None
    return manifest
