"""The epoch plan: the TensorFlow-free half of a split reader, shared by both input pipelines.

`lottery.data.pipeline.ShardedDataset` (tf.data) and `lottery.data.arrays.ArrayDataset` (numpy)
both derive from `SplitReader`, so they read the same manifest the same way and follow the same
epoch plan: every random choice of an epoch (shard order, shuffle keys, the permutation of a cached
split, augmentation parameters) is drawn with numpy from `SeedSequence([seed, epoch, stream])`
(`epoch_rng`) and indexed by the element's position in the epoch. The decoded split is kept on
disk beside the shards, written by whichever reader decodes first and read by both.

Nothing here imports TensorFlow (or Keras).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from lottery.errors import DataFormatError
from lottery.files import atomic_path
from .manifest import MANIFEST_NAME, read_manifest, shard_paths, verify_dataset
from .verify import verify_shards

log = logging.getLogger("lottery.data")

AUGMENTATIONS = ("none", "crop_flip", "random_resized_crop")
CROP_PAD = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10
MIN_STD = 1e-6

# SeedSequence streams: one independent generator per purpose.
STREAM_PERMUTATION, STREAM_FILES, STREAM_WINDOW, STREAM_AUGMENT = 0, 1, 2, 3


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The numpy generator of one purpose (`STREAM_*`) of one epoch."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) % (1 << 64), int(epoch) % (1 << 64), stream])))


def check_batch_args(batch_size, augmentation: str, skip_batches) -> tuple[int, int]:
    """Validate the arguments of `batches(...)`; returns `(batch_size, skip_batches)` as ints."""
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; expected one of {AUGMENTATIONS}")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    return batch_size, int(skip_batches)


def augment_params(augmentation: str, n: int, image_shape, seed: int, epoch: int) -> np.ndarray | None:
    """Per-position augmentation parameters of one epoch of `n` elements, or None for "none".
    `crop_flip`: int32 `[n, 3]`, (row, column) offsets into the image padded by `CROP_PAD` and a
    0/1 flip; `random_resized_crop` (torchvision's): float32 `[n, 4]` boxes `[y1, x1, y2, x2]` in
    `tf.image.crop_and_resize` coordinates, a flipped crop being a mirrored box (`x1 > x2`)."""
    h, w = int(image_shape[0]), int(image_shape[1])
    if augmentation == "none":
        return None
    rng = epoch_rng(seed, epoch, STREAM_AUGMENT)
    if augmentation == "crop_flip":
        offsets = rng.integers(0, 2 * CROP_PAD + 1, size=(n, 2))
        flip = rng.random(n) < 0.5
        return np.concatenate([offsets, flip[:, None]], axis=1).astype(np.int32)
    if augmentation != "random_resized_crop":
        raise ValueError(f"unknown augmentation {augmentation!r}; expected one of {AUGMENTATIONS}")
    area = float(h * w)
    scale = rng.uniform(RRC_SCALE[0], RRC_SCALE[1], size=(n, RRC_ATTEMPTS))
    log_ratio = rng.uniform(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]), size=(n, RRC_ATTEMPTS))
    u_top = rng.random(n)
    u_left = rng.random(n)
    flip = rng.random(n) < 0.5
    ratio = np.exp(log_ratio)
    cw = np.rint(np.sqrt(area * scale * ratio)).astype(np.int64)
    ch = np.rint(np.sqrt(area * scale / ratio)).astype(np.int64)
    valid = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = np.argmax(valid, axis=1)
    rows = np.arange(n)
    ok = valid[rows, first]
    cw, ch = cw[rows, first], ch[rows, first]
    # fallback: central crop of the whole image, aspect ratio clamped to RRC_RATIO
    in_ratio = w / h
    if in_ratio < RRC_RATIO[0]:
        fw, fh = w, int(round(w / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        fh, fw = h, int(round(h * RRC_RATIO[1]))
    else:
        fw, fh = w, h
    cw = np.where(ok, cw, fw)
    ch = np.where(ok, ch, fh)
    top = np.where(ok, np.floor(u_top * (h - ch + 1)), (h - ch) // 2).astype(np.float64)
    left = np.where(ok, np.floor(u_left * (w - cw + 1)), (w - cw) // 2).astype(np.float64)
    dy, dx = max(h - 1, 1), max(w - 1, 1)
    x1, x2 = left / dx, (left + cw - 1) / dx
    x1, x2 = np.where(flip, x2, x1), np.where(flip, x1, x2)  # a mirrored box = a flipped crop
    return np.stack([top / dy, x1, (top + ch - 1) / dy, x2], axis=1).astype(np.float32)


def cached_epoch(n: int, batch_size: int, seed: int, epoch: int, skip_batches: int,
                 params: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The batches of one epoch over a split held in memory: a permutation of the `n` examples cut
    into `n // batch_size` batches, `skip_batches` skipped, as `order` `[batches, batch_size]` and
    the matching augmentation parameters `[batches, batch_size, k]` (`k = 0`: none)."""
    n_batches = n // batch_size
    skip = min(int(skip_batches), n_batches)
    nb = n_batches - skip
    order = epoch_rng(seed, epoch, STREAM_PERMUTATION).permutation(n)
    order = order[skip * batch_size:n_batches * batch_size].reshape(nb, batch_size)
    if params is None:
        params = np.zeros((n, 0), np.int32)
    params = params[skip * batch_size:n_batches * batch_size].reshape(nb, batch_size, params.shape[1])
    return order, params


def file_order(seed: int, epoch: int, num_files: int) -> np.ndarray:
    """The order in which a streamed (`cache=False`) epoch opens the shards."""
    return epoch_rng(seed, epoch, STREAM_FILES).permutation(num_files)


def window_keys(seed: int, epoch: int, n: int) -> np.ndarray:
    """Random float64 sort keys, one per position of a streamed epoch: the records of window
    `w` (positions `[w * window, (w + 1) * window)` of the interleaved stream) come out in the
    stable argsort order of their keys."""
    return epoch_rng(seed, epoch, STREAM_WINDOW).random(max(int(n), 1))


def interleave_positions(counts, cycle_length: int) -> tuple[np.ndarray, np.ndarray]:
    """tf.data's deterministic `interleave(cycle_length=c, block_length=1)` over files of
    `counts[i]` records, as positions: `(file i, record k)` of every element in stream order.
    (An exhausted file frees its slot; the next file opens there when the cycle comes back.)"""
    cycle_length = max(1, int(cycle_length))
    counts = [int(c) for c in counts]
    slots: list[list[int] | None] = [None] * cycle_length  # [file, next record]
    files, records = [], []
    pending, end_of_input, num_open, index = 0, False, 0, 0
    while not end_of_input or num_open > 0:
        slot = slots[index]
        if slot is not None:
            if slot[1] < counts[slot[0]]:
                files.append(slot[0])
                records.append(slot[1])
                slot[1] += 1
            else:
                slots[index] = None
                num_open -= 1
            index = (index + 1) % cycle_length
        elif not end_of_input:
            if pending == len(counts):
                end_of_input = True
            else:
                slots[index] = [pending, 0]
                pending += 1
                num_open += 1
        else:
            index = (index + 1) % cycle_length
    return np.asarray(files, np.int64), np.asarray(records, np.int64)


def streamed_epoch(seed: int, epoch: int, counts, cycle_length: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """A streamed (`cache=False`) epoch as positions: `(shard index, record index)` per element, in
    the order tf.data reads them (the epoch's file order, the interleave, the windowed shuffle by
    the stable argsort of `window_keys`)."""
    order = file_order(seed, epoch, len(counts))
    files, records = interleave_positions([counts[i] for i in order], min(len(counts), cycle_length))
    files = order[files]
    keys = window_keys(seed, epoch, len(files))
    perm = np.concatenate([start + np.argsort(keys[start:start + window], kind="stable")
                           for start in range(0, len(files), window)] or [np.zeros(0, np.int64)])
    return files[perm], records[perm]


class SplitReader:
    """The TF-free part of one split of a dataset directory: manifest, checks, epoch plan and
    the decoded-split disk cache."""

    shuffle_window = 8192      # records shuffled together when cache=False
    interleave_cycle = 16      # shards read concurrently when cache=False

    def __init__(self, data_dir: str | os.PathLike, split: str, *, cache: bool = False):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if split not in self.manifest["splits"]:
            raise DataFormatError(
                f"{self.data_dir / MANIFEST_NAME}: no split {split!r} (has {sorted(self.manifest['splits'])})",
                path=self.data_dir / MANIFEST_NAME, field=f"splits.{split}")
        self.split = split
        self.cache = bool(cache)
        self.files = shard_paths(self.data_dir, self.manifest, split)
        # never train on a damaged shard: sizes always, sha256 once per file version (lottery.data.verify)
        verify_shards(self.data_dir, self.manifest, [split])
        self.num_examples = int(self.manifest["splits"][split]["count"])
        self.image_shape = tuple(int(v) for v in self.manifest["image_shape"])
        self.classes = list(self.manifest["classes"])
        self.num_classes = len(self.classes)
        self.encoding = self.manifest["encoding"]
        self.mean = np.asarray(self.manifest["mean"], dtype=np.float64)
        self.std = np.asarray(self.manifest["std"], dtype=np.float64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.data_dir)!r}, {self.split!r}, cache={self.cache}, "
                f"num_examples={self.num_examples}, image_shape={self.image_shape})")

    # ------------------------------------------------------------------ helpers
    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_examples // int(batch_size)

    def verify(self, *, check_records: bool = False) -> dict:
        """sha256 (and optionally CRC) check of every shard; raises naming the bad file."""
        return verify_dataset(self.data_dir, check_records=check_records)

    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 `(scale, offset)` per channel: the model sees `pixel * scale + offset`
        = `(pixel / 255 - mean) / std` (computed in float64, rounded once to float32)."""
        std = np.maximum(self.std, MIN_STD)
        return (np.asarray(1.0 / (255.0 * std), dtype=np.float32),
                np.asarray(-self.mean / std, dtype=np.float32))

    def _augment_params(self, augmentation: str, seed: int, epoch: int) -> np.ndarray | None:
        return augment_params(augmentation, self.num_examples, self.image_shape, seed, epoch)

    # ------------------------------------------------------------------ decoded split on disk
    decoded_suffix = ""  # a reader whose decoder gives other pixels keeps its own file

    def _decoded_path(self) -> Path | None:
        """Where the decoded split is kept between processes: beside the shards, named by the
        dataset id (a new preprocessing run has a new id, so a stale file is never read)."""
        if os.environ.get("LOTTERY_DECODED_CACHE", "1") == "0":
            return None
        return self.data_dir / ".decoded" / f"{self.split}-{self.manifest['dataset_id']}{self.decoded_suffix}.npz"

    def _load_decoded(self):
        path = self._decoded_path()
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
        except Exception as exc:  # damaged: decode again and replace it
            log.warning("ignoring damaged decoded cache %s: %s", path, exc)
            return None
        if images.shape != (self.num_examples, *self.image_shape) or labels.shape != (self.num_examples,):
            log.warning("ignoring decoded cache %s: shape %s does not match the manifest", path, images.shape)
            return None
        return images, labels

    def _save_decoded(self, images, labels) -> None:
        path = self._decoded_path()
        if path is None:
            return
        try:
            with atomic_path(path) as tmp:
                np.savez(tmp, images=images, labels=labels)
        except OSError as exc:  # a read-only data directory: keep decoding in every process
            log.info("not keeping decoded %s split at %s: %s", self.split, path, exc)
