"""The numpy input pipeline: `ShardedDataset`'s streams without TensorFlow (docs/data-format.md).

`ArrayDataset(data_dir, split, cache=...)` has `ShardedDataset`'s interface and epoch plan
(`lottery.data.epochs`), so for the same `(seed, epoch)` it yields the same examples in the same
order with the same augmentation parameters:

* `cache=True`: the split is decoded once (Pillow, `lottery.data.example`) into a uint8
  `[N, H, W, C]` array, shared with `ShardedDataset` through `<data_dir>/.decoded/` (png and raw
  decode to the same pixels in both; a jpeg split decoded by Pillow is kept under its own name,
  `<split>-<dataset_id>-pillow.npz`, since TensorFlow's jpeg decoder gives slightly different
  pixels); an epoch is the same permutation, cut into the same batches;
* `cache=False`: the shards are read in the epoch's file order by the same deterministic
  interleave (`interleave_cycle` shards round-robin) and the same windowed shuffle
  (`shuffle_window`, stable argsort of the epoch's keys) as tf.data does, then decoded per batch;
* augmentations: `none` and `crop_flip` give bit-identical batches to `ShardedDataset`;
  `random_resized_crop` is the same bilinear `crop_and_resize` (TensorFlow's algorithm, float32)
  on the same boxes, equal to TensorFlow's within float rounding (see the tests).

The streams are `keras.utils.PyDataset`s (what `model.fit` / `model.evaluate` take on every
Keras backend), re-iterable, with a `take(n)` like `tf.data.Dataset.take`.  Batches are
`(float32 [B, H, W, C], int32 [B])` numpy arrays.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator

import keras
import numpy as np

from .epochs import (
    CROP_PAD,
    SplitReader,
    augment_params,
    cached_epoch,
    check_batch_args,
    file_order,
    window_keys,
)
from .errors import DataFormatError
from .example import decode_example, decode_image
from .manifest import MANIFEST_NAME
from .tfrecord import read_records

log = logging.getLogger("lottery.data")


class ArrayDataset(SplitReader):
    """One split of a dataset directory as numpy batch streams (no TensorFlow).

    Attributes as `ShardedDataset`: `manifest`, `split`, `num_examples`, `image_shape` (H, W, C),
    `num_classes`, `classes`, `encoding`, `mean`, `std`, `files`.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, *, cache: bool = False):
        super().__init__(data_dir, split, cache=cache)
        if self.encoding == "jpeg":
            self.decoded_suffix = "-pillow"
        self._scale, self._offset = self.normalisation()
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ decoding
    def _decode_records(self, records: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Serialised Examples -> (uint8 [n, H, W, C], int32 [n])."""
        images = np.empty((len(records), *self.image_shape), np.uint8)
        labels = np.empty((len(records),), np.int32)
        for i, record in enumerate(records):
            example = decode_example(record)
            images[i] = decode_image(example["encoded"], self.encoding, self.image_shape)
            labels[i] = example["label"]
        return images, labels

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole split decoded, in file order: uint8 `[N, H, W, C]`, int32 `[N]` (host memory).

        Kept on disk beside the shards (shared with `ShardedDataset` for png/raw), so the many
        processes of one experiment decode each split once."""
        if self._arrays is None and (loaded := self._load_decoded()) is not None:
            images, labels = loaded
            self._arrays = (images, labels.astype(np.int32, copy=False))
            log.info("loaded decoded %s/%s: %d images (%.1f MiB)", self.data_dir, self.split, len(labels),
                     images.nbytes / 2**20)
        if self._arrays is None:
            started = time.perf_counter()
            images = np.empty((self.num_examples, *self.image_shape), np.uint8)
            labels = np.empty((self.num_examples,), np.int32)
            n = 0
            for path in self.files:
                for chunk in _chunks(read_records(path), 1024):
                    if n + len(chunk) > self.num_examples:
                        raise self._count_error(f"more than {self.num_examples}")
                    images[n:n + len(chunk)], labels[n:n + len(chunk)] = self._decode_records(chunk)
                    n += len(chunk)
            if n != self.num_examples:
                raise self._count_error(str(n))
            self._save_decoded(images, labels)
            self._arrays = (images, labels)
            log.info("cached %s/%s: %d images (%.1f MiB) decoded in %.1fs", self.data_dir, self.split, n,
                     images.nbytes / 2**20, time.perf_counter() - started)
        return self._arrays

    def _count_error(self, found: str) -> DataFormatError:
        return DataFormatError(f"{self.data_dir / MANIFEST_NAME}: split {self.split!r} has {found} records, "
                               f"manifest says {self.num_examples}", field=f"splits.{self.split}.count")

    # ------------------------------------------------------------------ augmentation + normalisation
    def augment(self, images: np.ndarray, augmentation: str, params: np.ndarray | None) -> np.ndarray:
        """uint8 `[B, H, W, C]` + per-element parameters (`epochs.augment_params`) -> float32 pixels."""
        if augmentation == "none":
            return images.astype(np.float32)
        if augmentation == "crop_flip":
            return crop_flip(images, params)
        if augmentation == "random_resized_crop":
            return crop_and_resize(images, params, self.image_shape[:2])
        raise ValueError(f"unknown augmentation {augmentation!r}")

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """float32 pixels -> `pixel * scale + offset` (float32, as `ShardedDataset` computes it)."""
        out = np.multiply(pixels, self._scale, dtype=np.float32)
        out += self._offset
        return out

    # ------------------------------------------------------------------ streams
    def batches(self, batch_size: int, *, seed: int, epoch: int, augmentation: str = "none",
                skip_batches: int = 0) -> "Batches":
        """The training stream of one epoch: `(float32 [B, H, W, C], int32 [B])` batches,
        shuffled/augmented as a pure function of `(seed, epoch)`, normalised, drop_remainder,
        the first `skip_batches` batches skipped.  Same batches as `ShardedDataset.batches`."""
        batch_size, skip_batches = check_batch_args(batch_size, augmentation, skip_batches)
        n_batches = self.num_examples // batch_size
        skip = min(skip_batches, n_batches)
        params = augment_params(augmentation, self.num_examples, self.image_shape, seed, epoch)
        _warn_if_uneven(batch_size)

        if self.cache:
            images, labels = self.arrays()
            order, params = cached_epoch(self.num_examples, batch_size, seed, epoch, skip, params)

            def batch(i: int):
                idx = order[i]
                return self.normalise(self.augment(images[idx], augmentation, params[i])), labels[idx]

            return IndexedBatches(batch, len(order))

        def stream(start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            first = (skip + start) * batch_size  # position in the epoch of the first element
            records = itertools.islice(self._epoch_records(seed, epoch), first, None)
            for pos in itertools.count(first, batch_size):
                chunk = list(itertools.islice(records, batch_size))
                if len(chunk) < batch_size:
                    return
                x, y = self._decode_records(chunk)
                p = None if params is None else params[pos:pos + batch_size]
                yield self.normalise(self.augment(x, augmentation, p)), y

        return StreamedBatches(stream, n_batches - skip)

    def _epoch_records(self, seed: int, epoch: int) -> Iterator[bytes]:
        """The serialised records of one streamed epoch in ShardedDataset's (cache=False) order:
        shards in the epoch's file order, interleaved one record at a time over
        `interleave_cycle` open shards (tf.data `interleave` semantics), then each window of
        `shuffle_window` records permuted by the stable argsort of its keys."""
        files = [self.files[i] for i in file_order(seed, epoch, len(self.files))]
        records = interleave([lambda f=f: read_records(f) for f in files], min(len(files), self.interleave_cycle))
        keys = window_keys(seed, epoch, self.num_examples)
        window = int(self.shuffle_window)
        start = 0
        for chunk in _chunks(records, window):
            k = keys[start:start + len(chunk)]
            if len(k) != len(chunk):
                raise DataFormatError(f"{self.data_dir / MANIFEST_NAME}: split {self.split!r} has more records "
                                      f"than its manifest count {self.num_examples}", field=f"splits.{self.split}.count")
            for j in np.argsort(k, kind="stable"):
                yield chunk[j]
            start += len(chunk)

    def eval_batches(self, batch_size: int) -> "Batches":
        """File order, no augmentation, normalised, the last partial batch kept.

        Under a multi-device `keras.distribution` whose devices do not divide the last batch, that
        batch comes first (same examples, same metrics): Keras lays every batch of an `evaluate`
        out like the first one, and `lottery.data.runtime`'s DataParallel replicates a batch it
        cannot split."""
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = self.num_examples
        sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
        if len(sizes) > 1 and sizes[-1] % _data_parallel_degree():
            sizes = sizes[-1:] + sizes[:-1]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        if self.cache:
            images, labels = self.arrays()

            def batch(i: int):
                lo, hi = starts[i], starts[i + 1]
                return self.normalise(images[lo:hi].astype(np.float32)), labels[lo:hi]

            return IndexedBatches(batch, len(sizes))

        def stream(start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            records = itertools.chain.from_iterable(read_records(f) for f in self.files)
            records = itertools.islice(records, int(starts[start]), None)
            for size in sizes[start:]:
                chunk = list(itertools.islice(records, size))
                if len(chunk) < size:
                    raise self._count_error(f"fewer than {n}")
                x, y = self._decode_records(chunk)
                yield self.normalise(x.astype(np.float32)), y

        return StreamedBatches(stream, len(sizes))


# ---------------------------------------------------------------------- batch streams for Keras
class Batches(keras.utils.PyDataset):
    """A finite, re-iterable stream of `(x, y)` numpy batches that `model.fit` / `evaluate` take."""

    def __init__(self, length: int):
        super().__init__(workers=1, use_multiprocessing=False)
        self._length = max(int(length), 0)

    def __len__(self) -> int:
        return self._length

    def _check(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"batch {index} out of range (the stream has {self._length})")
        return index

    def take(self, count: int) -> "Batches":
        """The first `count` batches (all of them when `count` is negative or too large)."""
        raise NotImplementedError

    def __iter__(self):
        for i in range(self._length):
            yield self[i]


class IndexedBatches(Batches):
    """Batches computed independently by index (a split held in memory)."""

    def __init__(self, batch: Callable[[int], tuple[np.ndarray, np.ndarray]], length: int):
        super().__init__(length)
        self._batch = batch

    def __getitem__(self, index: int):
        return self._batch(self._check(index))

    def take(self, count: int) -> "IndexedBatches":
        count = int(count)
        return IndexedBatches(self._batch, self._length if count < 0 else min(count, self._length))


class StreamedBatches(Batches):
    """Batches read sequentially from the shards.  In-order access (what Keras does) continues
    one reader; any other index starts a new reader there (correct, but reads from the start)."""

    def __init__(self, stream: Callable[[int], Iterator], length: int):
        super().__init__(length)
        self._stream = stream
        self._reader: Iterator | None = None
        self._next = 0

    def __getitem__(self, index: int):
        index = self._check(index)
        if self._reader is None or index != self._next:
            self._reader = self._stream(index)
            self._next = index
        try:
            batch = next(self._reader)
        except StopIteration:
            self._reader = None
            raise DataFormatError(f"the shards ended before batch {index} of {self._length}: fewer records "
                                  "than the manifest says") from None
        self._next = index + 1
        return batch

    def __iter__(self):
        reader = self._stream(0)  # an iterator of its own: two loops over one stream do not interfere
        for _ in range(self._length):
            try:
                yield next(reader)
            except StopIteration:
                raise DataFormatError("the shards ended early: fewer records than the manifest says") from None

    def take(self, count: int) -> "StreamedBatches":
        count = int(count)
        return StreamedBatches(self._stream, self._length if count < 0 else min(count, self._length))


# ---------------------------------------------------------------------- numpy augmentations
def crop_flip(images: np.ndarray, params: np.ndarray, pad: int = CROP_PAD) -> np.ndarray:
    """Zero-pad by `pad`, crop H x W at `(params[:, 0], params[:, 1])`, flip where `params[:, 2]`;
    uint8 `[B, H, W, C]` -> float32.  Bit-identical to `ShardedDataset`'s (which gathers from
    the unpadded image and zeroes the rows and columns that fall into the padding)."""
    b, h, w, c = images.shape
    params = np.asarray(params)
    padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), np.uint8)
    padded[:, pad:pad + h, pad:pad + w] = images
    cols = np.arange(w)[None, :]
    rows = params[:, 0:1] + np.arange(h)[None, :]
    cols = params[:, 1:2] + np.where(params[:, 2:3] > 0, (w - 1) - cols, cols)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.float32)


def crop_and_resize(images: np.ndarray, boxes: np.ndarray, size) -> np.ndarray:
    """`tf.image.crop_and_resize(images, boxes, range(B), size, method="bilinear")` in numpy:
    images `[B, H, W, C]` (uint8 or float32; computed in float32), boxes `[B, 4]` = normalised `[y1, x1, y2, x2]` (x1 > x2 mirrors),
    extrapolation value 0.  TensorFlow's CPU algorithm, step by step in float32."""
    b, h, w, _ = images.shape
    ch, cw = int(size[0]), int(size[1])
    f32 = np.float32
    boxes = np.asarray(boxes, f32)
    y1, x1, y2, x2 = (boxes[:, i:i + 1] for i in range(4))
    in_y = _sample_grid(y1, y2, h, ch)  # [B, ch]
    in_x = _sample_grid(x1, x2, w, cw)  # [B, cw]
    valid_y = (in_y >= 0) & (in_y <= f32(h - 1))
    valid_x = (in_x >= 0) & (in_x <= f32(w - 1))
    top = np.clip(np.floor(in_y), 0, h - 1).astype(np.int64)
    bottom = np.clip(np.ceil(in_y), 0, h - 1).astype(np.int64)
    left = np.clip(np.floor(in_x), 0, w - 1).astype(np.int64)
    right = np.clip(np.ceil(in_x), 0, w - 1).astype(np.int64)
    y_lerp = (in_y - np.floor(in_y)).astype(f32)[:, :, None, None]
    x_lerp = (in_x - np.floor(in_x)).astype(f32)[:, None, :, None]
    bi = np.arange(b)[:, None, None]

    def pick(rows, cols):  # gather first (uint8 is 4x less to move), then convert: exact either way
        return images[bi, rows[:, :, None], cols[:, None, :]].astype(f32)  # [B, ch, cw, C]

    top_left, top_right = pick(top, left), pick(top, right)
    bottom_left, bottom_right = pick(bottom, left), pick(bottom, right)
    upper = top_left + (top_right - top_left) * x_lerp
    lower = bottom_left + (bottom_right - bottom_left) * x_lerp
    out = upper + (lower - upper) * y_lerp
    return np.where(valid_y[:, :, None, None] & valid_x[:, None, :, None], out, f32(0)).astype(f32, copy=False)


def _sample_grid(lo: np.ndarray, hi: np.ndarray, extent: int, n: int) -> np.ndarray:
    f32 = np.float32
    if n > 1:
        step = (hi - lo) * f32(extent - 1) / f32(n - 1)
        return lo * f32(extent - 1) + np.arange(n, dtype=f32)[None, :] * step
    centre = 0.5 * (lo + hi).astype(np.float64) * (extent - 1)  # TF: float sum, then double
    return np.repeat(centre.astype(f32), n, axis=1)


# ---------------------------------------------------------------------- helpers
def interleave(openers: list[Callable[[], Iterator]], cycle_length: int) -> Iterator:
    """tf.data `interleave(cycle_length=c, block_length=1)` (deterministic) over lazily opened
    iterators: one element from each of `c` open iterators in turn; an exhausted iterator frees
    its slot, which the next input opens when the cycle comes back to it."""
    cycle_length = max(1, int(cycle_length))
    slots: list[Iterator | None] = [None] * cycle_length
    pending = iter(openers)
    end_of_input = False
    num_open = 0
    index = 0
    while not end_of_input or num_open > 0:
        current = slots[index]
        if current is not None:
            try:
                item = next(current)
            except StopIteration:
                slots[index] = None
                num_open -= 1
                index = (index + 1) % cycle_length
                continue
            yield item
            index = (index + 1) % cycle_length
        elif not end_of_input:
            opener = next(pending, None)
            if opener is None:
                end_of_input = True
            else:
                slots[index] = iter(opener())
                num_open += 1
        else:
            index = (index + 1) % cycle_length


def _chunks(iterable, size: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _data_parallel_degree() -> int:
    """How many devices the current `keras.distribution` splits a batch over (1: none)."""
    try:
        distribution = keras.distribution.distribution()
    except Exception:  # pragma: no cover - a backend without keras.distribution
        return 1
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    try:
        return int(mesh.shape[list(mesh.axis_names).index(distribution.batch_dim_name)])
    except (ValueError, AttributeError, TypeError):
        return int(mesh.devices.size)


_warned_uneven: set[tuple[int, int]] = set()


def _warn_if_uneven(batch_size: int) -> None:
    degree = _data_parallel_degree()
    if degree > 1 and batch_size % degree and (batch_size, degree) not in _warned_uneven:
        _warned_uneven.add((batch_size, degree))
        log.warning("batch_size %d does not divide over %d devices: every device computes whole batches "
                    "(choose a multiple of %d to split them)", batch_size, degree, degree)
