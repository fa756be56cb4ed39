"""The engine without TensorFlow: the numpy input pipeline (`lottery.data.arrays`) against the
tf.data one, and the whole CLI flow on Keras's JAX backend in a Python where `import tensorflow`
fails.

The pipeline comparisons run wherever the test suite runs (TensorFlow is the reference).  The JAX
runs need JAX: they use this interpreter when it can import jax, or the one named by
`LOTTERY_JAX_PYTHON` (e.g. a venv with keras + jax and no TensorFlow), and are skipped otherwise.
"""
import ast
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from lottery import data as R  # the record format's errors and read_manifest
from lottery.data.arrays import ArrayDataset
from lottery.data.epochs import interleave_positions
from lottery.data.pipeline import ShardedDataset
from tests.datasets import make_synthetic_shards
from tests.helpers import tiny_training

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (8, 6, 3)  # non-square RGB, so axis mix-ups show
N_TRAIN, N_VAL, BS = 101, 13, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("jaxpipe"), N_TRAIN, N_VAL, shape=SHAPE, num_classes=3,
                                 seed=5, num_shards={"train": 7, "val": 2})


@pytest.fixture
def no_disk_cache(monkeypatch):
    """Each reader decodes the shards itself (so equal batches also mean equal decoders)."""
    monkeypatch.setenv("LOTTERY_DECODED_CACHE", "0")


def _tf_epoch(ds, **kw):
    return [(x.numpy(), y.numpy()) for x, y in ds.batches(BS, **kw)]


def _np_epoch(ds, **kw):
    return [(x, y) for x, y in ds.batches(BS, **kw)]


def _assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for i, ((x0, y0), (x1, y1)) in enumerate(zip(expected, got)):
        assert x1.dtype == np.float32 and y1.dtype == np.int32 and x1.shape == x0.shape, i
        assert np.array_equal(y0, y1), f"batch {i}: labels differ"
        assert np.array_equal(x0, x1), f"batch {i}: pixels differ (max {np.abs(x0 - x1).max()})"


# ---------------------------------------------------------------- the numpy pipeline = the tf.data one

@pytest.mark.parametrize("cache, cycle, window", [(True, None, None), (False, None, None), (False, 3, 16)])
@pytest.mark.parametrize("augmentation", ["none", "crop_flip"])
def test_array_batches_are_the_sharded_batches(data_dir, no_disk_cache, cache, cycle, window, augmentation):
    """Same examples, same order, same augmentation, bit for bit: several epochs, mid-epoch starts."""
    tfds, npds = ShardedDataset(data_dir, "train", cache=cache), ArrayDataset(data_dir, "train", cache=cache)
    for ds in (tfds, npds):
        if cycle:
            ds.interleave_cycle, ds.shuffle_window = cycle, window
    assert npds.steps_per_epoch(BS) == tfds.steps_per_epoch(BS) == 12
    for attr in ("num_examples", "image_shape", "num_classes", "classes", "encoding"):
        assert getattr(npds, attr) == getattr(tfds, attr)
    assert np.array_equal(npds.mean, tfds.mean) and np.array_equal(npds.std, tfds.std)
    epochs = []
    for epoch, skip in ((0, 0), (1, 0), (1, 5), (2, 11), (2, 12), (3, 40)):
        expected = _tf_epoch(tfds, seed=3, epoch=epoch, augmentation=augmentation, skip_batches=skip)
        got = _np_epoch(npds, seed=3, epoch=epoch, augmentation=augmentation, skip_batches=skip)
        assert len(got) == max(0, 12 - skip)
        _assert_same_batches(expected, got)
        if skip == 0:
            epochs.append(np.concatenate([y for _, y in got]))
    assert not np.array_equal(epochs[0], epochs[1])  # the epochs really differ
    # the loop's use: .take(n) of a mid-epoch stream, iterated twice
    expected = _tf_epoch(tfds, seed=9, epoch=4, augmentation=augmentation, skip_batches=3)[:4]
    stream = npds.batches(BS, seed=9, epoch=4, augmentation=augmentation, skip_batches=3).take(4)
    assert len(stream) == 4
    _assert_same_batches(expected, list(stream))
    _assert_same_batches(expected, [stream[i] for i in range(4)])


@pytest.mark.parametrize("cache", [False, True])
def test_random_resized_crop_same_examples(data_dir, no_disk_cache, cache):
    """The same examples in the same order; the pixels come from Pillow's resize of the same boxes
    (their distribution is tested in tests/test_input_pipeline.py), so they are close, not equal."""
    tfds, npds = ShardedDataset(data_dir, "train", cache=cache), ArrayDataset(data_dir, "train", cache=cache)
    expected = _tf_epoch(tfds, seed=2, epoch=1, augmentation="random_resized_crop", skip_batches=2)
    got = _np_epoch(npds, seed=2, epoch=1, augmentation="random_resized_crop", skip_batches=2)
    assert len(got) == len(expected) == 10
    for (x0, y0), (x1, y1) in zip(expected, got):
        assert np.array_equal(y0, y1) and x1.shape == x0.shape and x1.dtype == np.float32
        assert np.isfinite(x1).all()


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("batch_size", [5, 13, 64])
def test_eval_batches_are_the_same(data_dir, no_disk_cache, cache, batch_size):
    tfds, npds = ShardedDataset(data_dir, "val", cache=cache), ArrayDataset(data_dir, "val", cache=cache)
    expected = [(x.numpy(), y.numpy()) for x, y in tfds.eval_batches(batch_size)]
    stream = npds.eval_batches(batch_size)
    _assert_same_batches(expected, list(stream))
    _assert_same_batches(expected, list(stream))  # evaluate() iterates it once per epoch


def test_interleave_is_tf_data_interleave():
    """Uneven and empty shards, more shards than the cycle: the same element order as tf.data."""
    rng = np.random.default_rng(0)
    for _ in range(25):
        lens = rng.integers(0, 9, int(rng.integers(1, 12)))
        cycle = int(rng.integers(1, 6))
        ds = tf.data.Dataset.from_tensor_slices(np.arange(len(lens), dtype=np.int64)).interleave(
            lambda i: tf.data.Dataset.range(tf.gather(tf.constant(lens, tf.int64), i)).map(lambda k: i * 100 + k),
            cycle_length=cycle, block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        want = [int(v) for v in ds.as_numpy_iterator()]
        files, records = interleave_positions(lens, cycle)
        got = (files * 100 + records).tolist()
        assert got == want, (lens.tolist(), cycle)


def test_decoded_split_is_shared_by_both_pipelines(tmp_path, caplog):
    """Whichever pipeline decodes first writes `.decoded/<split>-<id>.npz`; the other one loads it."""
    d = make_synthetic_shards(tmp_path, 40, 9, shape=SHAPE)
    first = ArrayDataset(d, "train", cache=True)
    expected = _np_epoch(first, seed=1, epoch=0, augmentation="crop_flip")
    kept = sorted((d / ".decoded").glob("*.npz"))
    assert [p.name for p in kept] == [f"train-{first.manifest['dataset_id']}.npz"]
    with caplog.at_level(logging.INFO, logger="lottery.data"):
        _assert_same_batches(expected, _tf_epoch(ShardedDataset(d, "train", cache=True), seed=1, epoch=0,
                                                 augmentation="crop_flip"))
    assert "loaded decoded" in caplog.text
    # and the other way round
    val = ShardedDataset(d, "val", cache=True)
    expected = [(x.numpy(), y.numpy()) for x, y in val.eval_batches(4)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lottery.data"):
        _assert_same_batches(expected, list(ArrayDataset(d, "val", cache=True).eval_batches(4)))
    assert "loaded decoded" in caplog.text


def test_jpeg_decoded_by_pillow_is_kept_apart(tmp_path):
    """TF's and Pillow's jpeg decoders differ slightly: each keeps its own decoded file."""
    d = make_synthetic_shards(tmp_path, 12, 5, shape=(8, 8, 3), encoding="jpeg")
    x_np = np.concatenate([x for x, _ in ArrayDataset(d, "val", cache=True).eval_batches(4)])
    x_tf = np.concatenate([x.numpy() for x, _ in ShardedDataset(d, "val", cache=True).eval_batches(4)])
    dataset_id = R.read_manifest(d)["dataset_id"]
    assert sorted(p.name for p in (d / ".decoded").glob("*.npz")) == [f"val-{dataset_id}-pillow.npz",
                                                                        f"val-{dataset_id}.npz"]
    assert np.abs(x_np - x_tf).mean() < 0.1  # normalised units: close, not equal


def test_bad_arguments_and_short_shards(tmp_path, data_dir):
    ds = ArrayDataset(data_dir, "train")
    with pytest.raises(ValueError, match="augmentation"):
        ds.batches(8, seed=0, epoch=0, augmentation="mixup")
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="skip_batches"):
        ds.batches(8, seed=0, epoch=0, skip_batches=-1)
    with pytest.raises(IndexError):
        ds.batches(8, seed=0, epoch=0).take(2)[2]
    with pytest.raises(R.DataFormatError, match="no split 'test'"):
        ArrayDataset(data_dir, "test")
    # a manifest that promises more records than the shards hold is an error, not a silent short epoch
    d = make_synthetic_shards(tmp_path, 16, 4)
    short = ArrayDataset(d, "train", cache=True)
    short.num_examples = 17
    with pytest.raises(R.DataFormatError, match="has 16 records, manifest says 17"):
        short.arrays()
    short = ArrayDataset(d, "train", cache=False)
    short.num_examples = 17
    with pytest.raises(R.DataFormatError, match="fewer records than the manifest says"):
        list(short.batches(1, seed=0, epoch=0))


# ---------------------------------------------------------------- nothing in the JAX path needs TensorFlow

TF_FREE = ["lottery/data/tfrecord.py", "lottery/data/example.py", "lottery/data/manifest.py", "lottery/errors.py",
           "lottery/files.py", "lottery/data/epochs.py", "lottery/data/arrays.py", "lottery/data/runtime.py",
           "lottery/data/fetch.py", "lottery/data/__init__.py", "lottery/data/workers.py", "lottery/data/hostaug.py", "lottery/input_bench.py", "lottery/models.py", "lottery/pruning.py",
           "lottery/training.py", "lottery/session.py", "lottery/dense.py", "lottery/masks.py", "lottery/late_reset.py",
           "lottery/packed.py", "lottery/ticket.py", "lottery/phases.py",
           "lottery/plan.py", "lottery/paths.py", "lottery/cli.py", "lottery/config.py"]


@pytest.mark.parametrize("path", TF_FREE)
def test_no_module_level_tensorflow_import(path):
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:  # module level only: runtime.py imports TF inside its TF branches
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not any(n == "tensorflow" or n.startswith("tensorflow.") for n in names), (path, node.lineno)


BLOCK_TF = textwrap.dedent('''
    """Make this Python behave as if TensorFlow were not installed (tests/test_jax_backend.py)."""
    import sys

    class _HideTensorFlow:
        def __init__(self, inner):
            self._inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tf_keras"):
                return None
            find = getattr(self._inner, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
    for _name in [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras")]:
        del sys.modules[_name]
''')


def _jax_python() -> str | None:
    python = os.environ.get("LOTTERY_JAX_PYTHON")
    if python:
        return python
    return sys.executable if importlib.util.find_spec("jax") is not None else None


@pytest.fixture(scope="module")
def jax_env(tmp_path_factory):
    python = _jax_python()
    if python is None:
        pytest.skip("jax is not installed in this environment (CI has TensorFlow only); set LOTTERY_JAX_PYTHON "
                    "to a Python with keras + jax to run the TensorFlow-free flow")
    blocker = tmp_path_factory.mktemp("no_tensorflow")
    (blocker / "sitecustomize.py").write_text(BLOCK_TF)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "LOTTERY_DECODED_CACHE": "1"}
    env.pop("XLA_FLAGS", None)
    # the blocker works: TensorFlow is not importable in that Python, and jax is
    check = subprocess.run([python, "-c", "import importlib.util as u, jax; assert u.find_spec('tensorflow') is None; "
                            "import tensorflow"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode != 0 and "No module named 'tensorflow'" in check.stderr, check.stderr[-2000:]
    return python, env


def _run(python, env, *args, timeout=300, **extra_env):
    r = subprocess.run([python, *args], env={**env, **extra_env}, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{args}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    return r


JAX_CONFIG = tiny_training(lr_milestones=[], augmentation="none", jit_compile=True,
                           drop=("nesterov", "weight_decay", "warmup_steps"))

CHECK_TICKETS = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from lottery.models import prunable_weights
    from lottery.pruning import load_mask
    workdir = sys.argv[1]
    out = {"backend": keras.backend.backend(), "tensorflow_loaded": "tensorflow" in sys.modules, "tickets": {}}
    for ticket in sys.argv[2:]:
        model = keras.models.load_model(f"{workdir}/tickets/{ticket}/model.keras", compile=False)
        mask, _ = load_mask(f"{workdir}/masks/{ticket.split('__')[0]}.npz")
        weights = prunable_weights(model)
        values = {p: keras.ops.convert_to_numpy(weights[p]) for p in mask}
        out["tickets"][ticket] = {
            "pruned_nonzero": int(sum(np.count_nonzero(values[p][~keep]) for p, keep in mask.items())),
            "kept_nonzero": int(sum(np.count_nonzero(values[p][keep]) for p, keep in mask.items())),
            "kept": int(sum(keep.sum() for keep in mask.values())),
        }
    print("RESULT", json.dumps(out))
""")


def test_cli_flow_on_jax_without_tensorflow(jax_env, tmp_path):
    """dense (data parallel over 2 CPU devices, odd-sized validation set) -> masks -> retrain (one
    device, resuming from the distributed run's rewind checkpoint) -> summarize, each a fresh
    `python -m lottery` process on the JAX backend in a Python where TensorFlow cannot be imported."""
    python, env = jax_env
    data = make_synthetic_shards(tmp_path, 256, 97, shape=(8, 8, 1), num_classes=3)
    workdir = tmp_path / "w"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(JAX_CONFIG))

    r = _run(python, env, "-m", "tests.logical_cpus", "2", "lottery", "-v", "dense", "--config", str(config), "--data", str(data),
             "--workdir", str(workdir), "--threads", "1")
    dense = json.loads((workdir / "dense" / "result.json").read_text())
    assert dense["replicas"] == 2, "keras.distribution.DataParallel over the two CPU devices"
    assert dense["epochs"] == 3 and dense["best_val_accuracy"] > 0.9, dense["curve"]
    assert sorted(p.name for p in (workdir / "dense" / "rewind").glob("*.npz")) == ["0it.npz", "1ep.npz"]
    assert "configure_threads(1) on the jax backend" in r.stderr  # a debug line: no noise in task logs

    _run(python, env, "-m", "lottery", "masks", "--workdir", str(workdir))
    assert sorted(p.name for p in (workdir / "masks").glob("*.npz")) == ["sp50.000.npz", "sp90.000.npz"]

    _run(python, env, "-m", "lottery", "retrain", "--workdir", str(workdir), "--mask", "1", "--rewind", "1ep")
    ticket = json.loads((workdir / "tickets" / "sp90.000__1ep" / "result.json").read_text())
    assert ticket["rewind_step"] == 8 and len(ticket["curve"]) == 2 and ticket["val_accuracy"] > 0.5

    r = _run(python, env, "-m", "lottery", "summarize", "--workdir", str(workdir))
    assert "90.00%" in r.stdout and (workdir / "results.csv").exists()

    r = _run(python, env, "-c", CHECK_TICKETS, str(workdir), "sp90.000__1ep")
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert out["backend"] == "jax" and out["tensorflow_loaded"] is False
    stats = out["tickets"]["sp90.000__1ep"]
    assert stats["pruned_nonzero"] == 0, "pruned weights must stay exactly 0.0"
    assert stats["kept_nonzero"] > 0.9 * stats["kept"]


RUNTIME_CHECK = textwrap.dedent("""
    import os, sys
    import keras, numpy as np
    from lottery.data import runtime
    from lottery.data.arrays import ArrayDataset
    assert runtime.backend() == "jax"
    assert runtime.configure_threads(1) == 1 and runtime.data_threads() == 1
    runtime.enable_determinism()
    assert "--xla_gpu_deterministic_ops=true" in os.environ["XLA_FLAGS"], os.environ.get("XLA_FLAGS")
    assert not runtime.jax_initialised()
    assert len(runtime.split_cpu(2)) == 2
    try:
        runtime.split_cpu(3)
    except RuntimeError as e:
        assert "before JAX initialises" in str(e)
    else:
        raise AssertionError("split_cpu after JAX initialised must fail")
    assert runtime.num_replicas() == 2 and runtime.get_strategy() is None
    assert runtime.get_distribution() is runtime.get_distribution()
    val = ArrayDataset(sys.argv[1], "val", cache=True)
    train = ArrayDataset(sys.argv[1], "train", cache=True)

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input(val.image_shape), keras.layers.Flatten(), keras.layers.Dense(3)])
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], jit_compile=True)
        return model

    single = build()
    single.fit(train.batches(32, seed=0, epoch=0).take(3), epochs=1, steps_per_epoch=3, shuffle=False, verbose=0)
    want = single.evaluate(val.eval_batches(32), verbose=0, return_dict=True)
    with runtime.distribution_scope():
        assert isinstance(keras.distribution.distribution(), keras.distribution.DataParallel)
        model = build()
        model.set_weights(single.get_weights())
        stream = val.eval_batches(32)  # 97 = 1 + 3 x 32: the odd batch first, replicated
        assert [len(y) for _, y in stream] == [1, 32, 32, 32]
        got = [model.evaluate(stream, verbose=0, return_dict=True) for _ in range(2)]
    assert keras.distribution.distribution() is None
    for g in got:
        assert abs(g["accuracy"] - want["accuracy"]) < 1e-6 and abs(g["loss"] - want["loss"]) < 1e-4, (g, want)
    print("OK", want, "tensorflow" in sys.modules)
""")


def test_runtime_on_jax(jax_env, tmp_path):
    """XLA flags before JAX starts, split_cpu, DataParallel scope, and an odd-sized evaluation that
    gives the single-device metrics under data parallelism."""
    python, env = jax_env
    data = make_synthetic_shards(tmp_path, 96, 97, shape=(8, 8, 1), num_classes=3)
    r = _run(python, env, "-c", RUNTIME_CHECK, str(data), LOTTERY_XLA_DETERMINISTIC="1")
    assert r.stdout.strip().endswith("False"), r.stdout


SEEDED_BUILD = textwrap.dedent("""
    import json, sys
    import keras
    if sys.argv[1] == "keras":
        import tensorflow  # noqa: F401  (imported first: Keras' own seeding and saving, untouched)
    from lottery.models import build_model, set_random_seed
    model = build_model("lenet_300_100", (28, 28, 1), 10, seed=7)
    set_random_seed(7)
    draw = keras.ops.convert_to_numpy(keras.random.normal((3,))).tolist()
    model.save(sys.argv[2])
    loaded = keras.models.load_model(sys.argv[2], compile=False)
    print("RESULT", json.dumps({"tensorflow_loaded": "tensorflow" in sys.modules, "draw": draw,
                                "sums": [float(keras.ops.convert_to_numpy(w).sum()) for w in loaded.weights]}))
""")


def test_seeding_and_saving_on_jax_import_no_tensorflow(tmp_path):
    """Keras imports TensorFlow when it is installed, to seed tf.random and while saving a model
    (3 s of every JAX task process); on JAX the engine's seeding and saving do not, and give the same
    draws and the same saved weights as Keras with TensorFlow loaded."""
    if _jax_python() is None or importlib.util.find_spec("tensorflow") is None:
        pytest.skip("needs jax and tensorflow in one Python")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    out = {}
    for how in ("keras", "lottery"):
        r = _run(_jax_python(), env, "-c", SEEDED_BUILD, how, str(tmp_path / f"{how}.keras"), timeout=180)
        out[how] = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["keras"]["tensorflow_loaded"] and not out["lottery"]["tensorflow_loaded"]
    assert out["lottery"]["sums"] == out["keras"]["sums"] and out["lottery"]["draw"] == out["keras"]["draw"]


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="no jax in this interpreter")
def test_no_tpu_backend_line_in_a_process_that_imports_lottery():
    """JAX's "Unable to initialize backend 'tpu'" (INFO) never reaches a task's log; it does without lottery."""
    code = "import logging; logging.basicConfig(level=logging.INFO); {}import jax; jax.numpy.zeros(1)"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": ""}
    runs = [subprocess.run([sys.executable, "-c", code.format(pre)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120) for pre in ("", "import lottery; ")]
    if "Unable to initialize backend" not in runs[0].stderr:
        pytest.skip("this JAX logs no backend line here")
    assert runs[1].returncode == 0 and "Unable to initialize backend" not in runs[1].stderr, runs[1].stderr[-2000:]
