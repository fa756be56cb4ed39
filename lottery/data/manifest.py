"""A dataset directory: shard names, channel statistics and the manifest (pure Python).

* `ChannelStats`: mergeable per-channel pixel statistics (mean/std on the [0, 1] scale).
* `shard_name`, `dataset_fingerprint`, `dataset_id`, `build_manifest`, `write_manifest`,
  `validate_manifest`, `read_manifest`: the manifest contract of docs/data-format.md.
* `shard_paths`, `verify_dataset`, `iter_split`, `read_split_arrays`: reading a dataset back
  without TensorFlow.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from lottery.errors import CorruptDataError, DataFormatError, MissingDataError
from lottery.files import MISSING, file_damage, write_text

from .example import ENCODINGS, decode_example, decode_image
from .tfrecord import read_records

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ChannelStats:
    """Per-channel pixel count, sum and sum of squares (float64, 0..255), mergeable so that Spark
    partitions can reduce them; `mean()` and `std()` are of x / 255."""

    def __init__(self, channels: int, count=None, sum=None, sumsq=None):  # noqa: A002 - the field names
        self.channels = int(channels)
        z = np.zeros(self.channels, dtype=np.float64)
        self.count = z.copy() if count is None else np.asarray(count, dtype=np.float64).reshape(self.channels)
        self.sum = z.copy() if sum is None else np.asarray(sum, dtype=np.float64).reshape(self.channels)
        self.sumsq = z.copy() if sumsq is None else np.asarray(sumsq, dtype=np.float64).reshape(self.channels)

    def update(self, pixels: np.ndarray) -> "ChannelStats":
        """Add one uint8 image [H, W, C] (or a batch [..., C]); returns self."""
        pixels = np.asarray(pixels)
        if pixels.ndim == 2 and self.channels == 1:
            pixels = pixels[:, :, None]
        if pixels.shape[-1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got shape {pixels.shape}")
        flat = pixels.reshape(-1, self.channels).astype(np.uint64)  # exact integer sums
        self.count += flat.shape[0]
        self.sum += flat.sum(axis=0).astype(np.float64)
        self.sumsq += (flat * flat).sum(axis=0).astype(np.float64)
        return self

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        if other.channels != self.channels:
            raise ValueError(f"cannot merge stats of {self.channels} and {other.channels} channels")
        return ChannelStats(self.channels, self.count + other.count, self.sum + other.sum,
                            self.sumsq + other.sumsq)

    __add__ = merge

    def mean(self) -> list[float]:
        c = np.maximum(self.count, 1)
        return [float(v) for v in self.sum / c / 255.0]

    def std(self) -> list[float]:
        c = np.maximum(self.count, 1)
        m = self.sum / c
        var = np.maximum(self.sumsq / c - m * m, 0.0)
        return [float(v) for v in np.sqrt(var) / 255.0]

    def to_dict(self) -> dict:
        return {"channels": self.channels, "count": self.count.tolist(), "sum": self.sum.tolist(),
                "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChannelStats":
        return cls(d["channels"], d["count"], d["sum"], d["sumsq"])

    def __repr__(self) -> str:
        return f"ChannelStats(channels={self.channels}, count={self.count.tolist()}, mean={self.mean()}, std={self.std()})"


def shard_name(split: str, index: int, count: int) -> str:
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"



def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def dataset_fingerprint(classes: Sequence[str], image_shape: Sequence[int], encoding: str,
                        splits: Mapping[str, Mapping]) -> str:
    """sha256 of the content: classes, image shape, encoding and every shard's (file, records, sha256)."""
    content = {
        "classes": list(classes), "image_shape": [int(v) for v in image_shape], "encoding": encoding,
        "splits": {name: [[s["file"], int(s["records"]), s["sha256"]] for s in split["shards"]]
                   for name, split in sorted(splits.items())},
    }
    return hashlib.sha256(_canonical(content)).hexdigest()


def dataset_id(fingerprint: str, options: Mapping) -> str:
    """Short (12 hex) hash of the fingerprint + the options that produced it."""
    return hashlib.sha256(fingerprint.encode("ascii") + b"\n" + _canonical(dict(options))).hexdigest()[:12]


def build_manifest(*, classes: Sequence[str], image_shape: Sequence[int], encoding: str,
                   splits: Mapping[str, Mapping], stats: ChannelStats, options: Mapping,
                   skipped: Sequence[Mapping] = (), spark_version: str | None = None,
                   duration_s: float = 0.0, created_at: str | None = None) -> dict:
    """The manifest dict with every key of the contract (docs/data-format.md); `stats` are the
    training split's pixel statistics."""
    splits = {name: {"count": int(s["count"]), "per_class": [int(v) for v in s["per_class"]],
                     "shards": [dict(sh) for sh in s["shards"]]} for name, s in splits.items()}
    fingerprint = dataset_fingerprint(classes, image_shape, encoding, splits)
    manifest = {
        "format_version": FORMAT_VERSION,
        "classes": list(classes),
        "image_shape": [int(v) for v in image_shape],
        "encoding": encoding,
        "splits": splits,
        "mean": stats.mean(),
        "std": stats.std(),
        "stats": stats.to_dict(),
        "skipped": [dict(s) for s in skipped],
        "fingerprint": fingerprint,
        "dataset_id": dataset_id(fingerprint, options),
        "options": dict(options),
        "spark_version": spark_version,
        "duration_s": float(duration_s),
        "created_at": created_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    validate_manifest(manifest)
    return manifest


def write_manifest(data_dir: str | os.PathLike, manifest: Mapping) -> Path:
    """Write `data_dir/manifest.json` atomically (`lottery.files.write_text`)."""
    path = Path(data_dir) / MANIFEST_NAME
    write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def _fail(path, field, message):
    raise DataFormatError(f"{path}: manifest field {field!r}: {message}", path=path, field=field)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


REQUIRED_KEYS = ("format_version", "classes", "image_shape", "encoding", "splits", "mean", "std",
                 "skipped", "fingerprint", "dataset_id", "options", "spark_version", "duration_s",
                 "created_at")


def validate_manifest(manifest: Any, path: str | os.PathLike = "<manifest>") -> dict:
    """Check every required key and its type; raises `DataFormatError` naming path and field."""
    path = str(path)
    if not isinstance(manifest, dict):
        _fail(path, "<root>", f"expected a JSON object, got {type(manifest).__name__}")
    for key in REQUIRED_KEYS:
        if key not in manifest:
            _fail(path, key, "missing")
    _check_images(manifest, path)
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not splits:
        _fail(path, "splits", "expected a non-empty object {split: {...}}")
    for name, split in splits.items():
        _check_split(split, f"splits.{name}", len(manifest["classes"]), path)
    _check_provenance(manifest, path)
    return manifest


def _check_images(m: Mapping, path: str) -> None:
    """format_version, classes, image_shape, encoding and the per-channel mean/std."""
    if m["format_version"] != FORMAT_VERSION:
        _fail(path, "format_version", f"unsupported version {m['format_version']!r} (reader knows {FORMAT_VERSION})")
    classes = m["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        _fail(path, "classes", "expected a non-empty list of class names")
    if len(set(classes)) != len(classes):
        _fail(path, "classes", "duplicate class names")
    shape = m["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)):
        _fail(path, "image_shape", f"expected [H, W, C] positive ints, got {shape!r}")
    channels = shape[2]
    if m["encoding"] not in ENCODINGS:
        _fail(path, "encoding", f"expected one of {list(ENCODINGS)}, got {m['encoding']!r}")
    for key in ("mean", "std"):
        v = m[key]
        if not (isinstance(v, list) and len(v) == channels and all(_is_num(x) for x in v)):
            _fail(path, key, f"expected {channels} numbers (one per channel), got {v!r}")
    if any(x < 0 for x in m["std"]):
        _fail(path, "std", "negative standard deviation")


def _check_split(split: Any, f: str, num_classes: int, path: str) -> None:
    """One `splits.<name>` entry: count, per_class (sums to count), shards (records sum to count)."""
    if not isinstance(split, dict):
        _fail(path, f, "expected an object")
    for key in ("count", "per_class", "shards"):
        if key not in split:
            _fail(path, f"{f}.{key}", "missing")
    if not (_is_int(split["count"]) and split["count"] >= 0):
        _fail(path, f"{f}.count", f"expected a non-negative int, got {split['count']!r}")
    pc = split["per_class"]
    if not (isinstance(pc, list) and len(pc) == num_classes and all(_is_int(v) and v >= 0 for v in pc)):
        _fail(path, f"{f}.per_class", f"expected {num_classes} non-negative ints (one per class)")
    if sum(pc) != split["count"]:
        _fail(path, f"{f}.per_class", f"sums to {sum(pc)}, but count is {split['count']}")
    shards = split["shards"]
    if not isinstance(shards, list):
        _fail(path, f"{f}.shards", "expected a list")
    for i, sh in enumerate(shards):
        _check_shard(sh, f"{f}.shards[{i}]", path)
    total = sum(sh["records"] for sh in shards)
    if total != split["count"]:
        _fail(path, f"{f}.shards", f"records sum to {total}, but count is {split['count']}")


def _check_shard(sh: Any, sf: str, path: str) -> None:
    """One shard entry `{file, records, sha256, bytes}`; `file` is a plain name in the directory."""
    if not isinstance(sh, dict):
        _fail(path, sf, "expected an object")
    for key in ("file", "records", "sha256", "bytes"):
        if key not in sh:
            _fail(path, f"{sf}.{key}", "missing")
    if not isinstance(sh["file"], str) or not sh["file"] or "/" in sh["file"] or sh["file"].startswith("."):
        _fail(path, f"{sf}.file", f"expected a plain file name, got {sh['file']!r}")
    for key in ("records", "bytes"):
        if not (_is_int(sh[key]) and sh[key] >= 0):
            _fail(path, f"{sf}.{key}", f"expected a non-negative int, got {sh[key]!r}")
    if not (isinstance(sh["sha256"], str) and len(sh["sha256"]) == 64):
        _fail(path, f"{sf}.sha256", "expected 64 hex characters")


def _check_provenance(m: Mapping, path: str) -> None:
    """skipped, fingerprint, dataset_id, created_at, options, spark_version, duration_s."""
    if not isinstance(m["skipped"], list) or not all(isinstance(s, dict) for s in m["skipped"]):
        _fail(path, "skipped", "expected a list of {path, reason}")
    for key in ("fingerprint", "dataset_id", "created_at"):
        if not isinstance(m[key], str) or not m[key]:
            _fail(path, key, "expected a non-empty string")
    if not isinstance(m["options"], dict):
        _fail(path, "options", "expected an object")
    if m["spark_version"] is not None and not isinstance(m["spark_version"], str):
        _fail(path, "spark_version", "expected a string or null")
    if not _is_num(m["duration_s"]):
        _fail(path, "duration_s", "expected a number")


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Read and validate `data_dir/manifest.json` (errors name the file and the field)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset manifest (was the dataset written completely?)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON: {e}", path=path, field="<root>") from e
    return validate_manifest(manifest, path)


def shard_paths(data_dir: str | os.PathLike, manifest: Mapping, split: str) -> list[Path]:
    if split not in manifest["splits"]:
        raise KeyError(f"{Path(data_dir) / MANIFEST_NAME}: no split {split!r} (has {sorted(manifest['splits'])})")
    return [Path(data_dir) / s["file"] for s in manifest["splits"][split]["shards"]]


def redo_hint(data_dir: Path) -> str:
    """What to do about a damaged data set."""
    return (f"preprocess the data again: clear the run's preprocess task (with downstream), or run "
            f"spark_jobs/preprocess_images.py with --force, or delete {data_dir}")


def shard_version(st: os.stat_result, sha256: str) -> list:
    """A shard's file version, (size, mtime_ns, ctime_ns, inode), and the sha256 it was verified with."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sha256]


def check_shard(path: Path, entry: Mapping, split: str, recorded: list | None = None) -> list:
    """One shard against its manifest entry (`lottery.files.file_damage`; the sha256 only when its file
    version is not ``recorded``, `lottery.data.verify`): its version when intact; raises
    ``MissingDataError`` or ``CorruptDataError`` naming the shard and what to do."""
    data_dir = path.parent
    if path.is_file() and recorded is not None and recorded == shard_version(path.stat(), entry["sha256"]):
        return recorded
    damage = file_damage(path, entry, MANIFEST_NAME)
    if damage == MISSING:
        raise MissingDataError(f"{path}: shard of split {split!r} listed in {MANIFEST_NAME} is missing; "
                               f"{redo_hint(data_dir)}")
    if damage:
        raise CorruptDataError(f"{path}: damaged shard of split {split!r}: {damage}; {redo_hint(data_dir)}", path=path)
    return shard_version(path.stat(), entry["sha256"])


def verify_dataset(data_dir: str | os.PathLike, *, check_records: bool = False) -> dict:
    """Check every shard's size and sha256 (and, with check_records, every record's CRCs); returns
    the manifest, or raises MissingDataError or CorruptDataError naming the file."""
    manifest = read_manifest(data_dir)
    for split in manifest["splits"]:
        for entry, path in zip(manifest["splits"][split]["shards"], shard_paths(data_dir, manifest, split)):
            check_shard(path, entry, split)
            if check_records:
                n = sum(1 for _ in read_records(path))
                if n != entry["records"]:
                    raise CorruptDataError(f"{path}: {n} records, manifest says {entry['records']}", path=path)
    return manifest


def iter_split(data_dir: str | os.PathLike, split: str, manifest: Mapping | None = None) -> Iterator[dict]:
    """Pure-Python reader: the decoded examples of one split in file order (`decode_example` dicts)."""
    manifest = manifest or read_manifest(data_dir)
    for path in shard_paths(data_dir, manifest, split):
        for record in read_records(path):
            yield decode_example(record)


def read_split_arrays(data_dir: str | os.PathLike, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pure-Python reader (no TF): uint8 images [N, H, W, C] and int64 labels [N] in file order."""
    manifest = read_manifest(data_dir)
    shape = manifest["image_shape"]
    n = manifest["splits"][split]["count"] if limit is None else min(limit, manifest["splits"][split]["count"])
    images = np.empty((n, *shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    for i, ex in enumerate(iter_split(data_dir, split, manifest)):
        if i >= n:
            break
        images[i] = decode_image(ex["encoded"], ex["encoding"], shape)
        labels[i] = ex["label"]
    return images, labels

