"""Atomic, checked file writes: everything the engine and the data layer produce goes through here.

Every file is written to a temporary name in the same directory, fsynced and renamed into place
(`atomic_path`), so a reader sees either nothing or the whole file; a whole directory (a dataset, an
image export) is written into a staging sibling and swapped in by `publish_dir`. A file is vouched
for by its record, ``{"bytes", "sha256"}`` (`file_record`), and checked against it by one function
(`file_damage`). Array bundles (`save_arrays`) are deterministic ``.npz`` files whose record and
meta are in a sealed ``<stem>.json`` beside them.

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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# A file's record, the one format that vouches for a file (a shard in a data set's manifest, the
# files a result lists, a mask in its report): ``{"bytes": size, "sha256": hex digest}``.
MISSING = "missing"


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def file_damage(path: str | os.PathLike, record: dict[str, Any], source: str) -> str | None:
    """What is wrong with ``path`` against its ``record`` (kept in ``source``, named in the message),
    or None when it matches. The size first: it is cheap."""
    path = Path(path)
    if not path.is_file():
        return MISSING
    if (size := path.stat().st_size) != record["bytes"]:
        return f"{size:,} bytes, {source} says {record['bytes']:,}"
    if sha256_file(path) != record["sha256"]:
        return f"its sha256 differs from {source} (same size, {size:,} bytes)"
    return None


def output_records(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, Any]:
    """What a result lists of the files ``names`` under ``directory`` (those that exist), so that
    "already done" can check every file it made: records, and the array bundles (sealed apart)."""
    present = [name for name in names if (Path(directory) / name).is_file()]
    return {"files": {name: file_record(Path(directory) / name) for name in present if not name.endswith(".npz")},
            "arrays": [name for name in present if name.endswith(".npz")]}


def damaged_files(directory: str | os.PathLike, manifest: dict[str, dict[str, Any]], source: str) -> list[str]:
    """What no longer matches ``manifest`` (kept in ``source``) under ``directory``, one line per file."""
    return [f"{name}: {damage}" for name, record in manifest.items()
            if (damage := file_damage(Path(directory) / name, record, source))]


def intact_result(path: str | os.PathLike, label: str, *, number: str = "val_accuracy",
                  redo: str = "training it again") -> dict[str, Any] | None:
    """A unit of work's sealed ``result.json`` when it and every file it lists are intact; else
    None, after logging the damage (``<label>: damaged, <redo>: ...``) and removing the result, so
    that nothing reads the unit as done while it is recomputed. ``number``: the field that must
    hold a number (`result_damage`)."""
    path = Path(path)
    if not path.exists():
        return None
    result, damaged = result_damage(path, number=number)
    if damaged:
        logging.getLogger("lottery").warning("%s: damaged, %s: %s", label, redo, "; ".join(damaged))
        path.unlink(missing_ok=True)
        return None
    return result


def result_damage(path: str | os.PathLike, *, number: str = "val_accuracy") -> tuple[dict[str, Any] | None, list[str]]:
    """A sealed ``result.json`` and what no longer matches it or the files it records, one line per
    file (``[]`` when all is intact); the result is None when it cannot be read or trusted (or its
    field ``number`` holds no number)."""
    path = Path(path)
    try:
        result = read_json(path, sealed=True)
        damaged = damaged_files(path.parent, result["files"], path.name)
        damaged += [f"{name}: {damage}" for name in result["arrays"] if (damage := arrays_damage(path.parent / name))]
        float(result[number])
    except (CorruptArtifactError, KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
        return None, [f"{path.name}: {exc}"]
    return result, damaged


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem supports it)."""
    try:
        _fsync(path)
    except OSError:
        pass


def _aside_path(target: str | os.PathLike) -> Path:
    """Where `publish_dir` moves the old ``target`` while it swaps (the Spark job removes leftovers)."""
    target = Path(target)
    return target.with_name(f"{target.name}.old-{uuid.uuid4().hex[:12]}")


def publish_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished directory ``staging`` (a sibling) in place of ``target``: a reader sees the
    old directory or the new one, never a mix; the old one is put back if the swap fails. OSError
    when ``target`` appears (non-empty) meanwhile: callers that race other writers catch it."""
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
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (with its suffix: writers pick the format by it); when
    the block succeeds, fsync it and rename it onto ``path``; it is removed whatever happens. The
    file gets ``mode``, by default that of a plain ``open()``, not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, new_file_mode() if mode is None else mode)
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise _naming(exc, path, tmp_path) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """``data`` as JSON, atomically; ``sealed`` (a dict): with its own checksum (`SEAL`)."""
    text = _json_text({**data, SEAL: _BLANK_SEAL} if sealed else data)
    if sealed:
        text = text.replace(f'"{_BLANK_SEAL}"', f'"sha256:{_sha256_text(text)}"', 1)
    write_text(path, text)


def read_json(path: str | os.PathLike, *, sealed: bool = False) -> Any:
    """The JSON in ``path``, without its seal once that matches; CorruptArtifactError for bad JSON,
    a seal that does not match, or (``sealed``) none at all."""
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
    elif sealed:
        raise CorruptArtifactError(f"{path} has no {SEAL} (not written sealed, or damaged); delete it to recompute")
    return data


def json_or(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing or unreadable (a best-effort note)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _looks_like_seal(value: Any) -> bool:
    """A seal whose key was damaged (an unsealed object has no such value at its top level)."""
    return isinstance(value, str) and len(value) == len(_BLANK_SEAL) and value.startswith("sha256:")


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def csv_text(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    """A header and one line per row (keys outside ``columns`` ignored)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, csv_text(columns, rows))


# Array bundles (checkpoints, masks): a ``.npz`` whose bytes depend only on its arrays (members in
# the given order, a fixed date), vouched for by the sealed ``<stem>.json`` beside it, which holds
# its record and its ``meta``.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def arrays_record_path(path: str | os.PathLike) -> Path:
    """``<stem>.json`` beside the array bundle ``path``: its record and meta, sealed."""
    return Path(path).with_suffix(".json")


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any], *,
                compress: bool = False) -> None:
    """Save named arrays (``np.load(path)[key]``) and their record and ``meta`` in the sealed
    ``<stem>.json``; the same arrays give the same bytes. ``compress``: for masks (weights barely shrink)."""
    path = Path(path)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", compression=method) as archive:
            for key, value in arrays.items():
                member = io.BytesIO()
                np.lib.format.write_array(member, np.asarray(value, order="C"), allow_pickle=False)
                member_info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
                archive.writestr(member_info, member.getvalue(), compress_type=method)
        # the record goes first: a crash between the two leaves a mismatch (refused), never a new
        # bundle vouched for by nothing
        write_json(arrays_record_path(path), {"file": path.name, **file_record(tmp), "meta": meta}, sealed=True)


def _arrays_meta(path: Path) -> tuple[str | None, Any]:
    """(what is wrong with the bundle ``path`` or None, its meta)."""
    record_path = arrays_record_path(path)
    try:
        info = read_json(record_path, sealed=True)
        record, meta = {"bytes": info["bytes"], "sha256": info["sha256"]}, info["meta"]
    except (OSError, KeyError, TypeError, CorruptArtifactError) as exc:
        return f"its record {record_path.name} is missing or unreadable ({type(exc).__name__}: {exc})", None
    return file_damage(path, record, record_path.name), meta


def arrays_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with the array bundle ``path``, or None when it matches its sealed record."""
    path = Path(path)
    return MISSING if not path.is_file() else _arrays_meta(path)[0]


def remove_arrays(path: str | os.PathLike) -> None:
    """Delete an array bundle and its record."""
    Path(path).unlink(missing_ok=True)
    arrays_record_path(path).unlink(missing_ok=True)


def load_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) that `save_arrays` wrote; CorruptArtifactError when it does not match its record."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    damage, meta = _arrays_meta(path)
    if damage:
        raise CorruptArtifactError(f"{path}: {damage} (truncated or modified); delete it to recompute")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}, meta
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as exc:
        raise CorruptArtifactError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it to recompute") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
