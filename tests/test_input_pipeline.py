"""The JAX-path input pipeline's worker processes (lottery/data/workers.py, hostaug.py), the
input-bench probe on both backends, and bfloat16 training with masks."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lottery.data import CorruptDataError
from lottery.data.arrays import ArrayDataset
from lottery.data.epochs import RRC_RATIO, RRC_SCALE, augment_params, streamed_epoch
from lottery.data.example import decode_example, decode_image
from lottery.data.hostaug import crop_box, resized_crop
from lottery.data.manifest import read_manifest
from lottery.data.tfrecord import read_records
from tests.datasets import make_synthetic_shards
from tests.helpers import wait_for
from tests.test_jax_backend import jax_env  # noqa: F401 - the TensorFlow-free Python fixture

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (24, 20, 3)
N_TRAIN, BS = 60, 8


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("workers"), N_TRAIN, 10, shape=SHAPE, seed=4,
                                 encoding="jpeg", num_shards={"train": 4, "val": 1})


def _epoch(ds, **kw):
    return [(x.copy(), y.copy()) for x, y in ds.batches(BS, **kw)]


def _same(a, b):
    assert len(a) == len(b)
    for (x0, y0), (x1, y1) in zip(a, b):
        assert np.array_equal(y0, y1) and np.array_equal(x0, x1)


@pytest.mark.parametrize("augmentation", ["random_resized_crop", "crop_flip", "none"])
def test_same_batches_across_runs_and_worker_counts(jpeg_dir, augmentation):
    kw = dict(seed=7, epoch=3, augmentation=augmentation)
    runs = {}
    for workers in (0, 1, 2):
        ds = ArrayDataset(jpeg_dir, "train", workers=workers)
        runs[workers] = _epoch(ds, **kw)
        if workers == 2:
            _same(runs[2], _epoch(ds, **kw))  # a second run on the same (running) pool
            _same(runs[2][3:], _epoch(ds, skip_batches=3, **kw))
            assert len(ds._pool.pids) == 2
        ds.close()
    _same(runs[0], runs[1])
    _same(runs[0], runs[2])
    assert len(runs[0]) == N_TRAIN // BS


def test_every_example_once_per_epoch(jpeg_dir):
    m = read_manifest(jpeg_dir)
    counts = [s["records"] for s in m["splits"]["train"]["shards"]]
    shards, records = streamed_epoch(5, 1, counts, 3, 16)
    assert sorted(zip(shards.tolist(), records.tolist())) == [(s, k) for s, c in enumerate(counts) for k in range(c)]
    ds = ArrayDataset(jpeg_dir, "train", workers=2)
    seen = np.concatenate([x for x, _ in ds.batches(6, seed=5, epoch=1)])  # 60 = 10 batches of 6: all of them
    evaluated = np.concatenate([x for x, _ in ds.eval_batches(7)])
    ds.close()
    key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert key(seen) == key(evaluated)


def test_augmentation_distribution_is_tf_datas():
    """The crops the workers cut (Pillow boxes) are the epoch plan's boxes tf.data samples: same
    scale and aspect-ratio histograms, flip probability 1/2 within sampling error."""
    h, w, n = 224, 224, 20000
    boxes = augment_params("random_resized_crop", n, (h, w, 3), seed=1, epoch=0)
    tf_h = np.rint((boxes[:, 2] - boxes[:, 0]) * (h - 1)) + 1  # tf.image.crop_and_resize's extent
    tf_w = np.rint(np.abs(boxes[:, 3] - boxes[:, 1]) * (w - 1)) + 1
    pil = np.array([[*crop_box(b, h, w)[0], crop_box(b, h, w)[1]] for b in boxes], np.float64)
    pil_w, pil_h = pil[:, 2] - pil[:, 0], pil[:, 3] - pil[:, 1]
    np.testing.assert_array_equal(pil_w, tf_w)
    np.testing.assert_array_equal(pil_h, tf_h)
    assert np.array_equal(pil[:, 4] > 0, boxes[:, 1] > boxes[:, 3])
    # and the histograms agree with another epoch of tf.data's boxes within sampling error
    other = augment_params("random_resized_crop", n, (h, w, 3), seed=1, epoch=1)
    o_h = np.rint((other[:, 2] - other[:, 0]) * (h - 1)) + 1
    o_w = np.rint(np.abs(other[:, 3] - other[:, 1]) * (w - 1)) + 1
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for ours, theirs, edges in ((pil_w * pil_h / (h * w), o_w * o_h / (h * w), np.linspace(RRC_SCALE[0] - 0.01, 1, 11)),
                                (np.log(pil_w / pil_h), np.log(o_w / o_h), np.linspace(lo - 0.02, hi + 0.02, 11))):
        assert ours.min() >= edges[0] and ours.max() <= edges[-1]
        p, q = np.histogram(ours, edges)[0] / n, np.histogram(theirs, edges)[0] / n
        sigma = np.sqrt((p * (1 - p) + q * (1 - q)) / n)
        assert np.all(np.abs(p - q) <= 4 * sigma + 1e-3), (p, q)
    assert abs((pil[:, 4] > 0).mean() - 0.5) < 4 * math.sqrt(0.25 / n)


def test_full_box_is_the_image_and_a_mirrored_box_flips_it(jpeg_dir):
    example = decode_example(next(read_records(sorted(jpeg_dir.glob("train-*"))[0])))
    pixels = decode_image(example["encoded"], "jpeg", SHAPE)
    assert np.array_equal(resized_crop(example["encoded"], "jpeg", SHAPE, [0, 0, 1, 1]), pixels)
    assert np.array_equal(resized_crop(example["encoded"], "jpeg", SHAPE, [0, 1, 1, 0]), pixels[:, ::-1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pids, seconds=5.0):
    """The processes of ``pids`` still alive (none, or the test fails naming them) after ``seconds``."""
    wait_for(lambda: not any(map(_alive, pids)), seconds, "the data workers to exit", interval=0.05,
             state=lambda: [p for p in pids if _alive(p)])
    return [p for p in pids if _alive(p)]


def test_corrupt_shard_is_a_named_error_and_no_worker_hangs(tmp_path):
    d = make_synthetic_shards(tmp_path, 40, 4, shape=SHAPE, encoding="jpeg", num_shards={"train": 2, "val": 1})
    ds = ArrayDataset(d, "train", workers=2)  # opened intact (a damaged shard is refused at open), damaged now
    shard = sorted(d.glob("train-*"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    started = time.monotonic()
    with pytest.raises(CorruptDataError, match=rf"{shard.name}: corrupt record at byte offset \d+") as info:
        list(ds.batches(4, seed=0, epoch=0))
    assert time.monotonic() - started < 30
    assert info.value.path == str(shard) and info.value.offset > 0
    pids = list(ds._pool.pids) if ds._pool else []
    ds.close()
    assert not _wait_dead(pids)


def test_truncated_shard_and_a_dead_worker_are_errors(tmp_path):
    from lottery.data.workers import WorkerError

    d = make_synthetic_shards(tmp_path, 40, 4, shape=SHAPE, encoding="jpeg", num_shards={"train": 2, "val": 1})
    ds = ArrayDataset(d, "train", workers=2)  # opened intact, truncated while open
    shard = sorted(d.glob("train-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CorruptDataError, match=rf"{shard.name}: truncated record at byte offset \d+"):
        list(ds.batches(4, seed=0, epoch=0))
    ds.close()
    ok = ArrayDataset(make_synthetic_shards(tmp_path, 64, 4, shape=SHAPE, encoding="jpeg", name="ok"), "train", workers=2)
    stream = iter(ok.batches(4, seed=0, epoch=0))
    next(stream)
    os.kill(ok._pool.pids[0], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"data worker pid \d+ died"):
        list(stream)
    assert time.monotonic() - started < 30
    assert len(list(ok.batches(4, seed=0, epoch=0))) == 16  # the next stream starts fresh workers
    ok.close()


CHILD = textwrap.dedent("""
    import signal, sys
    # Python's own Ctrl-C handling, whatever this process inherited: an ignored SIGINT survives exec,
    # and a test run that went through Airflow's in-process task runner may have left it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from lottery.data.arrays import ArrayDataset
    ds = ArrayDataset(sys.argv[1], "train", workers=2)
    stream = iter(ds.batches(4, seed=0, epoch=0, augmentation="random_resized_crop"))
    next(stream)
    print("PIDS", *ds._pool.pids, flush=True)
    import time
    # Short sleeps: the kernel may hand SIGINT to one of TensorFlow's threads, and Python then
    # raises KeyboardInterrupt in the main thread only when it next runs bytecode.
    for _ in range(1200):
        time.sleep(0.1)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_workers_end_with_the_parent(jpeg_dir, sig):
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(jpeg_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(p) for p in line.split()[1:]]
        assert len(pids) == 2 and all(map(_alive, pids))
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert not _wait_dead(pids), "orphaned data workers"
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- input-bench on both backends

def _check_bench_output(text: str) -> None:
    lines = text.strip().splitlines()
    assert any(line.startswith("input stream: ") for line in lines), text
    assert any(line.startswith(("input-bound: ", "compute-bound: ")) for line in lines), text
    last = lines[-1]
    assert last.startswith("input img/s: ") and float(last.split(": ")[1]) > 0, text


def test_input_bench_tensorflow(jpeg_dir, capsys):
    import keras

    from lottery import input_bench

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the in-process run is the TensorFlow backend's")
    try:
        input_bench.main(["--data", str(jpeg_dir), "--batch-size", "8", "--seconds", "0.5", "--model", "lenet_300_100",
                          "--augmentation", "random_resized_crop"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    _check_bench_output(capsys.readouterr().out)


def test_input_bench_jax_without_tensorflow(jax_env, jpeg_dir):  # noqa: F811 - the fixture
    python, env = jax_env
    # the user's command: the `input-bench` subcommand of `python -m lottery`, with TensorFlow blocked
    r = subprocess.run([python, "-m", "lottery", "input-bench", "--data", str(jpeg_dir), "--batch-size", "8", "--seconds",
                        "0.5", "--model", "lenet_300_100", "--workers", "2", "--augmentation", "random_resized_crop"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "backend jax" in r.stdout
    _check_bench_output(r.stdout)


# ---------------------------------------------------------------- bfloat16 keeps pruned weights at 0.0

BF16 = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from lottery import models
    from lottery.config import ExperimentConfig
    from lottery.pruning import apply_mask, magnitude_masks
    keras.mixed_precision.set_global_policy(ExperimentConfig.from_dict({"mixed_precision": "bfloat16"}).precision_policy())
    model = models.build_model("lenet_300_100", (8, 8, 1), 3, seed=0)
    weights = {p: keras.ops.convert_to_numpy(v) for p, v in models.prunable_weights(model).items()}
    mask = magnitude_masks(weights, 0.9)
    apply_mask(model, mask)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 64).astype("int32")
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    after = {p: keras.ops.convert_to_numpy(v) for p, v in models.prunable_weights(model).items()}
    print("RESULT", json.dumps({
        "backend": keras.backend.backend(), "compute": model.layers[-1].compute_dtype,
        "pruned_nonzero": int(sum(np.count_nonzero(after[p][~k]) for p, k in mask.items())),
        "kept_changed": int(sum(np.count_nonzero(after[p][k] != weights[p][k]) for p, k in mask.items()))}))
""")


def _bf16_result(python, env):
    r = subprocess.run([python, "-c", BF16], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


def test_bfloat16_keeps_pruned_weights_at_zero_tensorflow():
    out = _bf16_result(sys.executable, {**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert out["backend"] == "tensorflow" and out["compute"] == "bfloat16"
    assert out["pruned_nonzero"] == 0 and out["kept_changed"] > 0


def test_bfloat16_keeps_pruned_weights_at_zero_jax(jax_env):  # noqa: F811 - the fixture
    out = _bf16_result(*jax_env)
    assert out["backend"] == "jax" and out["compute"] == "bfloat16"
    assert out["pruned_nonzero"] == 0 and out["kept_changed"] > 0


@pytest.mark.parametrize("value, policy", [(False, "float32"), (True, "mixed_float16"), ("bfloat16", "mixed_bfloat16")])
def test_training_session_uses_the_configured_precision(value, policy):
    """The engine's session (what dense training and late reset run in) sets the config's policy."""
    code = (
        "import json, keras\n"
        "from lottery.config import ExperimentConfig\n"
        "from lottery.session import session\n"
        f"cfg = ExperimentConfig.from_dict({{'mixed_precision': {value!r}}})\n"
        "with session(cfg, 1):\n"
        "    print(keras.config.dtype_policy().name)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == policy
