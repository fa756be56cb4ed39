"""The DAG's ``preprocess`` task: ``spark-submit spark_jobs/preprocess_images.py`` only when the data needs writing.

Runs that share an artifact root share its preprocessed data (``<artifact_root>/data/<key>``).
``PreprocessOperator`` holds the hidden sibling lock ``.<key>.task.lock`` for the whole task, so of
the runs that reach ``preprocess`` together one starts Spark and the others wait for it (bounded:
``LOTTERY_DATA_LOCK_TIMEOUT``, default 30 min; logged with the holder and the time waited). Holding
the lock, it checks "already up to date" in this process (the manifest, the options, every shard's
size and sha256, the input's fingerprint: no JVM, no Spark session) and returns when the data is
there. The Spark job itself still takes its own lock (``.<key>.lock``) against a job run by hand.

A lost cluster never holds the lock for long: before spark-submit the task checks that the
connection's master answers (``Spark master … unreachable: connection refused``), and the job
fails when no executor registers within ``LOTTERY_SPARK_EXECUTOR_TIMEOUT`` (120 s). The job writes
its error to a file (``--error-file``) and the task raises it, so the task's error names the cause
rather than spark-submit's exit status.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowFailException

from lottery.errors import LotteryError

log = logging.getLogger("lottery.dag")


class SparkJobError(LotteryError):
    """The Spark job failed; the message is the job's own error (transient: the task's retry runs it again)."""


class PreprocessOperator(SparkSubmitOperator):
    """A ``SparkSubmitOperator`` that waits for another run writing the same data, starts Spark only
    when the data is missing, damaged or out of date, and fails naming the job's own error. The
    job's JVM options (`spark_jobs.preprocess.spark.JVM_CONF`) come first in ``conf``."""

    def __init__(self, *, conf: dict[str, Any] | None = None, **kwargs: Any) -> None:
        from spark_jobs.preprocess.spark import JVM_CONF

        super().__init__(conf={**JVM_CONF, **(conf or {})}, **kwargs)

    def execute(self, context: Any) -> None:
        from lottery.locks import lock_path, wait_lock
        from spark_jobs.preprocess.args import effective_options, parse_args, validate
        from spark_jobs.preprocess.errors import InputError
        from spark_jobs.preprocess.job import already_up_to_date

        argv = [str(a) for a in self.application_args or []]
        args = parse_args(argv)
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
            return self._submit(context, argv, cfg.output)

    def _submit(self, context: Any, argv: list[str], output: Path) -> None:
        """spark-submit, once the master answers; a failed job's ``--error-file`` is the task's error."""
        from spark_jobs.preprocess.cluster import check_master

        with tempfile.TemporaryDirectory(prefix="lottery-preprocess-") as tmp:
            error_file = Path(tmp) / "error.json"
            self.application_args = [*argv, "--error-file", str(error_file)]
            self._hook = self._get_hook()
            master = self._hook._connection["master"]
            check_master(master)  # before a JVM is started for nothing
            log.info("preprocess: %s needs writing: starting spark-submit (master %s)", output, master)
            try:
                return super().execute(context)
            except Exception as exc:
                cause = job_error(error_file)
                if cause is None:  # the job never ran (spark-submit itself failed): the hook's error says why
                    raise
                raise cause from exc


def job_error(path: Path) -> Exception | None:
    """The error the job wrote to ``path`` (``--error-file``) as an exception, or None when it wrote none."""
    from spark_jobs.preprocess.errors import ClusterError

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        kind, message = record["error"], record["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if kind == ClusterError.__name__:
        return ClusterError(message)
    status = record.get("exit_status")
    return SparkJobError(f"the Spark job failed{f' (exit {status})' if status is not None else ''}: {message}")
