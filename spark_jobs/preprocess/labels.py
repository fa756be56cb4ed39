"""The labels of a flat validation folder: ``ROOT/val/*.JPEG`` (the ILSVRC-2012 validation set as
distributed) with a label file that names each image's class folder in train/.

Two formats, told apart by the first line:

* the CLS-LOC solution CSV (``LOC_val_solution.csv``): header ``ImageId,PredictionString``, rows
  ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295``: the class is the
  first token of PredictionString (the boxes that follow are ignored); ImageId has no extension;
* ``filename,class`` rows (that header line is optional); the file name may leave out its extension.

An id matches the file of val/ with exactly that name, else the one file whose name without its
extension is the id. Every image directly in val/ must have a label naming a class of train/;
labels of images that are not there are allowed (a label file of the whole validation set with a
subset of its images or classes). Pure Python (no Spark): `args.validate` calls it on the driver.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path

from .errors import InputError

log = logging.getLogger("preprocess_images")

SOLUTION_HEADER = ("imageid", "predictionstring")
PLAIN_HEADER = ("filename", "class")
# Files directly in val/ that need a label; other files there are skipped like files outside class folders.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MAX_LISTED = 10


def read_val_labels(path: str | os.PathLike) -> dict[str, str]:
    """``{id: class folder}`` of a label file, the ids as the file writes them (``ILSVRC2012_val_00000001``
    or ``ILSVRC2012_val_00000001.JPEG``). Raises InputError naming the file and the line."""
    return {i: cls for i, (cls, _) in _read(Path(path))[0].items()}


def label_file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the label file's bytes (part of the job's options: other labels, other data)."""
    return hashlib.sha256(_read_bytes(Path(path))).hexdigest()


def flat_images(val_dir: str | os.PathLike) -> list[str]:
    """Names of the image files directly in val/ (names starting with "." or "_" ignored, as Spark does)."""
    return sorted(e.name for e in os.scandir(val_dir)
                  if not e.name.startswith((".", "_")) and e.name.lower().endswith(IMAGE_SUFFIXES)
                  and e.is_file())


def resolve_val_labels(label_file: str | os.PathLike, val_dir: str | os.PathLike,
                       classes: list[str]) -> dict[str, str]:
    """``{file name in val/: class folder}`` for every image directly in ``val_dir``, from the label
    file. Raises InputError (naming the file and the line) for a label file that cannot be read or
    parsed, conflicting labels of one image, a label of an image naming a class that train/ does not
    have, and images without a label."""
    path = Path(label_file)
    entries, header = _read(path)
    names = sorted(e.name for e in os.scandir(val_dir)
                   if not e.name.startswith((".", "_")) and e.is_file())
    by_name = set(names)
    by_stem: dict[str, list[str]] = {}
    for name in names:
        by_stem.setdefault(os.path.splitext(name)[0], []).append(name)

    class_set = set(classes)
    out: dict[str, str] = {}
    line_of: dict[str, int] = {}
    unmatched = 0
    for ident, (cls, line) in sorted(entries.items(), key=lambda kv: kv[1][1]):
        if ident in by_name:
            name = ident
        elif len(by_stem.get(ident, ())) == 1:
            name = by_stem[ident][0]
        elif ident in by_stem:
            raise InputError(f"{path}, line {line}: {ident!r} matches several files of {val_dir}: "
                             f"{', '.join(by_stem[ident])}; name the file with its extension")
        else:
            unmatched += 1
            continue
        if name in out and out[name] != cls:
            raise InputError(f"{path}, line {line}: {ident!r} is labelled {cls!r}, but line {line_of[name]} "
                             f"labels the same file {name} {out[name]!r}")
        if cls not in class_set:
            hint = ""
            if line == 1 and header is None:
                hint = (" (if line 1 is a header: the known headers are 'ImageId,PredictionString' "
                        "and 'filename,class')")
            raise InputError(f"{path}, line {line}: class {cls!r} of {ident!r} is not a class folder of "
                             f"train/ ({len(classes)} classes: {_few(classes)}){hint}")
        out[name] = cls
        line_of[name] = line

    missing = [n for n in names if n not in out and n.lower().endswith(IMAGE_SUFFIXES)]
    if missing:
        raise InputError(f"{len(missing)} of the {len([n for n in names if n.lower().endswith(IMAGE_SUFFIXES)])} "
                         f"images directly in {val_dir} have no label in {path}: {_few(missing)}")
    log.info("val labels: %d images of %s labelled from %s (%s)%s", len(out), val_dir, path,
             "CLS-LOC solution CSV" if header == SOLUTION_HEADER else "filename,class CSV",
             f"; {unmatched} labels name no file there (ignored)" if unmatched else "")
    return out


def _few(items: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"val label file {path} does not exist")
    if path.is_dir():
        raise InputError(f"val label file {path} is a directory")
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"val label file {path} cannot be read: {e.strerror or e}") from e


def _read(path: Path) -> tuple[dict[str, tuple[str, int]], tuple[str, str] | None]:
    """``({id: (class, line number)}, the recognised header or None)``."""
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}, line {line}: not UTF-8 text ({e.reason})") from e

    entries: dict[str, tuple[str, int]] = {}
    header: tuple[str, str] | None = None
    first = True
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            cells = [c.strip() for c in next(csv.reader([raw]))]
        except csv.Error as e:
            raise InputError(f"{path}, line {number}: not a CSV line ({e}): {raw[:80]!r}") from e
        if first:
            first = False
            key = tuple(c.lower() for c in cells)
            if key in (SOLUTION_HEADER, PLAIN_HEADER):
                header = key  # type: ignore[assignment]
                continue
            if len(cells) != 2:
                raise InputError(f"{path}, line {number}: unknown header {raw[:80]!r}: expected "
                                 f"'ImageId,PredictionString' (the CLS-LOC solution CSV) or 'filename,class' "
                                 f"(optional) followed by rows 'filename,class'")
        if len(cells) != 2:
            raise InputError(f"{path}, line {number}: expected 2 comma-separated columns, got {len(cells)}: "
                             f"{raw[:80]!r}")
        ident, value = cells
        cls = (value.split() or [""])[0] if header == SOLUTION_HEADER else value
        if not ident:
            raise InputError(f"{path}, line {number}: empty image id: {raw[:80]!r}")
        if "/" in ident or "\\" in ident:
            raise InputError(f"{path}, line {number}: {ident!r} is a path: expected the name of a file "
                             f"directly in val/")
        if not cls:
            raise InputError(f"{path}, line {number}: empty class for {ident!r}")
        if ident in entries:
            before, before_line = entries[ident]
            if before != cls:
                raise InputError(f"{path}, line {number}: {ident!r} is labelled {cls!r}, but line "
                                 f"{before_line} labels it {before!r}")
            continue
        entries[ident] = (cls, number)
    if not entries:
        raise InputError(f"val label file {path} has no labels")
    return entries, header
