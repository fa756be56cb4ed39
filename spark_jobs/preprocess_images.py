#!/usr/bin/env python3
"""Spark job: an ImageNet-layout image folder -> TFRecord shards + manifest.json.

    spark-submit spark_jobs/preprocess_images.py --input ROOT --output DATA_DIR [options]

Input is ``ROOT/train/<class>/<files>`` and optionally ``ROOT/val/<class>/<files>`` (without
``val/`` a seeded split of ``train/`` by a hash of each relative path).  Output is the record
format of ``lottery.data.records`` (shards ``{split}-{index:05d}-of-{count:05d}.tfrecord`` and a
``manifest.json`` written last), published atomically from a sibling staging directory.  A rerun
with the same input fingerprint and options prints "already up to date" and exits 0.

Exit status: 0 done (or already up to date), 1 the data failed a check (too many bad files, an
empty class, images of different sizes without --image-size), 2 bad arguments or input/output
paths (nothing written).  See docs/spark-preprocessing.md.

Only the driver reads the manifest and lists nothing itself: files are read with Spark's
``binaryFile`` source, decoded, resized and encoded on the executors, and every shard is written
by the executor task that owns it; only small metadata rows come back to the driver.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import heapq
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

_REPO_ROOT = Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "lottery").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from lottery.data import records  # noqa: E402  (pure Python: also imported by the executors)

log = logging.getLogger("preprocess_images")

# Bump when the same options would produce different bytes (it is part of the options, so of
# the dataset_id and of the "already up to date" check).
PREPROCESS_VERSION = 1
SPLITS = ("train", "val")
RESIZE_METHODS = ("shorter-side-crop", "exact")
# Channel decision and shard-size estimate: deterministic samples of the input (smallest hashes
# of the relative paths), read on the executors.
HEADER_SAMPLE = 1000
SIZE_SAMPLE = 64
# Decode stage input partitions: at least this many per core and about this many files each (small
# tasks balance the load), none bigger than this.
PARTITIONS_PER_CORE = 3
FILES_PER_PARTITION = 256
MAX_PARTITION_BYTES = 64 << 20
MAX_LISTED_SKIPS = 20

EXIT_OK, EXIT_DATA, EXIT_USAGE = 0, 1, 2

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_OTHER_MAGIC = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
                (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"))
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_16BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class InputError(Exception):
    """Bad arguments, input root or output path: nothing was written (exit 2)."""


class DataError(Exception):
    """The data failed a check (bad-file threshold, empty class, mixed sizes): exit 1."""


# =============================================================================================
# Pure functions: split assignment and image decoding (driver, executors, tests, benchmark)
# =============================================================================================

def unit_hash(text: str) -> float:
    """A stable hash of `text` mapped to [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def shard_key(rel: str) -> str:
    """Sort key of a file inside its split: 16 hex digits of a hash of its relative path."""
    return hashlib.sha256(("shard:" + rel).encode("utf-8")).hexdigest()[:16]


def assign(rel: str, *, derived_val: bool, val_fraction: float, seed: int) -> tuple[str, str | None]:
    """(split, class folder or None) of a path relative to the input root ("train/cls/x.jpg").

    With `derived_val`, a file of train/ goes to "val" when the hash of its path relative to
    train/ (salted with the seed) falls below `val_fraction`: a file's split never depends on
    the other files, so adding files does not reshuffle the rest.
    """
    parts = rel.split("/")
    top = parts[0]
    cls = parts[1] if len(parts) >= 3 else None
    split = top
    if derived_val and top == "train":
        if unit_hash(f"val-split:{seed}:{'/'.join(parts[1:])}") < val_fraction:
            split = "val"
    return split, cls


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


def to_channels(im, channels: int):
    """Convert any Pillow mode to "L" (channels=1) or "RGB" (channels=3).

    16-bit grayscale keeps its high byte (as Pillow does for 16-bit RGB PNGs); alpha is dropped;
    palette, CMYK and YCbCr go through Pillow's conversions; color -> gray is ITU-R 601-2 luma.
    """
    from PIL import Image

    mode = im.mode
    if mode in _16BIT_MODES:
        a = np.asarray(im)
        im = Image.fromarray((np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8), "L")
        mode = "L"
    elif mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
        mode = "L"
    target = "L" if channels == 1 else "RGB"
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


def transform_image(data: bytes, t: Transform) -> np.ndarray:
    """Bytes of one input file -> uint8 [H, W, C] pixels, or BadImage."""
    if not data:
        raise BadImage("empty", "zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = load_image(data, t)
        im = to_channels(im, t.channels)
        im = resize_image(im, t)
        pixels = np.asarray(im)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels


def encode_record(pixels: np.ndarray, label: int, image_id: str, t: Transform) -> bytes:
    """The serialised Example of one image, with the shared encoders of lottery.data.records."""
    h, w, c = pixels.shape
    encoded = records.encode_image(pixels, t.encoding, t.jpeg_quality)
    return records.encode_example(encoded=encoded, label=label, height=h, width=w, channels=c,
                                  encoding=t.encoding, image_id=image_id)


class HistogramStats:
    """Per-channel value histograms (exact, ~10x faster than summing squares per image);
    converted to a mergeable `records.ChannelStats` at the end of a partition."""

    def __init__(self, channels: int):
        self.hist = np.zeros((channels, 256), dtype=np.int64)
        self.images = 0

    def update(self, pixels: np.ndarray) -> None:
        flat = pixels.reshape(-1, pixels.shape[-1])
        for c in range(flat.shape[1]):
            self.hist[c] += np.bincount(flat[:, c], minlength=256)
        self.images += 1

    def to_channel_stats(self) -> "records.ChannelStats":
        v = np.arange(256, dtype=np.float64)
        h = self.hist.astype(np.float64)
        return records.ChannelStats(self.hist.shape[0], h.sum(axis=1), h @ v, h @ (v * v))


# =============================================================================================
# Arguments and driver-side validation (before any Spark work)
# =============================================================================================

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="preprocess_images.py",
        description="Image folder (ROOT/train/<class>/..., optional ROOT/val/<class>/...) -> "
                    "TFRecord shards + manifest.json in the lottery record format.")
    p.add_argument("--input", required=True, metavar="ROOT", help="input root with train/ (and val/)")
    p.add_argument("--output", required=True, metavar="DATA_DIR", help="output dataset directory")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="output S x S; default: keep the native size when all images share one")
    p.add_argument("--resize", choices=RESIZE_METHODS, default="shorter-side-crop",
                   help="shorter-side-crop: scale the shorter side to S and crop the centre "
                        "(ImageNet convention); exact: scale to S x S ignoring the aspect ratio")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="output channels; default: the majority of a header sample of the input")
    p.add_argument("--encoding", choices=records.ENCODINGS, default="png")
    p.add_argument("--jpeg-quality", type=int, default=95, help="with --encoding jpeg (1-100)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="without ROOT/val: fraction of train/ split off as val (by path hash)")
    p.add_argument("--seed", type=int, default=0, help="salt of the train/val split hash")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shard-mb", type=float, default=100.0, help="target shard size in MB (default 100)")
    g.add_argument("--num-shards", type=int, default=None, help="exact number of shards per split")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of the input files is unusable")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    p.add_argument("--progress-interval", type=float, default=15.0, metavar="SECONDS",
                   help="log progress of the running stage this often (0: never)")
    return p.parse_args(argv)


@dataclasses.dataclass
class JobConfig:
    root: Path
    output: Path
    classes: list[str]
    has_val_dir: bool
    args: argparse.Namespace

    @property
    def derived_val(self) -> bool:
        return not self.has_val_dir


def _visible_dirs(path: Path) -> list[str]:
    # Spark's file listing ignores names starting with "." or "_": so do we.
    return sorted(e.name for e in os.scandir(path)
                  if e.is_dir() and not e.name.startswith((".", "_")))


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def validate(args: argparse.Namespace) -> JobConfig:
    """Every check that needs no Spark: arguments, input layout, output path. Raises InputError."""
    if args.image_size is not None and args.image_size < 1:
        raise InputError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise InputError(f"--jpeg-quality must be between 1 and 100, got {args.jpeg_quality}")
    if not 0.0 < args.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    if args.num_shards is not None and args.num_shards < 1:
        raise InputError(f"--num-shards must be at least 1, got {args.num_shards}")
    if args.num_shards is None and not args.shard_mb > 0:
        raise InputError(f"--shard-mb must be positive, got {args.shard_mb}")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise InputError(f"--max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")

    root = Path(os.path.abspath(args.input))
    if not root.exists():
        raise InputError(f"input root {root} does not exist")
    if not root.is_dir():
        raise InputError(f"input root {root} is not a directory")
    train = root / "train"
    if not train.is_dir():
        raise InputError(f"input root {root} has no train/ folder: expected the ImageNet layout "
                         f"ROOT/train/<class>/<images> (and optionally ROOT/val/<class>/<images>)")
    classes = _visible_dirs(train)
    if not classes:
        raise InputError(f"{train} has no class folders: expected ROOT/train/<class>/<images>")
    has_val = (root / "val").is_dir()
    if has_val:
        extra = [c for c in _visible_dirs(root / "val") if c not in set(classes)]
        if extra:
            raise InputError(f"{root / 'val'} has class folders that train/ does not have: "
                             f"{', '.join(extra[:10])}")

    output = Path(os.path.abspath(args.output))
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} exists and is not a directory")
    if _is_within(output, root):
        raise InputError(f"output {output} is inside the input root {root}")
    if _is_within(root, output):
        raise InputError(f"input root {root} is inside the output {output}, which would be replaced")
    parent = output.parent
    for anc in [parent, *parent.parents]:
        if anc.exists():
            if not anc.is_dir():
                raise InputError(f"output {output}: {anc} is not a directory")
            if not os.access(anc, os.W_OK | os.X_OK):
                raise InputError(f"output {output}: {anc} is not writable")
            break
    if output.is_dir() and not (output / records.MANIFEST_NAME).exists() and any(output.iterdir()):
        raise InputError(f"output {output} is a non-empty directory without {records.MANIFEST_NAME}: "
                         f"refusing to replace something that is not a dataset written by this job")
    return JobConfig(root=root, output=output, classes=classes, has_val_dir=has_val, args=args)


def effective_options(cfg: JobConfig) -> dict:
    """The options that determine the output (manifest "options"; part of dataset_id)."""
    a = cfg.args
    opts: dict[str, Any] = {"preprocess_version": PREPROCESS_VERSION, "source": "spark",
                            "image_size": a.image_size, "channels": a.channels or "auto",
                            "encoding": a.encoding}
    if a.image_size is not None:
        opts["resize"] = a.resize
    if a.encoding == "jpeg":
        opts["jpeg_quality"] = a.jpeg_quality
    opts["split"] = ("folders" if cfg.has_val_dir
                     else {"val_fraction": a.val_fraction, "seed": a.seed})
    if a.num_shards is not None:
        opts["num_shards"] = a.num_shards
    else:
        opts["shard_mb"] = a.shard_mb
    return opts


# =============================================================================================
# Output: lock, staging, publication
# =============================================================================================

@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """One job at a time per output (an flock on a hidden sibling file)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_path = output.parent / f".{output.name}.lock"
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another preprocessing job is writing {output} (lock {lock_path})") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def staging_dirs(output: Path) -> list[Path]:
    """Leftovers of earlier runs: DATA_DIR.staging-* and DATA_DIR.old-* siblings."""
    if not output.parent.is_dir():
        return []
    pat = re.compile(re.escape(output.name) + r"\.(staging|old)-[0-9a-f]+$")
    return sorted(p for p in output.parent.iterdir() if pat.match(p.name))


def remove_stale(output: Path) -> None:
    for p in staging_dirs(output):
        log.warning("removing %s left behind by an interrupted run", p)
        shutil.rmtree(p, ignore_errors=True)


def publish(staging: Path, output: Path) -> None:
    """Put the finished staging dir in place of `output`: rename old aside, rename new in, delete old."""
    records.fsync_dir(staging)
    if output.exists():
        old = output.with_name(f"{output.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(output, old)
        os.rename(staging, output)
        records.fsync_dir(output.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, output)
        records.fsync_dir(output.parent)


def up_to_date(output: Path, input_fp: str, options: dict) -> dict | None:
    """The existing manifest when it was made from the same input and options and every shard
    is there with its size; else None."""
    if not (output / records.MANIFEST_NAME).is_file():
        return None
    try:
        manifest = records.read_manifest(output)
    except Exception as e:  # unreadable or old format: rebuild
        log.info("existing %s is not usable (%s): rebuilding", output / records.MANIFEST_NAME, e)
        return None
    if (manifest.get("input_fingerprint") or {}).get("sha256") != input_fp:
        log.info("input changed since %s was written: rebuilding", output)
        return None
    if manifest.get("options") != options:
        log.info("options changed since %s was written: rebuilding", output)
        return None
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            p = output / shard["file"]
            if not p.is_file() or p.stat().st_size != shard["bytes"]:
                log.info("%s is missing or has the wrong size: rebuilding", p)
                return None
    return manifest


# =============================================================================================
# Spark plumbing
# =============================================================================================

def _lottery_package_dir() -> Path:
    import lottery
    return Path(lottery.__file__).resolve().parent


def build_py_files(dest: str | os.PathLike) -> Path:
    """A zip for --py-files with the `lottery` package and this job's `spark_jobs` package
    (deterministic: sorted, fixed timestamps)."""
    pkgs = [_lottery_package_dir(), Path(__file__).resolve().parent]
    dest = Path(dest)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for pkg in pkgs:
            for path in sorted(pkg.rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                info = zipfile.ZipInfo(str(path.relative_to(pkg.parent)), date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                z.writestr(info, path.read_bytes())
    return dest


def _py_files_provide_lottery(conf_value: str) -> bool:
    for entry in filter(None, (e.strip() for e in conf_value.split(","))):
        local = entry[len("file:"):] if entry.startswith("file:") else entry
        try:
            if zipfile.is_zipfile(local):
                with zipfile.ZipFile(local) as z:
                    if "lottery/__init__.py" in z.namelist():
                        return True
            elif os.path.isfile(os.path.join(local, "lottery", "__init__.py")):
                return True
        except OSError:
            continue
    return False


def ship_lottery(spark, tmpdir: Path) -> str:
    """Make `lottery` importable on the executors unless --py-files already does."""
    sc = spark.sparkContext
    given = sc.getConf().get("spark.submit.pyFiles", "") or ""
    if _py_files_provide_lottery(given):
        return "given with --py-files"
    zpath = build_py_files(tmpdir / "lottery.zip")
    sc.addPyFile(str(zpath))
    return f"shipped {zpath.name} (built from {_lottery_package_dir()})"


def create_session(app_name: str = "preprocess_images"):
    from pyspark.sql import SparkSession

    if not os.environ.get("PYSPARK_PYTHON"):
        # Executors run the driver's interpreter (same venv path on a shared filesystem).
        # PySpark reads the variable when the SparkContext is created.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    builder = SparkSession.builder.appName(app_name).config("spark.ui.showConsoleProgress", "false")
    return builder.getOrCreate()


_GLOB_CHARS = re.compile(r"([\[\]{}*?\\])")


def _uri(path: Path) -> str:
    return "file://" + _GLOB_CHARS.sub(r"\\\1", str(path))


class _Progress(threading.Thread):
    """Logs the running stage of a job group every `interval` seconds (0: never) and keeps a
    timeline of (seconds since start, files done) samples of `counter` (one per second at most)."""

    SAMPLE_S = 1.0
    MAX_SAMPLES = 300

    def __init__(self, sc, group: str, label: str, interval: float, counter=None, total: int | None = None):
        super().__init__(daemon=True)
        self.sc, self.group, self.label, self.interval = sc, group, label, interval
        self.counter, self.total = counter, total
        self.stop_event = threading.Event()
        self.t0 = time.time()
        self.timeline: list[tuple[float, int]] = []

    def _sample(self) -> None:
        if self.counter is None:
            return
        n = self.counter.value
        if not self.timeline or self.timeline[-1][1] != n:
            self.timeline.append((round(time.time() - self.t0, 2), n))
            if len(self.timeline) > self.MAX_SAMPLES:
                self.timeline = self.timeline[::2]

    def _message(self) -> str:
        st = self.sc.statusTracker()
        parts = []
        for job_id in st.getJobIdsForGroup(self.group):
            job = st.getJobInfo(job_id)
            if job is None or job.status != "RUNNING":
                continue
            for sid in job.stageIds:
                s = st.getStageInfo(sid)
                if s is not None and s.numActiveTasks + s.numCompletedTasks > 0 and s.numCompletedTasks < s.numTasks:
                    parts.append(f"stage {sid}: {s.numCompletedTasks}/{s.numTasks} tasks done, "
                                 f"{s.numActiveTasks} running")
        msg = "; ".join(parts) or "waiting"
        if self.counter is not None:
            n = self.counter.value
            of = f"/{self.total}" if self.total else ""
            msg += f"; {n}{of} files done in finished tasks ({n / max(1e-9, time.time() - self.t0):.0f}/s)"
        return msg

    def run(self) -> None:
        last_msg, last_log = None, time.time()
        while not self.stop_event.wait(self.SAMPLE_S):
            try:
                self._sample()
                if self.interval > 0 and time.time() - last_log >= self.interval:
                    last_log = time.time()
                    msg = self._message()
                    if msg != last_msg:
                        log.info("%s: %s", self.label, msg)
                        last_msg = msg
            except Exception:  # progress is best effort
                pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# Stage 1: listing.  A parallel walk of the class folders on the executors (Spark's own file
# index skips zero-byte files and names starting with "_" or ".", which must be reported).
# ---------------------------------------------------------------------------------------------

def _rel_of(path: str, prefix: str) -> str:
    if not path.startswith(prefix):
        raise ValueError(f"file {path} is not under the input root {prefix}")
    return path[len(prefix):]


def _new_listing() -> dict:
    return {"files": 0, "bytes": 0, "fp": 0, "readable": 0, "by_split": {}, "by_class": {}, "outside": 0,
            "skipped": [], "sample": []}


class _Lister:
    """Accumulates the listing of some files: counts, fingerprint, listing-time skips, sample."""

    def __init__(self, *, derived_val: bool, val_fraction: float, seed: int, class_set: frozenset,
                 sample_size: int):
        self.kw = {"derived_val": derived_val, "val_fraction": val_fraction, "seed": seed}
        self.class_set, self.sample_size = class_set, sample_size
        self.agg = _new_listing()
        self.heap: list[tuple[str, str]] = []   # negated keys: a max-heap of the smallest keys

    def add(self, rel: str, size: int, mtime_ns: int) -> None:
        agg = self.agg
        agg["files"] += 1
        agg["bytes"] += size
        digest = hashlib.sha256(f"{rel}\0{size}\0{mtime_ns}".encode("utf-8")).digest()
        agg["fp"] = (agg["fp"] + int.from_bytes(digest[:16], "big")) % (1 << 128)
        split, cls = assign(rel, **self.kw)
        s = agg["by_split"].setdefault(split, [0, 0])
        s[0] += 1
        s[1] += size
        if cls is None or cls not in self.class_set:
            agg["outside"] += 1
            agg["skipped"].append({"path": rel, "reason": "outside-class: not inside a class folder"})
            return
        if any(part.startswith("_") for part in rel.split("/")[2:]):
            agg["skipped"].append({"path": rel, "reason": "ignored-name: Spark does not read names "
                                                          "starting with '_'"})
            return
        if size == 0:
            agg["skipped"].append({"path": rel, "reason": "empty: zero-byte file"})
            return
        agg["readable"] += 1
        agg["by_class"][(split, cls)] = agg["by_class"].get((split, cls), 0) + 1
        item = (_neg_hex(shard_key(rel)), rel)
        if len(self.heap) < self.sample_size:
            heapq.heappush(self.heap, item)
        elif item > self.heap[0]:
            heapq.heapreplace(self.heap, item)

    def result(self) -> dict:
        self.agg["sample"] = sorted((_neg_hex(k), rel) for k, rel in self.heap)
        return self.agg


def _walk_partition(rel_dirs: Iterable[str], *, root: str, lister_kw: dict) -> Iterator[dict]:
    """Walk some class folders (recursively, following links like Spark's listing does)."""
    lister = _Lister(**lister_kw)
    for rel_dir in rel_dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, rel_dir), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))   # hidden: ignored
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue   # vanished or a dangling link: Spark cannot read it either
                if not stat.S_ISREG(st.st_mode):
                    continue
                lister.add(os.path.relpath(full, root).replace(os.sep, "/"), st.st_size, st.st_mtime_ns)
    yield lister.result()


def _neg_hex(h: str) -> str:
    """Order-reversing map of a hex string (for a max-heap of the smallest keys)."""
    return h.translate(str.maketrans("0123456789abcdef", "fedcba9876543210"))


def _merge_listing(a: dict, b: dict, sample_size: int = HEADER_SAMPLE) -> dict:
    out = {"files": a["files"] + b["files"], "bytes": a["bytes"] + b["bytes"],
           "fp": (a["fp"] + b["fp"]) % (1 << 128), "readable": a["readable"] + b["readable"],
           "outside": a["outside"] + b["outside"], "skipped": a["skipped"] + b["skipped"],
           "by_split": dict(a["by_split"]), "by_class": dict(a["by_class"])}
    for k, (n, nb) in b["by_split"].items():
        s = out["by_split"].get(k, [0, 0])
        out["by_split"][k] = [s[0] + n, s[1] + nb]
    for k, n in b["by_class"].items():
        out["by_class"][k] = out["by_class"].get(k, 0) + n
    out["sample"] = heapq.nsmallest(sample_size, heapq.merge(a["sample"], b["sample"]))
    return out


def class_dirs(cfg: JobConfig) -> list[str]:
    """Relative paths of the class folders to read: train/<c> and val/<c>."""
    dirs = [f"train/{c}" for c in cfg.classes]
    if cfg.has_val_dir:
        dirs += [f"val/{c}" for c in _visible_dirs(cfg.root / "val")]
    return dirs


def list_inputs(spark, cfg: JobConfig) -> dict:
    """Listing, fingerprint, counts and the probe sample of the input (no file contents read)."""
    a = cfg.args
    lister_kw = {"derived_val": cfg.derived_val, "val_fraction": a.val_fraction, "seed": a.seed,
                 "class_set": frozenset(cfg.classes), "sample_size": HEADER_SAMPLE}
    # Files directly in train/ or val/ (not in a class folder), on the driver: few and cheap.
    top = _Lister(**lister_kw)
    for split in SPLITS:
        d = cfg.root / split
        if not d.is_dir():
            continue
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            if e.name.startswith(".") or not e.is_file():
                continue
            st = e.stat()
            top.add(f"{split}/{e.name}", st.st_size, st.st_mtime_ns)
    dirs = class_dirs(cfg)
    sc = spark.sparkContext
    root = str(cfg.root)
    n = max(1, min(len(dirs), sc.defaultParallelism * PARTITIONS_PER_CORE))
    walked = sc.parallelize(dirs, n).mapPartitions(
        lambda part: _walk_partition(part, root=root, lister_kw=lister_kw))
    listing = _merge_listing(top.result(), walked.fold(_new_listing(), _merge_listing))
    fp = hashlib.sha256(json.dumps([listing["files"], listing["bytes"], f"{listing['fp']:032x}"])
                        .encode("ascii")).hexdigest()
    listing["fingerprint"] = fp
    listing["sample"] = [rel for _, rel in listing["sample"]]
    listing["skipped"].sort(key=lambda s: s["path"])
    return listing


def _partial(fn, **kwargs):
    def bound(rows):
        return fn(rows, **kwargs)
    return bound


# ---------------------------------------------------------------------------------------------
# Stage 2: probes of a deterministic sample (headers for the channels/size decision, full
# transforms for the shard-size estimate).  Executors open the files directly (shared path).
# ---------------------------------------------------------------------------------------------

def _probe_header(rel: str, root: str) -> tuple[str, Any]:
    from PIL import Image

    try:
        with open(os.path.join(root, rel), "rb") as f:
            head = f.read(16)
            fmt = sniff_format(head)
            if fmt is None:
                return ("bad", None)
            f.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(f, formats=[fmt]) as im:
                    return ("ok", (im.mode, im.size))
    except Exception:
        return ("bad", None)


def _probe_size(rel: str, root: str, t: Transform) -> int | None:
    try:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        pixels = transform_image(data, t)
        return len(encode_record(pixels, 0, rel, t)) + 16   # + TFRecord framing
    except Exception:
        return None


def decide_transform(spark, cfg: JobConfig, sample: list[str]) -> tuple[Transform, dict]:
    a = cfg.args
    info: dict[str, Any] = {}
    channels, native = a.channels, None
    if a.channels is None or a.image_size is None:
        sc = spark.sparkContext
        root = str(cfg.root)
        n = max(1, min(len(sample), sc.defaultParallelism * 2))
        res = sc.parallelize(sample, n).map(lambda rel: _probe_header(rel, root)).collect()
        ok = [v for status, v in res if status == "ok"]
        gray = sum(1 for mode, _ in ok if mode_channels(mode) == 1)
        info["header_sample"] = {"files": len(sample), "readable": len(ok), "gray": gray, "color": len(ok) - gray}
        if not ok:
            raise DataError(f"none of the {len(sample)} sampled input files is a readable JPEG or PNG")
        if channels is None:
            channels = 1 if gray > len(ok) - gray else 3
            info["channels"] = (f"{channels} (majority of a header sample: {gray} grayscale, "
                                f"{len(ok) - gray} color of {len(ok)} readable files)")
        if a.image_size is None:
            sizes: dict[tuple[int, int], int] = {}
            for _, size in ok:
                sizes[tuple(size)] = sizes.get(tuple(size), 0) + 1
            if len(sizes) > 1:
                top = ", ".join(f"{w}x{h} ({n})" for (w, h), n in
                                sorted(sizes.items(), key=lambda kv: -kv[1])[:5])
                raise DataError(f"the images have different sizes (sample of {len(ok)}: {top}): "
                                f"pass --image-size S to resize them")
            native = next(iter(sizes))
    t = Transform(channels=channels, size=a.image_size, resize=a.resize, native=native,
                  encoding=a.encoding, jpeg_quality=a.jpeg_quality)
    return t, info


def estimate_record_bytes(spark, cfg: JobConfig, t: Transform, sample: list[str]) -> float:
    h, w, c = t.shape
    if t.encoding == "raw":
        return h * w * c + 120.0
    sc = spark.sparkContext
    root = str(cfg.root)
    few = sample[:SIZE_SAMPLE]
    n = max(1, min(len(few), sc.defaultParallelism * 2))
    sizes = [s for s in sc.parallelize(few, n).map(lambda rel: _probe_size(rel, root, t)).collect() if s]
    if not sizes:
        return h * w * c + 120.0
    return float(sum(sizes)) / len(sizes)


# ---------------------------------------------------------------------------------------------
# Stage 3: decode + transform + encode (input partitions) -> shuffle to shards -> write shards
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShardPlan:
    splits: tuple[str, ...]
    counts: tuple[int, ...]     # shards per split
    offsets: tuple[int, ...]    # first partition of each split

    @property
    def total(self) -> int:
        return sum(self.counts)

    def partition(self, split: str, key: str) -> int:
        i = self.splits.index(split)
        u = int(key, 16) / 16.0 ** len(key)
        return self.offsets[i] + min(int(u * self.counts[i]), self.counts[i] - 1)

    def shard_of(self, p: int) -> tuple[str, int, int]:
        for split, off, n in zip(self.splits, self.offsets, self.counts):
            if off <= p < off + n:
                return split, p - off, n
        raise IndexError(p)


def content_rdd(spark, df):
    """(path, content) of every file of a binaryFile DataFrame as a Python RDD.

    The rows go from the JVM to Python as a pair RDD of (String, byte[]), which PySpark streams
    as raw bytes (as `sc.binaryFiles` does) instead of pickled `Row`s: about 4x less CPU for
    image-sized values.  Falls back to `df.rdd` where the JVM is not reachable (Spark Connect).
    """
    try:
        from pyspark.rdd import RDD
        from pyspark.serializers import NoOpSerializer, PairDeserializer, UTF8Deserializer

        enc = spark.sparkContext._jvm.org.apache.spark.sql.Encoders
        pairs = getattr(df.select("path", "content")._jdf, "as")(enc.tuple(enc.STRING(), enc.BINARY()))
        return RDD(pairs.javaRDD(), spark.sparkContext, PairDeserializer(UTF8Deserializer(), NoOpSerializer()))
    except Exception as e:  # pragma: no cover - depends on the deployment
        log.info("raw content transfer unavailable (%s); using DataFrame.rdd", e)
        return df.select("path", "content").rdd.map(tuple)


def _decode_partition(rows: Iterable, *, prefix: str, derived_val: bool, val_fraction: float, seed: int,
                      class_index: dict, t: Transform, plan: ShardPlan, counter) -> Iterator:
    stats = HistogramStats(t.channels)
    done = 0
    for path, content in rows:
        rel = _rel_of(path, prefix)
        split, cls = assign(rel, derived_val=derived_val, val_fraction=val_fraction, seed=seed)
        key = shard_key(rel)
        p = plan.partition(split, key)
        label = class_index.get(cls) if cls is not None else None
        done += 1
        if label is None:
            where = "not inside a class folder" if cls is None else f"unknown class folder {cls!r}"
            yield (p, key, rel), ("skip", f"outside-class: {where}")
            continue
        try:
            pixels = transform_image(content if isinstance(content, bytes) else bytes(content), t)
        except BadImage as e:
            yield (p, key, rel), ("skip", e.reason)
            continue
        record = encode_record(pixels, label, rel, t)
        if split == "train":
            stats.update(pixels)
        yield (p, key, rel), ("rec", label, record)
    counter.add(done)
    if stats.images:
        st = stats.to_channel_stats()
        yield (0, "", ""), ("stats", st.to_dict(), stats.images)


def _write_partition(p: int, rows: Iterable, *, staging: str, plan: ShardPlan, num_classes: int) -> Iterator[dict]:
    split, index, count = plan.shard_of(p)
    per_class = [0] * num_classes
    skipped: list[dict] = []
    stats: list[dict] = []

    def recs() -> Iterator[bytes]:
        for (_, _, rel), value in rows:
            kind = value[0]
            if kind == "rec":
                per_class[value[1]] += 1
                yield value[2]
            elif kind == "skip":
                skipped.append({"path": rel, "reason": value[1]})
            elif kind == "stats":
                stats.append(value[1])

    entry = records.write_shard(os.path.join(staging, records.shard_name(split, index, count)), recs())
    yield {"split": split, "index": index, "count": count, "entry": entry, "per_class": per_class,
           "skipped": skipped, "stats": stats}


def process(spark, df, cfg: JobConfig, t: Transform, plan: ShardPlan, staging: Path, listing: dict) -> list[dict]:
    sc = spark.sparkContext
    a = cfg.args
    # Input partitions: enough to keep every core busy (and balanced), none too big.
    dp = sc.defaultParallelism
    n_files = max(1, listing["readable"])
    target = max(dp * PARTITIONS_PER_CORE, math.ceil(listing["readable"] / FILES_PER_PARTITION),
                 math.ceil(listing["bytes"] / MAX_PARTITION_BYTES))
    target = min(target, n_files)
    spark.conf.set("spark.sql.files.openCostInBytes", str(4096))
    spark.conf.set("spark.sql.files.minPartitionNum", str(target))
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(MAX_PARTITION_BYTES))

    counter = sc.accumulator(0)
    prefix = "file:" + str(cfg.root) + "/"
    decode = _partial(_decode_partition, prefix=prefix, derived_val=cfg.derived_val,
                      val_fraction=a.val_fraction, seed=a.seed,
                      class_index={c: i for i, c in enumerate(cfg.classes)}, t=t, plan=plan, counter=counter)
    write_kw = {"staging": str(staging), "plan": plan, "num_classes": len(cfg.classes)}

    content = content_rdd(spark, df)
    n_in = content.getNumPartitions()
    log.info("decode: %d input partitions on %d cores -> %d shard partitions", n_in, dp, plan.total)
    pairs = content.mapPartitions(decode)
    shards = pairs.repartitionAndSortWithinPartitions(
        numPartitions=plan.total, partitionFunc=lambda k: k[0], keyfunc=lambda k: k)
    written = shards.mapPartitionsWithIndex(lambda p, rows: _write_partition(p, rows, **write_kw))
    sc.setJobGroup("preprocess-write", "decode, resize, encode and write shards")
    progress = _Progress(sc, "preprocess-write", "decode+write", a.progress_interval, counter, listing["readable"])
    with progress:
        results = written.collect()
    progress._sample()
    return sorted(results, key=lambda r: (SPLITS.index(r["split"]), r["index"])), progress.timeline


def plan_shards(cfg: JobConfig, listing: dict, record_bytes: float) -> ShardPlan:
    a = cfg.args
    counts = []
    for split in SPLITS:
        n = sum(v for (s, _), v in listing["by_class"].items() if s == split)
        if a.num_shards is not None:
            k = a.num_shards
        else:
            k = math.ceil(n * record_bytes / (a.shard_mb * (1 << 20)))
        counts.append(max(1, min(k, max(n, 1))))
    offsets = tuple(sum(counts[:i]) for i in range(len(counts)))
    return ShardPlan(SPLITS, tuple(counts), offsets)


# =============================================================================================
# The job
# =============================================================================================

def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def summarize_skips(skipped: list[dict]) -> str:
    by_code: dict[str, int] = {}
    for s in skipped:
        code = s["reason"].split(":", 1)[0]
        by_code[code] = by_code.get(code, 0) + 1
    return ", ".join(f"{c} {n}" for c, n in sorted(by_code.items(), key=lambda kv: -kv[1]))


def _skip_lines(skipped: list[dict], limit: int = MAX_LISTED_SKIPS) -> str:
    lines = [f"  {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def run(cfg: JobConfig, t_start: float) -> int:
    a = cfg.args
    options = effective_options(cfg)
    split_desc = ("train/ and val/ folders" if cfg.has_val_dir
                  else f"val = {a.val_fraction:g} of train/ by path hash (seed {a.seed})")
    log.info("start: input %s (%d classes; split: %s) -> output %s", cfg.root, len(cfg.classes),
             split_desc, cfg.output)
    log.info("options: %s", json.dumps({k: v for k, v in vars(a).items() if k not in ("input", "output")},
                                       sort_keys=True))
    with output_lock(cfg.output), tempfile.TemporaryDirectory(prefix="preprocess-images-") as tmp:
        remove_stale(cfg.output)
        t_session0 = time.time()
        spark = create_session()
        try:
            t_session = time.time()
            sc = spark.sparkContext
            sc.setLogLevel("WARN")
            shipped = ship_lottery(spark, Path(tmp))
            log.info("spark %s, master %s, %d cores; lottery on executors: %s; session ready in %.1f s",
                     spark.version, sc.master, sc.defaultParallelism, shipped, t_session - t_session0)
            return _run_with_spark(spark, cfg, options, t_start, t_session0, t_session)
        finally:
            spark.stop()


def _run_with_spark(spark, cfg: JobConfig, options: dict, t_start: float, t_session0: float,
                    t_session: float) -> int:
    a = cfg.args
    sc = spark.sparkContext
    timings: dict[str, float] = {"session_start_s": t_session - t_session0}

    # --- 1. listing + fingerprint (no file contents are read) ---
    t0 = time.time()
    timings["first_job_at"] = t0
    sc.setJobGroup("preprocess-list", "list input files")
    listing = list_inputs(spark, cfg)
    timings["listing_s"] = time.time() - t0
    by_split = {s: listing["by_split"].get(s, [0, 0])[0] for s in SPLITS}
    log.info("listing: %d files (%.1f MB) in %.1f s: %s%s", listing["files"], listing["bytes"] / 1e6,
             timings["listing_s"], _fmt_counts(by_split),
             f"; {listing['outside']} outside class folders" if listing["outside"] else "")
    if listing["readable"] == 0:
        raise InputError(f"no (non-empty) files in the class folders of {cfg.root / 'train'}")

    if not a.force:
        existing = up_to_date(cfg.output, listing["fingerprint"], options)
        if existing is not None:
            log.info("already up to date: %s (dataset_id %s, input fingerprint %s); nothing to do",
                     cfg.output, existing["dataset_id"], listing["fingerprint"][:12])
            print(f"already up to date: {cfg.output}", flush=True)
            return EXIT_OK

    # --- 2. decisions from a deterministic sample ---
    t0 = time.time()
    sc.setJobGroup("preprocess-probe", "probe a sample of the input")
    t, decision = decide_transform(spark, cfg, listing["sample"])
    record_bytes = estimate_record_bytes(spark, cfg, t, listing["sample"])
    plan = plan_shards(cfg, listing, record_bytes)
    timings["probe_s"] = time.time() - t0
    if "channels" in decision:
        log.info("channels: %s", decision["channels"])
    log.info("plan: images %dx%dx%d (%s), ~%.1f KB per record; shards: %s (probe %.1f s)",
             t.shape[0], t.shape[1], t.shape[2],
             f"{t.resize} to {t.size}" if t.size else "native size", record_bytes / 1024,
             _fmt_counts(dict(zip(plan.splits, plan.counts))), timings["probe_s"])

    # --- 3. decode + write shards into the staging directory ---
    df = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
          .load([_uri(cfg.root / d) for d in class_dirs(cfg)]))
    staging = cfg.output.with_name(f"{cfg.output.name}.staging-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        t0 = time.time()
        results, timeline = process(spark, df, cfg, t, plan, staging, listing)
        timings["process_s"] = time.time() - t0
        timings["process_started_at"] = t0
        manifest = assemble(cfg, options, t, plan, listing, results, decision, spark, timings, t_start, timeline)
        # Remove anything that is not a listed shard (temporary files of failed task attempts).
        keep = {s["file"] for sp in manifest["splits"].values() for s in sp["shards"]}
        for p in staging.iterdir():
            if p.name not in keep:
                p.unlink()
        records.write_manifest(staging, manifest)   # last: a reader needs it
        publish(staging, cfg.output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    total = time.time() - t_start
    written = sum(s["count"] for s in manifest["splits"].values())
    log.info("done: %d records written (%s), %d skipped (%s), %.1f s total, Spark start-up %.1f s, "
             "%.1f images/s after start-up; dataset_id %s -> %s",
             written, ", ".join(f"{k} {v['count']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items()),
             len(manifest["skipped"]), summarize_skips(manifest["skipped"]) or "none", total,
             timings["session_start_s"], listing["files"] / max(1e-9, time.time() - timings["first_job_at"]),
             manifest["dataset_id"], cfg.output)
    return EXIT_OK


def assemble(cfg: JobConfig, options: dict, t: Transform, plan: ShardPlan, listing: dict, results: list[dict],
             decision: dict, spark, timings: dict, t_start: float, timeline: list) -> dict:
    a = cfg.args
    splits: dict[str, dict] = {s: {"count": 0, "per_class": [0] * len(cfg.classes), "shards": []} for s in SPLITS}
    skipped: list[dict] = []
    stats = records.ChannelStats(t.channels)
    for r in results:
        sp = splits[r["split"]]
        sp["shards"].append(r["entry"])
        sp["count"] += r["entry"]["records"]
        sp["per_class"] = [x + y for x, y in zip(sp["per_class"], r["per_class"])]
        skipped.extend(r["skipped"])
        for d in r["stats"]:
            stats = stats.merge(records.ChannelStats.from_dict(d))
    good = sum(sp["count"] for sp in splits.values())
    if good + len(skipped) != listing["readable"]:
        raise DataError(f"the input changed while the job was running: {good + len(skipped)} files were read, "
                        f"{listing['readable']} were listed; run the job again")
    skipped = sorted(skipped + listing["skipped"], key=lambda s: s["path"])
    assert good + len(skipped) == listing["files"]

    mismatched = [s for s in skipped if s["reason"].startswith("size-mismatch")]
    if mismatched:
        raise DataError(f"{len(mismatched)} images do not have the size of the others "
                        f"({t.native[0]}x{t.native[1]}), e.g.\n{_skip_lines(mismatched, 5)}\n"
                        f"pass --image-size S to resize all images to S x S")
    frac = len(skipped) / listing["files"]
    if frac > a.max_bad_fraction:
        raise DataError(f"{len(skipped)} of {listing['files']} input files ({frac:.1%}) are unusable "
                        f"({summarize_skips(skipped)}), more than --max-bad-fraction={a.max_bad_fraction:g}:\n"
                        f"{_skip_lines(skipped)}")
    empty = [c for c, n in zip(cfg.classes, splits["train"]["per_class"]) if n == 0]
    if empty:
        raise DataError(f"{len(empty)} classes have no usable training images: {', '.join(empty[:10])}"
                        + (" ..." if len(empty) > 10 else ""))
    if skipped:
        log.warning("skipped %d unusable files (%s):\n%s", len(skipped), summarize_skips(skipped),
                    _skip_lines(skipped))
    empty_val = [c for c, n in zip(cfg.classes, splits["val"]["per_class"]) if n == 0]
    if empty_val:
        log.warning("%d classes have no validation images: %s", len(empty_val), ", ".join(empty_val[:10]))

    sc = spark.sparkContext
    timings = dict(timings)
    manifest = records.build_manifest(
        classes=cfg.classes, image_shape=list(t.shape), encoding=t.encoding, splits=splits, stats=stats,
        options=options, skipped=skipped, spark_version=spark.version, duration_s=time.time() - t_start)
    manifest["input_fingerprint"] = {
        "sha256": listing["fingerprint"], "files": listing["files"], "bytes": listing["bytes"],
        "basis": "relative path, size and mtime of every file under train/ and val/",
    }
    manifest["input"] = {
        "root": str(cfg.root), "files_per_split": {s: listing["by_split"].get(s, [0, 0])[0] for s in SPLITS},
        "outside_class_folders": listing["outside"],
        "split": options["split"],
    }
    if decision:
        manifest["decisions"] = decision
    manifest["spark"] = {"version": spark.version, "master": sc.master, "default_parallelism": sc.defaultParallelism,
                         "app_id": sc.applicationId}
    timings["finished_at"] = time.time()
    manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
    manifest["timings"]["decode_progress"] = [list(x) for x in timeline]  # [s since decode start, files]
    manifest["job"] = {"max_bad_fraction": a.max_bad_fraction}
    return manifest


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s preprocess_images %(levelname)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        cfg = validate(args)
        return run(cfg, t_start)
    except InputError as e:
        log.error("%s", e)
        print(f"preprocess_images: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except DataError as e:
        log.error("%s", e)
        print(f"preprocess_images: error: {e}", file=sys.stderr, flush=True)
        return EXIT_DATA


if __name__ == "__main__":
    sys.exit(main())
