"""A flat validation folder with a label file (``ROOT/val/*.JPEG`` + ``--val-labels FILE``: the
ILSVRC-2012 validation set as distributed): spark_jobs.preprocess.labels, the checks of
``args.validate``, ``sharding.assign``, the listing's counts and the options, all without Spark;
and one spark-submit run (local[2]) of each label format.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spark_jobs.preprocess import args as job_args
from spark_jobs.preprocess import labels, listing, sharding
from spark_jobs.preprocess.errors import InputError

CLASSES = ["n01440764", "n01443537", "n01484850"]   # WordNet ids, like ImageNet's class folders
SOLUTION = """ImageId,PredictionString
ILSVRC2012_val_00000001,n01443537 10 20 30 40 n01443537 1 2 3 4
ILSVRC2012_val_00000002,n01440764 0 0 7 7
ILSVRC2012_val_00000003,n01484850 1 1 5 5
"""


def _jpeg(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_root(tmp: Path, val: dict[str, bytes] | None = None, per_class: int = 2) -> Path:
    """ROOT/train/<wnid>/{0..per_class-1}.png; ROOT/val/<name> for each of ``val`` (flat)."""
    root = tmp / "in"
    for k, cls in enumerate(CLASSES):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(per_class):
            (root / "train" / cls / f"{i}.png").write_bytes(_png(100 * k + i))
    if val is not None:
        (root / "val").mkdir()
        for name, data in val.items():
            (root / "val" / name).write_bytes(data)
    return root


def flat_val(n: int = 3) -> dict[str, bytes]:
    return {f"ILSVRC2012_val_{i:08d}.JPEG": _jpeg(i) for i in range(1, n + 1)}


def validate(root: Path, out: Path, *extra: str) -> job_args.JobConfig:
    return job_args.validate(job_args.parse_args(["--input", str(root), "--output", str(out), *extra]))


# ---------------------------------------------------------------------------------------------
# the label file
# ---------------------------------------------------------------------------------------------

def test_solution_csv_class_is_the_first_token(tmp_path):
    f = tmp_path / "LOC_val_solution.csv"
    f.write_text(SOLUTION)
    assert labels.read_val_labels(f) == {"ILSVRC2012_val_00000001": "n01443537",
                                         "ILSVRC2012_val_00000002": "n01440764",
                                         "ILSVRC2012_val_00000003": "n01484850"}


@pytest.mark.parametrize("header", ["filename,class\n", "Filename, Class\n", ""])
def test_plain_csv_with_or_without_header(tmp_path, header):
    f = tmp_path / "labels.csv"
    f.write_text(header + "a.JPEG,n01440764\n\n b , n01443537 \n\"c,d.png\",n01484850\n")
    assert labels.read_val_labels(f) == {"a.JPEG": "n01440764", "b": "n01443537", "c,d.png": "n01484850"}


def test_ids_match_files_by_name_or_by_stem(tmp_path, caplog):
    val = tmp_path / "val"
    val.mkdir()
    for name in ("ILSVRC2012_val_00000001.JPEG", "x.png", "y.jpg", "notes.txt", ".hidden.JPEG", "_tmp.JPEG"):
        (val / name).write_bytes(b"\xff\xd8 not decoded here")
    f = tmp_path / "labels.csv"
    f.write_text("ILSVRC2012_val_00000001,n01440764\n"       # by stem
                 "x.png,n01443537\n"                          # by name
                 "y,n01484850\n"
                 "ILSVRC2012_val_00049999,n01440764\n"       # no such file: allowed
                 "gone.JPEG,n99999999\n")                     # nor its class: it labels nothing
    with caplog.at_level(logging.INFO, logger="preprocess_images"):
        got = labels.resolve_val_labels(f, val, CLASSES)
    assert got == {"ILSVRC2012_val_00000001.JPEG": "n01440764", "x.png": "n01443537", "y.jpg": "n01484850"}
    lines = [r.getMessage() for r in caplog.records if "val labels" in r.getMessage()]
    assert len(lines) == 1 and "3 images" in lines[0] and "2 labels name no file there" in lines[0]


def test_an_id_matching_two_files_must_name_the_extension(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    (val / "a.jpg").write_bytes(b"x")
    (val / "a.png").write_bytes(b"x")
    f = tmp_path / "labels.csv"
    f.write_text("a.png,n01440764\na,n01440764\n")
    with pytest.raises(InputError, match=r"labels.csv, line 2: 'a' matches several files.*a.jpg, a.png"):
        labels.resolve_val_labels(f, val, CLASSES)


def test_images_without_labels_are_counted_and_ten_named(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(16):
        (val / f"img{i:02d}.JPEG").write_bytes(b"x")
    f = tmp_path / "labels.csv"
    f.write_text("img00,n01440764\n")
    with pytest.raises(InputError) as e:
        labels.resolve_val_labels(f, val, CLASSES)
    msg = str(e.value)
    assert "15 of the 16 images" in msg and str(f) in msg
    assert "img01.JPEG" in msg and "img10.JPEG" in msg and "img11.JPEG" not in msg and "and 5 more" in msg


# ---------------------------------------------------------------------------------------------
# validate(): every refusal before any work, nothing written
# ---------------------------------------------------------------------------------------------

BAD = {
    # case: (label file content or None for no file, val/ layout, extra, message regex)
    "missing-file": (None, "flat", r"val label file .*nope.csv does not exist"),
    "a-directory": ("<dir>", "flat", r"val label file .*labels.csv is a directory"),
    "not-utf8": (b"a,n01440764\n\xff\xfe,x\n", "flat", r"labels.csv, line 2: not UTF-8"),
    "three-columns": ("filename,class\nILSVRC2012_val_00000001.JPEG,n01440764\nb,c,d\n", "flat",
                      r"labels.csv, line 3: expected 2 comma-separated columns, got 3"),
    "unknown-header": ("image id,label,box\nILSVRC2012_val_00000001,n01440764,0\n", "flat",
                       r"labels.csv, line 1: unknown header"),
    "empty-class": ("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 0 0 1 1\n"
                    "ILSVRC2012_val_00000002,\n", "flat", r"labels.csv, line 3: empty class"),
    "empty-plain-class": ("ILSVRC2012_val_00000001, \n", "flat", r"labels.csv, line 1: empty class"),
    "a-path": ("val/ILSVRC2012_val_00000001.JPEG,n01440764\n", "flat", r"labels.csv, line 1: .* is a path"),
    "conflict": ("filename,class\nILSVRC2012_val_00000001,n01440764\nILSVRC2012_val_00000002,n01440764\n"
                 "ILSVRC2012_val_00000001,n01443537\n", "flat",
                 r"labels.csv, line 4: 'ILSVRC2012_val_00000001' is labelled 'n01443537', but line 2 labels it "
                 r"'n01440764'"),
    "conflict-name-and-stem": ("ILSVRC2012_val_00000001,n01440764\nILSVRC2012_val_00000001.JPEG,n01443537\n",
                               "flat", r"labels.csv, line 2: .* but line 1 labels the same file"),
    "no-labels": ("filename,class\n", "flat", r"labels.csv has no labels"),
    "unknown-class": ("filename,class\nILSVRC2012_val_00000001,n01440764\nILSVRC2012_val_00000002,n09999999\n"
                      "ILSVRC2012_val_00000003,n01440764\n", "flat",
                      r"labels.csv, line 3: class 'n09999999' of 'ILSVRC2012_val_00000002' is not a class folder "
                      r"of train/"),
    "header-like-first-row": ("image,label\nILSVRC2012_val_00000001,n01440764\n", "flat-with-image",
                              r"line 1: class 'label' .*if line 1 is a header"),
    "unlabelled-image": ("ILSVRC2012_val_00000001,n01440764\nILSVRC2012_val_00000003,n01440764\n", "flat",
                         r"1 of the 3 images directly in .*val have no label in .*labels.csv: "
                         r"ILSVRC2012_val_00000002.JPEG$"),
    "val-class-folders": (SOLUTION, "folders", r"--val-labels .*labels.csv is for a flat val/.*"
                                               r"val has class folders \(n01440764\)"),
    "no-val": (SOLUTION, None, r"--val-labels .*labels.csv: there is no .*val folder"),
    "val-without-images": (SOLUTION, "empty", r"val holds no images"),
    "flat-without-labels": (False, "flat", r"val holds 3 images directly \(ILSVRC2012_val_00000001.JPEG, "
                                           r"ILSVRC2012_val_00000002.JPEG, ILSVRC2012_val_00000003.JPEG\) and "
                                           r"no class folders: pass --val-labels FILE"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_labels_or_layouts_are_refused_before_any_work(tmp_path, case):
    content, layout, message = BAD[case]
    val = {"flat": flat_val(), "flat-with-image": {"image.JPEG": _jpeg(9)}, "empty": {"notes.txt": b"x"},
           "folders": {}, None: None}[layout]
    root = make_root(tmp_path, val)
    if layout == "folders":
        (root / "val" / CLASSES[0]).mkdir()
        (root / "val" / CLASSES[0] / "x.png").write_bytes(_png(1))
    f = tmp_path / "labels.csv"
    if content == "<dir>":
        f.mkdir()
    elif isinstance(content, bytes):
        f.write_bytes(content)
    elif content:
        f.write_text(content)
    extra = [] if content is False else ["--val-labels", str(tmp_path / "nope.csv" if content is None else f)]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match=message):
        validate(root, out, *extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()


def test_stray_files_beside_val_class_folders_are_still_accepted(tmp_path):
    root = make_root(tmp_path, {"stray.png": _png(5)})
    (root / "val" / CLASSES[1]).mkdir()
    (root / "val" / CLASSES[1] / "v.png").write_bytes(_png(6))
    cfg = validate(root, tmp_path / "out")
    assert cfg.has_val_dir and cfg.val_labels is None
    got = _listing(cfg)
    assert got["by_class"][("val", CLASSES[1])] == 1
    assert {"path": "val/stray.png", "reason": "outside-class: not inside a class folder"} in got["skipped"]


def test_flat_val_with_labels_is_the_val_split(tmp_path):
    root = make_root(tmp_path, flat_val())
    f = tmp_path / "LOC_val_solution.csv"
    f.write_text(SOLUTION)
    cfg = validate(root, tmp_path / "out", "--val-labels", str(f))
    assert cfg.has_val_dir and not cfg.derived_val
    assert cfg.val_labels == {"ILSVRC2012_val_00000001.JPEG": "n01443537", "ILSVRC2012_val_00000002.JPEG": "n01440764",
                              "ILSVRC2012_val_00000003.JPEG": "n01484850"}
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# assign, listing, options
# ---------------------------------------------------------------------------------------------

def test_assign_with_val_labels():
    kw = dict(derived_val=False, val_fraction=0.1, seed=0)
    vl = {"ILSVRC2012_val_00000001.JPEG": "n01440764"}
    assert sharding.assign("val/ILSVRC2012_val_00000001.JPEG", **kw, val_labels=vl) == ("val", "n01440764")
    assert sharding.assign("val/unlabelled.JPEG", **kw, val_labels=vl) == ("val", None)
    assert sharding.assign("train/n01440764/a.JPEG", **kw, val_labels=vl) == ("train", "n01440764")
    assert sharding.assign("train/a.JPEG", **kw, val_labels=vl) == ("train", None)
    # without labels: as it always was (a file directly in val/ is in no class)
    assert sharding.assign("val/ILSVRC2012_val_00000001.JPEG", **kw) == ("val", None)
    assert sharding.assign("val/ILSVRC2012_val_00000001.JPEG", **kw, val_labels=None) == ("val", None)
    assert sharding.assign("val/c/x.jpg", **kw) == ("val", "c")


def _listing(cfg: job_args.JobConfig) -> dict:
    """`list_inputs`'s result, walked in this process (as `local_fingerprint` does)."""
    kw = listing.lister_kwargs(cfg)
    walked = next(listing._walk_partition(listing.class_dirs(cfg), root=str(cfg.root), lister_kw=kw))
    return listing._finish(listing._merge_listing(listing._top_level(cfg, kw), walked))


def test_listing_counts_flat_val_files_in_their_classes(tmp_path):
    val = flat_val()
    val["README.txt"] = b"not an image, not labelled\n"
    root = make_root(tmp_path, val)
    f = tmp_path / "LOC_val_solution.csv"
    f.write_text(SOLUTION)
    cfg = validate(root, tmp_path / "out", "--val-labels", str(f))
    got = _listing(cfg)
    assert got["by_class"] == {("train", c): 2 for c in CLASSES} | {("val", c): 1 for c in CLASSES}
    assert got["readable"] == 9 and got["outside"] == 1
    assert got["skipped"] == [{"path": "val/README.txt",
                               "reason": "outside-class: not inside a class folder and not in the val label file"}]
    assert "val/ILSVRC2012_val_00000001.JPEG" in got["sample"]
    # the fingerprint is of the files alone (path, size, mtime), as for every other layout
    assert got["fingerprint"] == _listing(job_args.JobConfig(
        root=cfg.root, output=cfg.output, classes=cfg.classes, has_val_dir=True, args=cfg.args))["fingerprint"]
    assert listing.local_fingerprint(cfg) == got["fingerprint"]


def test_options_are_unchanged_without_labels(tmp_path):
    root = make_root(tmp_path)
    derived = job_args.effective_options(validate(root, tmp_path / "out"))
    assert derived == {"preprocess_version": 1, "source": "spark", "image_size": None, "channels": "auto",
                       "encoding": "png", "split": {"val_fraction": 0.1, "seed": 0}, "shard_mb": 100.0}
    (root / "val" / CLASSES[0]).mkdir(parents=True)
    folders = job_args.effective_options(validate(root, tmp_path / "out", "--image-size", "32", "--encoding", "jpeg",
                                                  "--num-shards", "2"))
    assert folders == {"preprocess_version": 1, "source": "spark", "image_size": 32, "channels": "auto",
                       "encoding": "jpeg", "resize": "shorter-side-crop", "jpeg_quality": 95, "split": "folders",
                       "num_shards": 2}


def test_options_name_the_label_files_sha256(tmp_path):
    root = make_root(tmp_path, flat_val())
    f = tmp_path / "LOC_val_solution.csv"
    f.write_text(SOLUTION)
    opts = job_args.effective_options(validate(root, tmp_path / "out", "--val-labels", str(f)))
    assert opts == {"preprocess_version": 1, "source": "spark", "image_size": None, "channels": "auto",
                    "encoding": "png", "split": "folders", "val_labels": hashlib.sha256(SOLUTION.encode()).hexdigest(),
                    "shard_mb": 100.0}
    f.write_text(SOLUTION.replace("n01484850 1 1 5 5", "n01440764 1 1 5 5"))   # other labels: other data
    again = job_args.effective_options(validate(root, tmp_path / "out", "--val-labels", str(f)))
    assert again["val_labels"] == hashlib.sha256(f.read_bytes()).hexdigest() != opts["val_labels"]


# ---------------------------------------------------------------------------------------------
# spark-submit: a flat val/ with each label format
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_flat_val_end_to_end(tmp_path):
    from lottery.data.manifest import read_manifest
    from tests.test_spark_preprocess import check, read_all, spark_submit

    val = flat_val(6)
    root = make_root(tmp_path, val, per_class=3)
    names = sorted(val)
    solution = {n.rsplit(".", 1)[0]: CLASSES[i % 3] for i, n in enumerate(names)}
    loc = tmp_path / "LOC_val_solution.csv"
    loc.write_text("ImageId,PredictionString\n" + "".join(
        f"{i},{c} 0 0 7 7 {c} 1 1 6 6\n" for i, c in solution.items()) + "ILSVRC2012_val_00049999,n01440764 0 0 1 1\n")
    # the other format, with other labels (so the second run must rebuild), extensions or not
    plain = {n: CLASSES[(i + 1) % 3] for i, n in enumerate(names)}
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,class\n" + "".join(
        f"{n if i % 2 else n.rsplit('.', 1)[0]},{c}\n" for i, (n, c) in enumerate(plain.items())))
    out = tmp_path / "data"
    for label_file, expected in ((loc, {f"{i}.JPEG": c for i, c in solution.items()}), (csv, plain)):
        check(spark_submit("--input", root, "--output", out, "--val-labels", label_file, "--image-size", 8))
        manifest = read_manifest(out)
        assert manifest["classes"] == sorted(CLASSES)
        assert manifest["splits"]["val"]["count"] == 6 and manifest["splits"]["train"]["count"] == 9
        got = read_all(out)
        val_records = {k: v for k, v in got.items() if v["split"] == "val"}
        assert sorted(val_records) == [f"val/{n}" for n in names]
        for name, cls in expected.items():
            assert val_records[f"val/{name}"]["label"] == manifest["classes"].index(cls), name
        for image_id, rec in got.items():
            if rec["split"] == "train":
                assert rec["label"] == manifest["classes"].index(image_id.split("/")[1])
