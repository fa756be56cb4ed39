"""The job: wait for the output -> up to date? (no Spark) -> list -> resume, or probe and plan -> decode and write shards -> manifest -> publish.

`main(argv)` is the command line of spark_jobs/preprocess_images.py (exit status 0 done or
already up to date, 1 the data failed a check, 2 bad arguments or paths, 3 the Spark master
unreachable or no executor within the bound: nothing written). On a non-local master the session
starts only once the master answers, and the work only once an executor is there (`cluster`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lottery.data.manifest import MANIFEST_NAME, ChannelStats, build_manifest, write_manifest
from lottery.data.verify import record_written
from lottery.files import write_text

from .args import JobConfig, effective_options, parse_args, validate
from .chunks import ChunkPlan, sum_results
from .cluster import ExecutorWatch, check_master, executor_timeout, submitted_master, wait_for_executors
from .errors import EXIT_CLUSTER, EXIT_DATA, EXIT_OK, EXIT_USAGE, ClusterError, DataError, InputError
from .images import HistogramStats, Transform
from .listing import list_inputs, local_fingerprint
from .publish import output_lock, partial_dir, publish_partial, remove_stale, resumable, start_partial, up_to_date
from .sharding import SPLITS
from .spark import create_session, ship_code
from .stages import decide_transform, estimate_record_bytes, keep_finished_work, plan_work, process

log = logging.getLogger("preprocess_images")

MAX_LISTED_SKIPS = 20


@dataclasses.dataclass
class _Run:
    """One run of the job with its Spark session; `timings` ends up in the manifest."""
    spark: Any
    cfg: JobConfig
    options: dict
    t_start: float
    timings: dict[str, float]


@dataclasses.dataclass
class _Written:
    """What stage 3 produced, and what the manifest is built from."""
    t: Transform
    listing: dict
    results: list[dict]
    decision: dict
    timeline: list


def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def summarize_skips(skipped: list[dict]) -> str:
    """Skips by reason code, the most common first."""
    return _fmt_counts(dict(Counter(s["reason"].split(":", 1)[0] for s in skipped).most_common()))


def _skip_lines(skipped: list[dict], limit: int = MAX_LISTED_SKIPS) -> str:
    lines = [f"  {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def run(cfg: JobConfig, t_start: float) -> int:
    a = cfg.args
    options = effective_options(cfg)
    split_desc = (f"val/ labelled by {a.val_labels}" if cfg.val_labels is not None
                  else "train/ and val/ folders" if cfg.has_val_dir
                  else f"val = {a.val_fraction:g} of train/ by path hash (seed {a.seed})")
    log.info("start: input %s (%d classes; split: %s) -> output %s", cfg.root, len(cfg.classes),
             split_desc, cfg.output)
    log.info("options: %s", json.dumps({k: v for k, v in vars(a).items() if k not in ("input", "output", "error_file")},
                                       sort_keys=True))
    with output_lock(cfg.output, a.lock_timeout), tempfile.TemporaryDirectory(prefix="preprocess-images-") as tmp:
        remove_stale(cfg.output)
        if not a.force and already_up_to_date(cfg, options):
            return EXIT_OK
        bound = executor_timeout(a.executor_timeout)
        check_master(submitted_master())
        t_session0 = time.time()
        spark = create_session()
        try:
            t_session = time.time()
            sc = spark.sparkContext
            sc.setLogLevel("WARN")
            waited = wait_for_executors(sc, bound)
            shipped = ship_code(spark, Path(tmp))
            log.info("spark %s, master %s, %d cores; lottery on executors: %s; session ready in %.1f s%s",
                     spark.version, sc.master, sc.defaultParallelism, shipped, t_session - t_session0,
                     f", then {waited:.1f} s until an executor registered" if waited else "")
            job = _Run(spark, cfg, options, t_start, {"session_start_s": t_session - t_session0})
            return _watched(job, bound)
        finally:
            spark.stop()


def _watched(job: _Run, bound: float) -> int:
    """`_run_with_spark`, failed with a `ClusterError` when every executor is lost for ``bound`` s."""
    with ExecutorWatch(job.spark.sparkContext, bound) as watch:
        try:
            return _run_with_spark(job)
        except Exception as e:
            if watch.cause:  # the failure is the jobs the watch cancelled
                raise ClusterError(watch.cause) from e
            raise


def already_up_to_date(cfg: JobConfig, options: dict) -> bool:
    """The output was made from this input with these options and is intact: checked without Spark
    (also by the DAG's preprocess task before it starts spark-submit), logged for people."""
    existing = up_to_date(cfg.output, lambda: local_fingerprint(cfg), options)
    if existing is None:
        return False
    log.info("already up to date: %s (dataset_id %s, input fingerprint %s); nothing to do",
             cfg.output, existing["dataset_id"], existing["input_fingerprint"]["sha256"][:12])
    print(f"already up to date: {cfg.output}", flush=True)
    return True


def _run_with_spark(job: _Run) -> int:
    listing = _list(job)
    t, decision, plan, finished = _resume_or_plan(job, listing)
    manifest = _write(job, t, plan, listing, decision, finished)
    _log_done(job, listing, manifest)
    return EXIT_OK


def _resume_or_plan(job: _Run, listing: dict) -> tuple[Transform, dict, ChunkPlan, frozenset]:
    """The plan of an interrupted run on the same input with the same options, and the shards it
    finished; else a new plan (a new partial directory)."""
    cfg = job.cfg
    state = resumable(cfg.output, listing["fingerprint"], job.options, force=cfg.args.force)
    if state is not None:
        t = Transform.from_dict(state["transform"])
        plan = ChunkPlan.from_dict(state["plan"], SPLITS)
        return t, state["decision"], plan, keep_finished_work(job.spark, partial_dir(cfg.output), plan)
    t, decision, plan = _probe_and_plan(job, listing)
    start_partial(cfg.output, {"input_fingerprint": listing["fingerprint"], "options": job.options,
                               "transform": t.to_dict(), "decision": decision, "plan": plan.to_dict()})
    return t, decision, plan, frozenset()


def _list(job: _Run) -> dict:
    """Stage 1: listing + fingerprint (no file contents are read)."""
    cfg, sc = job.cfg, job.spark.sparkContext
    t0 = time.time()
    job.timings["first_job_at"] = t0
    sc.setJobGroup("preprocess-list", "list input files")
    listing = list_inputs(job.spark, cfg)
    job.timings["listing_s"] = time.time() - t0
    by_split = {s: listing["by_split"].get(s, [0, 0])[0] for s in SPLITS}
    log.info("listing: %d files (%.1f MB) in %.1f s: %s%s", listing["files"], listing["bytes"] / 1e6,
             job.timings["listing_s"], _fmt_counts(by_split),
             f"; {listing['outside']} outside class folders" if listing["outside"] else "")
    if listing["readable"] == 0:
        raise InputError(f"no (non-empty) files in the class folders of {cfg.root / 'train'}")
    return listing


def _probe_and_plan(job: _Run, listing: dict) -> tuple[Transform, dict, ChunkPlan]:
    """Stage 2: channels, size and record size from a deterministic sample; the shard plan."""
    t0 = time.time()
    job.spark.sparkContext.setJobGroup("preprocess-probe", "probe a sample of the input")
    t, decision = decide_transform(job.spark, job.cfg, listing["sample"])
    record_bytes = estimate_record_bytes(job.spark, job.cfg, t, listing["sample"])
    plan = plan_work(job.cfg, listing, record_bytes, job.spark.sparkContext.defaultParallelism)
    job.timings["probe_s"] = time.time() - t0
    if "channels" in decision:
        log.info("channels: %s", decision["channels"])
    log.info("plan: images %dx%dx%d (%s), ~%.1f KB per record; shards: %s (probe %.1f s)",
             t.shape[0], t.shape[1], t.shape[2],
             f"{t.resize} to {t.size}" if t.size else "native size", record_bytes / 1024,
             _fmt_counts(dict(zip(plan.shards.splits, plan.shards.counts))), job.timings["probe_s"])
    return t, decision, plan


def _write(job: _Run, t: Transform, plan: ChunkPlan, listing: dict, decision: dict, finished: frozenset) -> dict:
    """Stage 3: decode + write shards into the partial directory, then the manifest, then publish.
    A failure leaves the partial directory for the next run to continue."""
    cfg = job.cfg
    partial = partial_dir(cfg.output)
    t0 = time.time()
    results, timeline = process(job.spark, cfg, t, plan, partial, listing, finished)
    job.timings["process_s"] = time.time() - t0
    job.timings["process_started_at"] = t0
    manifest = assemble(job, _Written(t, listing, results, decision, timeline))
    write_manifest(partial, manifest)   # a reader needs it: the swap below makes it visible with the shards
    shards = {s["file"] for sp in manifest["splits"].values() for s in sp["shards"]}
    publish_partial(partial, cfg.output, shards | {MANIFEST_NAME})
    record_written(cfg.output, manifest)  # the executors hashed each shard as they wrote it
    return manifest


def _log_done(job: _Run, listing: dict, manifest: dict) -> None:
    total = time.time() - job.t_start
    written = sum(s["count"] for s in manifest["splits"].values())
    log.info("done: %d records written (%s), %d skipped (%s), %.1f s total, Spark start-up %.1f s, "
             "%.1f images/s after start-up; dataset_id %s -> %s",
             written, ", ".join(f"{k} {v['count']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items()),
             len(manifest["skipped"]), summarize_skips(manifest["skipped"]) or "none", total,
             job.timings["session_start_s"], listing["files"] / max(1e-9, time.time() - job.timings["first_job_at"]),
             manifest["dataset_id"], job.cfg.output)


def assemble(job: _Run, w: _Written) -> dict:
    """The manifest of the written shards, after the data checks (DataError)."""
    splits, skipped, stats, conversions = _merge_results(job.cfg, w.t, w.results)
    skipped = _check_data(job.cfg, w.t, w.listing, splits, skipped)
    manifest = _job_manifest(job, w, splits, skipped, stats)
    if conversions:
        manifest["conversions"] = conversions
        log.info("converted: %s", _fmt_counts(conversions))
    return manifest


def _merge_results(cfg: JobConfig, t: Transform, results: list[dict]) -> tuple[dict, list[dict], ChannelStats, dict]:
    """Per-split counts and shard entries, the decode-time skips, the training pixel statistics
    (exact: from histograms) and the conversions of odd files."""
    splits: dict[str, dict] = {}
    for split in SPLITS:   # every split has at least one shard (plan_shards)
        mine = [r for r in results if r["split"] == split]
        splits[split] = {"count": sum(r["entry"]["records"] for r in mine),
                         "per_class": sum_results(mine)["per_class"], "shards": [r["entry"] for r in mine]}
    total = sum_results(results)
    hist = HistogramStats(t.channels)
    hist.hist += np.asarray(total["hist"], dtype=np.int64)
    return splits, total["skipped"], hist.to_channel_stats(), dict(sorted(total["conversions"].items()))


def _check_data(cfg: JobConfig, t: Transform, listing: dict, splits: dict, skipped: list[dict]) -> list[dict]:
    """Every file read once, sizes agree, few bad files, no empty class; returns all skips, sorted."""
    a = cfg.args
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
    return skipped


def _job_manifest(job: _Run, w: _Written, splits: dict, skipped: list[dict], stats: ChannelStats) -> dict:
    """The format's manifest plus the job's own keys: input, decisions, spark, timings, job."""
    cfg, spark, listing = job.cfg, job.spark, w.listing
    sc = spark.sparkContext
    timings = dict(job.timings)
    manifest = build_manifest(
        classes=cfg.classes, image_shape=list(w.t.shape), encoding=w.t.encoding, splits=splits, stats=stats,
        options=job.options, skipped=skipped, spark_version=spark.version, duration_s=time.time() - job.t_start)
    manifest["input_fingerprint"] = {
        "sha256": listing["fingerprint"], "files": listing["files"], "bytes": listing["bytes"],
        "basis": "relative path, size and mtime of every file under train/ and val/",
    }
    manifest["input"] = {
        "root": str(cfg.root), "files_per_split": {s: listing["by_split"].get(s, [0, 0])[0] for s in SPLITS},
        "outside_class_folders": listing["outside"],
        "split": job.options["split"],
    }
    if w.decision:
        manifest["decisions"] = w.decision
    manifest["spark"] = {"version": spark.version, "master": sc.master, "default_parallelism": sc.defaultParallelism,
                         "app_id": sc.applicationId}
    timings["finished_at"] = time.time()
    manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
    manifest["timings"]["decode_progress"] = [list(x) for x in w.timeline]  # [s since decode start, files]
    manifest["job"] = {"max_bad_fraction": cfg.args.max_bad_fraction}
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
    except (InputError, DataError, ClusterError) as e:
        log.error("%s", e)
        print(f"preprocess_images: error: {e}", file=sys.stderr, flush=True)
        status = EXIT_USAGE if isinstance(e, InputError) else EXIT_DATA if isinstance(e, DataError) else EXIT_CLUSTER
        write_error(args.error_file, e, status)
        return status
    except Exception as e:
        write_error(args.error_file, e, None)
        raise


def write_error(path: str | None, exc: Exception, status: int | None) -> None:
    """The job's error as JSON at ``path`` (``--error-file``): the DAG's preprocess task raises it
    as the task's error, which spark-submit's exit status alone cannot say."""
    if not path:
        return
    message = str(exc) if status is not None else f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    record = {"error": type(exc).__name__, "message": message, "exit_status": status}
    try:
        write_text(path, json.dumps(record))
    except OSError as e:  # the error itself is in the log; the task then falls back to the exit status
        log.warning("could not write the error to %s: %s", path, e)
