"""spark_jobs/preprocess_images.py: real spark-submit runs (local[2]) on real data, and the job's
pure functions (spark_jobs.preprocess.images / sharding / args, imported without Spark).

Module-scoped fixtures share the expensive runs (each spark-submit costs several seconds of JVM
and Python start-up):

* ``fm_run``: Fashion-MNIST (100 images per split, exported with lottery.data.fetch) -> png shards;
* ``bad_run``: a folder with every kind of bad file and every Pillow mode -> png shards at 16x16.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "spark_jobs" / "preprocess_images.py"
FM_LIMIT = 100

from lottery.data import ChannelStats, example, tfrecord  # noqa: E402
from lottery.data.manifest import MANIFEST_NAME, dataset_id, read_manifest, shard_paths, verify_dataset  # noqa: E402
from lottery.data.verify import verify_shards  # noqa: E402
from spark_jobs.preprocess import args as job_args  # noqa: E402
from spark_jobs.preprocess import images, sharding  # noqa: E402
from spark_jobs.preprocess.errors import InputError  # noqa: E402
from spark_jobs.preprocess.spark import JVM_CONF  # noqa: E402
from spark_jobs.preprocess.spark import submit_env as spark_env  # noqa: E402


# ---------------------------------------------------------------------------------------------
# helpers (also used by tests/test_spark_cluster.py)
# ---------------------------------------------------------------------------------------------

def spark_submit_cmd(*args, master: str = "local[2]", extra: tuple = ()) -> list[str]:
    return [str(Path(sys.executable).parent / "spark-submit"), "--master", master,
            "--conf", "spark.ui.enabled=false", "--conf", "spark.driver.memory=1g",
            # the options the DAG's preprocess task gives the job
            *[arg for key, value in JVM_CONF.items() for arg in ("--conf", f"{key}={value}")],
            *extra, str(JOB), *[str(a) for a in args]]


def spark_submit(*args, master: str = "local[2]", extra: tuple = (), timeout: float = 400,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = spark_submit_cmd(*args, master=master, extra=extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=spark_env(), timeout=timeout,
                          cwd=str(cwd or ROOT))
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    if proc.returncode != rc:
        tail = proc.output[-6000:]  # type: ignore[attr-defined]
        pytest.fail(f"spark-submit exited {proc.returncode}, expected {rc}:\n{tail}")
    return proc


def leftovers(output: Path) -> list[str]:
    """Staging/old siblings of an output dir (the hidden lock file is not data)."""
    return sorted(p.name for p in output.parent.iterdir()
                  if p.name.startswith((output.name + ".staging-", output.name + ".old-", output.name + ".partial")))


def read_all(data_dir: Path) -> dict[str, dict]:
    """{image_id: {"label", "pixels", "split"}} read with the pure-Python reader (CRCs checked)."""
    manifest = read_manifest(data_dir)
    shape = manifest["image_shape"]
    out = {}
    for split in manifest["splits"]:
        for path in shard_paths(data_dir, manifest, split):
            for rec in tfrecord.read_records(path):
                ex = example.decode_example(rec)
                assert ex["image_id"] not in out
                assert [ex["height"], ex["width"], ex["channels"]] == shape
                out[ex["image_id"]] = {"label": ex["label"], "split": split,
                                       "pixels": example.decode_image(ex["encoded"], ex["encoding"], shape)}
    return out


def fashion_mnist_root(tmp: Path, limit: int = FM_LIMIT) -> Path:
    from lottery.data.fetch import export_fashion_mnist

    root = tmp / "fashion-mnist"
    export_fashion_mnist(root, limit=limit, progress=False)
    return root


def check_fashion_mnist_output(data_dir: Path, limit: int = FM_LIMIT) -> dict:
    """Every record is exactly its source image and label; returns the manifest."""
    from lottery.data.fetch import CLASS_FOLDERS, load_fashion_mnist_arrays

    manifest = verify_dataset(data_dir, check_records=True)
    assert manifest["classes"] == CLASS_FOLDERS
    assert manifest["image_shape"] == [28, 28, 1]
    got = read_all(data_dir)
    assert len(got) == 2 * limit
    for split in ("train", "val"):
        images, labels = load_fashion_mnist_arrays(split, limit=limit)
        assert manifest["splits"][split]["count"] == limit
        assert manifest["splits"][split]["per_class"] == np.bincount(labels, minlength=10).tolist()
        for i in range(limit):
            rec = got[f"{split}/{CLASS_FOLDERS[labels[i]]}/{i:05d}.png"]
            assert rec["split"] == split
            assert rec["label"] == labels[i]
            np.testing.assert_array_equal(rec["pixels"][:, :, 0], images[i])
    return manifest


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (gray [H, W] or RGB [H, W, 3] uint16), written by hand."""
    h, w = arr.shape[:2]
    color_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _center_crop(a: np.ndarray, s: int) -> np.ndarray:
    h, w = a.shape[:2]
    m = min(h, w)
    assert m == s, "test images have their shorter side equal to the output size: a pure crop"
    top, left = (h - m) // 2, (w - m) // 2
    return a[top:top + m, left:left + m]


# Expected reason codes of the bad files (the manifest's reason is "<code>: <detail>").
BAD_FILES = {
    "train/a_color/corrupt.png": "corrupt",
    "train/a_color/truncated.jpg": "truncated",
    "train/a_color/empty.jpg": "empty",
    "train/a_color/notes.txt": "not-image",
    "train/b_gray/corrupt.jpg": "corrupt",
    "train/b_gray/truncated.png": "truncated",
    "train/b_gray/anim.gif": "unsupported-format",
    "train/README.txt": "outside-class",
}
S = 16  # output size of the bad-folder runs


def make_mixed_folder(root: Path) -> dict[str, np.ndarray]:
    """Every Pillow mode the job must convert, in mixed sizes (shorter side S), plus every kind of
    bad file.  No val/: the job splits train/.  Returns {image_id: expected RGB pixels [S, S, 3]}."""
    rng = np.random.default_rng(7)
    a, b = root / "train" / "a_color", root / "train" / "b_gray"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def put(rel: str, data: bytes, exp: np.ndarray | None = None):
        (root / rel).write_bytes(data)
        if exp is not None:
            if exp.ndim == 2:
                exp = np.repeat(exp[:, :, None], 3, axis=2)
            expected[rel] = _center_crop(exp, S)

    def pillow_rgb(data: bytes) -> np.ndarray:  # reference decode for lossy/converted sources
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    # color (the majority: 11 of 18 good files)
    for i, (h, w) in enumerate([(16, 16), (16, 24), (20, 16), (16, 17), (31, 16), (16, 16)]):
        x = rgb(h, w)
        name = f"rgb_{i}.png" if i else "rgb 0 [a]{b} ü%20#.png"   # spaces, glob characters, unicode
        put(f"train/a_color/{name}", _save(Image.fromarray(x), "PNG"), x)
    data = _save(Image.fromarray(rgb(16, 20)), "JPEG", quality=90)
    put("train/a_color/rgb.jpg", data, pillow_rgb(data))
    data = _save(Image.fromarray(rgb(16, 16)).convert("CMYK"), "JPEG", quality=90)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    put("train/a_color/cmyk.jpg", data, pillow_rgb(data))
    pal = Image.fromarray(rgb(18, 16)).quantize(colors=16)
    data = _save(pal, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    put("train/a_color/palette.png", data, np.asarray(pal.convert("RGB")))
    x = rng.integers(0, 256, (16, 22, 4), dtype=np.uint8)
    put("train/a_color/rgba.png", _save(Image.fromarray(x, "RGBA"), "PNG"), x[:, :, :3])  # alpha dropped
    x16 = rng.integers(0, 65536, (16, 16, 3)).astype(np.uint16)
    put("train/a_color/rgb16.png", _png16(x16), (x16 >> 8).astype(np.uint8))  # high byte

    # grayscale (7 of 18)
    for i, (h, w) in enumerate([(16, 16), (16, 20), (19, 16)]):
        x = rng.integers(0, 256, (h, w), dtype=np.uint8)
        put(f"train/b_gray/gray_{i}.png", _save(Image.fromarray(x), "PNG"), x)
    data = _save(Image.fromarray(rng.integers(0, 256, (16, 18), dtype=np.uint8)), "JPEG", quality=90)
    put("train/b_gray/gray.jpg", data, pillow_rgb(data))
    g16 = rng.integers(0, 65536, (20, 16)).astype(np.uint16)
    data = _png16(g16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    put("train/b_gray/gray16.png", data, (g16 >> 8).astype(np.uint8))
    x = rng.integers(0, 256, (16, 16, 2), dtype=np.uint8)
    put("train/b_gray/la.png", _save(Image.fromarray(x, "LA"), "PNG"), x[:, :, 0])
    bw = rng.integers(0, 2, (16, 21), dtype=np.uint8).astype(bool)
    put("train/b_gray/bw.png", _save(Image.fromarray(bw), "PNG"), bw.astype(np.uint8) * 255)

    # bad files
    png = bytearray(_save(Image.fromarray(rgb(16, 16)), "PNG"))
    idat = png.index(b"IDAT")
    png[idat + 8] ^= 0xFF                       # IDAT data no longer matches its CRC
    put("train/a_color/corrupt.png", bytes(png))
    jpg = _save(Image.fromarray(rgb(16, 16)), "JPEG")
    put("train/a_color/truncated.jpg", jpg[: len(jpg) // 2])
    put("train/a_color/empty.jpg", b"")
    put("train/a_color/notes.txt", b"these are not the images you are looking for\n")
    jpg = bytearray(_save(Image.fromarray(rgb(16, 16)), "JPEG"))
    dht = jpg.index(b"\xff\xc4")
    jpg[dht + 5:dht + 21] = b"\xff" * 16     # impossible Huffman table: a broken data stream
    put("train/b_gray/corrupt.jpg", bytes(jpg))
    png = _save(Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)), "PNG")
    put("train/b_gray/truncated.png", png[: len(png) * 2 // 3])
    put("train/b_gray/anim.gif", _save(Image.fromarray(rgb(16, 16)).convert("P"), "GIF"))
    put("train/README.txt", b"a file outside the class folders\n")
    assert set(BAD_FILES) <= {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    return expected


# ---------------------------------------------------------------------------------------------
# fixtures: the shared runs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spark_preprocess")


@pytest.fixture(scope="module")
def fm_root(work) -> Path:
    return fashion_mnist_root(work)


@pytest.fixture(scope="module")
def fm_run(work, fm_root):
    out = work / "fm_data"
    proc = check(spark_submit("--input", fm_root, "--output", out))
    return out, proc


@pytest.fixture(scope="module")
def mixed_root(work):
    root = work / "mixed [1]{x} ü"      # the input root too
    expected = make_mixed_folder(root)
    return root, expected


@pytest.fixture(scope="module")
def bad_run(work, mixed_root):
    root, expected = mixed_root
    out = work / "mixed_data"
    proc = check(spark_submit("--input", root, "--output", out, "--image-size", S, "--max-bad-fraction", 0.5,
                              "--val-fraction", 0.25, "--seed", 1))
    return out, proc, expected


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: exact pixels and labels, manifest, idempotence, option changes, killed runs
# ---------------------------------------------------------------------------------------------

def test_fashion_mnist_pixels_and_labels_pure_python_reader(fm_run):
    out, proc = fm_run
    manifest = check_fashion_mnist_output(out)
    assert manifest["encoding"] == "png"
    assert manifest["skipped"] == []
    # logs for people: start summary, per-stage progress, end summary; no per-image lines
    for text in ("start: input", "listing: 200 files", "channels: 1", "plan: images 28x28x1",
                 "done: 200 records written", "images/s"):
        assert text in proc.stdout, text
    assert "00017.png" not in proc.stdout


def test_fashion_mnist_pixels_and_labels_tensorflow_reader(fm_run):
    import tensorflow as tf

    from lottery.data.fetch import CLASS_FOLDERS, load_fashion_mnist_arrays

    out, _ = fm_run
    manifest = read_manifest(out)
    spec = {example.KEY_ENCODED: tf.io.FixedLenFeature([], tf.string),
            example.KEY_LABEL: tf.io.FixedLenFeature([], tf.int64),
            example.KEY_ID: tf.io.FixedLenFeature([], tf.string),
            example.KEY_FORMAT: tf.io.FixedLenFeature([], tf.string)}
    for split in ("train", "val"):
        images, labels = load_fashion_mnist_arrays(split, limit=FM_LIMIT)
        files = [str(p) for p in shard_paths(out, manifest, split)]
        seen = 0
        for raw in tf.data.TFRecordDataset(files):
            ex = tf.io.parse_single_example(raw, spec)
            assert ex[example.KEY_FORMAT].numpy() == b"png"
            pixels = tf.io.decode_png(ex[example.KEY_ENCODED], channels=1).numpy()
            image_id = ex[example.KEY_ID].numpy().decode()
            s, folder, name = image_id.split("/")
            i = int(name.split(".")[0])
            assert s == split and folder == CLASS_FOLDERS[labels[i]]
            assert int(ex[example.KEY_LABEL]) == labels[i]
            np.testing.assert_array_equal(pixels[:, :, 0], images[i])
            seen += 1
        assert seen == FM_LIMIT


def test_fashion_mnist_manifest(fm_run, fm_root):
    from lottery.data.fetch import load_fashion_mnist_arrays

    out, _ = fm_run
    manifest = read_manifest(out)
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            p = out / shard["file"]
            assert hashlib.sha256(p.read_bytes()).hexdigest() == shard["sha256"]
            assert p.stat().st_size == shard["bytes"]
            assert shard["file"].startswith(f"{split}-") and shard["file"].endswith(
                f"-of-{len(manifest['splits'][split]['shards']):05d}.tfrecord")
    images, _ = load_fashion_mnist_arrays("train", limit=FM_LIMIT)
    x = images.astype(np.float64) / 255.0
    assert manifest["mean"] == pytest.approx([x.mean()], abs=1e-9)
    assert manifest["std"] == pytest.approx([x.std()], abs=1e-9)
    fp = manifest["input_fingerprint"]
    assert fp["files"] == 2 * FM_LIMIT and len(fp["sha256"]) == 64
    assert fp["bytes"] == sum(p.stat().st_size for p in (fm_root / "train").rglob("*.png")) + \
        sum(p.stat().st_size for p in (fm_root / "val").rglob("*.png"))
    assert manifest["options"]["channels"] == "auto" and manifest["options"]["split"] == "folders"
    assert manifest["spark_version"] and manifest["duration_s"] > 0
    assert manifest["dataset_id"] == dataset_id(manifest["fingerprint"], manifest["options"])
    # byte for byte what every earlier version of the job wrote: experiment ids and results stay
    assert manifest["dataset_id"] == "4a26835173ea"
    assert {s["file"]: s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]} == {
        "train-00000-of-00001.tfrecord": "c30d7b25cd7a6d5427078e4643de64fddd292749c4215a845d17e6f59fa73afd",
        "val-00000-of-00001.tfrecord": "9cb71f75ffbbe8240bc51e4c44eecbaad6c6afa8df394e8724a4a2a71285557e"}
    assert "conversions" not in manifest   # grayscale PNGs to 1 channel: nothing converted
    # the shards, the manifest, and the record that the shards as written match it (lottery.data.verify)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME, ".verified.json"] + [s["file"] for sp in manifest["splits"].values() for s in sp["shards"]])
    assert verify_shards(out, manifest, manifest["splits"])["hashed"] == 0
    assert leftovers(out) == []


def test_sharded_dataset_reads_the_output(fm_run):
    pipeline = pytest.importorskip("lottery.data.pipeline")
    from lottery.data.fetch import load_fashion_mnist_arrays

    out, _ = fm_run
    ds = pipeline.ShardedDataset(out, "val")
    assert ds.num_examples == FM_LIMIT
    assert tuple(ds.image_shape) == (28, 28, 1)
    assert ds.num_classes == 10
    labels = np.concatenate([np.asarray(y) for _, y in ds.eval_batches(32)])
    _, source_labels = load_fashion_mnist_arrays("val", limit=FM_LIMIT)
    assert sorted(labels.tolist()) == sorted(source_labels.tolist())


def _data_files(out: Path) -> dict:
    """The data set's files (not the hidden record of verified shards) with their mtime and inode."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir() if not p.name.startswith(".")}


def test_second_run_is_a_noop(fm_run, fm_root):
    out, _ = fm_run
    before = _data_files(out)
    proc = check(spark_submit("--input", fm_root, "--output", out))
    assert "already up to date" in proc.stdout
    assert "session ready" not in proc.stdout  # checked before a Spark session is created
    assert _data_files(out) == before


def test_a_job_waits_for_another_writing_the_output(fm_run, fm_root, tmp_path):
    """Another job holds the output's lock: with a short --lock-timeout this one fails (exit 2) naming
    the holder; by default it waits (logged), and once the holder is gone finds the output up to date
    and exits 0 without a Spark session."""
    from tests.lockholder import hold_lock

    out, _ = fm_run
    copy = tmp_path / "fm_data"
    shutil.copytree(out, copy)
    holder = hold_lock(copy.parent / f".{copy.name}.lock", 600)
    try:
        refused = check(spark_submit("--input", fm_root, "--output", copy, "--lock-timeout", "0.5"), rc=2)
        assert "another preprocessing job is writing" in refused.output and "the test's holder" in refused.output
        job = subprocess.Popen(spark_submit_cmd("--input", fm_root, "--output", copy), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=spark_env(), cwd=str(ROOT))
        lines = []
        for line in job.stdout:  # the holder finishes once the job says it waits
            lines.append(line)
            if "waiting for" in line:
                holder.kill()
        assert job.wait(timeout=120) == 0, "".join(lines)[-4000:]
    finally:
        holder.kill()
        holder.wait()
    log = "".join(lines)
    assert "waiting for the test's holder" in log
    assert re.search(r"got the lock \S+ after waiting \d+\.\d s", log)
    assert "already up to date" in log and "session ready" not in log


@pytest.mark.slow
def test_option_change_replaces_output_and_killed_run_is_not_data(fm_run, fm_root):
    out, _ = fm_run
    first = read_manifest(out)

    # another encoding: a new output replaces the old one (same pixels, new dataset_id)
    proc = check(spark_submit("--input", fm_root, "--output", out, "--encoding", "raw", "--num-shards", 2))
    assert "already up to date" not in proc.stdout
    raw = check_fashion_mnist_output(out)
    assert raw["encoding"] == "raw" and raw["dataset_id"] != first["dataset_id"]
    assert [len(raw["splits"][s]["shards"]) for s in ("train", "val")] == [2, 2]
    assert leftovers(out) == []

    # a killed run leaves a staging dir with a partial shard and no manifest: not a dataset
    staging = out.with_name(out.name + ".staging-0123456789ab")
    staging.mkdir()
    (staging / "train-00000-of-00001.tfrecord").write_bytes(b"\x00" * 100)
    with pytest.raises(FileNotFoundError, match="no dataset manifest"):
        read_manifest(staging)
    if _has_pipeline():
        from lottery.data.pipeline import ShardedDataset

        with pytest.raises(FileNotFoundError):
            ShardedDataset(staging, "train")

    # back to the first options: the rerun succeeds, cleans the leftovers and reproduces the
    # first output byte for byte (same dataset_id)
    proc = check(spark_submit("--input", fm_root, "--output", out))
    assert "interrupted run" in proc.stdout
    again = check_fashion_mnist_output(out)
    assert again["dataset_id"] == first["dataset_id"]
    assert again["splits"] == first["splits"]
    assert leftovers(out) == []


def _has_pipeline() -> bool:
    try:
        import lottery.data.pipeline  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# bad files and every image mode
# ---------------------------------------------------------------------------------------------

def test_bad_files_are_listed_with_their_reason(bad_run, mixed_root):
    out, proc, expected = bad_run
    root, _ = mixed_root
    manifest = verify_dataset(out, check_records=True)
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(BAD_FILES)
    for path, code in BAD_FILES.items():
        assert reasons[path].startswith(code + ":"), (path, reasons[path])
    total = sum(1 for p in root.rglob("*") if p.is_file())
    good = sum(sp["count"] for sp in manifest["splits"].values())
    assert good == len(expected) and good + len(manifest["skipped"]) == total
    assert manifest["input_fingerprint"]["files"] == total
    assert "skipped 8 unusable files" in proc.stdout


def test_every_mode_is_converted_to_the_majority_channels(bad_run):
    out, proc, expected = bad_run
    manifest = read_manifest(out)
    assert manifest["image_shape"] == [S, S, 3]            # 11 color vs 7 grayscale files
    assert "channels: 3 (majority" in proc.stdout
    assert manifest["classes"] == ["a_color", "b_gray"]
    got = read_all(out)
    assert set(got) == set(expected)
    for image_id, pixels in expected.items():
        assert got[image_id]["label"] == (0 if "/a_color/" in image_id else 1)
        np.testing.assert_array_equal(got[image_id]["pixels"], pixels, err_msg=image_id)
    # derived split: both splits present, deterministic by path hash
    assert manifest["options"]["split"] == {"val_fraction": 0.25, "seed": 1}
    for image_id, rec in got.items():
        split, _ = sharding.assign(image_id, derived_val=True, val_fraction=0.25, seed=1)
        assert rec["split"] == split
    # mean/std of the training split, from the stored pixels
    train = np.stack([r["pixels"] for r in got.values() if r["split"] == "train"]).astype(np.float64) / 255
    assert manifest["mean"] == pytest.approx(train.reshape(-1, 3).mean(axis=0).tolist(), abs=1e-9)
    assert manifest["std"] == pytest.approx(train.reshape(-1, 3).std(axis=0).tolist(), abs=1e-9)


def test_too_many_bad_files_fails_publishes_nothing_and_keeps_its_work(work, mixed_root):
    root, _ = mixed_root
    out = work / "mixed_strict"
    proc = check(spark_submit("--input", root, "--output", out, "--image-size", S), rc=1)
    assert "8 of 26 input files (30.8%) are unusable" in proc.output
    assert "more than --max-bad-fraction=0.01" in proc.output
    assert "train/b_gray/truncated.png: truncated" in proc.output
    assert not out.exists() and leftovers(out) == [out.name + ".partial"]

    # accepting the bad files reuses every shard written (the bound is not part of the data)
    proc = check(spark_submit("--input", root, "--output", out, "--image-size", S, "--max-bad-fraction", 0.5))
    assert "resuming: 2 of 2 shards" in proc.stdout
    assert len(read_manifest(out)["skipped"]) == 8
    assert leftovers(out) == []


def test_mixed_sizes_need_image_size(work, mixed_root):
    root, _ = mixed_root
    out = work / "mixed_native"
    proc = check(spark_submit("--input", root, "--output", out, "--max-bad-fraction", 0.5), rc=1)
    assert "different sizes" in proc.output and "--image-size" in proc.output
    assert not out.exists() and leftovers(out) == []


def test_empty_class_fails(work):
    root = work / "empty_class"
    (root / "train" / "good").mkdir(parents=True)
    (root / "train" / "broken").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "train" / "good" / f"{i}.png")
    (root / "train" / "broken" / "empty.png").write_bytes(b"")
    out = work / "empty_class_data"
    proc = check(spark_submit("--input", root, "--output", out, "--max-bad-fraction", 0.5,
                              "--val-fraction", 0.01), rc=1)
    assert "1 classes have no usable training images: broken" in proc.output
    assert not out.exists() and leftovers(out) == [out.name + ".partial"]   # the work, for a rerun


# ---------------------------------------------------------------------------------------------
# input errors: clear message, exit 2, nothing written
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing-root", "no-train", "no-class-folders", "output-is-file"])
def test_input_errors_write_nothing(tmp_path, case):
    root, out = tmp_path / "in", tmp_path / "out"
    message = {
        "missing-root": "does not exist",
        "no-train": "has no train/ folder",
        "no-class-folders": "has no class folders",
        "output-is-file": "exists and is not a directory",
    }[case]
    if case != "missing-root":
        root.mkdir()
    if case in ("no-class-folders", "output-is-file"):
        (root / "train").mkdir()
        (root / "train" / "loose.png").write_bytes(b"x")
    if case == "output-is-file":
        (root / "train" / "c").mkdir()
        out.write_text("precious")
    before = sorted(p.name for p in tmp_path.iterdir())
    # in-process (fast) and through spark-submit (the real thing) for one case
    with pytest.raises(InputError, match=message):
        job_args.validate(job_args.parse_args(["--input", str(root), "--output", str(out)]))
    if case in ("missing-root", "output-is-file"):
        proc = check(spark_submit("--input", root, "--output", out), rc=2)
        assert message in proc.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "output-is-file":
        assert out.read_text() == "precious"


def test_validation_refuses_dangerous_outputs(tmp_path):
    root = tmp_path / "in"
    (root / "train" / "c").mkdir(parents=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    cases = {str(root / "train" / "out"): "inside the input root",
             str(tmp_path): "inside the output",
             str(foreign): "without manifest.json"}
    for out, message in cases.items():
        with pytest.raises(InputError, match=message):
            job_args.validate(job_args.parse_args(["--input", str(root), "--output", out]))
    for bad in (["--val-fraction", "0"], ["--jpeg-quality", "0"], ["--image-size", "0"], ["--num-shards", "0"],
                ["--max-bad-fraction", "2"]):
        with pytest.raises(InputError):
            job_args.validate(job_args.parse_args(["--input", str(root), "--output", str(tmp_path / "o"), *bad]))


# ---------------------------------------------------------------------------------------------
# pure functions (no Spark)
# ---------------------------------------------------------------------------------------------

def test_split_is_stable_when_files_are_added():
    names = [f"train/c{i % 3}/{i:05d}.jpg" for i in range(2000)]
    kw = dict(derived_val=True, val_fraction=0.2, seed=5)
    splits = {n: sharding.assign(n, **kw)[0] for n in names}
    more = names + [f"train/c{i % 3}/new_{i}.jpg" for i in range(500)]
    assert all(sharding.assign(n, **kw)[0] == splits[n] for n in more[:2000])
    assert 0.15 < sum(s == "val" for s in splits.values()) / len(names) < 0.25
    other_seed = {n: sharding.assign(n, derived_val=True, val_fraction=0.2, seed=6)[0] for n in names}
    assert other_seed != splits
    assert sharding.assign("val/c1/x.jpg", derived_val=False, val_fraction=0.2, seed=5) == ("val", "c1")
    assert sharding.assign("train/x.jpg", derived_val=False, val_fraction=0.2, seed=5) == ("train", None)


def test_shard_plan_covers_every_partition():
    plan = sharding.ShardPlan.of(("train", "val"), (5, 2))
    seen = set()
    for i in range(3000):
        key = sharding.shard_key(f"train/c/{i}.jpg")
        p = plan.partition("train", key)
        assert 0 <= p < 5
        seen.add(p)
        assert plan.partition("val", key) in (5, 6)
    assert seen == set(range(5))
    assert [plan.shard_of(p) for p in range(7)] == [("train", i, 5) for i in range(5)] + [("val", 0, 2), ("val", 1, 2)]


def test_transform_resize_methods():
    x = np.arange(20 * 40 * 3, dtype=np.uint32).reshape(20, 40, 3).astype(np.uint8)
    data = _save(Image.fromarray(x), "PNG")
    crop = images.transform_image(data, images.Transform(channels=3, size=20))
    np.testing.assert_array_equal(crop, x[:, 10:30])                      # shorter side == S: pure crop
    small = images.transform_image(data, images.Transform(channels=1, size=10))
    assert small.shape == (10, 10, 1)
    exact = images.transform_image(data, images.Transform(channels=3, size=8, resize="exact"))
    assert exact.shape == (8, 8, 3)
    native = images.transform_image(data, images.Transform(channels=3, size=None, native=(40, 20)))
    np.testing.assert_array_equal(native, x)
    with pytest.raises(images.BadImage, match="size-mismatch"):
        images.transform_image(data, images.Transform(channels=3, size=None, native=(28, 28)))
    # a large JPEG takes the DCT-scaled (draft) decode and still gives the right size
    big = _save(Image.fromarray(np.full((600, 800, 3), 128, np.uint8)), "JPEG")
    out = images.transform_image(big, images.Transform(channels=3, size=64))
    assert out.shape == (64, 64, 3) and abs(int(out.mean()) - 128) <= 2


def test_histogram_stats_match_channel_stats():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    h = images.HistogramStats(3)
    ref = ChannelStats(3)
    for im in imgs:
        h.update(im)
        ref.update(im)
    st = h.to_channel_stats()
    assert st.mean() == pytest.approx(ref.mean()) and st.std() == pytest.approx(ref.std())
    assert json.dumps(st.to_dict()) == json.dumps(ref.to_dict())


def test_imagenet_odd_files_are_decoded_by_content_and_counted(work):
    """ImageNet's odd files: a PNG named .JPEG, a CMYK JPEG and a grayscale JPEG become RGB
    records with the right colours, and the manifest counts each conversion."""
    root = work / "odd_files"
    colours = {"cmyk": (200, 30, 30), "png": (10, 200, 30), "gray": (90, 90, 90)}
    a, b = root / "train" / "n01440764", root / "train" / "n01443537"
    for d in (a, b):
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (40 * i, 100, 150)).save(d / f"{d.name}_{i}.JPEG", quality=95)
    Image.new("RGB", (40, 30), colours["cmyk"]).convert("CMYK").save(a / "cmyk.JPEG", quality=95)
    Image.new("RGB", (40, 30), colours["png"]).save(a / "png.JPEG", format="PNG")
    Image.new("L", (40, 30), colours["gray"][0]).save(a / "gray.JPEG", quality=95)
    out = work / "odd_files_data"
    proc = check(spark_submit("--input", root, "--output", out, "--image-size", 16, "--channels", 3,
                              "--val-fraction", 0.01))
    manifest = read_manifest(out)
    assert manifest["conversions"] == {"CMYK to RGB": 1, "L to RGB": 1, "PNG named .JPEG": 1}
    assert "converted: CMYK to RGB 1, L to RGB 1, PNG named .JPEG 1" in proc.stdout
    assert manifest["skipped"] == [] and sum(s["count"] for s in manifest["splits"].values()) == 9
    got = read_all(out)
    for name, colour in colours.items():
        pixels = got[f"train/n01440764/{name}.JPEG"]["pixels"]
        assert pixels.shape == (16, 16, 3)
        assert np.abs(pixels.reshape(-1, 3).mean(axis=0) - colour).max() < 8, (name, pixels[0, 0])
