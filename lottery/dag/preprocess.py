"""The DAG's ``preprocess`` task: ``spark-submit spark_jobs/preprocess_images.py`` only when the data needs writing.

Runs that share an artifact root share its preprocessed data (``<artifact_root>/data/<key>``).
``PreprocessOperator`` holds the hidden sibling lock ``.<key>.task.lock`` for the whole task, so of
the runs that reach ``preprocess`` together one starts Spark and the others wait for it (bounded:
``LOTTERY_DATA_LOCK_TIMEOUT``, default 30 min; logged with the holder and the time waited). Holding
the lock, it checks "already up to date" in this process (the manifest, the options, every shard's
size and sha256, the input's fingerprint: no JVM, no Spark session) and returns when the data is
there. The Spark job itself still takes its own lock (``.<key>.lock``) against a job run by hand.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger("lottery.dag")


class PreprocessOperator(SparkSubmitOperator):
    """A ``SparkSubmitOperator`` that waits for another run writing the same data and starts
    Spark only when the data is missing, damaged or out of date."""

    def execute(self, context: Any) -> None:
        from lottery.locks import lock_path, wait_lock
        from spark_jobs.preprocess.args import effective_options, parse_args, validate
        from spark_jobs.preprocess.errors import InputError
        from spark_jobs.preprocess.job import already_up_to_date

        args = parse_args([str(a) for a in self.application_args or []])
        try:
            cfg = validate(args)
        except InputError as exc:  # the job would refuse the same way: no retry fixes it
            raise AirflowFailException(f"preprocess: {exc}") from exc
        what = f"the preprocess task of DAG run {context.get('run_id')} writing {cfg.output}"
        with wait_lock(lock_path(cfg.output, "task.lock"), what, log=log, timeout=args.lock_timeout) as waited:
            started = time.perf_counter()
            if not args.force and already_up_to_date(cfg, effective_options(cfg)):
                log.info("preprocess: %s is already up to date (checked in %.2f s, after waiting %.1f s for "
                              "another run): Spark not started", cfg.output, time.perf_counter() - started, waited)
                return None
            log.info("preprocess: %s needs writing: starting spark-submit", cfg.output)
            return super().execute(context)
