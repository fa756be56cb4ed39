"""The output directory: one job at a time (the others wait), the partial sibling that a killed
job resumes from, the atomic swap, "up to date" (no Spark needed).

The job writes into `DATA_DIR.partial` (with `resume.json`, what it was started for) and
`lottery.files.publish_dir` swaps it in (the old copy goes aside as `DATA_DIR.old-<hex>` and is
deleted). A job run again after a kill continues the partial directory when the input and the
options are the same, and starts over, saying why, when they are not. `remove_stale` deletes the
`.old-<hex>` and `.staging-<hex>` leftovers of interrupted swaps.
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

from lottery.errors import CorruptArtifactError, CorruptDataError
from lottery.data.manifest import MANIFEST_NAME, read_manifest
from lottery.data.verify import verify_shards
from lottery.files import publish_dir, read_json, write_json
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


RESUME_NAME = "resume.json"


def partial_dir(output: Path) -> Path:
    return output.with_name(f"{output.name}.partial")


def resumable(output: Path, fingerprint: str, options: dict, *, force: bool = False) -> dict | None:
    """The resume record of an interrupted job on the same input with the same options, else None;
    a partial directory that cannot be continued is deleted, and the log says why."""
    partial = partial_dir(output)
    if not partial.exists():
        return None
    try:
        state = read_json(partial / RESUME_NAME, sealed=True)
        old = state["input_fingerprint"]
        if force:
            reason = "--force was given"
        elif state["options"] != options:
            reason = "the options are not the same"
        elif old != fingerprint:
            reason = (f"the input changed since (its fingerprint was {old[:12]}, it is {fingerprint[:12]} now); "
                      f"shards of two inputs are never mixed")
        else:
            log.info("resuming the interrupted run in %s (same input, same options)", partial)
            return state
    except FileNotFoundError:
        reason = f"it has no {RESUME_NAME}"
    except (OSError, KeyError, TypeError, CorruptArtifactError) as e:
        reason = f"its {RESUME_NAME} is not usable ({e})"
    log.warning("starting over: the interrupted run's work in %s cannot be reused: %s", partial, reason)
    shutil.rmtree(partial)
    return None


def start_partial(output: Path, state: dict) -> Path:
    """A new partial directory with its resume record."""
    partial = partial_dir(output)
    partial.mkdir()
    write_json(partial / RESUME_NAME, state, sealed=True)
    return partial


def publish_partial(partial: Path, output: Path, keep: set[str]) -> None:
    """Leave only the files in ``keep`` (the shards, the manifest) in ``partial`` and swap it in."""
    for path in partial.iterdir():
        if path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    publish_dir(partial, output)


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
