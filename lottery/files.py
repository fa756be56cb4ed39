"""Atomic, checked file writes: everything the engine and the data layer produce goes through here.

Every artifact is written to a temporary name in the same directory and renamed into place, so a
reader sees either nothing or the whole file; a whole directory (a dataset, an image export) is
written into a staging sibling and swapped in by `publish_dir`. Array bundles are ``.npz`` files:
a zip whose members carry CRC-32 checksums, read back eagerly so that a truncated or corrupted file
is refused.

Pure Python + numpy (no TensorFlow, no Keras): Spark executors and the data layer import it.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from lottery.errors import CorruptArtifactError


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of the files ``names`` under ``directory`` (those that exist):
    written into a unit of work's result, so that "already done" can check every file it made."""
    directory = Path(directory)
    return {name: {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
            for name in names if (directory / name).is_file()}


def damaged_files(directory: str | os.PathLike, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """What no longer matches ``manifest`` under ``directory``: ``"model.keras: missing"``,
    ``"...: 1,024 bytes, not 2,048"``, ``"...: sha256 differs"`` (sizes first: cheap)."""
    directory, damaged = Path(directory), []
    for name, want in manifest.items():
        path = directory / name
        if not path.is_file():
            damaged.append(f"{name}: missing")
        elif (size := path.stat().st_size) != want["size"]:
            damaged.append(f"{name}: {size:,} bytes, not {want['size']:,}")
        elif sha256_file(path) != want["sha256"]:
            damaged.append(f"{name}: sha256 differs")
    return damaged


def intact_result(path: str | os.PathLike, label: str, legacy_damage=lambda: []) -> dict[str, Any] | None:
    """A unit of work's ``result.json`` when it and every file it lists (``files``, relative to its
    directory) are intact; else None, after naming the damage in the log (``<label>: damaged,
    training it again: ...``) and removing the result, so that nothing reads the unit as done while
    it is recomputed. ``legacy_damage``: what is wrong with a result written before results listed
    their files."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        result = read_json(path)
        damaged = damaged_files(path.parent, result["files"]) if "files" in result else legacy_damage()
        float(result["val_accuracy"])
    except (CorruptArtifactError, KeyError, TypeError, ValueError, AttributeError) as exc:
        damaged = [f"{path.name}: {exc}"]
    if damaged:
        logging.getLogger("lottery").warning("%s: damaged, training it again: %s", label, "; ".join(damaged))
        path.unlink(missing_ok=True)
        return None
    return result


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _aside_path(target: str | os.PathLike) -> Path:
    """Where `publish_dir` moves the old copy of ``target`` while it swaps: ``<name>.old-<12 hex>``
    beside it (the Spark job removes such leftovers of an interrupted swap)."""
    target = Path(target)
    return target.with_name(f"{target.name}.old-{uuid.uuid4().hex[:12]}")


def publish_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished directory ``staging`` in place of ``target``, atomically for readers.

    ``staging`` must be a sibling of ``target`` (same filesystem). Its entries and the rename are
    fsynced. An existing ``target`` is renamed aside, the staging directory renamed in, and the
    old copy deleted; if the second rename fails, the old copy is put back. A reader sees the old
    directory or the new one, never a mix. Raises OSError when ``target`` appears (non-empty)
    between the check and the rename: callers that race other writers catch it.
    """
    staging, target = Path(staging), Path(target)
    fsync_dir(staging)
    if not target.exists():
        os.replace(staging, target)
        fsync_dir(target.parent)
        return
    old = _aside_path(target)
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask (0644 under the usual 022)."""
    try:  # Linux >= 4.7 reports the umask without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The file gets the mode a plain ``open()`` would give it (``new_file_mode``), not mkstemp's 0600:
    a report, a result or a model is as readable as the plot beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, new_file_mode())
        os.replace(tmp_path, path)
    except OSError as exc:
        raise _naming(exc, path, tmp_path) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def _naming(exc: OSError, path: Path, tmp: Path) -> OSError:
    """An error writing ``tmp`` as one that names ``path`` (a full disk's write error names no file:
    ``[Errno 28] No space left on device``) and says what was kept; any other error as it is."""
    if exc.errno is None or exc.filename not in (None, str(tmp)):
        return exc
    reason = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror
    return OSError(exc.errno, f"{reason} while writing {path}: nothing was written there (its temporary file "
                              f"was removed; a previous copy, if any, is intact); free space and rerun", str(path))


# The key of a sealed JSON object: the sha256 of the file's text with this value blank. A bit flipped
# in a result can leave valid JSON with another number in it (or a digit that parses to the same
# float): the seal tells, byte for byte.
SEAL = "checksum"
_BLANK_SEAL = "sha256:" + "0" * 64


def write_json(path: str | os.PathLike, data: Any, *, sealed: bool = False) -> None:
    """``data`` as JSON, atomically; ``sealed`` (a dict): with its own checksum, which `read_json`
    verifies, so that a changed byte is refused rather than read as another value."""
    text = _json_text({**data, SEAL: _BLANK_SEAL} if sealed else data)
    if sealed:
        text = text.replace(f'"{_BLANK_SEAL}"', f'"sha256:{_sha256_text(text)}"', 1)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; for a sealed object (`write_json`), its content without the seal once the
    seal matches. Unreadable JSON or a seal that does not match raise CorruptArtifactError."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(f"{path} is not valid JSON ({exc}); delete it to recompute") from None
    if isinstance(data, dict) and SEAL in data:
        seal = data.pop(SEAL)
        blank = text.replace(f'"{seal}"', f'"{_BLANK_SEAL}"', 1) if isinstance(seal, str) else ""
        if seal != f"sha256:{_sha256_text(blank)}":
            raise CorruptArtifactError(f"{path}: its content does not match its {SEAL} (modified or damaged); "
                                       "delete it to recompute")
    elif isinstance(data, dict) and any(_looks_like_seal(value) for value in data.values()):
        raise CorruptArtifactError(f"{path}: its {SEAL} is under another name (damaged); delete it to recompute")
    return data


def _looks_like_seal(value: Any) -> bool:
    """A seal whose key was damaged (an unsealed object has no such value at its top level)."""
    return isinstance(value, str) and len(value) == len(_BLANK_SEAL) and value.startswith("sha256:")


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def csv_text(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    """A header and one line per row (keys outside ``columns`` ignored)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """``csv_text``, written atomically."""
    write_text(path, csv_text(columns, rows))


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Save named arrays plus a JSON ``meta`` dict as one ``.npz``, atomically."""
    keys = list(arrays)
    payload = {f"a{i:04d}": np.asarray(arrays[k]) for i, k in enumerate(keys)}
    payload["__meta__"] = np.array(json.dumps({"keys": keys, "meta": meta}, default=_json_default))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        # the checksum goes first: a crash between the two leaves a mismatch (refused), never a
        # new checkpoint vouched for by nothing
        write_text(checksum_path(path), f"{sha256_file(tmp)}  {Path(path).name}\n")


def checksum_path(path: str | os.PathLike) -> Path:
    """``<name>.sha256`` beside an array bundle, in ``sha256sum`` format (``sha256sum -c`` checks it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def arrays_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with the array bundle ``path`` (``"missing"``, ``"sha256 differs from …"``), or
    None when it is intact: its ``.sha256`` matches, or (a bundle saved before those existed) every
    member reads back with its CRC-32."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        _verify_checksum(path) if checksum_path(path).exists() else load_arrays(path)
    except CorruptArtifactError as exc:
        return str(exc)
    return None


def remove_arrays(path: str | os.PathLike) -> None:
    """Delete an array bundle and its checksum."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def _verify_checksum(path: Path) -> None:
    recorded = checksum_path(path)
    try:
        want = recorded.read_text().split()[0]
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise CorruptArtifactError(f"{recorded} cannot be read ({exc}); delete {path} to recompute") from None
    if sha256_file(path) != want:
        raise CorruptArtifactError(f"{path}: sha256 differs from {recorded.name} (truncated or modified); "
                                   "delete it to recompute")


def load_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load what :func:`save_arrays` wrote, checked against its ``.sha256`` when it has one; a
    truncated or corrupted file raises CorruptArtifactError."""
    path = Path(path)
    if path.exists() and checksum_path(path).exists():
        _verify_checksum(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["__meta__"]))
            arrays = {key: data[f"a{i:04d}"] for i, key in enumerate(header["keys"])}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, json.JSONDecodeError) as exc:
        raise CorruptArtifactError(f"{path} is corrupted or truncated ({type(exc).__name__}: {exc}); delete it to recompute") from None
    return arrays, header["meta"]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
