"""lottery.data.pipeline (tf.data) and lottery.data.runtime, on tiny synthetic shards."""
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from lottery.data import CorruptDataError, DataFormatError, manifest
from lottery.data import runtime
from lottery.data.pipeline import ShardedDataset
from tests.datasets import make_synthetic_shards

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (8, 6, 3)  # non-square RGB, so axis mix-ups show
N_TRAIN, N_VAL, BS = 50, 13, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("pipe"), N_TRAIN, N_VAL, shape=SHAPE, num_classes=3,
                                 seed=5, num_shards={"train": 3, "val": 2})


@pytest.fixture(scope="module")
def arrays(data_dir):
    return {s: manifest.read_split_arrays(data_dir, s) for s in ("train", "val")}


def _pixels(ds, x):
    """Undo the normalisation: back to uint8 pixels."""
    return np.rint((np.asarray(x, np.float64) * ds.std + ds.mean) * 255).astype(np.uint8)


def _epoch(ds, **kw):
    return [(x.numpy(), y.numpy()) for x, y in ds.batches(BS, **kw)]


def _index_of(images):
    return {img.tobytes(): i for i, img in enumerate(images)}


def test_properties(data_dir):
    ds = ShardedDataset(data_dir, "train")
    assert ds.num_examples == N_TRAIN and ds.image_shape == SHAPE and ds.num_classes == 3
    assert ds.classes == ["class_0", "class_1", "class_2"] and ds.manifest["encoding"] == "png"
    assert ds.steps_per_epoch(BS) == N_TRAIN // BS == 6
    assert ShardedDataset(data_dir, "val").num_examples == N_VAL


def test_missing_shard_and_split_are_named(tmp_path):
    d = make_synthetic_shards(tmp_path, 10, 4)
    with pytest.raises(DataFormatError, match="no split 'test'"):
        ShardedDataset(d, "test")
    (d / "train-00001-of-00002.tfrecord").unlink()
    with pytest.raises(FileNotFoundError, match="train-00001-of-00002.tfrecord"):
        ShardedDataset(d, "train")
    (d / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardedDataset(d, "val")


@pytest.mark.parametrize("cache", [False, True])
def test_eval_batches_file_order_normalised_with_remainder(data_dir, arrays, cache):
    ds = ShardedDataset(data_dir, "val", cache=cache)
    got = list(ds.eval_batches(5))
    assert [len(y) for _, y in got] == [5, 5, 3]
    x = np.concatenate([b[0].numpy() for b in got])
    y = np.concatenate([b[1].numpy() for b in got])
    images, labels = arrays["val"]
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert np.array_equal(y, labels)
    m = ds.manifest
    expected = (images / 255.0 - np.array(m["mean"])) / np.array(m["std"])
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(_pixels(ds, x), images)


def test_normalisation_uses_training_statistics(data_dir, arrays):
    images = arrays["train"][0].reshape(-1, 3) / 255.0
    ds = ShardedDataset(data_dir, "train")
    np.testing.assert_allclose(ds.manifest["mean"], images.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ds.manifest["std"], images.std(0), rtol=1e-9)
    x = np.concatenate([b[0].numpy() for b in ds.eval_batches(64)]).reshape(-1, 3)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1.0, atol=1e-5)
    # the val split is normalised with the *training* numbers
    assert ShardedDataset(data_dir, "val").manifest["mean"] == ds.manifest["mean"]


@pytest.mark.parametrize("cache, window", [(False, 8192), (False, 16), (True, None)])
def test_epoch_is_a_shuffled_subset_and_depends_on_seed_and_epoch(data_dir, arrays, cache, window):
    ds = ShardedDataset(data_dir, "train", cache=cache)
    if window:
        ds.shuffle_window = window
    index = _index_of(arrays["train"][0])
    e0 = _epoch(ds, seed=1, epoch=0)
    assert len(e0) == 6 and all(x.shape == (BS, *SHAPE) and y.shape == (BS,) for x, y in e0)
    idx = [index[img.tobytes()] for x, _ in e0 for img in _pixels(ds, x)]
    assert len(set(idx)) == 48  # drop_remainder, no repeats
    assert [int(y) for _, ys in e0 for y in ys] == [int(arrays["train"][1][i]) for i in idx]
    assert idx != sorted(idx)
    same = _epoch(ds, seed=1, epoch=0)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(e0, same))

    def order(**kw):
        return [index[img.tobytes()] for x, _ in _epoch(ds, **kw) for img in _pixels(ds, x)]

    assert order(seed=1, epoch=1) != idx
    assert order(seed=2, epoch=0) != idx


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("augmentation", ["none", "crop_flip"])
def test_skip_batches_equals_dropping_the_first_batches(data_dir, cache, augmentation):
    ds = ShardedDataset(data_dir, "train", cache=cache)
    full = _epoch(ds, seed=7, epoch=3, augmentation=augmentation)
    for k in (2, 5, 6, 9):
        rest = _epoch(ds, seed=7, epoch=3, augmentation=augmentation, skip_batches=k)
        assert len(rest) == max(0, 6 - k)
        for a, b in zip(full[k:], rest):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_cached_and_streamed_epochs_hold_the_same_examples(data_dir, arrays):
    index = _index_of(arrays["train"][0])
    sets = []
    for cache in (False, True):
        ds = ShardedDataset(data_dir, "train", cache=cache)
        sets.append({index[img.tobytes()] for x, _ in ds.batches(N_TRAIN, seed=0, epoch=0)
                     for img in _pixels(ds, x)})
    assert sets[0] == sets[1] == set(range(N_TRAIN))


def _crop_flip_reference(images, params, pad=4):
    out = []
    for img, (oy, ox, flip) in zip(images, params):
        p = np.pad(img, [(pad, pad), (pad, pad), (0, 0)])
        c = p[oy:oy + img.shape[0], ox:ox + img.shape[1]]
        out.append(c[:, ::-1] if flip else c)
    return np.stack(out)


def test_crop_flip_is_pad_crop_flip(data_dir, arrays):
    ds = ShardedDataset(data_dir, "train")
    images = arrays["train"][0][:20]
    params = ds._augment_params("crop_flip", 3, 0)[:20]
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 8 and set(params[:, 2]) == {0, 1}
    params[0] = (0, 0, 0)
    params[1] = (8, 8, 1)
    params[2] = (4, 4, 0)  # identity
    got = ds._augment_fn("crop_flip")(tf.constant(images), tf.constant(params)).numpy()
    assert np.array_equal(got, _crop_flip_reference(images, params).astype(np.float32))
    assert np.array_equal(got[2], images[2])


def test_random_resized_crop_boxes_and_flip(data_dir, arrays):
    ds = ShardedDataset(data_dir, "train")
    h, w, _ = SHAPE
    boxes = ds._augment_params("random_resized_crop", 3, 0)
    assert boxes.shape == (N_TRAIN, 4) and boxes.min() >= 0 and boxes.max() <= 1
    y1, x1, y2, x2 = boxes.T
    assert (y2 >= y1).all() and (x1 > x2).any() and (x1 < x2).any()  # some crops are mirrored
    area = ((y2 - y1) * (h - 1) + 1) * (np.abs(x2 - x1) * (w - 1) + 1) / (h * w)
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    fn = ds._augment_fn("random_resized_crop")
    img = arrays["train"][0][:2]
    same = fn(tf.constant(img), tf.constant([[0, 0, 1, 1], [0, 1, 1, 0]], tf.float32)).numpy()
    np.testing.assert_allclose(same[0], img[0], atol=1e-3)
    np.testing.assert_allclose(same[1], img[1][:, ::-1], atol=1e-3)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("augmentation", ["crop_flip", "random_resized_crop"])
def test_augmentation_shapes_and_reproducibility(data_dir, cache, augmentation):
    ds = ShardedDataset(data_dir, "train", cache=cache)
    a = _epoch(ds, seed=4, epoch=2, augmentation=augmentation)
    b = _epoch(ds, seed=4, epoch=2, augmentation=augmentation)
    plain = _epoch(ds, seed=4, epoch=2)
    assert len(a) == 6 and all(x.shape == (BS, *SHAPE) and x.dtype == np.float32 for x, _ in a)
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(a, b))
    assert all(np.array_equal(p[1], q[1]) for p, q in zip(a, plain))  # same order, only pixels change
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, plain))
    c = _epoch(ds, seed=4, epoch=3, augmentation=augmentation)
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))


def test_bad_arguments(data_dir):
    ds = ShardedDataset(data_dir, "train")
    with pytest.raises(ValueError, match="augmentation"):
        ds.batches(8, seed=0, epoch=0, augmentation="mixup")
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="skip_batches"):
        ds.batches(8, seed=0, epoch=0, skip_batches=-1)


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_other_encodings(tmp_path, encoding):
    d = make_synthetic_shards(tmp_path, 12, 5, shape=(8, 8, 3), encoding=encoding)
    images, labels = manifest.read_split_arrays(d, "val")
    for cache in (False, True):
        ds = ShardedDataset(d, "val", cache=cache)
        x = np.concatenate([b[0].numpy() for b in ds.eval_batches(4)])
        got = _pixels(ds, x)
        if encoding == "raw":
            assert np.array_equal(got, images)
        else:  # TF's jpeg decoder (chroma upsampling) differs from Pillow's: compare with TF's own
            ref = np.stack([tf.io.decode_jpeg(e["encoded"], channels=3).numpy() for e in manifest.iter_split(d, "val")])
            assert np.array_equal(got, ref)
            assert np.abs(got.astype(int) - images).mean() < 8
        assert len(list(ShardedDataset(d, "train", cache=cache).batches(4, seed=0, epoch=0))) == 3


def test_corrupt_shard_fails_loudly(tmp_path):
    d = make_synthetic_shards(tmp_path, 10, 4)
    ds = ShardedDataset(d, "train")  # opened intact, damaged while open: the record CRCs catch it
    shard = d / "train-00000-of-00002.tfrecord"
    raw = bytearray(shard.read_bytes())
    raw[30] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="train-00000-of-00002.tfrecord: damaged shard"):
        ShardedDataset(d, "train")  # opened damaged: refused at once (tests/test_concurrency.py)
    with pytest.raises(CorruptDataError, match="train-00000-of-00002.tfrecord"):
        ds.verify()
    with pytest.raises(tf.errors.DataLossError):
        list(ds.eval_batches(4))


# ---------------------------------------------------------------- fresh processes

HASH_CODE = textwrap.dedent("""
    import hashlib
    from lottery.data.pipeline import ShardedDataset

    def batch_hash(data_dir):
        h = hashlib.sha256()
        for cache, aug in ((False, "crop_flip"), (True, "random_resized_crop"), (True, "none")):
            ds = ShardedDataset(data_dir, "train", cache=cache)
            for x, y in ds.batches(8, seed=11, epoch=1, augmentation=aug, skip_batches=1).take(3):
                h.update(x.numpy().tobytes())
                h.update(y.numpy().tobytes())
        return h.hexdigest()
""")


def test_same_seed_and_epoch_give_identical_batches_in_fresh_processes(data_dir):
    script = HASH_CODE + textwrap.dedent("""
        import sys
        import tensorflow as tf
        if len(sys.argv) > 2:  # neither the global TF seed nor the thread count may matter
            from lottery.data import runtime
            runtime.configure_threads(1)
            tf.random.set_seed(int(sys.argv[2]))
            tf.random.uniform([3])
        print("HASH", batch_hash(sys.argv[1]))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(data_dir), *extra], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ([], ["1234"])]
    hashes = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        hashes.append([line.split()[1] for line in out.splitlines() if line.startswith("HASH")][0])
    ns: dict = {}
    exec(HASH_CODE, ns)
    assert hashes[0] == hashes[1] == ns["batch_hash"](str(data_dir))


# ---------------------------------------------------------------- runtime

def test_mirrored_strategy_with_two_logical_cpus():
    script = textwrap.dedent("""
        from lottery.data import runtime
        assert runtime.configure_threads(2) == 2
        devices = runtime.split_cpu(2)
        assert len(devices) == 2, devices
        runtime.enable_determinism()
        import tensorflow as tf
        with runtime.distribution_scope():
            strategy = tf.distribute.get_strategy()
            v = tf.Variable(1.0)
        assert isinstance(strategy, tf.distribute.MirroredStrategy), strategy
        assert runtime.num_replicas() == 2 and strategy.num_replicas_in_sync == 2
        assert runtime.get_strategy() is runtime.get_strategy()
        assert tf.config.threading.get_intra_op_parallelism_threads() == 2
        print("OK", type(v).__name__)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "KERAS_BACKEND": "tensorflow"}  # MirroredStrategy is TensorFlow's
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


def test_single_device_gets_a_null_scope_and_late_thread_config_warns(caplog, tensorflow_runtime):
    tf.constant(1.0) + 1.0  # TF is initialised by now
    if len(tf.config.list_logical_devices("CPU")) == 1 and not tf.config.list_logical_devices("GPU"):
        assert runtime.num_replicas() == 1
        with runtime.distribution_scope():
            assert not isinstance(tf.distribute.get_strategy(), tf.distribute.MirroredStrategy)
    old = runtime._data_threads
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="lottery.data"):
            assert runtime.configure_threads(intra + 3) == intra + 3
        assert "already initialised" in caplog.text
        assert tf.config.threading.get_intra_op_parallelism_threads() == intra
    finally:
        runtime._data_threads = old
    with pytest.raises(RuntimeError, match="before TensorFlow initialises"):
        runtime.split_cpu(7)


def test_decoded_split_is_kept_on_disk_and_reused(tmp_path, caplog):
    """A second process loads the decoded split instead of decoding every image again; a damaged
    copy is ignored and replaced, never used."""
    import logging

    from tests.datasets import make_synthetic_shards

    data_dir = make_synthetic_shards(tmp_path, 64, 16)
    first = ShardedDataset(data_dir, "train", cache=True)
    expected = [x.numpy() for x, _ in first.batches(8, seed=1, epoch=0)]
    kept = list((data_dir / ".decoded").glob("train-*.npz"))
    assert len(kept) == 1 and first.manifest["dataset_id"] in kept[0].name
    with caplog.at_level(logging.INFO, logger="lottery.data"):
        second = ShardedDataset(data_dir, "train", cache=True)
        again = [x.numpy() for x, _ in second.batches(8, seed=1, epoch=0)]
    assert "loaded decoded" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(expected, again))
    kept[0].write_bytes(kept[0].read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lottery.data"):
        third = ShardedDataset(data_dir, "train", cache=True)
        fresh = [x.numpy() for x, _ in third.batches(8, seed=1, epoch=0)]
    assert "ignoring damaged decoded cache" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(expected, fresh))
    assert ShardedDataset(data_dir, "train", cache=True)._load_decoded() is not None, "the damaged copy was replaced"


# ---- the tf.data path feeds a device: parallel map, prefetch, no Python in the hot loop
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("augmentation", ["none", "random_resized_crop"])
def test_training_stream_is_parallel_prefetched_and_python_free(tmp_path, cache, augmentation):
    d = make_synthetic_shards(tmp_path, 24, 4, shape=(16, 16, 3), encoding="jpeg", num_shards={"train": 3, "val": 1})
    ds = ShardedDataset(d, "train", cache=cache).batches(4, seed=0, epoch=0, augmentation=augmentation)
    graph = ds._as_serialized_graph().numpy()
    assert b"ParallelMapDataset" in graph, "decoding/augmentation must be a parallel map"
    assert b"PrefetchDataset" in graph
    for python_op in (b"PyFunc", b"EagerPyFunc", b"GeneratorDataset"):
        assert python_op not in graph, python_op
    if not cache:
        assert b"ParallelInterleaveDataset" in graph  # the shards are read in parallel


def test_cached_streams_run_without_the_autotuner(data_dir):
    # In a one-thread training process tf.data's autotuner slowed a third of the epochs by a third
    # (docs/benchmarks.md); the cached split's streams (one gather per batch) have nothing to tune.
    cached, streamed = ShardedDataset(data_dir, "train", cache=True), ShardedDataset(data_dir, "train")
    assert cached.batches(8, seed=0, epoch=0).options().autotune.enabled is False
    assert cached.eval_batches(8).options().autotune.enabled is False
    assert streamed.batches(8, seed=0, epoch=0).options().autotune.enabled is not False
