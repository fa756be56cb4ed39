#!/usr/bin/env python3
"""Spark job: an ImageNet-layout image folder -> TFRecord shards + manifest.json.

    spark-submit spark_jobs/preprocess_images.py --input ROOT --output DATA_DIR [options]

Input is ``ROOT/train/<class>/<files>`` and optionally ``ROOT/val/<class>/<files>`` (without
``val/`` a seeded split of ``train/`` by a hash of each relative path).  Output is the record
format of ``lottery.data`` (shards ``{split}-{index:05d}-of-{count:05d}.tfrecord`` and a
``manifest.json`` written last, docs/data-format.md), published atomically from a sibling staging
directory.  A rerun with the same input fingerprint and options prints "already up to date" and
exits 0.

Exit status: 0 done (or already up to date), 1 the data failed a check (too many bad files, an
empty class, images of different sizes without --image-size), 2 bad arguments or input/output
paths, 3 the Spark master unreachable or no executor registered within --executor-timeout
(nothing written in any of these).  See docs/spark-preprocessing.md.

This file is only the entry point: the job is the package ``spark_jobs.preprocess`` (installed
with the project; the driver ships it and ``lottery`` to the executors).
"""
import sys

from spark_jobs.preprocess.job import main

if __name__ == "__main__":
    sys.exit(main())
