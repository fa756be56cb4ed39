"""Test helpers: tiny datasets in the shard format (no TensorFlow needed to write them).

    from tests.datasets import make_synthetic_shards, make_fashion_mnist_shards
    data_dir = make_synthetic_shards(tmp_path, 64, 32)          # -> tmp_path / "synthetic"
    data_dir = make_fashion_mnist_shards(tmp_path, 256, 128)    # -> tmp_path / "fashion_mnist"

Both return the dataset directory (a `pathlib.Path`), written with
`lottery.data.records.write_dataset` (png, 2 train shards and 1 val shard by default).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lottery.data.fetch import CLASS_FOLDERS, load_fashion_mnist_arrays
from lottery.data.records import write_dataset


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
