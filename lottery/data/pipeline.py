"""The tf.data input pipeline over a sharded dataset (docs/data-format.md).

Determinism: every random choice of an epoch (shard order, shuffle, augmentation parameters)
is drawn with numpy from `SeedSequence([seed, epoch, stream])` and indexed by the element's
position in the epoch.  Nothing depends on TensorFlow's global seed or op counters, so the same
`(seed, epoch)` yields the same batches in the same order in a fresh process, and
`skip_batches=k` yields exactly the batches from `k` on.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow as tf

from . import runtime
from .epochs import (  # noqa: F401 - the constants are re-exported (the epoch plan lives in epochs.py)
    AUGMENTATIONS,
    CROP_PAD,
    MIN_STD,
    RRC_ATTEMPTS,
    RRC_RATIO,
    RRC_SCALE,
    SplitReader,
    cached_epoch,
    check_batch_args,
    file_order,
    window_keys,
)
from lottery.errors import DataFormatError
from .manifest import MANIFEST_NAME

log = logging.getLogger("lottery.data")


class ShardedDataset(SplitReader):
    """One split of a dataset directory as tf.data streams; the manifest, the epoch plan and the
    decoded-split disk cache are `SplitReader`'s (shared with the numpy `ArrayDataset`)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, *, cache: bool = False):
        super().__init__(data_dir, split, cache=cache)
        scale, offset = self.normalisation()
        with tf.device("/CPU:0"):  # tf.data runs on the host
            self._scale = tf.constant(scale, dtype=tf.float32)
            self._offset = tf.constant(offset, dtype=tf.float32)
        self._cached = None

    # ------------------------------------------------------------------ helpers
    def _options(self, autotune: bool = True) -> tf.data.Options:
        """Deterministic, on the configured thread pool. ``autotune=False`` for the cached split,
        whose map is one gather per batch: nothing to tune, and in a one-thread training process
        the autotuner's own work made about a third of the epochs run at 2/3 speed (LeNet on 2
        cores: 23k instead of 36k img/s; docs/benchmarks.md)."""
        options = tf.data.Options()
        options.deterministic = True
        threads = runtime.data_threads()
        if threads:
            options.threading.private_threadpool_size = threads
        options.autotune.enabled = autotune
        return options

    def _decode_batch_fn(self):
        """serialised Examples [B] -> (uint8 [B, H, W, C], int32 [B]); parsing is vectorised."""
        h, w, c = self.image_shape
        encoding = self.encoding
        spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
                "image/class/label": tf.io.FixedLenFeature([], tf.int64)}

        def decode_one(data):
            if encoding == "png":
                img = tf.io.decode_png(data, channels=c, dtype=tf.uint8)
            else:
                img = tf.io.decode_jpeg(data, channels=c)
            return tf.ensure_shape(img, [h, w, c])

        def decode_batch(serialized):
            f = tf.io.parse_example(serialized, spec)
            if encoding == "raw":
                images = tf.reshape(tf.io.decode_raw(f["image/encoded"], tf.uint8), [-1, h, w, c])
            else:
                images = tf.map_fn(decode_one, f["image/encoded"],
                                   fn_output_signature=tf.TensorSpec([h, w, c], tf.uint8))
            return images, tf.cast(f["image/class/label"], tf.int32)

        return decode_batch

    def _normalise(self, images):
        return tf.cast(images, tf.float32) * self._scale + self._offset

    def _cached_arrays(self):
        """Decode the whole split once into host-memory tensors, kept on disk beside the shards so
        that the hundred processes of one experiment decode each split once, not once each."""
        if self._cached is None and (loaded := self._load_decoded()) is not None:
            images, labels = loaded
            with tf.device("/CPU:0"):
                self._cached = (tf.constant(images), tf.constant(labels))
            log.info("loaded decoded %s/%s: %d images (%.1f MiB)", self.data_dir, self.split, len(labels), images.nbytes / 2**20)
        if self._cached is None:
            ds = tf.data.TFRecordDataset([str(p) for p in self.files], buffer_size=1 << 20).batch(1024)
            ds = ds.map(self._decode_batch_fn(), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.prefetch(2).with_options(self._options())
            images, labels = [], []
            for x, y in ds:
                images.append(x.numpy())
                labels.append(y.numpy())
            n = sum(len(y) for y in labels)
            if n != self.num_examples:
                raise DataFormatError(f"{self.data_dir / MANIFEST_NAME}: split {self.split!r} has {n} records, "
                                      f"manifest says {self.num_examples}", field=f"splits.{self.split}.count")
            images = np.concatenate(images) if images else np.zeros((0, *self.image_shape), np.uint8)
            labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
            self._save_decoded(images, labels)
            with tf.device("/CPU:0"):
                self._cached = (tf.constant(images), tf.constant(labels))
            log.info("cached %s/%s: %d images (%.1f MiB)", self.data_dir, self.split, n, images.nbytes / 2**20)
        return self._cached

    # ------------------------------------------------------------------ augmentation (TF)
    def _augment_fn(self, augmentation: str):
        h, w, _ = self.image_shape
        if augmentation == "none":
            return lambda images, params: tf.cast(images, tf.float32)
        if augmentation == "crop_flip":
            def crop_flip(images, params):
                # = zero-pad CROP_PAD px, crop H x W at (oy, ox), flip if asked; done as two
                # gathers on the unpadded image with out-of-range rows/cols masked to 0
                p = CROP_PAD
                r = tf.range(h, dtype=tf.int32)[None, :]
                c = tf.range(w, dtype=tf.int32)[None, :]
                flip = params[:, 2:3] > 0
                rows = params[:, 0:1] - p + r
                cols = params[:, 1:2] - p + tf.where(flip, (w - 1) - c, c)
                inside = (((rows >= 0) & (rows < h))[:, :, None, None]
                          & ((cols >= 0) & (cols < w))[:, None, :, None])
                x = tf.cast(images, tf.float32)
                x = tf.gather(x, tf.clip_by_value(rows, 0, h - 1), axis=1, batch_dims=1)
                x = tf.gather(x, tf.clip_by_value(cols, 0, w - 1), axis=2, batch_dims=1)
                return x * tf.cast(inside, tf.float32)
            return crop_flip

        def random_resized_crop(images, params):
            # the flip is in the box (x1 > x2 samples the crop mirrored)
            b = tf.shape(images)[0]
            return tf.image.crop_and_resize(tf.cast(images, tf.float32), params, tf.range(b), [h, w],
                                            method="bilinear")
        return random_resized_crop

    # ------------------------------------------------------------------ streams
    def batches(self, batch_size: int, *, seed: int, epoch: int, augmentation: str = "none",
                skip_batches: int = 0) -> tf.data.Dataset:
        """The training stream of one epoch: `(float32 [B, H, W, C], int32 [B])` batches,
        shuffled/augmented as a pure function of `(seed, epoch)`, normalised, drop_remainder,
        the first `skip_batches` batches skipped."""
        batch_size, skip_batches = check_batch_args(batch_size, augmentation, skip_batches)
        skip = min(skip_batches, self.num_examples // batch_size)
        params = self._augment_params(augmentation, seed, epoch)
        augment = self._augment_fn(augmentation)
        if self.cache:
            return self._cached_batches(batch_size, seed, epoch, skip, params, augment)

        ds = self._shuffled_records(seed, epoch)
        decode = self._decode_batch_fn()
        normalise = self._normalise
        if params is not None:  # position i of the epoch gets params[i]
            ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(params)))

            def decode_augment(records, p):
                x, y = decode(records)
                return normalise(augment(x, p)), y
        else:
            def decode_augment(records):
                x, y = decode(records)
                return normalise(x), y
        ds = ds.skip(skip * batch_size).batch(batch_size, drop_remainder=True)
        ds = ds.map(decode_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(self._options())

    def _cached_batches(self, batch_size: int, seed: int, epoch: int, skip: int, params, augment) -> tf.data.Dataset:
        """`batches` of a cached split: the epoch's permutation of the decoded arrays."""
        images, labels = self._cached_arrays()
        scale, offset = self._scale, self._offset
        order, params = cached_epoch(self.num_examples, batch_size, seed, epoch, skip, params)
        ds = tf.data.Dataset.from_tensor_slices((order, params))

        def gather(idx, p):
            x = augment(tf.gather(images, idx), p)
            return x * scale + offset, tf.gather(labels, idx)

        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(self._options(autotune=False))

    def _shuffled_records(self, seed: int, epoch: int) -> tf.data.Dataset:
        """The serialised records of one streamed epoch: the epoch's file order, a deterministic
        interleave, then each `shuffle_window` records permuted by the stable argsort of its keys."""
        files = [str(self.files[i]) for i in file_order(seed, epoch, len(self.files))]
        fds = tf.data.Dataset.from_tensor_slices(files)
        if len(files) > 1:
            ds = fds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20),
                                cycle_length=min(len(files), self.interleave_cycle), block_length=1,
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:
            ds = tf.data.TFRecordDataset(files, buffer_size=1 << 20)
        window = int(self.shuffle_window)
        # random sort keys per position; a window is permuted by argsort of its keys (stable)
        with tf.device("/CPU:0"):
            keys = tf.constant(window_keys(seed, epoch, self.num_examples), tf.float64)

        def shuffle_window(index, records):
            start = tf.cast(index, tf.int32) * window
            k = keys[start:start + tf.shape(records)[0]]
            tf.debugging.assert_equal(tf.shape(k)[0], tf.shape(records)[0],
                                      message="split has more records than its manifest count")
            perm = tf.argsort(k, stable=True)
            return tf.gather(records, perm)

        return ds.batch(window).enumerate().map(shuffle_window).unbatch()

    def eval_batches(self, batch_size: int) -> tf.data.Dataset:
        """File order, no augmentation, normalised, the last partial batch kept."""
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.cache:
            images, labels = self._cached_arrays()
            ds = tf.data.Dataset.range(self.num_examples).batch(batch_size)
            ds = ds.map(lambda idx: (self._normalise(tf.gather(images, idx)), tf.gather(labels, idx)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return ds.prefetch(tf.data.AUTOTUNE).with_options(self._options(autotune=False))
        decode = self._decode_batch_fn()

        def decode_normalise(records):
            x, y = decode(records)
            return self._normalise(x), y

        ds = tf.data.TFRecordDataset([str(p) for p in self.files], buffer_size=1 << 20).batch(batch_size)
        ds = ds.map(decode_normalise, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(self._options())
