"""The Spark preprocessing job (an ImageNet-layout image folder -> TFRecord shards + manifest.json),
run as `spark-submit spark_jobs/preprocess_images.py ...` (docs/spark-preprocessing.md).

Modules, in the order a run uses them:

* `args`: the command line, the checks that need no Spark, the options that define the output;
* `labels`: the label file of a flat val/ (`--val-labels`: the ILSVRC-2012 validation layout);
* `errors`: `InputError` (exit 2), `DataError` (exit 1) and `ClusterError` (exit 3);
* `publish`: one job per output (a lock), the partial directory a killed job resumes from,
  "already up to date";
* `cluster`: a master that answers, an executor within the bound, and none lost for longer;
* `spark`: the session, shipping `lottery` + `spark_jobs` to the executors, the JVM options, the
  progress thread;
* `listing` (stage 1), `stages` (stage 2 probes and the plan, stage 3 decode and write), `chunks`
  (a shard's chunks on disk: decoded by path, assembled, kept by a resumed run);
* `images` and `sharding`: the pure functions the executors run (decode, resize, encode; the
  split and shard of a file), which the tests and bench/spark_preprocess.py import without Spark;
* `job`: the orchestration, the data checks, the manifest, `main`.

Importing this package imports nothing; pyspark is imported only when a session is created.
"""
