"""lottery.data.tfrecord / example / manifest: the pure-Python format, checked against TensorFlow's
own reader (datasets written with tests.datasets.write_dataset)."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from lottery.data import example, manifest, tfrecord
from lottery.data import ChannelStats, CorruptDataError, DataFormatError
from lottery.files import sha256_file
from tests.datasets import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TF_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/channels": tf.io.FixedLenFeature([], tf.int64),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/id": tf.io.FixedLenFeature([], tf.string),
}


def _splits(n_train=12, n_val=5, shape=(6, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        out[split] = [(rng.integers(0, 256, shape, dtype=np.uint8), int(i % 4), f"{split}/c{i % 4}/img_{i}.png")
                      for i in range(n)]
    return out


CLASSES = ["a", "b", "c", "d"]


# ---------------------------------------------------------------- Example codec

def test_example_round_trip():
    x = dict(encoded=bytes(range(256)) * 3, label=7, height=28, width=31, channels=3, encoding="png",
             image_id="train/07_bag/ünïcode 01.png")
    assert example.decode_example(example.encode_example(**x)) == x
    y = dict(x, encoded=b"", label=0, encoding="raw", image_id="")
    assert example.decode_example(example.encode_example(**y)) == y


def test_example_is_byte_identical_to_protobuf_and_parsed_by_tf():
    features = {"a": [-5, 3, 1 << 40], "b": [1.5, -2.0], "c": [b"x", b""], "d": []}
    ref = tf.train.Example(features=tf.train.Features(feature={
        "a": tf.train.Feature(int64_list=tf.train.Int64List(value=[-5, 3, 1 << 40])),
        "b": tf.train.Feature(float_list=tf.train.FloatList(value=[1.5, -2.0])),
        "c": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x", b""])),
        "d": tf.train.Feature(int64_list=tf.train.Int64List(value=[])),
    }))
    ours = example.serialize_example(features)
    assert tf.train.Example.FromString(ours) == ref
    assert example.parse_example_features(ref.SerializeToString()) == features
    record = example.encode_example(encoded=b"\x00\xff", label=9, height=2, width=1, channels=1, encoding="raw",
                              image_id="x/y.raw")
    parsed = tf.io.parse_single_example(record, TF_FEATURES)
    assert parsed["image/class/label"].numpy() == 9
    assert parsed["image/encoded"].numpy() == b"\x00\xff"
    assert parsed["image/id"].numpy() == b"x/y.raw"
    assert parsed["image/format"].numpy() == b"raw"


def test_decoder_accepts_unpacked_int64_and_unknown_fields():
    # Int64List value 5 unpacked (tag 0x08), plus an unknown varint field 7 in the Feature
    int64_list = b"\x08\x05"
    feature = b"\x1a" + bytes([len(int64_list)]) + int64_list + b"\x38\x01"
    entry = b"\x0a\x01k" + b"\x12" + bytes([len(feature)]) + feature
    features = b"\x0a" + bytes([len(entry)]) + entry
    message = b"\x0a" + bytes([len(features)]) + features
    assert example.parse_example_features(message) == {"k": [5]}


def test_decode_example_rejects_missing_feature_and_garbage():
    record = example.serialize_example({"image/encoded": [b"x"], "image/class/label": [1]})
    with pytest.raises(DataFormatError, match="image/format"):
        example.decode_example(record)
    with pytest.raises(DataFormatError):
        example.parse_example_features(b"\x0a\x50abc")  # length runs past the end


# ---------------------------------------------------------------- crc + framing

def test_crc32c_known_values_and_python_fallback():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    data = os.urandom(1000)
    assert tfrecord.crc32c_py(data) == tfrecord.crc32c(data)
    assert tfrecord.crc32c_py(b"123456789") == 0xE3069283


def test_tfrecord_framing_is_byte_identical_to_tf_writer(tmp_path):
    recs = [b"", b"hello", os.urandom(3000)]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for r in recs:
            w.write(r)
    with tfrecord.TFRecordWriter(tmp_path / "py.tfrecord") as w:
        for r in recs:
            w.write(r)
    assert (tmp_path / "tf.tfrecord").read_bytes() == (tmp_path / "py.tfrecord").read_bytes()
    assert list(tfrecord.read_records(tmp_path / "tf.tfrecord")) == recs
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "py.tfrecord"))] == recs
    assert w.records == 3 and w.bytes == (tmp_path / "py.tfrecord").stat().st_size
    assert w.sha256() == sha256_file(tmp_path / "py.tfrecord")


def _write_three(path):
    recs = [b"a" * 10, b"b" * 20, b"c" * 30]
    with tfrecord.TFRecordWriter(path) as w:
        for r in recs:
            w.write(r)
    return recs


@pytest.mark.parametrize("where", ["data", "data_crc", "length", "length_crc"])
def test_corrupt_record_is_detected_with_file_and_offset(tmp_path, where):
    path = tmp_path / "shard.tfrecord"
    _write_three(path)
    second = 16 + 10  # byte offset of the second record
    pos = {"data": second + 12 + 5, "data_crc": second + 12 + 20, "length": second, "length_crc": second + 9}[where]
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))
    it = tfrecord.read_records(path)
    assert next(it) == b"a" * 10
    with pytest.raises(CorruptDataError) as e:
        next(it)
    assert str(path) in str(e.value) and f"byte offset {second}" in str(e.value)
    assert e.value.offset == second and e.value.path == str(path)
    assert isinstance(e.value, ValueError)


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "shard.tfrecord"
    _write_three(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CorruptDataError, match=r"shard\.tfrecord: truncated record at byte offset 62"):
        list(tfrecord.read_records(path))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CorruptDataError, match="truncated record header at byte offset 26"):
        list(tfrecord.read_records(path))


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("shape", [(5, 7, 1), (5, 7, 3), (4, 4, 4)])
@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_image_lossless_round_trip(shape, encoding):
    x = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(example.decode_image(example.encode_image(x, encoding), encoding, shape), x)


def test_jpeg_is_close_and_gray_2d_is_accepted():
    x = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    y = example.decode_image(example.encode_image(x, "jpeg", jpeg_quality=95), "jpeg", (32, 32, 1))
    assert y.shape == (32, 32, 1) and np.abs(y[:, :, 0].astype(int) - x).mean() < 2
    with pytest.raises(ValueError):
        example.encode_image(x.astype(np.float32), "png")


# ---------------------------------------------------------------- channel stats

def test_channel_stats_match_numpy_and_merge():
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (20, 4, 5, 3), dtype=np.uint8)
    a, b = ChannelStats(3), ChannelStats(3)
    for im in imgs[:7]:
        a.update(im)
    for im in imgs[7:]:
        b.update(im)
    m = a.merge(b)
    ref = imgs.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(m.mean(), ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std(), ref.std(0), rtol=1e-9)
    assert (a + b).to_dict() == ChannelStats.from_dict(json.loads(json.dumps(m.to_dict()))).to_dict()
    assert ChannelStats(3).update(imgs).to_dict() == m.to_dict()


# ---------------------------------------------------------------- dataset + manifest

def test_shard_name():
    assert manifest.shard_name("train", 3, 12) == "train-00003-of-00012.tfrecord"
    with pytest.raises(ValueError):
        manifest.shard_name("train", 12, 12)


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_write_dataset_is_read_bit_exactly_by_tensorflow(tmp_path, encoding):
    splits = _splits()
    data_dir = tmp_path / "ds"
    m = write_dataset(data_dir, splits, CLASSES, encoding=encoding, num_shards={"train": 3, "val": 1})
    assert m == manifest.read_manifest(data_dir)
    assert sorted(os.listdir(data_dir)) == sorted(["manifest.json", "val-00000-of-00001.tfrecord"]
                                                  + [manifest.shard_name("train", i, 3) for i in range(3)])
    assert [s["records"] for s in m["splits"]["train"]["shards"]] == [4, 4, 4]
    assert m["splits"]["train"]["per_class"] == [3, 3, 3, 3] and m["splits"]["val"]["count"] == 5
    assert m["image_shape"] == [6, 5, 3] and m["encoding"] == encoding and m["spark_version"] is None
    for split, examples in splits.items():
        files = [str(data_dir / s["file"]) for s in m["splits"][split]["shards"]]
        got = list(tf.data.TFRecordDataset(files))
        assert len(got) == len(examples)
        for serialized, (pixels, label, image_id) in zip(got, examples):
            f = tf.io.parse_single_example(serialized, TF_FEATURES)
            if encoding == "png":
                img = tf.io.decode_png(f["image/encoded"], channels=3)
            else:
                img = tf.reshape(tf.io.decode_raw(f["image/encoded"], tf.uint8), [6, 5, 3])
            assert np.array_equal(img.numpy(), pixels)
            assert f["image/class/label"].numpy() == label
            assert f["image/id"].numpy().decode() == image_id
            assert f["image/format"].numpy().decode() == encoding
            assert (f["image/height"].numpy(), f["image/width"].numpy(), f["image/channels"].numpy()) == (6, 5, 3)
    # the pure-Python reader agrees
    images, labels = manifest.read_split_arrays(data_dir, "val")
    assert np.array_equal(images, np.stack([e[0] for e in splits["val"]]))
    assert labels.tolist() == [e[1] for e in splits["val"]]
    # mean/std: training split only, [0, 1] scale
    ref = np.stack([e[0] for e in splits["train"]]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(m["mean"], ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m["std"], ref.std(0), rtol=1e-9)
    assert manifest.verify_dataset(data_dir, check_records=True)["dataset_id"] == m["dataset_id"]


def test_write_dataset_atomic_fingerprint_and_overwrite(tmp_path):
    splits = _splits()
    m1 = write_dataset(tmp_path / "one", splits, CLASSES, num_shards=2)
    m2 = write_dataset(tmp_path / "two", splits, CLASSES, num_shards=2)
    assert m1["fingerprint"] == m2["fingerprint"] and m1["dataset_id"] == m2["dataset_id"]
    assert len(m1["dataset_id"]) == 12
    m3 = write_dataset(tmp_path / "three", splits, CLASSES, num_shards=3)  # other options
    assert m3["dataset_id"] != m1["dataset_id"]
    splits["train"][0][0][0, 0, 0] ^= 1  # other content
    m4 = write_dataset(tmp_path / "four", splits, CLASSES, num_shards=2)
    assert m4["fingerprint"] != m1["fingerprint"]
    with pytest.raises(FileExistsError, match="one"):
        write_dataset(tmp_path / "one", splits, CLASSES, num_shards=2)
    m5 = write_dataset(tmp_path / "one", splits, CLASSES, num_shards=2, overwrite=True)
    assert manifest.read_manifest(tmp_path / "one")["fingerprint"] == m5["fingerprint"] == m4["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four", "one", "three", "two"]  # no tmp left


def test_write_dataset_failure_leaves_nothing(tmp_path):
    splits = _splits()
    splits["val"].append((np.zeros((6, 5, 3), np.uint8), 99, "bad"))
    with pytest.raises(ValueError, match="label 99"):
        write_dataset(tmp_path / "ds", splits, CLASSES)
    assert list(tmp_path.iterdir()) == []


def test_verify_dataset_detects_tampered_shard(tmp_path):
    m = write_dataset(tmp_path / "ds", _splits(), CLASSES, num_shards=2)
    shard = tmp_path / "ds" / m["splits"]["train"]["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[40] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="train-00001-of-00002.tfrecord: damaged shard of split .train.: its sha256 differs from manifest.json"):
        manifest.verify_dataset(tmp_path / "ds")
    with pytest.raises(CorruptDataError, match="train-00001-of-00002.tfrecord: corrupt record at byte offset 0"):
        list(manifest.iter_split(tmp_path / "ds", "train"))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="train-00001-of-00002.tfrecord"):
        manifest.verify_dataset(tmp_path / "ds")


def _edit_manifest(data_dir, edit):
    path = data_dir / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("field, edit", [
    ("fingerprint", lambda m: m.pop("fingerprint")),
    ("format_version", lambda m: m.update(format_version=99)),
    ("classes", lambda m: m.update(classes=[])),
    ("image_shape", lambda m: m.update(image_shape=[6, 5])),
    ("encoding", lambda m: m.update(encoding="gif")),
    ("mean", lambda m: m.update(mean=[0.5])),
    ("std", lambda m: m.update(std=[0.1, -0.1, 0.2])),
    ("splits.train.count", lambda m: m["splits"]["train"].update(count="12")),
    ("splits.val.per_class", lambda m: m["splits"]["val"].update(per_class=[1, 1, 1, 1])),
    ("splits.train.shards[1].sha256", lambda m: m["splits"]["train"]["shards"][1].pop("sha256")),
    ("splits.train.shards[0].file", lambda m: m["splits"]["train"]["shards"][0].update(file="../x")),
    ("splits.train.shards", lambda m: m["splits"]["train"]["shards"].pop()),
    ("spark_version", lambda m: m.update(spark_version=4)),
])
def test_manifest_validation_names_file_and_field(tmp_path, field, edit):
    write_dataset(tmp_path / "ds", _splits(), CLASSES, num_shards=2)
    path = _edit_manifest(tmp_path / "ds", edit)
    with pytest.raises(DataFormatError) as e:
        manifest.read_manifest(tmp_path / "ds")
    assert e.value.field == field
    assert str(path) in str(e.value) and repr(field) in str(e.value)


def test_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        manifest.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="manifest.json: not valid JSON"):
        manifest.read_manifest(tmp_path)


def test_write_manifest_is_atomic(tmp_path):
    m = write_dataset(tmp_path / "ds", _splits(), CLASSES, num_shards=1)
    m["options"]["note"] = "rewritten"
    manifest.write_manifest(tmp_path / "ds", m)
    assert manifest.read_manifest(tmp_path / "ds")["options"]["note"] == "rewritten"
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".")]


def test_record_format_and_fetch_do_not_import_tensorflow():
    code = ("import sys; import lottery.data, lottery.data.tfrecord, lottery.data.example, "
            "lottery.data.manifest, lottery.data.epochs, lottery.data.fetch, lottery.files; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def test_frame_layout():
    frame = tfrecord.frame_record(b"xyz")
    assert struct.unpack("<Q", frame[:8])[0] == 3 and frame[12:15] == b"xyz" and len(frame) == 19


def test_publish_dir_swaps_and_puts_the_old_copy_back_on_failure(tmp_path, monkeypatch):
    from lottery.files import publish_dir

    target, staging = tmp_path / "ds", tmp_path / "ds.staging"
    for d, text in ((target, "old"), (staging, "new")):
        d.mkdir()
        (d / "f").write_text(text)
    publish_dir(staging, target)
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    staging.mkdir()
    (staging / "f").write_text("newer")
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="rename failed"):
        publish_dir(staging, target)
    monkeypatch.undo()
    assert (target / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.staging"]
