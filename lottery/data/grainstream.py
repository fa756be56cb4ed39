"""`ArrayDataset`'s streamed epochs read by Grain's multi-process `DataLoader` (an alternative to
`lottery.data.workers` for `lottery input-bench --loader grain`).

One Grain record is one batch of the epoch plan (`epochs.streamed_epoch` and `epochs.augment_params`,
computed in each Grain worker); the record's transform reads, decodes and augments it with the
same per-record code as the worker pool (`workers._Worker`), so both loaders give the same batches,
bit for bit.  Grain hands batch `i` to worker `i % workers` and yields the batches in order.  One
`DataLoader` serves consecutive epochs, so its workers start once.

Needs Google's `grain` package (not a dependency of the project).
"""
from __future__ import annotations

from functools import lru_cache

import grain.python as grain
import numpy as np

from .epochs import augment_params, streamed_epoch
from .workers import _Worker

EPOCHS_PER_LOADER = 1000  # a loader's epochs (planned lazily): more than any measurement uses


class EpochBatches:
    """Grain data source: record `i` is batch `i % n` of epoch `first_epoch + i // n`, as
    `(shards, records, augmentation, params)`, the worker pool's task."""

    def __init__(self, counts, image_shape, *, batch_size: int, seed: int, first_epoch: int, augmentation: str,
                 cycle: int, window: int):
        self.counts, self.image_shape = [int(c) for c in counts], tuple(image_shape)
        self.batch_size, self.seed, self.first_epoch = int(batch_size), int(seed), int(first_epoch)
        self.augmentation, self.cycle, self.window = augmentation, int(cycle), int(window)
        self.per_epoch = sum(self.counts) // self.batch_size

    def __len__(self) -> int:
        return self.per_epoch * EPOCHS_PER_LOADER

    def __repr__(self) -> str:
        return (f"EpochBatches(counts={self.counts}, batch_size={self.batch_size}, seed={self.seed}, "
                f"first_epoch={self.first_epoch}, augmentation={self.augmentation!r})")

    @lru_cache(maxsize=2)
    def plan(self, epoch: int):
        shards, records = streamed_epoch(self.seed, epoch, self.counts, self.cycle, self.window)
        return shards, records, augment_params(self.augmentation, sum(self.counts), self.image_shape, self.seed, epoch)

    def __getitem__(self, i: int):
        shards, records, params = self.plan(self.first_epoch + int(i) // self.per_epoch)
        at = slice((int(i) % self.per_epoch) * self.batch_size, (int(i) % self.per_epoch + 1) * self.batch_size)
        return shards[at], records[at], self.augmentation, None if params is None else params[at]


class DecodeBatch(grain.MapTransform):
    """Grain transform: a task -> `(float32 [B, H, W, C], int32 [B])`, by the worker pool's code."""

    def __init__(self, init: dict, *, shared: bool):
        self.init, self.shared = init, shared  # shared: write straight into shared memory (a Grain worker's output)
        self.worker: _Worker | None = None

    def map(self, task):
        if self.worker is None:
            self.worker = _Worker(self.init)
        shards, records, augmentation, params = task
        out = (grain.SharedMemoryArray if self.shared else np.empty)((len(shards), *self.init["shape"]), np.float32)
        self.worker.slots = out[None]
        labels = self.worker.task(0, 0, augmentation, shards, records, params)
        return out, labels


class GrainSplit:
    """`ds.batches(...)` of an uncached `ArrayDataset`, by Grain's `DataLoader` with `workers` processes."""

    def __init__(self, ds, workers: int, *, buffer: int = 2):
        self.ds, self.workers, self.buffer = ds, int(workers), int(buffer)
        self._iterator, self._next = None, None

    def __getattr__(self, name: str):  # the split's attributes: num_examples, image_shape, ...
        return getattr(self.ds, name)

    def _loader(self, batch_size: int, seed: int, epoch: int, augmentation: str):
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain reads absl flags; this process is no absl app: their defaults
            flags.FLAGS.mark_as_parsed()
        ds = self.ds
        source = EpochBatches(ds._counts(), ds.image_shape, batch_size=batch_size, seed=seed, first_epoch=epoch,
                              augmentation=augmentation, cycle=ds.interleave_cycle, window=ds.shuffle_window)
        scale, offset = ds.normalisation()
        decode = DecodeBatch(
            {"files": [str(f) for f in ds.files], "encoding": ds.encoding, "shape": ds.image_shape,
             "scale": scale, "offset": offset}, shared=self.workers > 0)
        return grain.DataLoader(data_source=source, operations=[decode], worker_count=self.workers,
                                worker_buffer_size=self.buffer, shard_options=grain.NoSharding(),
                                sampler=grain.IndexSampler(len(source), grain.NoSharding(), shuffle=False, num_epochs=1),
                                read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.buffer))

    def batches(self, batch_size: int, *, seed: int, epoch: int, augmentation: str = "none"):
        """The batches of epoch `epoch` (consecutive epochs continue one loader)."""
        key = (int(batch_size), int(seed), int(epoch), augmentation)
        if self._next != key:
            self.close()
            self._iterator = iter(self._loader(batch_size, seed, epoch, augmentation))
        self._next = (key[0], key[1], key[2] + 1, augmentation)
        return (next(self._iterator) for _ in range(self.steps_per_epoch(batch_size)))

    def close(self) -> None:
        """Stop the loader's workers and free the batches they had ready."""
        inner = getattr(self._iterator, "_iterator", None)  # DataLoaderIterator has no close() of its own
        if inner is not None:
            inner.close()
        self._iterator, self._next = None, None
