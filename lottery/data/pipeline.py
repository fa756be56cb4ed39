"""The tf.data input pipeline over a sharded dataset (docs/data-format.md).

Determinism: every random choice of an epoch (shard order, shuffle, augmentation parameters)
is drawn with numpy from `SeedSequence([seed, epoch, stream])` and indexed by the element's
position in the epoch.  Nothing depends on TensorFlow's global seed or op counters, so the same
`(seed, epoch)` yields the same batches in the same order in a fresh process, and
`skip_batches=k` yields exactly the batches from `k` on.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import runtime
from .records import DataFormatError, MANIFEST_NAME, read_manifest, shard_paths, verify_dataset

log = logging.getLogger("lottery.data")

AUGMENTATIONS = ("none", "crop_flip", "random_resized_crop")
CROP_PAD = 4
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10
MIN_STD = 1e-6

# SeedSequence streams: one independent generator per purpose.
_STREAM_PERMUTATION, _STREAM_FILES, _STREAM_WINDOW, _STREAM_AUGMENT = 0, 1, 2, 3


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) % (1 << 64), int(epoch) % (1 << 64), stream])))


class ShardedDataset:
    """One split of a dataset directory as tf.data streams.

    Attributes: `manifest`, `split`, `num_examples`, `image_shape` (H, W, C), `num_classes`,
    `classes`, `encoding`, `mean`, `std`, `files`.
    """

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
        for path in self.files:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard of split {split!r} listed in {MANIFEST_NAME} is missing")
        self.num_examples = int(self.manifest["splits"][split]["count"])
        self.image_shape = tuple(int(v) for v in self.manifest["image_shape"])
        self.classes = list(self.manifest["classes"])
        self.num_classes = len(self.classes)
        self.encoding = self.manifest["encoding"]
        self.mean = np.asarray(self.manifest["mean"], dtype=np.float64)
        self.std = np.asarray(self.manifest["std"], dtype=np.float64)
        std = np.maximum(self.std, MIN_STD)
        with tf.device("/CPU:0"):  # tf.data runs on the host
            self._scale = tf.constant(1.0 / (255.0 * std), dtype=tf.float32)
            self._offset = tf.constant(-self.mean / std, dtype=tf.float32)
        self._cached = None

    def __repr__(self) -> str:
        return (f"ShardedDataset({str(self.data_dir)!r}, {self.split!r}, cache={self.cache}, "
                f"num_examples={self.num_examples}, image_shape={self.image_shape})")

    # ------------------------------------------------------------------ helpers
    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_examples // int(batch_size)

    def verify(self, *, check_records: bool = False) -> dict:
        """sha256 (and optionally CRC) check of every shard; raises naming the bad file."""
        return verify_dataset(self.data_dir, check_records=check_records)

    def _options(self) -> tf.data.Options:
        options = tf.data.Options()
        options.deterministic = True
        threads = runtime.data_threads()
        if threads:
            options.threading.private_threadpool_size = threads
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

    def _decoded_path(self) -> Path | None:
        """Where the decoded split is kept between processes: beside the shards, named by the
        dataset id (a new preprocessing run has a new id, so a stale file is never read)."""
        if os.environ.get("LOTTERY_DECODED_CACHE", "1") == "0":
            return None
        return self.data_dir / ".decoded" / f"{self.split}-{self.manifest['dataset_id']}.npz"

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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only data directory: keep decoding in every process
            log.info("not keeping decoded %s split at %s: %s", self.split, path, exc)
            tmp.unlink(missing_ok=True)

    def _cached_arrays(self):
        """Decode the whole split once into uint8 [N, H, W, C] / int32 [N] tensors (host memory).

        The decoded arrays are also kept on disk beside the shards, so the hundred processes of one
        experiment decode each split once, not once each."""
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

    # ------------------------------------------------------------------ epoch plan (numpy)
    def _augment_params(self, augmentation: str, seed: int, epoch: int) -> np.ndarray | None:
        """Per-position augmentation parameters of one epoch ([N, k] array) or None."""
        n = self.num_examples
        h, w, _ = self.image_shape
        if augmentation == "none":
            return None
        rng = _rng(seed, epoch, _STREAM_AUGMENT)
        if augmentation == "crop_flip":
            offsets = rng.integers(0, 2 * CROP_PAD + 1, size=(n, 2))
            flip = rng.random(n) < 0.5
            return np.concatenate([offsets, flip[:, None]], axis=1).astype(np.int32)
        # random_resized_crop (Inception / torchvision RandomResizedCrop): boxes [y1, x1, y2, x2]
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
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augmentation!r}; expected one of {AUGMENTATIONS}")
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        n_batches = self.num_examples // batch_size
        skip = min(int(skip_batches), n_batches)
        params = self._augment_params(augmentation, seed, epoch)
        augment = self._augment_fn(augmentation)
        normalise = self._normalise
        scale, offset = self._scale, self._offset

        if self.cache:
            images, labels = self._cached_arrays()
            order = _rng(seed, epoch, _STREAM_PERMUTATION).permutation(self.num_examples)
            nb = n_batches - skip
            order = order[skip * batch_size:n_batches * batch_size].reshape(nb, batch_size)
            if params is None:
                params = np.zeros((self.num_examples, 0), np.int32)
            params = params[skip * batch_size:n_batches * batch_size].reshape(nb, batch_size, params.shape[1])
            ds = tf.data.Dataset.from_tensor_slices((order, params))

            def gather(idx, p):
                x = augment(tf.gather(images, idx), p)
                return x * scale + offset, tf.gather(labels, idx)

            ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return ds.prefetch(tf.data.AUTOTUNE).with_options(self._options())

        files = [str(self.files[i]) for i in _rng(seed, epoch, _STREAM_FILES).permutation(len(self.files))]
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
            keys = tf.constant(_rng(seed, epoch, _STREAM_WINDOW).random(max(self.num_examples, 1)), tf.float64)

        def shuffle_window(index, records):
            start = tf.cast(index, tf.int32) * window
            k = keys[start:start + tf.shape(records)[0]]
            tf.debugging.assert_equal(tf.shape(k)[0], tf.shape(records)[0],
                                      message="split has more records than its manifest count")
            perm = tf.argsort(k, stable=True)
            return tf.gather(records, perm)

        ds = ds.batch(window).enumerate().map(shuffle_window).unbatch()
        decode = self._decode_batch_fn()
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
        else:
            decode = self._decode_batch_fn()

            def decode_normalise(records):
                x, y = decode(records)
                return self._normalise(x), y

            ds = tf.data.TFRecordDataset([str(p) for p in self.files], buffer_size=1 << 20).batch(batch_size)
            ds = ds.map(decode_normalise, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(self._options())
