"""Runtime set-up for the Keras backend in use: thread pools, determinism, data-parallel scope.

Call `configure_threads` (and, in tests, `split_cpu`) before the backend runs its first op.

TensorFlow backend: TF's thread pools and tf.data's, op determinism, one process-wide
`MirroredStrategy` when there is more than one replica device. JAX (TensorFlow need not be
installed): XLA reads `XLA_FLAGS` when JAX creates its backends, so these act before the first
computation. XLA:CPU sizes its pool to the cores the process may run on (limit it with
`taskset -c`) and is deterministic already; on a GPU, `LOTTERY_XLA_DETERMINISTIC=1` adds
`--xla_gpu_deterministic_ops=true`, not the default because XLA:GPU then refuses to compile
select-and-scatter, the gradient of max pooling (conv2/4/6, vgg16). Several devices: a
`keras.distribution.DataParallel` scope.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

log = logging.getLogger("lottery.data")

_data_threads: int | None = None
_replicated: tuple[tuple[str, ...], object] | None = None  # (devices, MirroredStrategy or DataParallel)

XLA_DETERMINISTIC_ENV = "LOTTERY_XLA_DETERMINISTIC"
XLA_GPU_DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def backend() -> str:
    """The Keras backend this process trains with (`"tensorflow"`, `"jax"`, ...)."""
    import keras

    return keras.backend.backend()


def _tensorflow() -> bool:
    return backend() == "tensorflow"


# ---------------------------------------------------------------------------------------- XLA
def jax_initialised() -> bool:
    """Whether JAX has created its backends (after that, XLA_FLAGS and device counts are fixed)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this module: assume the worst
        return True
    probe = getattr(xla_bridge, "backends_are_initialized", None)
    if probe is not None:
        return bool(probe())
    return bool(getattr(xla_bridge, "_backends", None))  # pragma: no cover - older JAX


def add_xla_flags(*flags: str) -> bool:
    """Append `flags` to `XLA_FLAGS` unless JAX is already initialised (then: False); a flag the
    environment already sets (by name) is left as the user set it."""
    if jax_initialised():
        return False
    current = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=", 1)[0] for f in current}
    added = [f for f in flags if f.split("=", 1)[0] not in names]
    if added:
        os.environ["XLA_FLAGS"] = " ".join(current + added)
    return True


# ---------------------------------------------------------------------------------------- threads
def configure_threads(n: int | None = None) -> int:
    """Size the backend's thread pools (and the input pipeline's) to `n` (default: the number of
    CPUs); returns `n`. Once TensorFlow is initialised it is too late for its pools (a warning);
    tf.data's size still applies to datasets built afterwards."""
    global _data_threads
    n = int(n) if n else (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _data_threads = n
    if not _tensorflow():
        log.debug("configure_threads(%d) on the %s backend: XLA:CPU sizes its thread pool to the cores this "
                 "process may run on (limit them with taskset -c / a cgroup); nothing else to set", n, backend())
        return n
    import tensorflow as tf

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
    """The input-pipeline thread count set by `configure_threads` (None: the default)."""
    return _data_threads


# ---------------------------------------------------------------------------------------- determinism
def enable_determinism() -> None:
    """Deterministic kernels (see the module docstring)."""
    if _tensorflow():
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        return
    if os.environ.get(XLA_DETERMINISTIC_ENV, "0") not in ("", "0"):
        if not add_xla_flags(XLA_GPU_DETERMINISTIC_FLAG):
            log.warning("enable_determinism: JAX is already initialised, cannot add %s to XLA_FLAGS",
                        XLA_GPU_DETERMINISTIC_FLAG)
        else:
            log.info("enable_determinism: XLA_FLAGS=%s", os.environ.get("XLA_FLAGS"))


# ---------------------------------------------------------------------------------------- devices
def split_cpu(n: int) -> list:
    """`n` logical CPU devices, for tests of data parallelism; before the backend initialises."""
    if not _tensorflow():
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", int(n))
        except RuntimeError as e:
            raise RuntimeError(f"split_cpu({n}) must be called before JAX initialises: {e}") from e
        return jax.devices("cpu")
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * int(n))
    except RuntimeError as e:
        raise RuntimeError(f"split_cpu({n}) must be called before TensorFlow initialises: {e}") from e
    return tf.config.list_logical_devices("CPU")


def _replica_devices() -> tuple[str, ...]:
    if not _tensorflow():
        if backend() != "jax":  # keras.distribution is JAX-only
            return ()
        import keras

        devices = tuple(keras.distribution.list_devices())  # accelerators if any, else the CPUs
        return devices if len(devices) > 1 else ()
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tuple(d.name for d in gpus)
    if not gpus:
        cpus = tf.config.list_logical_devices("CPU")
        if len(cpus) > 1:
            return tuple(d.name for d in cpus)
    return ()


def _replicate(make, name: str):
    """The process-wide ``make(devices)`` over the replica devices (made again when they change),
    or None for a single device."""
    global _replicated
    devices = _replica_devices()
    if not devices:
        return None
    if _replicated is None or _replicated[0] != devices:
        _replicated = (devices, make(devices=list(devices)))
        log.info("%s over %d devices: %s", name, len(devices), ", ".join(devices))
    return _replicated[1]


def get_strategy():
    """The `MirroredStrategy` over all GPUs (or the logical CPUs `split_cpu` made), or None."""
    if not _tensorflow():
        return None
    import tensorflow as tf

    return _replicate(tf.distribute.MirroredStrategy, "MirroredStrategy")


def get_distribution():
    """The `keras.distribution.DataParallel` over all devices JAX sees (non-TensorFlow backends),
    or None. A batch that does not divide over the devices (the last evaluation batch) is
    replicated instead of split."""
    if _tensorflow():
        return None
    return _replicate(lambda devices: _data_parallel_class()(devices=devices), "keras.distribution.DataParallel")


def _data_parallel_class():
    import keras

    class DataParallel(keras.distribution.DataParallel):
        """`DataParallel` that replicates a batch which cannot be split evenly over the devices."""

        def get_data_layout(self, data_shape):
            shards = self.device_mesh.devices.size
            if data_shape and data_shape[0] is not None and int(data_shape[0]) % shards:
                return keras.distribution.TensorLayout([None] * len(data_shape), self.device_mesh)
            return super().get_data_layout(data_shape)

    return DataParallel


def distribution_scope():
    """The data-parallel scope when more than one replica device is visible, else a null context:
    `MirroredStrategy().scope()` on TensorFlow, `keras.distribution.DataParallel(...).scope()`
    on JAX."""
    if _tensorflow():
        strategy = get_strategy()
        return strategy.scope() if strategy is not None else contextlib.nullcontext()
    distribution = get_distribution()
    return distribution.scope() if distribution is not None else contextlib.nullcontext()


def num_replicas() -> int:
    if _tensorflow():
        strategy = get_strategy()
        return 1 if strategy is None else int(strategy.num_replicas_in_sync)
    distribution = get_distribution()
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)
