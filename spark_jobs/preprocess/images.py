"""One input file -> pixels -> a serialised Example: sniff, load, convert, resize, encode.

Pure functions (Pillow + numpy + lottery.data): the executors run them, and the tests and
bench/spark_preprocess.py import them without Spark.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings
from collections import Counter

import numpy as np

from lottery.data.example import encode_example, encode_image
from lottery.data.manifest import ChannelStats

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_OTHER_MAGIC = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
                (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"))
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_16BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class BadImage(Exception):
    """A file that cannot be used; `code` is one of the reasons listed in the manifest."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}"


def sniff_format(data: bytes) -> str | None:
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    return None


def _bad_content(data: bytes) -> BadImage:
    if not data:
        return BadImage("empty", "zero-byte file")
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return BadImage("unsupported-format", f"{name} image (only JPEG and PNG are accepted)")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return BadImage("unsupported-format", "WEBP image (only JPEG and PNG are accepted)")
    return BadImage("not-image", "not a JPEG or PNG file")


def mode_channels(mode: str) -> int:
    """1 for the grayscale Pillow modes, else 3 (palette, RGB(A), CMYK, YCbCr, ...)."""
    return 1 if mode in _GRAY_MODES else 3


@dataclasses.dataclass(frozen=True)
class Transform:
    """What to do with every image (resolved on the driver, shipped to the executors)."""
    channels: int                      # 1 or 3
    size: int | None                   # --image-size, or None to keep the native size
    resize: str = "shorter-side-crop"
    native: tuple[int, int] | None = None   # (width, height) every image must have when size is None
    encoding: str = "png"
    jpeg_quality: int = 95

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Transform":
        return cls(**{**d, "native": tuple(d["native"]) if d.get("native") else None})

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.size is not None:
            return (self.size, self.size, self.channels)
        assert self.native is not None
        return (self.native[1], self.native[0], self.channels)


def _draft_size(w: int, h: int, t: Transform) -> tuple[int, int] | None:
    """Request a DCT-scaled JPEG decode (2x-8x faster) when the target is at most half the size."""
    if t.size is None:
        return None
    if t.resize == "exact":
        req = (t.size, t.size)
    else:
        m = min(w, h)
        req = (math.ceil(w * t.size / m), math.ceil(h * t.size / m))
    if req[0] * 2 <= w and req[1] * 2 <= h:
        return req
    return None


def load_image(data: bytes, t: Transform | None = None):
    """Open, `verify()` and fully `load()` a JPEG or PNG; raise BadImage with the reason."""
    from PIL import Image, UnidentifiedImageError

    fmt = sniff_format(data)
    if fmt is None:
        raise _bad_content(data)
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as probe:
            probe.verify()
        im = Image.open(io.BytesIO(data), formats=[fmt])
        if fmt == "JPEG" and t is not None:
            req = _draft_size(*im.size, t)
            if req is not None:
                im.draft(im.mode, req)
        im.load()
        return im
    except MemoryError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage("too-large", str(e)) from None
    except UnidentifiedImageError:
        raise BadImage("corrupt", f"{fmt} header cannot be parsed") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        msg = str(e) or type(e).__name__
        code = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise BadImage(code, f"{fmt}: {msg}") from None


def to_channels(im, channels: int, conversions: Counter | None = None):
    """Convert any Pillow mode to "L" (channels=1) or "RGB" (channels=3): 16-bit grayscale keeps
    its high byte (as Pillow does for 16-bit RGB), alpha is dropped, gray is ITU-R 601-2 luma.
    A conversion is counted in ``conversions`` as "CMYK to RGB", "L to RGB", ..."""
    from PIL import Image

    mode = im.mode
    target = "L" if channels == 1 else "RGB"
    if conversions is not None and mode != target:
        conversions[f"{mode} to {target}"] += 1
    if mode in _16BIT_MODES:
        a = np.asarray(im)
        im = Image.fromarray((np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8), "L")
        mode = "L"
    elif mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == target:
        return im
    try:
        if mode in ("P", "PA"):
            im = im.convert("RGBA")
        return im.convert(target)
    except (ValueError, OSError) as e:
        raise BadImage("unsupported-mode", f"cannot convert Pillow mode {mode} to {target}: {e}") from None


def resize_image(im, t: Transform):
    from PIL import Image

    w, h = im.size
    if t.size is None:
        if t.native is not None and (w, h) != tuple(t.native):
            raise BadImage("size-mismatch", f"{w}x{h}, the other images are {t.native[0]}x{t.native[1]}")
        return im
    s = t.size
    if (w, h) == (s, s):
        return im
    if t.resize == "exact":
        return im.resize((s, s), Image.Resampling.BILINEAR)
    m = min(w, h)  # shorter-side-crop: the central m x m square, scaled to s x s
    left, top = (w - m) // 2, (h - m) // 2
    box = (left, top, left + m, top + m)
    if m == s:
        return im.crop(box)
    return im.resize((s, s), Image.Resampling.BILINEAR, box=box)


def transform_image(data: bytes, t: Transform, conversions: Counter | None = None, name: str = "") -> np.ndarray:
    """Bytes of one input file -> uint8 [H, W, C] pixels, or BadImage. The file is decoded by its
    content, whatever its name says; with ``conversions``, a PNG named ``.jpeg``/``.jpg`` (as
    ImageNet has) and each change of mode are counted there."""
    if not data:
        raise BadImage("empty", "zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = load_image(data, t)
        if conversions is not None and im.format == "PNG" and name.lower().endswith((".jpeg", ".jpg")):
            conversions["PNG named .JPEG"] += 1
        im = to_channels(im, t.channels, conversions)
        im = resize_image(im, t)
        pixels = np.asarray(im)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels


def encode_record(pixels: np.ndarray, label: int, image_id: str, t: Transform) -> bytes:
    """The serialised Example of one image, with the shared encoders of lottery.data.example."""
    h, w, c = pixels.shape
    encoded = encode_image(pixels, t.encoding, t.jpeg_quality)
    return encode_example(encoded=encoded, label=label, height=h, width=w, channels=c,
                          encoding=t.encoding, image_id=image_id)


class HistogramStats:
    """Per-channel value histograms (exact, ~10x faster than summing squares per image);
    converted to a mergeable `lottery.data.manifest.ChannelStats` at the end of a partition."""

    def __init__(self, channels: int):
        self.hist = np.zeros((channels, 256), dtype=np.int64)
        self.images = 0

    def update(self, pixels: np.ndarray) -> None:
        flat = pixels.reshape(-1, pixels.shape[-1])
        for c in range(flat.shape[1]):
            self.hist[c] += np.bincount(flat[:, c], minlength=256)
        self.images += 1

    def to_channel_stats(self) -> ChannelStats:
        v = np.arange(256, dtype=np.float64)
        h = self.hist.astype(np.float64)
        return ChannelStats(self.hist.shape[0], h.sum(axis=1), h @ v, h @ (v * v))
