"""One image as a `tf.train.Example`, in pure Python (no TensorFlow).

* `encode_example` / `decode_example`: a hand-written protobuf encoder/decoder for the
  `tf.train.Example` messages of this format (plus the generic `serialize_example` /
  `parse_example_features`); the feature keys `KEY_*` are the contract (docs/data-format.md).
* `encode_image` / `decode_image`: png (lossless), jpeg, raw (the bytes of the uint8 HWC array).
"""
from __future__ import annotations

import io
import struct
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from lottery.errors import DataFormatError

ENCODINGS = ("png", "jpeg", "raw")

# Feature keys of one Example (the contract; docs/data-format.md).
KEY_ENCODED = "image/encoded"
KEY_FORMAT = "image/format"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
KEY_CHANNELS = "image/channels"
KEY_LABEL = "image/class/label"
KEY_ID = "image/id"


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
    """Serialise `{key: list of bytes | list of int | list of float}` as a tf.train.Example, the
    value type picking the list kind; keys in sorted order, so the output is deterministic."""
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
        elif wire in (1, 5):  # fixed64, fixed32
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise DataFormatError(f"malformed protobuf: truncated fixed{8 * size}")
            value = bytes(buf[pos:pos + size])
            pos += size
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise DataFormatError("malformed protobuf: length-delimited field runs past the end")
            value = (pos, pos + length)
            pos += length
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


def as_hwc(pixels: np.ndarray) -> np.ndarray:
    """A uint8 image as [H, W, C] (a [H, W] image gets C = 1); ValueError for anything else."""
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
    pixels = as_hwc(pixels)
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
    arr = as_hwc(arr)
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise DataFormatError(f"decoded image has shape {list(arr.shape)}, expected {list(shape)}")
    return arr

