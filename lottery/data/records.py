"""The on-disk record format, in pure Python (no TensorFlow).

Spark executors, the TF-less JAX machine, tests and small tools all use this module; the
TensorFlow reader (`lottery.data.pipeline`) reads exactly what it writes.  See
`docs/data-format.md` for the format itself.

Contents:

* `encode_example` / `decode_example`: a hand-written protobuf encoder/decoder for the
  `tf.train.Example` messages of this format (plus a generic `parse_example_features`).
* `encode_image` / `decode_image`: png (lossless), jpeg, raw (the bytes of the uint8 HWC array).
* `TFRecordWriter` / `read_records`: TFRecord framing with masked crc32c; a bad CRC or a
  truncated file raises `CorruptDataError` naming the file and the byte offset.
* `ChannelStats`: mergeable per-channel pixel statistics (mean/std on the [0, 1] scale).
* `shard_name`, `write_shard`, `build_manifest`, `write_manifest`, `read_manifest`,
  `verify_dataset`, `write_dataset`, `iter_split`, `read_split_arrays`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

import numpy as np

FORMAT_VERSION = 1
ENCODINGS = ("png", "jpeg", "raw")
MANIFEST_NAME = "manifest.json"

# Feature keys of one Example (the contract; docs/data-format.md).
KEY_ENCODED = "image/encoded"
KEY_FORMAT = "image/format"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
KEY_CHANNELS = "image/channels"
KEY_LABEL = "image/class/label"
KEY_ID = "image/id"

# Default number of examples per shard when `num_shards` is not given.
EXAMPLES_PER_SHARD = 5000
MAX_AUTO_SHARDS = 256


class DataFormatError(ValueError):
    """A manifest or record does not follow the format; the message names the file and field."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, field: str | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.field = field


class CorruptDataError(ValueError):
    """A TFRecord file failed a CRC check or is truncated; the message names the file and offset."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.offset = offset


# --------------------------------------------------------------------------------------------
# crc32c (Castagnoli) and the TFRecord mask
# --------------------------------------------------------------------------------------------

def _make_crc32c_py():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)

    def crc32c_py(data: bytes) -> int:
        crc = 0xFFFFFFFF
        for b in memoryview(data).cast("B"):
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

    return crc32c_py


crc32c_py = _make_crc32c_py()

try:  # the C implementation: ~GB/s
    import google_crc32c as _gcrc

    def crc32c(data: bytes) -> int:
        return _gcrc.value(bytes(data) if not isinstance(data, (bytes, bytearray)) else data)

    CRC32C_IMPLEMENTATION = "google_crc32c/" + str(getattr(_gcrc, "implementation", "?"))
except ImportError:  # pragma: no cover - exercised only without the package
    crc32c = crc32c_py
    CRC32C_IMPLEMENTATION = "python"

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked crc32c: rotate right by 15 bits and add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Protobuf wire format (just what tf.train.Example needs)
# --------------------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    if value < 0:  # int64 two's complement, always 10 bytes
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_delimited(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _feature_bytes(values: Sequence[bytes]) -> bytes:
    bytes_list = b"".join(_len_delimited(1, v) for v in values)
    return _len_delimited(1, bytes_list)  # Feature.bytes_list = 1


def _feature_int64(values: Sequence[int]) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    int64_list = _len_delimited(1, packed) if values else b""  # packed repeated int64
    return _len_delimited(3, int64_list)  # Feature.int64_list = 3


def _feature_float(values: Sequence[float]) -> bytes:
    packed = struct.pack("<%df" % len(values), *values)
    float_list = _len_delimited(1, packed) if values else b""
    return _len_delimited(2, float_list)  # Feature.float_list = 2


def serialize_example(features: Mapping[str, Any]) -> bytes:
    """Serialise `{key: list of bytes | list of int | list of float}` as a tf.train.Example.

    The value type picks the list kind (bytes/str -> BytesList, int -> Int64List, float ->
    FloatList).  Keys are written in sorted order, so the output is deterministic.
    """
    entries = []
    for key in sorted(features):
        values = features[key]
        if isinstance(values, (bytes, str, int, float, np.integer, np.floating)):
            values = [values]
        values = list(values)
        if values and isinstance(values[0], (bytes, bytearray, str)):
            feature = _feature_bytes([v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values])
        elif values and isinstance(values[0], (float, np.floating)):
            feature = _feature_float([float(v) for v in values])
        else:
            feature = _feature_int64([int(v) for v in values])
        entry = _len_delimited(1, key.encode("utf-8")) + _len_delimited(2, feature)
        entries.append(_len_delimited(1, entry))  # Features.feature (map entry) = 1
    return _len_delimited(1, b"".join(entries))  # Example.features = 1


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise DataFormatError("malformed protobuf: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DataFormatError("malformed protobuf: varint too long")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) where value is an int (varint/fixed) or a
    (start, end) slice for length-delimited fields."""
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
        elif wire == 1:
            if pos + 8 > end:
                raise DataFormatError("malformed protobuf: truncated fixed64")
            value = bytes(buf[pos:pos + 8])
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise DataFormatError("malformed protobuf: length-delimited field runs past the end")
            value = (pos, pos + length)
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise DataFormatError("malformed protobuf: truncated fixed32")
            value = bytes(buf[pos:pos + 4])
            pos += 4
        else:
            raise DataFormatError(f"malformed protobuf: unsupported wire type {wire}")
        yield field, wire, value


def _to_int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_feature(buf: memoryview, start: int, end: int) -> list:
    values: list = []
    for field, wire, val in _fields(buf, start, end):
        if wire != 2 or field not in (1, 2, 3):
            continue
        s, e = val
        for f2, w2, v2 in _fields(buf, s, e):
            if f2 != 1:
                continue
            if field == 1:  # BytesList
                if w2 != 2:
                    raise DataFormatError("malformed Example: BytesList value is not length-delimited")
                values.append(bytes(buf[v2[0]:v2[1]]))
            elif field == 2:  # FloatList
                if w2 == 5:
                    values.append(struct.unpack("<f", v2)[0])
                elif w2 == 2:
                    n = (v2[1] - v2[0]) // 4
                    values.extend(struct.unpack("<%df" % n, bytes(buf[v2[0]:v2[0] + 4 * n])))
                else:
                    raise DataFormatError("malformed Example: bad FloatList encoding")
            else:  # Int64List
                if w2 == 0:
                    values.append(_to_int64(v2))
                elif w2 == 2:
                    pos, pend = v2
                    while pos < pend:
                        v, pos = _read_varint(buf, pos, pend)
                        values.append(_to_int64(v))
                else:
                    raise DataFormatError("malformed Example: bad Int64List encoding")
    return values


def parse_example_features(record: bytes) -> dict[str, list]:
    """Generic tf.train.Example decoder: `{key: [values]}` (bytes, int or float values)."""
    buf = memoryview(record)
    out: dict[str, list] = {}
    for field, wire, val in _fields(buf, 0, len(buf)):
        if field != 1 or wire != 2:
            continue
        for f2, w2, v2 in _fields(buf, *val):  # Features
            if f2 != 1 or w2 != 2:
                continue
            key = None
            feature: list = []
            for f3, w3, v3 in _fields(buf, *v2):  # map entry
                if f3 == 1 and w3 == 2:
                    key = bytes(buf[v3[0]:v3[1]]).decode("utf-8")
                elif f3 == 2 and w3 == 2:
                    feature = _parse_feature(buf, *v3)
            if key is None:
                raise DataFormatError("malformed Example: feature map entry without a key")
            out[key] = feature
    return out


def encode_example(*, encoded: bytes, label: int, height: int, width: int, channels: int,
                   encoding: str, image_id: str) -> bytes:
    """One image as a serialised tf.train.Example with this format's feature keys."""
    if encoding not in ENCODINGS:
        raise DataFormatError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}", field="encoding")
    return serialize_example({
        KEY_ENCODED: [bytes(encoded)],
        KEY_FORMAT: [encoding.encode("ascii")],
        KEY_HEIGHT: [int(height)],
        KEY_WIDTH: [int(width)],
        KEY_CHANNELS: [int(channels)],
        KEY_LABEL: [int(label)],
        KEY_ID: [image_id.encode("utf-8")],
    })


_EXAMPLE_FIELDS = {
    KEY_ENCODED: ("encoded", bytes), KEY_FORMAT: ("encoding", bytes), KEY_HEIGHT: ("height", int),
    KEY_WIDTH: ("width", int), KEY_CHANNELS: ("channels", int), KEY_LABEL: ("label", int),
    KEY_ID: ("image_id", bytes),
}


def decode_example(record: bytes) -> dict:
    """Inverse of `encode_example`: returns its keyword arguments as a dict."""
    features = parse_example_features(record)
    out: dict = {}
    for key, (name, kind) in _EXAMPLE_FIELDS.items():
        values = features.get(key)
        if not values or len(values) != 1:
            raise DataFormatError(f"Example feature {key!r}: expected exactly one value, got {values!r:.80}",
                                  field=key)
        value = values[0]
        if not isinstance(value, bytes if kind is bytes else int):
            raise DataFormatError(f"Example feature {key!r}: wrong value type {type(value).__name__}", field=key)
        out[name] = value
    out["encoding"] = out["encoding"].decode("ascii")
    out["image_id"] = out["image_id"].decode("utf-8")
    return out


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _as_hwc(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3:
        raise ValueError(f"expected an [H, W, C] image, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    return pixels


def encode_image(pixels: np.ndarray, encoding: str = "png", jpeg_quality: int = 95) -> bytes:
    """Encode a uint8 [H, W, C] (or [H, W]) image. png is lossless; raw is the array's bytes."""
    pixels = _as_hwc(pixels)
    if encoding == "raw":
        return np.ascontiguousarray(pixels).tobytes()
    from PIL import Image

    c = pixels.shape[2]
    if c not in _PIL_MODES or (encoding == "jpeg" and c == 4):
        raise ValueError(f"{encoding} cannot store {c} channels")
    img = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    buf = io.BytesIO()
    if encoding == "png":
        img.save(buf, format="PNG")
    elif encoding == "jpeg":
        img.save(buf, format="JPEG", quality=int(jpeg_quality))
    else:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    return buf.getvalue()


def decode_image(data: bytes, encoding: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """Inverse of `encode_image`; returns uint8 [H, W, C]. `shape` is required for raw and
    checked for png/jpeg when given."""
    if encoding == "raw":
        if shape is None:
            raise ValueError("decode_image(raw) needs the [H, W, C] shape")
        arr = np.frombuffer(data, dtype=np.uint8)
        if arr.size != int(np.prod(shape)):
            raise DataFormatError(f"raw image has {arr.size} bytes, expected {int(np.prod(shape))} for shape {list(shape)}")
        return arr.reshape(tuple(shape)).copy()
    if encoding not in ("png", "jpeg"):
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img)
    arr = _as_hwc(arr)
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise DataFormatError(f"decoded image has shape {list(arr.shape)}, expected {list(shape)}")
    return arr


# --------------------------------------------------------------------------------------------
# TFRecord framing
# --------------------------------------------------------------------------------------------

def frame_record(record: bytes) -> bytes:
    """One TFRecord frame: length, masked crc of length, data, masked crc of data."""
    header = struct.pack("<Q", len(record))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), record,
                     struct.pack("<I", masked_crc32c(record))))


class TFRecordWriter:
    """Write TFRecord files (uncompressed). Context manager; `.write(record)`.

    Also keeps a running sha256 (`.sha256()`), the byte count (`.bytes`) and the number of
    records (`.records`) of what was written.
    """

    def __init__(self, path: str | os.PathLike | BinaryIO):
        if hasattr(path, "write"):
            self._f = path
            self._own = False
            self.path = getattr(path, "name", "<stream>")
        else:
            self.path = str(path)
            self._f = open(self.path, "wb")
            self._own = True
        self._hash = hashlib.sha256()
        self.bytes = 0
        self.records = 0

    def write(self, record: bytes) -> None:
        frame = frame_record(record)
        self._f.write(frame)
        self._hash.update(frame)
        self.bytes += len(frame)
        self.records += 1

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._own and not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str | os.PathLike, *, verify: bool = True) -> Iterator[bytes]:
    """Yield the records of one TFRecord file, checking both CRCs of every record.

    Raises `CorruptDataError` ("<file>: ... at byte offset N") on a CRC mismatch or truncation.
    """
    path = str(path)
    with open(path, "rb", buffering=1 << 20) as f:
        offset = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise CorruptDataError(f"{path}: truncated record header at byte offset {offset}",
                                       path=path, offset=offset)
            length_bytes = header[:8]
            (length,) = struct.unpack("<Q", length_bytes)
            (length_crc,) = struct.unpack("<I", header[8:])
            if verify and masked_crc32c(length_bytes) != length_crc:
                raise CorruptDataError(f"{path}: corrupt record at byte offset {offset}: length crc mismatch",
                                       path=path, offset=offset)
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise CorruptDataError(
                    f"{path}: truncated record at byte offset {offset} (expected {length} data bytes)",
                    path=path, offset=offset)
            if verify and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise CorruptDataError(f"{path}: corrupt record at byte offset {offset}: data crc mismatch",
                                       path=path, offset=offset)
            yield data
            offset += 16 + length


# --------------------------------------------------------------------------------------------
# Channel statistics
# --------------------------------------------------------------------------------------------

class ChannelStats:
    """Per-channel pixel count, sum and sum of squares (float64, raw 0..255 values).

    Mergeable (`merge`, `+`), so Spark partitions can each compute one and reduce them.
    `mean()` and `std()` (population std) are on the [0, 1] scale, i.e. of x / 255.
    """

    def __init__(self, channels: int, count=None, sum=None, sumsq=None):  # noqa: A002 - the field names
        self.channels = int(channels)
        z = np.zeros(self.channels, dtype=np.float64)
        self.count = z.copy() if count is None else np.asarray(count, dtype=np.float64).reshape(self.channels)
        self.sum = z.copy() if sum is None else np.asarray(sum, dtype=np.float64).reshape(self.channels)
        self.sumsq = z.copy() if sumsq is None else np.asarray(sumsq, dtype=np.float64).reshape(self.channels)

    def update(self, pixels: np.ndarray) -> "ChannelStats":
        """Add one uint8 image [H, W, C] (or a batch [..., C]); returns self."""
        pixels = np.asarray(pixels)
        if pixels.ndim == 2 and self.channels == 1:
            pixels = pixels[:, :, None]
        if pixels.shape[-1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got shape {pixels.shape}")
        flat = pixels.reshape(-1, self.channels).astype(np.uint64)  # exact integer sums
        self.count += flat.shape[0]
        self.sum += flat.sum(axis=0).astype(np.float64)
        self.sumsq += (flat * flat).sum(axis=0).astype(np.float64)
        return self

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        if other.channels != self.channels:
            raise ValueError(f"cannot merge stats of {self.channels} and {other.channels} channels")
        return ChannelStats(self.channels, self.count + other.count, self.sum + other.sum,
                            self.sumsq + other.sumsq)

    __add__ = merge

    def mean(self) -> list[float]:
        c = np.maximum(self.count, 1)
        return [float(v) for v in self.sum / c / 255.0]

    def std(self) -> list[float]:
        c = np.maximum(self.count, 1)
        m = self.sum / c
        var = np.maximum(self.sumsq / c - m * m, 0.0)
        return [float(v) for v in np.sqrt(var) / 255.0]

    def to_dict(self) -> dict:
        return {"channels": self.channels, "count": self.count.tolist(), "sum": self.sum.tolist(),
                "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChannelStats":
        return cls(d["channels"], d["count"], d["sum"], d["sumsq"])

    def __repr__(self) -> str:
        return f"ChannelStats(channels={self.channels}, count={self.count.tolist()}, mean={self.mean()}, std={self.std()})"


# --------------------------------------------------------------------------------------------
# Shards and manifest
# --------------------------------------------------------------------------------------------

def shard_name(split: str, index: int, count: int) -> str:
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> dict:
    """Write serialised Examples to one TFRecord file atomically (tmp name + rename).

    Returns the manifest's shard entry `{file, records, sha256, bytes}` (file = basename).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with TFRecordWriter(tmp) as w:
            for r in records:
                w.write(r)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"file": path.name, "records": w.records, "sha256": w.sha256(), "bytes": w.bytes}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def dataset_fingerprint(classes: Sequence[str], image_shape: Sequence[int], encoding: str,
                        splits: Mapping[str, Mapping]) -> str:
    """sha256 of the content: classes, image shape, encoding and every shard's (file, records, sha256)."""
    content = {
        "classes": list(classes), "image_shape": [int(v) for v in image_shape], "encoding": encoding,
        "splits": {name: [[s["file"], int(s["records"]), s["sha256"]] for s in split["shards"]]
                   for name, split in sorted(splits.items())},
    }
    return hashlib.sha256(_canonical(content)).hexdigest()


def dataset_id(fingerprint: str, options: Mapping) -> str:
    """Short (12 hex) hash of the fingerprint + the options that produced it."""
    return hashlib.sha256(fingerprint.encode("ascii") + b"\n" + _canonical(dict(options))).hexdigest()[:12]


def build_manifest(*, classes: Sequence[str], image_shape: Sequence[int], encoding: str,
                   splits: Mapping[str, Mapping], stats: ChannelStats, options: Mapping,
                   skipped: Sequence[Mapping] = (), spark_version: str | None = None,
                   duration_s: float = 0.0, created_at: str | None = None) -> dict:
    """The manifest dict with every key of the contract.

    `splits` is `{name: {"count": int, "per_class": [int per class], "shards": [shard entries]}}`;
    `stats` are the training split's pixel statistics.  fingerprint and dataset_id are computed here.
    """
    splits = {name: {"count": int(s["count"]), "per_class": [int(v) for v in s["per_class"]],
                     "shards": [dict(sh) for sh in s["shards"]]} for name, s in splits.items()}
    fingerprint = dataset_fingerprint(classes, image_shape, encoding, splits)
    manifest = {
        "format_version": FORMAT_VERSION,
        "classes": list(classes),
        "image_shape": [int(v) for v in image_shape],
        "encoding": encoding,
        "splits": splits,
        "mean": stats.mean(),
        "std": stats.std(),
        "stats": stats.to_dict(),
        "skipped": [dict(s) for s in skipped],
        "fingerprint": fingerprint,
        "dataset_id": dataset_id(fingerprint, options),
        "options": dict(options),
        "spark_version": spark_version,
        "duration_s": float(duration_s),
        "created_at": created_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    validate_manifest(manifest)
    return manifest


def write_manifest(data_dir: str | os.PathLike, manifest: Mapping) -> Path:
    """Write `data_dir/manifest.json` atomically (tmp file + fsync + os.replace)."""
    path = Path(data_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fail(path, field, message):
    raise DataFormatError(f"{path}: manifest field {field!r}: {message}", path=path, field=field)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


REQUIRED_KEYS = ("format_version", "classes", "image_shape", "encoding", "splits", "mean", "std",
                 "skipped", "fingerprint", "dataset_id", "options", "spark_version", "duration_s",
                 "created_at")


def validate_manifest(manifest: Any, path: str | os.PathLike = "<manifest>") -> dict:
    """Check every required key and its type; raises `DataFormatError` naming path and field."""
    path = str(path)
    if not isinstance(manifest, dict):
        _fail(path, "<root>", f"expected a JSON object, got {type(manifest).__name__}")
    for key in REQUIRED_KEYS:
        if key not in manifest:
            _fail(path, key, "missing")
    m = manifest
    if m["format_version"] != FORMAT_VERSION:
        _fail(path, "format_version", f"unsupported version {m['format_version']!r} (reader knows {FORMAT_VERSION})")
    classes = m["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        _fail(path, "classes", "expected a non-empty list of class names")
    if len(set(classes)) != len(classes):
        _fail(path, "classes", "duplicate class names")
    shape = m["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)):
        _fail(path, "image_shape", f"expected [H, W, C] positive ints, got {shape!r}")
    channels = shape[2]
    if m["encoding"] not in ENCODINGS:
        _fail(path, "encoding", f"expected one of {list(ENCODINGS)}, got {m['encoding']!r}")
    for key in ("mean", "std"):
        v = m[key]
        if not (isinstance(v, list) and len(v) == channels and all(_is_num(x) for x in v)):
            _fail(path, key, f"expected {channels} numbers (one per channel), got {v!r}")
    if any(x < 0 for x in m["std"]):
        _fail(path, "std", "negative standard deviation")
    splits = m["splits"]
    if not isinstance(splits, dict) or not splits:
        _fail(path, "splits", "expected a non-empty object {split: {...}}")
    for name, split in splits.items():
        f = f"splits.{name}"
        if not isinstance(split, dict):
            _fail(path, f, "expected an object")
        for key in ("count", "per_class", "shards"):
            if key not in split:
                _fail(path, f"{f}.{key}", "missing")
        if not (_is_int(split["count"]) and split["count"] >= 0):
            _fail(path, f"{f}.count", f"expected a non-negative int, got {split['count']!r}")
        pc = split["per_class"]
        if not (isinstance(pc, list) and len(pc) == len(classes) and all(_is_int(v) and v >= 0 for v in pc)):
            _fail(path, f"{f}.per_class", f"expected {len(classes)} non-negative ints (one per class)")
        if sum(pc) != split["count"]:
            _fail(path, f"{f}.per_class", f"sums to {sum(pc)}, but count is {split['count']}")
        shards = split["shards"]
        if not isinstance(shards, list):
            _fail(path, f"{f}.shards", "expected a list")
        total = 0
        for i, sh in enumerate(shards):
            sf = f"{f}.shards[{i}]"
            if not isinstance(sh, dict):
                _fail(path, sf, "expected an object")
            for key in ("file", "records", "sha256", "bytes"):
                if key not in sh:
                    _fail(path, f"{sf}.{key}", "missing")
            if not isinstance(sh["file"], str) or not sh["file"] or "/" in sh["file"] or sh["file"].startswith("."):
                _fail(path, f"{sf}.file", f"expected a plain file name, got {sh['file']!r}")
            for key in ("records", "bytes"):
                if not (_is_int(sh[key]) and sh[key] >= 0):
                    _fail(path, f"{sf}.{key}", f"expected a non-negative int, got {sh[key]!r}")
            if not (isinstance(sh["sha256"], str) and len(sh["sha256"]) == 64):
                _fail(path, f"{sf}.sha256", "expected 64 hex characters")
            total += sh["records"]
        if total != split["count"]:
            _fail(path, f"{f}.shards", f"records sum to {total}, but count is {split['count']}")
    if not isinstance(m["skipped"], list) or not all(isinstance(s, dict) for s in m["skipped"]):
        _fail(path, "skipped", "expected a list of {path, reason}")
    for key in ("fingerprint", "dataset_id", "created_at"):
        if not isinstance(m[key], str) or not m[key]:
            _fail(path, key, "expected a non-empty string")
    if not isinstance(m["options"], dict):
        _fail(path, "options", "expected an object")
    if m["spark_version"] is not None and not isinstance(m["spark_version"], str):
        _fail(path, "spark_version", "expected a string or null")
    if not _is_num(m["duration_s"]):
        _fail(path, "duration_s", "expected a number")
    return manifest


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Read and validate `data_dir/manifest.json` (errors name the file and the field)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset manifest (was the dataset written completely?)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON: {e}", path=path, field="<root>") from e
    return validate_manifest(manifest, path)


def shard_paths(data_dir: str | os.PathLike, manifest: Mapping, split: str) -> list[Path]:
    if split not in manifest["splits"]:
        raise KeyError(f"{Path(data_dir) / MANIFEST_NAME}: no split {split!r} (has {sorted(manifest['splits'])})")
    return [Path(data_dir) / s["file"] for s in manifest["splits"][split]["shards"]]


def verify_dataset(data_dir: str | os.PathLike, *, check_records: bool = False) -> dict:
    """Check every shard's existence, size and sha256 (and, with check_records, every record's CRCs).

    Returns the manifest; raises FileNotFoundError or CorruptDataError naming the file.
    """
    manifest = read_manifest(data_dir)
    for split in manifest["splits"]:
        for entry, path in zip(manifest["splits"][split]["shards"], shard_paths(data_dir, manifest, split)):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in the manifest is missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise CorruptDataError(f"{path}: {size} bytes, manifest says {entry['bytes']}", path=path)
            if sha256_file(path) != entry["sha256"]:
                raise CorruptDataError(f"{path}: sha256 does not match the manifest", path=path)
            if check_records:
                n = sum(1 for _ in read_records(path))
                if n != entry["records"]:
                    raise CorruptDataError(f"{path}: {n} records, manifest says {entry['records']}", path=path)
    return manifest


def iter_split(data_dir: str | os.PathLike, split: str, manifest: Mapping | None = None) -> Iterator[dict]:
    """Pure-Python reader: the decoded examples of one split in file order (`decode_example` dicts)."""
    manifest = manifest or read_manifest(data_dir)
    for path in shard_paths(data_dir, manifest, split):
        for record in read_records(path):
            yield decode_example(record)


def read_split_arrays(data_dir: str | os.PathLike, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pure-Python reader (no TF): uint8 images [N, H, W, C] and int64 labels [N] in file order."""
    manifest = read_manifest(data_dir)
    shape = manifest["image_shape"]
    n = manifest["splits"][split]["count"] if limit is None else min(limit, manifest["splits"][split]["count"])
    images = np.empty((n, *shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    for i, ex in enumerate(iter_split(data_dir, split, manifest)):
        if i >= n:
            break
        images[i] = decode_image(ex["encoded"], ex["encoding"], shape)
        labels[i] = ex["label"]
    return images, labels


def _auto_shards(count: int) -> int:
    return max(1, min(MAX_AUTO_SHARDS, -(-count // EXAMPLES_PER_SHARD)))


def write_dataset(data_dir: str | os.PathLike, splits: Mapping[str, Sequence], classes: Sequence[str], *,
                  encoding: str = "png", num_shards: int | Mapping[str, int] | None = None,
                  jpeg_quality: int = 95, source: str = "python", skipped: Sequence[Mapping] = (),
                  overwrite: bool = False) -> dict:
    """Write a whole dataset (shards + manifest) from Python, atomically.

    `splits` maps a split name to a sequence of `(pixels uint8 [H, W, C] or [H, W], label, image_id)`;
    every image must have the same shape.  Examples go to shards in the given order (contiguous
    blocks), so the eval order is the input order.  Mean/std come from the "train" split (or
    the first split when there is none).  Everything is written into `<data_dir>.tmp-<pid>` and
    renamed into place at the end.  An existing non-empty `data_dir` raises FileExistsError
    unless `overwrite=True`.  Returns the manifest.
    """
    start = time.monotonic()
    data_dir = Path(data_dir)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    if not splits:
        raise ValueError("write_dataset needs at least one split")
    classes = list(classes)
    if data_dir.exists() and any(data_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{data_dir}: already exists and is not empty (pass overwrite=True to replace it)")
    stats_split = "train" if "train" in splits else next(iter(splits))

    tmp_dir = data_dir.with_name(f"{data_dir.name}.tmp-{os.getpid()}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        image_shape = None
        stats = None
        split_entries = {}
        shard_counts = {}
        for split, examples in splits.items():
            examples = list(examples)
            n_shards = (num_shards.get(split) if isinstance(num_shards, Mapping) else num_shards) or _auto_shards(len(examples))
            n_shards = int(n_shards)
            if n_shards < 1:
                raise ValueError(f"split {split!r}: num_shards must be >= 1")
            shard_counts[split] = n_shards
            per_class = [0] * len(classes)
            shards = []
            for index in range(n_shards):
                lo = len(examples) * index // n_shards
                hi = len(examples) * (index + 1) // n_shards
                records = []
                for pixels, label, image_id in examples[lo:hi]:
                    pixels = _as_hwc(pixels)
                    if image_shape is None:
                        image_shape = list(pixels.shape)
                        stats = ChannelStats(image_shape[2])
                    elif list(pixels.shape) != image_shape:
                        raise ValueError(f"split {split!r}, image {image_id!r}: shape {list(pixels.shape)} "
                                         f"differs from {image_shape}")
                    label = int(label)
                    if not 0 <= label < len(classes):
                        raise ValueError(f"split {split!r}, image {image_id!r}: label {label} outside [0, {len(classes)})")
                    per_class[label] += 1
                    if split == stats_split:
                        stats.update(pixels)
                    h, w, c = pixels.shape
                    records.append(encode_example(
                        encoded=encode_image(pixels, encoding, jpeg_quality), label=label, height=h, width=w,
                        channels=c, encoding=encoding, image_id=str(image_id)))
                shards.append(write_shard(tmp_dir / shard_name(split, index, n_shards), records))
            split_entries[split] = {"count": len(examples), "per_class": per_class, "shards": shards}
        if image_shape is None:
            raise ValueError("write_dataset: no images in any split")
        options = {"encoding": encoding, "num_shards": shard_counts, "source": source}
        if encoding == "jpeg":
            options["jpeg_quality"] = int(jpeg_quality)
        manifest = build_manifest(classes=classes, image_shape=image_shape, encoding=encoding,
                                  splits=split_entries, stats=stats, options=options, skipped=skipped,
                                  spark_version=None, duration_s=time.monotonic() - start)
        write_manifest(tmp_dir, manifest)
        fsync_dir(tmp_dir)
        if data_dir.exists():
            old = data_dir.with_name(f"{data_dir.name}.old-{os.getpid()}")
            os.replace(data_dir, old)
            os.replace(tmp_dir, data_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, data_dir)
        fsync_dir(data_dir.parent)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return manifest


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
