"""Fashion-MNIST (Debian package `dataset-fashion-mnist`) -> an ImageNet-layout PNG folder.

No TensorFlow: the IDX files are read with numpy, the PNGs written with Pillow.

    out_dir/train/00_tshirt_top/00000.png ... out_dir/val/09_ankle_boot/09999.png
    out_dir/.complete.json   (marker: counts and limit of a complete export)

`val` is the t10k file.  The image id (file stem) is the index in the original IDX file.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np

from lottery.errors import MissingDataError
from lottery.files import json_or, publish_dir, write_text
from lottery.locks import lock_path, wait_lock

log = logging.getLogger("lottery.data")

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
MARKER = ".complete.json"
EXPORT_VERSION = 1
_FILES = {"train": "train", "val": "t10k"}
_SPLIT_ALIASES = {"train": "train", "val": "val", "test": "val", "t10k": "val"}
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"


class SourceDataMissingError(MissingDataError):
    """The Fashion-MNIST IDX files are not there (the Debian package is not installed)."""


def class_folder(index: int, name: str) -> str:
    """`00_tshirt_top`: two-digit label prefix (so sorted folder names == label order) + a slug."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("-", "")).strip("_")
    return f"{index:02d}_{slug}"


CLASS_FOLDERS = [class_folder(i, n) for i, n in enumerate(FASHION_MNIST_CLASSES)]


def _idx_path(source_dir: Path, split: str, kind: str) -> Path:
    suffix = "images-idx3-ubyte" if kind == "images" else "labels-idx1-ubyte"
    stem = f"{_FILES[split]}-{suffix}"
    for name in (stem + ".gz", stem):
        p = source_dir / name
        if p.is_file():
            return p
    raise SourceDataMissingError(
        f"Fashion-MNIST file {source_dir / (stem + '.gz')} not found: install the Debian package with "
        f"`{INSTALL_HINT}` (or pass source_dir=)")


def _read_idx(path: Path, expected_magic: int, limit: int | None) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic, n = struct.unpack(">II", f.read(8))
        if magic != expected_magic:
            raise ValueError(f"{path}: bad IDX magic {magic:#010x}, expected {expected_magic:#010x}")
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * (ndim - 1), f.read(4 * (ndim - 1))) if ndim > 1 else ()
        count = n if limit is None else min(n, int(limit))
        size = count * int(np.prod(dims, dtype=np.int64)) if dims else count
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: truncated, expected {size} bytes of data, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape((count, *dims)).copy()


def load_fashion_mnist_arrays(split: str, limit: int | None = None,
                              source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of `train` or `val` (= t10k; `test` also works);
    `limit` keeps the first N (only that much is decompressed)."""
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")
    split = _SPLIT_ALIASES[split]
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise SourceDataMissingError(
            f"Fashion-MNIST source directory {source_dir} does not exist: install the Debian package with "
            f"`{INSTALL_HINT}` (or pass source_dir=)")
    images = _read_idx(_idx_path(source_dir, split, "images"), 0x00000803, limit)
    labels = _read_idx(_idx_path(source_dir, split, "labels"), 0x00000801, limit).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{source_dir}: {split} has {len(images)} images but {len(labels)} labels")
    return images, labels


def _is_complete(out_dir: Path, limit: int | None) -> dict | None:
    marker = json_or(out_dir / MARKER)
    if marker and marker.get("version") == EXPORT_VERSION and marker.get("limit") == limit:
        return marker
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp(out_dir: Path) -> None:
    """Remove temporary siblings left behind by killed exports (their pid is gone)."""
    prefix = f".{out_dir.name}.tmp-"
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.iterdir():
        if p.name.startswith(prefix):
            try:
                pid = int(p.name[len(prefix):])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def export_fashion_mnist(out_dir: str | os.PathLike, *, limit: int | None = None,
                         source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR, progress: bool = True) -> dict:
    """Write Fashion-MNIST as `out_dir/{train,val}/<NN_class>/<index>.png` (val = t10k), the first
    `limit` images of each split. A complete export with the same limit is kept ("already
    exported"); a concurrent caller waits for the one in progress, then finds it done. An export
    with another limit is replaced atomically; any other non-empty `out_dir` is a FileExistsError."""
    start = time.monotonic()
    out_dir = Path(out_dir)
    marker = _is_complete(out_dir, limit)
    if marker:
        log.info("Fashion-MNIST already exported to %s (limit=%s): %s", out_dir, limit,
                 {s: marker["counts"][s] for s in _FILES})
        return _summary(out_dir, marker, already=True, duration=time.monotonic() - start)
    if out_dir.exists() and any(out_dir.iterdir()) and json_or(out_dir / MARKER) is None:
        raise FileExistsError(f"{out_dir}: exists, is not empty and is not a Fashion-MNIST export; "
                              f"refusing to replace it")

    # Runs sharing an artifact root export once: the others wait here, then find it done.
    with wait_lock(lock_path(out_dir), f"Fashion-MNIST export to {out_dir}", log=log) as waited:
        marker = _is_complete(out_dir, limit)
        if marker:
            log.info("Fashion-MNIST exported to %s by another run while this one waited %.1f s", out_dir, waited)
            return _summary(out_dir, marker, already=True, duration=time.monotonic() - start)
        marker = _export_locked(out_dir, limit, source_dir, progress)
    summary = _summary(out_dir, marker, already=False, duration=time.monotonic() - start)
    log.info("exported Fashion-MNIST to %s: train=%d val=%d in %.1fs", out_dir, summary["train"],
             summary["val"], summary["duration_s"])
    return summary


def _export_locked(out_dir: Path, limit: int | None, source_dir, progress: bool) -> dict:
    """The export into a temporary sibling, swapped in; returns its marker (the caller holds the lock)."""
    _clean_stale_tmp(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        marker = _write_export(tmp, out_dir, limit, source_dir, progress)
        _publish(tmp, out_dir, limit)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return marker


def _write_export(tmp: Path, out_dir: Path, limit: int | None, source_dir, progress: bool) -> dict:
    """Both splits as PNG folders in `tmp`, then the marker; returns the marker."""
    counts: dict[str, int] = {}
    per_class: dict[str, list[int]] = {}
    for split in _FILES:
        images, labels = load_fashion_mnist_arrays(split, limit, source_dir)
        log.info("exporting Fashion-MNIST %s: %d images -> %s", split, len(images), out_dir / split)
        per_class[split] = _write_pngs(tmp / split, images, labels, split, progress)
        counts[split] = len(images)
    marker = {"version": EXPORT_VERSION, "limit": limit, "counts": counts, "per_class": per_class,
              "classes": CLASS_FOLDERS, "class_names": FASHION_MNIST_CLASSES,
              "source_dir": str(source_dir)}
    write_text(tmp / MARKER, json.dumps(marker, indent=2) + "\n")
    return marker


def _write_pngs(split_dir: Path, images: np.ndarray, labels: np.ndarray, split: str, progress: bool) -> list[int]:
    """`split_dir/<NN_class>/<index>.png` for every image; returns the count per class."""
    from PIL import Image

    for folder in CLASS_FOLDERS:
        (split_dir / folder).mkdir(parents=True, exist_ok=True)
    n = len(images)
    step = max(1, n // 10)
    per_class = [0] * len(CLASS_FOLDERS)
    for i in range(n):
        label = int(labels[i])
        per_class[label] += 1
        Image.fromarray(images[i]).save(split_dir / CLASS_FOLDERS[label] / f"{i:05d}.png", format="PNG")
        if progress and (i + 1) % step == 0:
            log.info("  %s: %d/%d (%.0f%%)", split, i + 1, n, 100.0 * (i + 1) / n)
    return per_class


def _publish(tmp: Path, out_dir: Path, limit: int | None) -> None:
    """Swap the finished export in (only an empty dir or an export with another limit is replaced)."""
    if _is_complete(out_dir, limit):  # a concurrent export finished first: keep it
        return
    try:
        publish_dir(tmp, out_dir)
    except OSError:
        if not _is_complete(out_dir, limit):  # lost a race to a different export
            raise


def _summary(out_dir: Path, marker: dict, *, already: bool, duration: float) -> dict:
    return {"out_dir": str(out_dir), "train": marker["counts"]["train"], "val": marker["counts"]["val"],
            "per_class": marker["per_class"], "classes": list(marker["classes"]),
            "class_names": list(marker["class_names"]), "limit": marker["limit"],
            "already_exported": already, "duration_s": round(duration, 3)}
