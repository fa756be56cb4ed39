"""lottery.data.fetch: Fashion-MNIST (Debian package) -> PNG folder, and the test helpers."""
import gzip
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lottery.data import fetch
from lottery.data import manifest
from tests.datasets import make_fashion_mnist_shards, make_synthetic_shards

SOURCE = Path(fetch.DEFAULT_SOURCE_DIR)
needs_source = pytest.mark.skipif(not SOURCE.is_dir(), reason="apt-get install -y dataset-fashion-mnist")


def test_class_folders_sort_in_label_order():
    assert fetch.CLASS_FOLDERS[0] == "00_tshirt_top" and fetch.CLASS_FOLDERS[9] == "09_ankle_boot"
    assert fetch.CLASS_FOLDERS[1] == "01_trouser"
    assert sorted(fetch.CLASS_FOLDERS) == fetch.CLASS_FOLDERS and len(set(fetch.CLASS_FOLDERS)) == 10


def _write_idx(path, arr, magic):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def test_load_arrays_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 7), ("t10k", 3))}
    for s, x in imgs.items():
        _write_idx(tmp_path / f"{s}-images-idx3-ubyte.gz", x, 0x803)
        _write_idx(tmp_path / f"{s}-labels-idx1-ubyte.gz", np.arange(len(x)) % 10, 0x801)
    x, y = fetch.load_fashion_mnist_arrays("train", source_dir=tmp_path)
    assert np.array_equal(x, imgs["train"]) and y.tolist() == list(range(7)) and y.dtype == np.int64
    x, y = fetch.load_fashion_mnist_arrays("val", limit=2, source_dir=tmp_path)
    assert np.array_equal(x, imgs["t10k"][:2]) and y.tolist() == [0, 1]
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7), 0x803)
    with pytest.raises(ValueError, match="bad IDX magic"):
        fetch.load_fashion_mnist_arrays("train", source_dir=tmp_path)


def test_missing_source_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fetch.load_fashion_mnist_arrays("train", source_dir=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fetch.export_fashion_mnist(tmp_path / "out", limit=3, source_dir=tmp_path)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".out.lock"]  # no temporary directory left behind (the lock stays)


@needs_source
def test_real_arrays():
    x, y = fetch.load_fashion_mnist_arrays("train", limit=100)
    assert x.shape == (100, 28, 28) and x.dtype == np.uint8 and y.shape == (100,)
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) > 5
    xv, _ = fetch.load_fashion_mnist_arrays("val")
    assert xv.shape == (10000, 28, 28)


@needs_source
def test_export_with_limit_writes_counts_labels_pixels_and_is_idempotent(tmp_path, caplog):
    out = tmp_path / "fmnist"
    with caplog.at_level(logging.INFO, logger="lottery.data"):
        s = fetch.export_fashion_mnist(out, limit=40)
    assert s["train"] == 40 and s["val"] == 40 and not s["already_exported"] and s["limit"] == 40
    assert "(50%)" in caplog.text and "(100%)" in caplog.text
    for split in ("train", "val"):
        x, y = fetch.load_fashion_mnist_arrays(split, limit=40)
        assert sorted(p.name for p in (out / split).iterdir()) == fetch.CLASS_FOLDERS
        files = sorted((out / split).glob("*/*.png"))
        assert len(files) == 40
        assert s["per_class"][split] == np.bincount(y, minlength=10).tolist()
        for f in files:
            i = int(f.stem)
            assert f.parent.name == fetch.CLASS_FOLDERS[y[i]]
            with Image.open(f) as im:
                assert im.mode == "L" and np.array_equal(np.asarray(im), x[i])
    marker = json.loads((out / ".complete.json").read_text())
    assert marker["counts"] == {"train": 40, "val": 40} and marker["limit"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fmnist.lock", "fmnist"]  # atomic: no tmp sibling left

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lottery.data"):
        again = fetch.export_fashion_mnist(out, limit=40)
    assert again["already_exported"] and again["train"] == 40
    assert "already exported" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes

    other = fetch.export_fashion_mnist(out, limit=5, progress=False)  # another limit: replaced
    assert not other["already_exported"] and len(list((out / "val").glob("*/*.png"))) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fmnist.lock", "fmnist"]


@needs_source
def test_export_refuses_to_replace_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="mine"):
        fetch.export_fashion_mnist(tmp_path / "mine", limit=2)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert fetch.export_fashion_mnist(tmp_path / "empty", limit=2, progress=False)["train"] == 2


@needs_source
def test_make_fashion_mnist_shards(tmp_path):
    d = make_fashion_mnist_shards(tmp_path, 30, 10)
    m = manifest.read_manifest(d)
    assert m["image_shape"] == [28, 28, 1] and m["classes"] == fetch.CLASS_FOLDERS
    x, y = manifest.read_split_arrays(d, "train")
    rx, ry = fetch.load_fashion_mnist_arrays("train", limit=30)
    assert np.array_equal(x[:, :, :, 0], rx) and np.array_equal(y, ry)
    assert m["splits"]["val"]["count"] == 10


def test_make_synthetic_shards_is_deterministic(tmp_path):
    a = make_synthetic_shards(tmp_path / "a", 20, 6, shape=(8, 8, 1), num_classes=3, seed=0)
    b = make_synthetic_shards(tmp_path / "b", 20, 6, shape=(8, 8, 1), num_classes=3, seed=0)
    assert manifest.read_manifest(a)["fingerprint"] == manifest.read_manifest(b)["fingerprint"]
    _, y = manifest.read_split_arrays(a, "train")
    assert sorted(set(y.tolist())) == [0, 1, 2]
