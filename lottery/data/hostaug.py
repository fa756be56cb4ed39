"""Per-image decoding and augmentation on the host, straight from a record's bytes (numpy + Pillow).

What the numpy input pipeline runs for each example, with the parameters the epoch plan drew for
its position. `none` and `crop_flip` give the same float32 values as `ShardedDataset`;
`random_resized_crop` cuts the epoch plan's box with Pillow's resampler (a large JPEG crop is
decoded at a reduced scale first), so its pixels differ from `tf.image.crop_and_resize` by the
interpolation (pixel centres vs corners).

No TensorFlow, no Keras: the worker processes import only this, the record format and numpy.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .epochs import CROP_PAD
from lottery.errors import DataFormatError
from .example import decode_example, decode_image

_MODES = {1: "L", 3: "RGB"}


def crop_box(box, h: int, w: int) -> tuple[tuple[int, int, int, int], bool]:
    """A normalised `[y1, x1, y2, x2]` box of the epoch plan (corner convention; `x1 > x2` is a
    mirrored crop) -> Pillow's pixel box `(left, top, right, bottom)` and the flip."""
    y1, x1, y2, x2 = (float(v) for v in box)
    flip = x1 > x2
    if flip:
        x1, x2 = x2, x1
    top, bottom = round(y1 * max(h - 1, 1)), round(y2 * max(h - 1, 1))
    left, right = round(x1 * max(w - 1, 1)), round(x2 * max(w - 1, 1))
    return (left, top, right + 1, bottom + 1), flip


def _open(encoded: bytes, encoding: str, shape) -> Image.Image:
    h, w, c = shape
    if encoding == "raw":
        arr = decode_image(encoded, "raw", shape)
        return Image.fromarray(arr[:, :, 0] if c == 1 else arr)
    img = Image.open(io.BytesIO(encoded))
    if img.size != (w, h) or img.mode != _MODES.get(c):
        raise DataFormatError(f"image is {img.mode} {img.size[0]}x{img.size[1]}, expected {h}x{w}x{c}")
    return img


def resized_crop(encoded: bytes, encoding: str, shape, box) -> np.ndarray:
    """uint8 `[H, W, C]`: the crop `box` of the encoded image resized to the image's own size."""
    h, w, c = shape
    img = _open(encoded, encoding, shape)
    (left, top, right, bottom), flip = crop_box(box, h, w)
    if encoding == "jpeg":  # decode at 1/2, 1/4, 1/8 when the crop stays >= the output size
        wanted = (-(-w * w // (right - left)), -(-h * h // (bottom - top)))
        img.draft(img.mode, wanted)
        if img.size != (w, h):
            sx, sy = img.size[0] / w, img.size[1] / h
            left, right, top, bottom = left * sx, right * sx, top * sy, bottom * sy
    out = img.resize((w, h), Image.BILINEAR, box=(left, top, right, bottom))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out).reshape(h, w, c)


def crop_flip_one(pixels: np.ndarray, param, pad: int = CROP_PAD) -> np.ndarray:
    """One image of `crop_flip`: zero-pad by `pad`, crop H x W at `(param[0], param[1])`, flip
    when `param[2]` (uint8, the same pixels as the batched versions)."""
    h, w, c = pixels.shape
    padded = np.zeros((h + 2 * pad, w + 2 * pad, c), np.uint8)
    padded[pad:pad + h, pad:pad + w] = pixels
    out = padded[int(param[0]):int(param[0]) + h, int(param[1]):int(param[1]) + w]
    return out[:, ::-1] if param[2] else out


def decode_augment_into(record: bytes, out: np.ndarray, *, encoding: str, shape, augmentation: str,
                        param, scale: np.ndarray, offset: np.ndarray) -> int:
    """Decode one serialised Example, augment it, write `pixel * scale + offset` (float32) into
    `out` (`[H, W, C]`); returns its label."""
    example = decode_example(record)
    if augmentation == "random_resized_crop":
        pixels = resized_crop(example["encoded"], encoding, shape, param)
    else:
        pixels = decode_image(example["encoded"], encoding, shape)
        if augmentation == "crop_flip":
            pixels = crop_flip_one(pixels, param)
        elif augmentation != "none":
            raise ValueError(f"unknown augmentation {augmentation!r}")
    normalise_into(pixels, out, scale, offset)
    return int(example["label"])


_LUTS: dict[bytes, np.ndarray] = {}


def normalise_into(pixels: np.ndarray, out: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> None:
    """`out = float32(pixels) * scale + offset` per channel, with the two float32 roundings tf.data
    makes, by table: one lookup per value (twice as fast as three passes over the image)."""
    key = scale.tobytes() + offset.tobytes()
    lut = _LUTS.get(key)
    if lut is None:  # [C, 256]: the value of every uint8 pixel of every channel
        values = np.arange(256, dtype=np.float32)[:, None] * np.asarray(scale, np.float32)
        lut = _LUTS[key] = np.ascontiguousarray((values + np.asarray(offset, np.float32)).T, np.float32)
    for c in range(out.shape[-1]):
        np.take(lut[c], pixels[..., c], out=out[..., c], mode="clip")


def augment_array_into(pixels: np.ndarray, out: np.ndarray, *, augmentation: str, param,
                       scale: np.ndarray, offset: np.ndarray) -> None:
    """`decode_augment_into` for an image already decoded (uint8 `[H, W, C]`, a cached split)."""
    h, w, c = pixels.shape
    if augmentation == "random_resized_crop":
        box, flip = crop_box(param, h, w)
        img = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels).resize((w, h), Image.BILINEAR, box=box)
        pixels = np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img).reshape(h, w, c)
    elif augmentation == "crop_flip":
        pixels = crop_flip_one(pixels, param)
    normalise_into(pixels, out, scale, offset)
