"""Data: the record format in pure Python (`tfrecord`: TFRecord files; `example`: the Example and
image codecs; `manifest`: the dataset directory and its manifest), the tf.data pipeline
(`pipeline`), the numpy pipeline for TF-less machines (`arrays`, sharing its epoch plan with
`pipeline` through `epochs`; its decoding and augmentation run in the worker processes of
`workers`, per image by `hostaug`), the backend runtime (`runtime`) and the Fashion-MNIST export (`fetch`).

Importing `lottery.data` (or `tfrecord` / `example` / `manifest` / `epochs` / `fetch`) never
imports TensorFlow: Spark executors and TF-less (JAX) machines import this package; `arrays` and
`runtime` import it only on Keras's TensorFlow backend (`arrays` imports Keras).  `ShardedDataset`,
`ArrayDataset` and the runtime helpers are loaded lazily on first attribute access.
"""
from __future__ import annotations

import importlib

from lottery.errors import CorruptDataError, DataFormatError  # noqa: F401 - re-exported
from .manifest import ChannelStats, read_manifest  # noqa: F401 - re-exported

_LAZY = {
    "ShardedDataset": "pipeline",
    "ArrayDataset": "arrays",
    "configure_threads": "runtime",
    "enable_determinism": "runtime",
    "distribution_scope": "runtime",
    "num_replicas": "runtime",
    "split_cpu": "runtime",
    "export_fashion_mnist": "fetch",
    "load_fashion_mnist_arrays": "fetch",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ChannelStats", "CorruptDataError", "DataFormatError", "read_manifest", *_LAZY]
