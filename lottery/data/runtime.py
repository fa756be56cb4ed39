"""TensorFlow runtime set-up: thread pools, op determinism, MirroredStrategy scope.

Call `configure_threads` (and, in tests, `split_cpu`) before TensorFlow runs its first op.
"""
from __future__ import annotations

import contextlib
import logging
import os

import tensorflow as tf

log = logging.getLogger("lottery.data")

_data_threads: int | None = None
_strategy = None
_strategy_devices: tuple[str, ...] | None = None


def configure_threads(n: int | None = None) -> int:
    """Size TF's intra- and inter-op pools (and the tf.data pools of `ShardedDataset`) to `n`
    (default: the number of CPUs).  Returns `n`.

    Must run before TensorFlow initialises; if it is too late, logs a warning and keeps the
    existing pools (the tf.data pool size is still applied to datasets built afterwards).
    """
    global _data_threads
    n = int(n) if n else (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _data_threads = n
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError as e:
        current = (tf.config.threading.get_intra_op_parallelism_threads(),
                   tf.config.threading.get_inter_op_parallelism_threads())
        if current != (n, n):
            log.warning("configure_threads(%d): TensorFlow is already initialised, keeping its thread pools "
                        "(intra=%d, inter=%d; 0 = TF default): %s", n, current[0], current[1], e)
    return n


def data_threads() -> int | None:
    """The tf.data private thread-pool size set by `configure_threads` (None: TF's default)."""
    return _data_threads


def enable_determinism() -> None:
    """Deterministic TF kernels (`tf.config.experimental.enable_op_determinism`)."""
    tf.config.experimental.enable_op_determinism()


def split_cpu(n: int) -> list:
    """Configure `n` logical CPU devices (for testing MirroredStrategy on one machine).

    Must run before TensorFlow initialises (RuntimeError otherwise).  Returns the logical devices.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * int(n))
    except RuntimeError as e:
        raise RuntimeError(f"split_cpu({n}) must be called before TensorFlow initialises: {e}") from e
    return tf.config.list_logical_devices("CPU")


def _replica_devices() -> tuple[str, ...]:
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tuple(d.name for d in gpus)
    if not gpus:
        cpus = tf.config.list_logical_devices("CPU")
        if len(cpus) > 1:
            return tuple(d.name for d in cpus)
    return ()


def get_strategy():
    """The process-wide `MirroredStrategy` over all GPUs (or all logical CPUs when there is no
    GPU and `split_cpu` made several), or None for a single device."""
    global _strategy, _strategy_devices
    devices = _replica_devices()
    if not devices:
        return None
    if _strategy is None or _strategy_devices != devices:
        _strategy = tf.distribute.MirroredStrategy(devices=list(devices))
        _strategy_devices = devices
        log.info("MirroredStrategy over %d devices: %s", len(devices), ", ".join(devices))
    return _strategy


def distribution_scope():
    """`MirroredStrategy().scope()` when more than one replica device is visible, else a null context."""
    strategy = get_strategy()
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def num_replicas() -> int:
    strategy = get_strategy()
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)
