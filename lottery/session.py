"""The backend session every training step runs in: threads, determinism, seed, precision,
distribution scope; the data sets (with their cache policy) and the model.

Keras and the data pipeline are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Any, Iterator

from lottery.config import ConfigError, ExperimentConfig

# Decoded training sets smaller than this are cached in memory (Fashion-MNIST: 47 MB).
CACHE_LIMIT_BYTES = int(os.environ.get("LOTTERY_CACHE_LIMIT_BYTES", 4 << 30))


@contextmanager
def session(cfg: ExperimentConfig, threads: int | None) -> Iterator[int]:
    """Thread pools, determinism, seeds, precision policy and the distribution scope for one run;
    yields the number of replicas."""
    import keras

    from lottery.data import runtime

    if os.environ.get("LOTTERY_LOGICAL_CPUS"):  # test MirroredStrategy on a CPU machine
        runtime.split_cpu(int(os.environ["LOTTERY_LOGICAL_CPUS"]))
    runtime.configure_threads(threads)
    runtime.enable_determinism()
    keras.mixed_precision.set_global_policy(cfg.precision_policy())
    from lottery.models import set_random_seed

    set_random_seed(cfg.seed)
    with runtime.distribution_scope():
        yield runtime.num_replicas()


def open_data(cfg: ExperimentConfig, data_dir: str | os.PathLike) -> tuple[Any, Any, int]:
    """(train, val, iterations per epoch); both splits cached in memory when the decoded training
    set fits under ``CACHE_LIMIT_BYTES``. Checks the config against the data set's size."""
    import keras

    if keras.backend.backend() == "tensorflow":
        from lottery.data.pipeline import ShardedDataset
    else:  # the numpy pipeline: same batches, no TensorFlow needed (docs/data-format.md)
        from lottery.data.arrays import ArrayDataset as ShardedDataset

    train = ShardedDataset(data_dir, "train", cache=False)
    decoded = train.num_examples * math.prod(int(d) for d in train.image_shape)
    cache = decoded <= CACHE_LIMIT_BYTES
    if cache:
        train = ShardedDataset(data_dir, "train", cache=True)
    val = ShardedDataset(data_dir, "val", cache=cache)
    steps_per_epoch = train.steps_per_epoch(cfg.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError("batch_size", cfg.batch_size, f"is larger than the training set ({train.num_examples} images in {data_dir})")
    cfg.check_against_data(steps_per_epoch)
    return train, val, steps_per_epoch


def build_model(cfg: ExperimentConfig, train: Any, *, seed: int | None = None):
    """The config's model for the training set's image shape and classes (seed: the config's)."""
    from lottery import models

    return models.build_model(cfg.model, tuple(train.image_shape), train.num_classes, seed=cfg.seed if seed is None else seed)


def keras_backend() -> str:
    """The Keras backend of this process, recorded in every result: the backends draw different
    initial weights, so their results differ (each is deterministic)."""
    import keras

    return keras.backend.backend()


def small(result: dict[str, Any]) -> dict[str, Any]:
    """What may travel through XCom: no curves, no file manifest."""
    return {k: v for k, v in result.items() if k not in ("curve", "rewind_steps", "files")}


def final_accuracy(history: list[dict]) -> dict[str, Any]:
    """The last epoch's val accuracy, and the best one with its epoch."""
    best = max(history, key=lambda r: r["val_accuracy"]) if history else {"val_accuracy": float("nan"), "epoch": 0}
    return {"val_accuracy": history[-1]["val_accuracy"], "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"]}


def mean_images_per_s(history: list[dict]) -> float:
    values = [r["images_per_s"] for r in history]
    return sum(values) / len(values) if values else 0.0
