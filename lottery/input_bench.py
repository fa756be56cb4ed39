"""`input-bench`: is this machine's input stream fast enough for its model?  (docs/data-format.md)

    python -m lottery input-bench --data DIR [--split train] [--augmentation A] [--batch-size N]
                                  [--seconds S] [--model M] [--workers W]
    python -m lottery.input_bench ...          (the same)

Prints the input stream's img/s alone (the backend's reader: tf.data on TensorFlow, the worker
processes of `lottery.data.arrays` elsewhere).  With `--model`, also the training step's img/s on a
synthetic batch already on the device and on the real stream, and a one-line verdict.  The last
line printed is exactly `input img/s: <number>`.
"""
from __future__ import annotations

import argparse
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", required=True, help="data directory (TFRecord shards + manifest.json)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--augmentation", default="none", choices=("none", "crop_flip", "random_resized_crop"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    parser.add_argument("--model", default=None, help="also time this model's training step (e.g. resnet50)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data worker processes of the JAX-path reader (default: LOTTERY_DATA_WORKERS or the cores)")
    parser.add_argument("--cache", action="store_true", help="decode the split once into memory first")
    parser.add_argument("--precision", default="float32", help="Keras dtype policy for --model (e.g. mixed_bfloat16)")
    return parser


def open_split(data: str, split: str, *, cache: bool = False, workers: int | None = None):
    """The backend's reader of one split (tf.data on TensorFlow, the numpy worker pipeline else)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        from lottery.data.pipeline import ShardedDataset

        return ShardedDataset(data, split, cache=cache)
    from lottery.data.arrays import ArrayDataset

    return ArrayDataset(data, split, cache=cache, workers=workers)


def stream_rate(ds, batch_size: int, augmentation: str, seconds: float, *, seed: int = 0) -> float:
    """img/s of iterating the training stream (epochs chained) for about `seconds`, after one
    warm-up batch (worker start, first reads)."""
    images, epoch, started = 0, 0, None
    while True:
        for x, _ in ds.batches(batch_size, seed=seed, epoch=epoch, augmentation=augmentation):
            if started is None:
                started = time.perf_counter()
                continue
            images += int(x.shape[0])
            if time.perf_counter() - started >= seconds:
                return images / (time.perf_counter() - started)
        epoch += 1
        if ds.steps_per_epoch(batch_size) < 2 and started is not None and images == 0:
            raise ValueError(f"the split has fewer than 2 batches of {batch_size}")


def step_rates(ds, model_name: str, batch_size: int, augmentation: str, seconds: float, precision: str) -> tuple[float, float]:
    """(img/s of the training step on one synthetic batch held on the device, img/s on the stream)."""
    import keras
    import numpy as np

    from lottery import models

    keras.mixed_precision.set_global_policy(precision)
    model = models.build_model(model_name, tuple(ds.image_shape), ds.num_classes, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    x = np.random.default_rng(0).standard_normal((batch_size, *ds.image_shape)).astype(np.float32)
    y = np.zeros((batch_size,), np.int32)
    xs, ys = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    model.train_on_batch(xs, ys)  # compile
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loss = model.train_on_batch(xs, ys)
        count += 1
    float(np.asarray(loss))
    synthetic = count * batch_size / (time.perf_counter() - started)
    count, started, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        for xb, yb in ds.batches(batch_size, seed=1, epoch=epoch, augmentation=augmentation):
            loss = model.train_on_batch(xb, yb)
            count += 1
            if time.perf_counter() - started >= seconds:
                break
        epoch += 1
    float(np.asarray(loss))
    return synthetic, count * batch_size / (time.perf_counter() - started)


def verdict(stream: float, synthetic: float) -> str:
    if stream < synthetic:
        return f"input-bound: the stream gives {stream:,.0f} img/s, the model trains at {synthetic:,.0f}"
    return f"compute-bound: the model trains at {synthetic:,.0f} img/s, the stream gives {stream:,.0f}"


def run(args: argparse.Namespace) -> int:
    import keras

    ds = open_split(args.data, args.split, cache=args.cache, workers=args.workers)
    workers = getattr(ds, "workers", None)
    print(f"backend {keras.backend.backend()}  data {args.data} [{args.split}] {ds.num_examples} x "
          f"{'x'.join(map(str, ds.image_shape))} {ds.encoding}  augmentation {args.augmentation}  batch "
          f"{args.batch_size}  cores {len(os.sched_getaffinity(0))}"
          + (f"  workers {workers}" if workers is not None else "  reader tf.data"), flush=True)
    rate = stream_rate(ds, args.batch_size, args.augmentation, args.seconds)
    print(f"input stream: {rate:,.0f} img/s", flush=True)
    if args.model:
        synthetic, real = step_rates(ds, args.model, args.batch_size, args.augmentation, args.seconds, args.precision)
        print(f"{args.model} train step, synthetic batch on the device: {synthetic:,.0f} img/s")
        print(f"{args.model} train step, real stream: {real:,.0f} img/s ({real / synthetic:.0%} of synthetic)")
        print(verdict(rate, synthetic))
    if hasattr(ds, "close"):
        ds.close()
    print(f"input img/s: {rate:.1f}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m lottery.input_bench", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
