"""Atomic, checked file writes: everything the engine produces goes through here.

Every artifact is written to a temporary name in the same directory and renamed into place, so a
reader sees either nothing or the whole file. Array bundles are ``.npz`` files: a zip whose members
carry CRC-32 checksums, read back eagerly so that a truncated or corrupted file is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lottery.data.records import sha256_file  # noqa: F401  (re-exported: one definition)
from lottery.errors import CorruptArtifactError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptArtifactError(f"{path} is not valid JSON ({exc}); delete it to recompute") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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


def load_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load what :func:`save_arrays` wrote; a truncated or corrupted file raises CorruptArtifactError."""
    path = Path(path)
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
