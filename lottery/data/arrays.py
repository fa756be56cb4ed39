"""The numpy input pipeline: `ShardedDataset`'s streams without TensorFlow (docs/data-format.md).

`ArrayDataset(data_dir, split, cache=...)` has `ShardedDataset`'s interface and epoch plan
(`lottery.data.epochs`): for the same `(seed, epoch)`, the same examples in the same order with
the same augmentation parameters.

* `cache=True`: the split is decoded once into a uint8 array shared with `ShardedDataset` through
  `<data_dir>/.decoded/` (a jpeg split decoded by Pillow is kept under its own name: TensorFlow's
  jpeg decoder gives slightly different pixels);
* `cache=False`: the positions tf.data reads (`epochs.streamed_epoch`), each batch read, decoded,
  augmented and normalised by one of `workers` processes (`lottery.data.workers`; 0: this one);
* `none` and `crop_flip` give bit-identical batches to `ShardedDataset`; `random_resized_crop`
  cuts the same boxes with Pillow's resize (`hostaug`): the same distribution, not the same pixels.

The streams are re-iterable `keras.utils.PyDataset`s (every Keras backend) with a `take(n)`.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator

import keras
import numpy as np

from .epochs import CROP_PAD, SplitReader, augment_params, cached_epoch, check_batch_args, streamed_epoch
from lottery.errors import DataFormatError
from .example import decode_example, decode_image
from .hostaug import augment_array_into
from .manifest import MANIFEST_NAME
from .tfrecord import read_records
from .workers import WorkerPool, _Worker, default_workers

log = logging.getLogger("lottery.data")


class ArrayDataset(SplitReader):
    """One split of a dataset directory as numpy batch streams (no TensorFlow); attributes as
    `ShardedDataset`'s."""

    prefetch = 2  # batches in flight per worker

    def __init__(self, data_dir: str | os.PathLike, split: str, *, cache: bool = False, workers: int | None = None):
        super().__init__(data_dir, split, cache=cache)
        self.workers = default_workers() if workers is None else int(workers)
        self._pool: WorkerPool | None = None
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
        """The whole split decoded, in file order: uint8 `[N, H, W, C]`, int32 `[N]`; kept on disk
        beside the shards, so the many processes of one experiment decode each split once."""
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
        """uint8 `[B, H, W, C]` + per-element parameters (`epochs.augment_params`) -> normalised
        float32 (`hostaug`: Pillow's resize on the crop box for `random_resized_crop`)."""
        if augmentation == "none":
            return self.normalise(images)
        if augmentation == "crop_flip":
            return self.normalise(crop_flip(images, params))
        if augmentation != "random_resized_crop":
            raise ValueError(f"unknown augmentation {augmentation!r}")
        out = np.empty(images.shape, np.float32)
        for i in range(len(images)):
            augment_array_into(images[i], out[i], augmentation=augmentation, param=params[i],
                               scale=self._scale, offset=self._offset)
        return out

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """pixels -> `pixel * scale + offset` (float32, as `ShardedDataset` computes it)."""
        out = np.multiply(pixels, self._scale, dtype=np.float32)
        out += self._offset
        return out

    # ------------------------------------------------------------------ streams
    def batches(self, batch_size: int, *, seed: int, epoch: int, augmentation: str = "none",
                skip_batches: int = 0) -> "Batches":
        """The training stream of one epoch, as `ShardedDataset.batches`: shuffled and augmented as a
        pure function of `(seed, epoch)`, normalised, drop_remainder, `skip_batches` skipped."""
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
                return self.augment(images[idx], augmentation, params[i]), labels[idx]

            return IndexedBatches(batch, len(order))

        shards, records = streamed_epoch(seed, epoch, self._counts(), self.interleave_cycle, int(self.shuffle_window))

        def task(b: int):
            at = slice(b * batch_size, (b + 1) * batch_size)
            return shards[at], records[at], augmentation, None if params is None else params[at]

        return StreamedBatches(lambda start: self._run(map(task, range(skip + start, n_batches)), batch_size),
                               n_batches - skip)

    def _counts(self) -> list[int]:
        """Records per shard (the manifest's shard entries), checked against the split's count."""
        counts = [int(s["records"]) for s in self.manifest["splits"][self.split]["shards"]]
        if sum(counts) != self.num_examples:
            fewer = "fewer" if sum(counts) < self.num_examples else "more"
            raise DataFormatError(f"{self.data_dir / MANIFEST_NAME}: the shards of split {self.split!r} hold "
                                  f"{sum(counts)} records, {fewer} records than the manifest says ({self.num_examples})",
                                  field=f"splits.{self.split}.count")
        return counts

    def _run(self, tasks, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The batches of `tasks`, by the worker pool, or in this process when `workers` is 0."""
        if self.workers > 0:
            if self._pool is None:
                self._pool = WorkerPool(self.files, encoding=self.encoding, shape=self.image_shape, scale=self._scale,
                                        offset=self._offset, workers=self.workers, depth=self.prefetch)
            yield from self._pool.run(tasks, (batch_size, *self.image_shape))
            return
        local = _Worker({"files": [str(f) for f in self.files], "encoding": self.encoding, "shape": self.image_shape,
                         "scale": self._scale, "offset": self._offset})
        local.slots = np.empty((1, batch_size, *self.image_shape), np.float32)
        for shards, records, augmentation, params in tasks:
            labels = local.task(0, 0, augmentation, shards, records, params)
            yield local.slots[0][:len(labels)].copy(), labels

    def close(self) -> None:
        """Stop the worker processes (also done at exit)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def eval_batches(self, batch_size: int) -> "Batches":
        """File order, no augmentation, normalised, the last partial batch kept. When the devices of
        a `keras.distribution` do not divide the last batch, it comes first: Keras lays every batch
        of an `evaluate` out like the first, and the runtime's DataParallel replicates such a batch."""
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

        counts = self._counts()
        shards = np.repeat(np.arange(len(counts)), counts)
        records = np.concatenate([np.arange(c) for c in counts] or [np.zeros(0, np.int64)])

        def task(i: int):
            at = slice(starts[i], starts[i + 1])
            return shards[at], records[at], "none", None

        def stream(start: int):
            return self._run(map(task, range(start, len(sizes))), batch_size)

        return StreamedBatches(stream, len(sizes))


# ---------------------------------------------------------------------- batch streams for Keras
class Batches(keras.utils.PyDataset):
    """A finite, re-iterable stream of `(x, y)` numpy batches that `model.fit` / `evaluate` take,
    made by `source` (a function of the batch index, or of the index to start a stream at)."""

    def __init__(self, source: Callable, length: int):
        super().__init__(workers=1, use_multiprocessing=False)
        self._source = source
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
        count = int(count)
        return type(self)(self._source, self._length if count < 0 else min(count, self._length))

    def __iter__(self):
        for i in range(self._length):
            yield self[i]


class IndexedBatches(Batches):
    """Batches computed independently by index (a split held in memory)."""

    def __getitem__(self, index: int):
        return self._source(self._check(index))


class StreamedBatches(Batches):
    """Batches read sequentially from the shards.  In-order access (what Keras does) continues
    one reader; any other index starts a new reader there (correct, but reads from the start)."""

    def __init__(self, stream: Callable[[int], Iterator], length: int):
        super().__init__(stream, length)
        self._reader: Iterator | None = None
        self._next = 0

    def __getitem__(self, index: int):
        index = self._check(index)
        if self._reader is None or index != self._next:
            self._reader = self._source(index)
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
        reader = self._source(0)  # an iterator of its own: two loops over one stream do not interfere
        for _ in range(self._length):
            try:
                yield next(reader)
            except StopIteration:
                raise DataFormatError("the shards ended early: fewer records than the manifest says") from None


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
