"""A synthetic image folder with the statistics of ILSVRC-2012 (ImageNet-1k), for benchmarks.

    python -m bench.imagenet_like --count 2000 [--cache-dir build/bench]   # generate, print the stats

Layout as ImageNet is distributed (the Kaggle CLS-LOC folder)::

    <cache>/imagenet-like-v<version>-<count>/
        CLS-LOC/                                  the input root
            train/<wnid>/<wnid>_<n>.JPEG          1,000 classes named like WordNet ids (n01440764)
            val/ILSVRC2012_val_<8 digits>.JPEG    flat, 1 image in 25 (ImageNet: 50,000 of 1.33 M)
        LOC_val_solution.csv                      ImageId,PredictionString (class + boxes)
        images.tsv                                one line per image: index, path, bytes, size, kind
        .complete.json                            the marker: version, count and the corpus's statistics

What each image is (path, class, size, content, odd kind) is a pure function of its index, so the
corpus of N images is the first N images of any larger one: a smaller corpus is made of hard links
into a larger complete one when there is one (seconds instead of minutes).

The images: sizes lognormal around ImageNet's mean (~400x350), one in five portrait, a long tail of
large ones (longer side 1000-2000 px, 1 in 200) and small ones (shorter side under 224 px, 1 in
100); content with detail at every scale (gradients, blotches, shapes, pixel noise), JPEG quality
90-97, about 110 KB per file on average. ImageNet's odd files in small numbers: CMYK JPEGs
(1 in 2,000), grayscale JPEGs (1 in 400) and PNG files named .JPEG (1 in 5,000).
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lottery.files import atomic_path, json_or, write_json

# Bump when the same index would give another file (the cache is keyed by it).
GENERATOR_VERSION = 3
NUM_CLASSES = 1000
VAL_EVERY = 25                     # image 24, 49, ... goes to the flat val/
CMYK_EVERY, GRAY_EVERY, PNG_EVERY = 2000, 400, 5000
LARGE_FRACTION, SMALL_FRACTION = 0.005, 0.01
PORTRAIT_FRACTION = 0.2
LABEL_FILE = "LOC_val_solution.csv"
INPUT_DIR = "CLS-LOC"
MARKER = ".complete.json"
INDEX_FILE = "images.tsv"

# Tuned so that the mean file is ~110 KB (ImageNet's train set: 1.28 M files, ~140 GB).
NOISE_SIGMA = (20, 44)
JPEG_QUALITY = (90, 97)
_NOISE_BANK_SIDE = 1024


def wnids() -> list[str]:
    """1,000 distinct WordNet-style ids ("n" + 8 digits, in ImageNet's range), sorted, always the same."""
    rng = np.random.default_rng(2012)
    numbers = rng.choice(np.arange(1_440_000, 15_080_000), NUM_CLASSES, replace=False)
    return [f"n{x:08d}" for x in sorted(numbers)]


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything about image `index` but its pixels."""
    index: int
    rel: str          # path under the input root
    wnid: str
    width: int
    height: int
    kind: str         # "rgb", "cmyk", "gray" (JPEGs) or "png" (a PNG file named .JPEG)

    @property
    def val_id(self) -> str | None:
        """ImageId of a val/ image (its file name without the extension), else None."""
        return self.rel[len("val/"):-len(".JPEG")] if self.rel.startswith("val/") else None


def _train_number(i: int) -> int:
    """How many train/ images come before image i (every VAL_EVERY-th image is a val/ one)."""
    return i - (i + 1) // VAL_EVERY


def spec(i: int, classes: list[str]) -> Spec:
    if i % VAL_EVERY == VAL_EVERY - 1:
        # a val image takes the class of the train image before it, so its class is in train/
        wnid = classes[_train_number(i - 1) % NUM_CLASSES]
        rel = f"val/ILSVRC2012_val_{i // VAL_EVERY + 1:08d}.JPEG"
    else:
        k = _train_number(i)
        wnid = classes[k % NUM_CLASSES]
        rel = f"train/{wnid}/{wnid}_{k // NUM_CLASSES + 1}.JPEG"
    kind = ("cmyk" if i % CMYK_EVERY == 7 else "png" if i % PNG_EVERY == 11
            else "gray" if i % GRAY_EVERY == 3 else "rgb")
    w, h = _size(np.random.default_rng([GENERATOR_VERSION, 1, i]))
    return Spec(i, rel, wnid, w, h, kind)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): lognormal around ~410x310 landscape, some portrait, long tails both ways
    (only the small tail has a side under 224 px: the bulk is clipped there)."""
    aspect = float(np.clip(rng.lognormal(np.log(1.33), 0.12), 1.0, 2.5))
    r = rng.random()
    if r < LARGE_FRACTION:
        long = rng.uniform(1000, 2000)
    elif r < LARGE_FRACTION + SMALL_FRACTION:
        long = rng.uniform(60, 223) * aspect        # shorter side under 224
    else:
        long = float(np.clip(rng.lognormal(np.log(410), 0.18), 224 * aspect, 1000))
    w, h = max(16, round(long)), max(16, round(long / aspect))
    return (h, w) if rng.random() < PORTRAIT_FRACTION else (w, h)


# ---------------------------------------------------------------------------------------------
# pixels (in the pool's processes)
# ---------------------------------------------------------------------------------------------

_noise_bank: np.ndarray | None = None


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An int16 (h, w, 3) window of standard normal noise x 32: a random window of one bank per
    process, since drawing fresh normals for every pixel is most of the generation time."""
    global _noise_bank
    if _noise_bank is None:
        bank = np.random.default_rng(7).normal(0, 32, (_NOISE_BANK_SIDE, _NOISE_BANK_SIDE, 3))
        _noise_bank = np.clip(bank, -127, 127).astype(np.int8)
    side = _NOISE_BANK_SIDE
    if h > side or w > side:   # rare large images: tile the bank
        reps = (-(-h // side) + 1, -(-w // side) + 1, 1)
        bank = np.tile(_noise_bank, reps)
    else:
        bank = _noise_bank
    y, x = int(rng.integers(0, bank.shape[0] - h + 1)), int(rng.integers(0, bank.shape[1] - w + 1))
    return bank[y:y + h, x:x + w].astype(np.int16)


def _background(rng: np.random.Generator, h: int, w: int):
    """A colour gradient with low-frequency blotches, as a Pillow RGB image."""
    from PIL import Image

    base = rng.uniform(30, 225, 3).astype(np.float32)
    slope_x = rng.uniform(-60, 60, 3).astype(np.float32) / w
    slope_y = rng.uniform(-60, 60, 3).astype(np.float32) / h
    grad = (base + np.arange(w, dtype=np.float32)[None, :, None] * slope_x
            + np.arange(h, dtype=np.float32)[:, None, None] * slope_y)
    cell = int(rng.integers(8, 40))
    small = rng.normal(0, rng.uniform(10, 35), (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    blotch = Image.fromarray(np.clip(small + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    img = grad + np.asarray(blotch, dtype=np.float32) - 128
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw_shapes(rng: np.random.Generator, im) -> None:
    from PIL import ImageDraw

    w, h = im.size
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(8, max(9, w // 2))), y0 + int(rng.integers(8, max(9, h // 2)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == 2:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(2, 12)))
        else:
            draw.polygon([tuple(int(v) for v in p) for p in rng.integers(0, (w, h), (5, 2))], fill=color)


def render(s: Spec):
    """The Pillow image of a spec (mode RGB, CMYK or L)."""
    from PIL import Image

    rng = np.random.default_rng([GENERATOR_VERSION, 2, s.index])
    im = _background(rng, s.height, s.width)
    _draw_shapes(rng, im)
    sigma = rng.uniform(*NOISE_SIGMA)
    pixels = np.asarray(im, dtype=np.int16) + (_noise(rng, s.height, s.width) * int(sigma * 8)) // 256
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if s.kind == "cmyk":
        return im.convert("CMYK")
    if s.kind == "gray":
        return im.convert("L")
    return im


def _write_image(job: tuple[Spec, str]) -> tuple[Spec, int]:
    """Render and save one image; (its spec, the file's size)."""
    s, root = job
    im = render(s)
    quality = int(np.random.default_rng([GENERATOR_VERSION, 3, s.index]).integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    path = os.path.join(root, s.rel)
    with atomic_path(path) as tmp:
        if s.kind == "png":
            im.save(tmp, "PNG", compress_level=6)
        else:
            im.save(tmp, "JPEG", quality=quality)
    return s, os.path.getsize(path)


def _boxes(s: Spec) -> str:
    """PredictionString of a val image: its class and one or two boxes (xmin ymin xmax ymax)."""
    rng = np.random.default_rng([GENERATOR_VERSION, 4, s.index])
    parts = []
    for _ in range(int(rng.integers(1, 3))):
        x0, y0 = int(rng.integers(0, s.width // 2)), int(rng.integers(0, s.height // 2))
        x1, y1 = int(rng.integers(x0 + 1, s.width)), int(rng.integers(y0 + 1, s.height))
        parts.append(f"{s.wnid} {x0} {y0} {x1} {y1}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# the cached corpus
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Corpus:
    home: Path          # <cache>/imagenet-like-v<version>-<count>
    info: dict          # the marker's content

    @property
    def root(self) -> Path:
        return self.home / INPUT_DIR

    @property
    def labels(self) -> Path:
        return self.home / LABEL_FILE

    @property
    def count(self) -> int:
        return self.info["count"]


def corpus_home(cache_dir: Path, count: int) -> Path:
    return cache_dir / f"imagenet-like-v{GENERATOR_VERSION}-{count}"


def load_complete(home: Path) -> Corpus | None:
    info = json_or(home / MARKER, {})
    return Corpus(home, info) if info.get("version") == GENERATOR_VERSION else None


def ensure_corpus(cache_dir: Path, count: int, procs: int) -> Corpus:
    """The cached corpus of `count` images: as it is, linked from a larger one, or generated."""
    home = corpus_home(cache_dir, count)
    done = load_complete(home)
    if done is not None and done.count == count:
        return done
    if home.exists():
        shutil.rmtree(home)
    larger = _larger_corpus(cache_dir, count)
    t0 = time.time()
    if larger is not None:
        print(f"linking the first {count} images of {larger.home} into {home} ...", file=sys.stderr, flush=True)
        rows = _link_prefix(larger, home, count)
    else:
        print(f"generating {count} images into {home} ({procs} processes) ...", file=sys.stderr, flush=True)
        rows = _generate(home, count, procs)
    info = {"version": GENERATOR_VERSION, "count": count, "seconds": round(time.time() - t0, 1),
            "linked_from": str(larger.home) if larger else None, **summarize(rows)}
    write_json(home / MARKER, info)   # last, atomically: the corpus is complete
    return Corpus(home, info)


def _larger_corpus(cache_dir: Path, count: int) -> Corpus | None:
    found = [c for c in (load_complete(h) for h in cache_dir.glob(f"imagenet-like-v{GENERATOR_VERSION}-*"))
             if c is not None and c.count > count]
    return min(found, key=lambda c: c.count) if found else None


def _make_dirs(root: Path, classes: list[str], count: int) -> None:
    (root / "val").mkdir(parents=True, exist_ok=True)
    for wnid in sorted({spec(i, classes).wnid for i in range(min(count, 2 * NUM_CLASSES))}):
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)


def _generate(home: Path, count: int, procs: int) -> list[tuple]:
    """Render `count` images with a pool of `procs` processes; writes the label file and the index.
    The parent streams: it holds one small row per image, never pixels."""
    classes = wnids()
    root = home / INPUT_DIR
    _make_dirs(root, classes, count)
    jobs = ((spec(i, classes), str(root)) for i in range(count))
    rows = []
    with mp.Pool(procs) as pool, open(home / LABEL_FILE, "w") as labels:
        labels.write("ImageId,PredictionString\n")
        for s, size in pool.imap(_write_image, jobs, chunksize=16):
            if s.val_id:
                labels.write(f"{s.val_id},{_boxes(s)}\n")
            rows.append((s.index, s.rel, size, s.width, s.height, s.kind))
            if len(rows) % 5000 == 0:
                print(f"  {len(rows)}/{count}", file=sys.stderr, flush=True)
    _write_index(home, rows)
    return rows


def _link_prefix(larger: Corpus, home: Path, count: int) -> list[tuple]:
    """Hard links to the first `count` images of a larger corpus (the same files by construction)."""
    rows = [r for r in read_index(larger.home) if r[0] < count]
    root = home / INPUT_DIR
    _make_dirs(root, wnids(), count)
    for _, rel, *_ in rows:
        os.link(larger.root / rel, root / rel)
    present = {rel[len("val/"):-len(".JPEG")] for _, rel, *_ in rows if rel.startswith("val/")}
    with open(larger.labels) as src, open(home / LABEL_FILE, "w") as dst:
        dst.write(next(src))
        dst.writelines(line for line in src if line.split(",", 1)[0] in present)
    _write_index(home, rows)
    return rows


def _write_index(home: Path, rows: list[tuple]) -> None:
    with open(home / INDEX_FILE, "w") as f:
        f.writelines("\t".join(str(v) for v in r) + "\n" for r in rows)


def read_index(home: Path) -> list[tuple]:
    """(index, path under the input root, bytes, width, height, kind) of every image."""
    rows = []
    with open(home / INDEX_FILE) as f:
        for line in f:
            i, rel, size, w, h, kind = line.rstrip("\n").split("\t")
            rows.append((int(i), rel, int(size), int(w), int(h), kind))
    return rows


def summarize(rows: list[tuple]) -> dict:
    """The statistics the benchmark reports: sizes of files and images, odd files, split."""
    n = len(rows)
    sizes = np.array([r[2] for r in rows], dtype=np.float64)
    w = np.array([r[3] for r in rows], dtype=np.float64)
    h = np.array([r[4] for r in rows], dtype=np.float64)
    kinds = {k: sum(1 for r in rows if r[5] == k) for k in ("cmyk", "gray", "png")}
    return {"bytes": int(sizes.sum()), "mean_kb": round(sizes.mean() / 1024, 1),
            "median_kb": round(float(np.median(sizes)) / 1024, 1),
            "mean_size": [round(w.mean()), round(h.mean())],
            "max_side": int(max(w.max(), h.max())), "under_224": int(np.sum(np.minimum(w, h) < 224)),
            "over_1000": int(np.sum(np.maximum(w, h) > 1000)), "portrait": int(np.sum(h > w)),
            "val": sum(1 for r in rows if r[1].startswith("val/")), "train": sum(1 for r in rows if r[1].startswith("train/")),
            "classes": len({r[1].split("/")[1] for r in rows if r[1].startswith("train/")}), **kinds, "images": n}


def describe(info: dict) -> str:
    """One sentence about a corpus, for the benchmark's text."""
    return (f"{info['count']} images ({info['train']} in train/, {info['val']} in a flat val/ with "
            f"{LABEL_FILE}; {info['classes']} classes), mean {info['mean_kb']:.0f} KB per file "
            f"(median {info['median_kb']:.0f} KB), mean size {info['mean_size'][0]}x{info['mean_size'][1]} "
            f"(largest side {info['max_side']} px; {info['under_224']} with the shorter side under 224 px, "
            f"{info['over_1000']} over 1000 px, {info['portrait']} portrait); odd files: {info['cmyk']} CMYK "
            f"JPEGs, {info['gray']} grayscale JPEGs, {info['png']} PNGs named .JPEG")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parents[1] / "build" / "bench")
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    c = ensure_corpus(args.cache_dir, args.count, args.procs)
    print(f"{c.home}: {describe(c.info)}; made in {c.info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
