"""The command line and every check that needs no Spark: arguments, input layout, output path."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from lottery.data.example import ENCODINGS
from lottery.data.manifest import MANIFEST_NAME

from .cluster import executor_timeout
from .errors import InputError
from .labels import IMAGE_SUFFIXES, flat_images, label_file_sha256, resolve_val_labels

# Bump when the same options would produce different bytes (it is part of the options, so of
# the dataset_id and of the "already up to date" check).
PREPROCESS_VERSION = 1
RESIZE_METHODS = ("shorter-side-crop", "exact")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="preprocess_images.py",
        description="Image folder (ROOT/train/<class>/..., optional ROOT/val/<class>/... or ROOT/val/* "
                    "with --val-labels) -> TFRecord shards + manifest.json in the lottery record format.")
    p.add_argument("--input", required=True, metavar="ROOT", help="input root with train/ (and val/)")
    p.add_argument("--output", required=True, metavar="DATA_DIR", help="output dataset directory")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="output S x S; default: keep the native size when all images share one")
    p.add_argument("--resize", choices=RESIZE_METHODS, default="shorter-side-crop",
                   help="shorter-side-crop: scale the shorter side to S and crop the centre "
                        "(ImageNet convention); exact: scale to S x S ignoring the aspect ratio")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="output channels; default: the majority of a header sample of the input")
    p.add_argument("--encoding", choices=ENCODINGS, default="png")
    p.add_argument("--jpeg-quality", type=int, default=95, help="with --encoding jpeg (1-100)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="without ROOT/val: fraction of train/ split off as val (by path hash)")
    p.add_argument("--seed", type=int, default=0, help="salt of the train/val split hash")
    p.add_argument("--val-labels", default=None, metavar="FILE",
                   help="the labels of a flat ROOT/val/ (images directly in it, like the ILSVRC-2012 "
                        "validation set): LOC_val_solution.csv (ImageId,PredictionString) or "
                        "filename,class rows")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shard-mb", type=float, default=100.0, help="target shard size in MB (default 100)")
    g.add_argument("--num-shards", type=int, default=None, help="exact number of shards per split")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of the input files is unusable")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="wait this long for another job writing the same output, then fail "
                        "(default: $LOTTERY_DATA_LOCK_TIMEOUT or 1800)")
    p.add_argument("--progress-interval", type=float, default=15.0, metavar="SECONDS",
                   help="log progress of the running stage this often (0: never)")
    p.add_argument("--executor-timeout", type=float, default=None, metavar="SECONDS",
                   help="on a non-local master, fail when no Spark executor has registered for this long "
                        "(default: $LOTTERY_SPARK_EXECUTOR_TIMEOUT or 120; inf: no bound)")
    p.add_argument("--error-file", default=None, metavar="PATH",
                   help="when the job fails, write its error there as JSON (the DAG's preprocess task "
                        "reports it as the task's error)")
    return p.parse_args(argv)


@dataclasses.dataclass
class JobConfig:
    root: Path
    output: Path
    classes: list[str]
    has_val_dir: bool   # the val split is ROOT/val (class folders, or flat with val_labels)
    args: argparse.Namespace
    # --val-labels: {file name directly in val/: class folder}; None: val/ has class folders (or no val/).
    val_labels: dict[str, str] | None = None
    val_labels_sha256: str | None = None   # of the label file's bytes (effective_options)

    @property
    def derived_val(self) -> bool:
        return not self.has_val_dir


def visible_dirs(path: Path) -> list[str]:
    # Spark's file listing ignores names starting with "." or "_": so do we.
    return sorted(e.name for e in os.scandir(path)
                  if e.is_dir() and not e.name.startswith((".", "_")))


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_val_layout(args: argparse.Namespace, val: Path, classes: list[str]) -> None:
    """ROOT/val: class folders of train/'s classes (files directly in it beside them are skipped), or
    images directly in it with --val-labels; never both, never flat images without labels."""
    if args.val_labels is not None:
        if not val.is_dir():
            raise InputError(f"--val-labels {args.val_labels}: there is no {val} folder (expected the "
                             f"validation images directly in it)")
        val_dirs = visible_dirs(val)
        if val_dirs:
            raise InputError(f"--val-labels {args.val_labels} is for a flat val/ (images directly in it), "
                             f"but {val} has class folders ({', '.join(val_dirs[:10])}): pass --val-labels "
                             f"or use class folders in val/, not both")
        if not flat_images(val):
            raise InputError(f"--val-labels {args.val_labels}: {val} holds no images "
                             f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}) directly")
    elif val.is_dir():
        val_dirs = visible_dirs(val)
        extra = [c for c in val_dirs if c not in set(classes)]
        if extra:
            raise InputError(f"{val} has class folders that train/ does not have: "
                             f"{', '.join(extra[:10])}")
        if not val_dirs:
            flat = flat_images(val)
            if flat:
                raise InputError(f"{val} holds {len(flat)} images directly ({', '.join(flat[:3])}"
                                 f"{', ...' if len(flat) > 3 else ''}) and no class folders: pass "
                                 f"--val-labels FILE with their classes (LOC_val_solution.csv or "
                                 f"filename,class rows), or move them into val/<class>/ folders")


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
    if args.lock_timeout is not None and not args.lock_timeout >= 0:
        raise InputError(f"--lock-timeout must be a number of seconds >= 0, got {args.lock_timeout}")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise InputError(f"--max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")
    executor_timeout(args.executor_timeout)

    root = Path(os.path.abspath(args.input))
    if not root.exists():
        raise InputError(f"input root {root} does not exist")
    if not root.is_dir():
        raise InputError(f"input root {root} is not a directory")
    train = root / "train"
    if not train.is_dir():
        raise InputError(f"input root {root} has no train/ folder: expected the ImageNet layout "
                         f"ROOT/train/<class>/<images> (and optionally ROOT/val/<class>/<images>)")
    classes = visible_dirs(train)
    if not classes:
        raise InputError(f"{train} has no class folders: expected ROOT/train/<class>/<images>")
    val = root / "val"
    has_val = val.is_dir()
    _check_val_layout(args, val, classes)

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
    if output.is_dir() and not (output / MANIFEST_NAME).exists() and any(output.iterdir()):
        raise InputError(f"output {output} is a non-empty directory without {MANIFEST_NAME}: "
                         f"refusing to replace something that is not a dataset written by this job")
    labels = sha = None
    if args.val_labels is not None:   # last: it reads the label file and lists val/
        sha = label_file_sha256(args.val_labels)
        labels = resolve_val_labels(args.val_labels, val, classes)
    return JobConfig(root=root, output=output, classes=classes, has_val_dir=has_val, args=args,
                     val_labels=labels, val_labels_sha256=sha)


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
    if cfg.val_labels is not None:   # only then: the options (and ids) of every other input stay as they were
        opts["val_labels"] = cfg.val_labels_sha256
    if a.num_shards is not None:
        opts["num_shards"] = a.num_shards
    else:
        opts["shard_mb"] = a.shard_mb
    return opts
