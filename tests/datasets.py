"""Test helpers: tiny datasets in the shard format (no TensorFlow needed to write them).

    from tests.datasets import make_synthetic_shards, make_fashion_mnist_shards
    data_dir = make_synthetic_shards(tmp_path, 64, 32)          # -> tmp_path / "synthetic"
    data_dir = make_fashion_mnist_shards(tmp_path, 256, 128)    # -> tmp_path / "fashion_mnist"

Both return the dataset directory (a `pathlib.Path`), written with `write_dataset` below (png,
2 train shards and 1 val shard by default).  `write_dataset` writes any dataset from Python
arrays in the format of docs/data-format.md, with the library's own encoders and manifest code.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lottery.data.example import ENCODINGS, as_hwc, encode_example, encode_image
from lottery.data.fetch import CLASS_FOLDERS, load_fashion_mnist_arrays
from lottery.data.manifest import ChannelStats, build_manifest, shard_name, write_manifest
from lottery.data.tfrecord import write_shard
from lottery.files import publish_dir

# Default number of examples per shard when `num_shards` is not given.
EXAMPLES_PER_SHARD = 5000
MAX_AUTO_SHARDS = 256


def write_dataset(data_dir: str | os.PathLike, splits: Mapping[str, Sequence], classes: Sequence[str], *,
                  encoding: str = "png", num_shards: int | Mapping[str, int] | None = None,
                  jpeg_quality: int = 95, source: str = "python", skipped: Sequence[Mapping] = (),
                  overwrite: bool = False) -> dict:
    """Write a whole dataset (shards + manifest) from Python, atomically.

    `splits` maps a split name to a sequence of `(pixels uint8 [H, W, C] or [H, W], label, image_id)`;
    every image must have the same shape.  Examples go to shards in the given order (contiguous
    blocks), so the eval order is the input order.  Mean/std come from the "train" split (or
    the first split when there is none).  Everything is written into `<data_dir>.tmp-<pid>` and
    published with `lottery.files.publish_dir` at the end.  An existing non-empty `data_dir`
    raises FileExistsError unless `overwrite=True`.  Returns the manifest.
    """
    start = time.monotonic()
    data_dir = Path(data_dir)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    if not splits:
        raise ValueError("write_dataset needs at least one split")
    if data_dir.exists() and any(data_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{data_dir}: already exists and is not empty (pass overwrite=True to replace it)")
    tmp_dir = data_dir.with_name(f"{data_dir.name}.tmp-{os.getpid()}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        writer = _DatasetWriter(tmp_dir, list(classes), encoding, jpeg_quality,
                                stats_split="train" if "train" in splits else next(iter(splits)))
        for split, examples in splits.items():
            writer.write_split(split, list(examples), _shard_count(num_shards, split, len(examples)))
        manifest = writer.manifest(source=source, skipped=skipped, duration_s=time.monotonic() - start)
        write_manifest(tmp_dir, manifest)
        publish_dir(tmp_dir, data_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def _shard_count(num_shards, split: str, count: int) -> int:
    n = (num_shards.get(split) if isinstance(num_shards, Mapping) else num_shards)
    n = int(n or max(1, min(MAX_AUTO_SHARDS, -(-count // EXAMPLES_PER_SHARD))))
    if n < 1:
        raise ValueError(f"split {split!r}: num_shards must be >= 1")
    return n


class _DatasetWriter:
    """The shards of `write_dataset`, split by split, and what the manifest needs about them."""

    def __init__(self, out: Path, classes: list[str], encoding: str, jpeg_quality: int, stats_split: str):
        self.out, self.classes, self.encoding, self.jpeg_quality = out, classes, encoding, jpeg_quality
        self.stats_split = stats_split
        self.image_shape: list[int] | None = None
        self.stats: ChannelStats | None = None
        self.splits: dict[str, dict] = {}
        self.shard_counts: dict[str, int] = {}

    def write_split(self, split: str, examples: list, n_shards: int) -> None:
        self.shard_counts[split] = n_shards
        per_class = [0] * len(self.classes)
        shards = []
        for index in range(n_shards):
            lo = len(examples) * index // n_shards
            hi = len(examples) * (index + 1) // n_shards
            records = [self._record(split, per_class, *example) for example in examples[lo:hi]]
            shards.append(write_shard(self.out / shard_name(split, index, n_shards), records))
        self.splits[split] = {"count": len(examples), "per_class": per_class, "shards": shards}

    def _record(self, split: str, per_class: list[int], pixels, label, image_id) -> bytes:
        pixels = as_hwc(pixels)
        if self.image_shape is None:
            self.image_shape = list(pixels.shape)
            self.stats = ChannelStats(self.image_shape[2])
        elif list(pixels.shape) != self.image_shape:
            raise ValueError(f"split {split!r}, image {image_id!r}: shape {list(pixels.shape)} "
                             f"differs from {self.image_shape}")
        label = int(label)
        if not 0 <= label < len(self.classes):
            raise ValueError(f"split {split!r}, image {image_id!r}: label {label} outside [0, {len(self.classes)})")
        per_class[label] += 1
        if split == self.stats_split:
            self.stats.update(pixels)
        h, w, c = pixels.shape
        return encode_example(encoded=encode_image(pixels, self.encoding, self.jpeg_quality), label=label,
                              height=h, width=w, channels=c, encoding=self.encoding, image_id=str(image_id))

    def manifest(self, *, source: str, skipped: Sequence[Mapping], duration_s: float) -> dict:
        if self.image_shape is None:
            raise ValueError("write_dataset: no images in any split")
        options = {"encoding": self.encoding, "num_shards": self.shard_counts, "source": source}
        if self.encoding == "jpeg":
            options["jpeg_quality"] = int(self.jpeg_quality)
        return build_manifest(classes=self.classes, image_shape=self.image_shape, encoding=self.encoding,
                              splits=self.splits, stats=self.stats, options=options, skipped=skipped,
                              spark_version=None, duration_s=duration_s)


def synthetic_arrays(n: int, shape=(8, 8, 1), num_classes: int = 3, seed: int = 0, offset: int = 0):
    """Learnable synthetic images: class k is a bright horizontal band at a class-specific height
    plus uniform noise.  Returns (images uint8 [n, *shape], labels int64 [n])."""
    rng = np.random.default_rng([seed, offset])
    h, w, c = shape
    labels = (np.arange(n) + offset) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 96, size=(n, h, w, c), dtype=np.uint8)
    band = max(1, h // num_classes)
    for k in range(num_classes):
        lo = (k * h) // num_classes
        images[labels == k, lo:lo + band] += np.uint8(150)
    return images, labels.astype(np.int64)


def make_synthetic_shards(tmp_dir, n_train: int, n_val: int, shape=(8, 8, 1), num_classes: int = 3, seed: int = 0,
                          *, encoding: str = "png", num_shards=None, name: str = "synthetic") -> Path:
    """Write a small learnable synthetic dataset into `tmp_dir/name` and return that path."""
    shape = tuple(int(v) for v in shape)
    splits = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1)):
        images, labels = synthetic_arrays(n, shape, num_classes, seed, offset)
        splits[split] = [(images[i], int(labels[i]), f"{split}/c{int(labels[i])}/{i:05d}.png") for i in range(n)]
    if num_shards is None:
        num_shards = {"train": 2 if n_train >= 2 else 1, "val": 1}
    out = Path(tmp_dir) / name
    write_dataset(out, splits, [f"class_{k}" for k in range(num_classes)], encoding=encoding,
                  num_shards=num_shards)
    return out


def make_fashion_mnist_shards(tmp_dir, n_train: int, n_val: int, *, encoding: str = "png", num_shards=None,
                              name: str = "fashion_mnist") -> Path:
    """The first `n_train` / `n_val` Fashion-MNIST images (28x28x1, 10 classes) as shards in
    `tmp_dir/name`; returns that path.  Needs the Debian package dataset-fashion-mnist."""
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images, labels = load_fashion_mnist_arrays(split, limit=n)
        splits[split] = [(images[i][:, :, None], int(labels[i]), f"{split}/{CLASS_FOLDERS[labels[i]]}/{i:05d}.png")
                         for i in range(len(images))]
    if num_shards is None:
        num_shards = {"train": 2 if n_train >= 2 else 1, "val": 1}
    out = Path(tmp_dir) / name
    write_dataset(out, splits, CLASS_FOLDERS, encoding=encoding, num_shards=num_shards)
    return out
