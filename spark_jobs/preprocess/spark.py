"""Spark plumbing: the session, the code on the executors, the JVM options, the environment of a
`spark-submit` from this Python, progress.

The executors run functions of `spark_jobs.preprocess` that use `lottery.data`: unless the caller
gave both packages with `--py-files`, the driver zips them (`build_py_files`) and ships the zip
with `addPyFile`, so a standalone cluster needs neither package installed.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

log = logging.getLogger("preprocess_images")

# The job's JVMs only schedule tasks and move file paths: they need no optimising JIT and no
# parallel collector, and with these options they use about half the CPU (bench/spark_preprocess.py).
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
JVM_CONF = {"spark.driver.extraJavaOptions": JVM_OPTIONS, "spark.executor.extraJavaOptions": JVM_OPTIONS}

def submit_env() -> dict[str, str]:
    """The environment of a `spark-submit` of this Python's pyspark (the tests', the benchmark's):
    its scripts first on PATH, this Python on driver and executors, Spark on loopback, and no
    PYTHONPATH or SPARK_HOME (the job ships `lottery` to the executors itself)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
    env.pop("PYTHONPATH", None)
    env.pop("SPARK_HOME", None)
    return env


# The packages the executors import, as paths inside a --py-files zip or directory.
SHIPPED_PACKAGES = ("lottery", "spark_jobs")


def _package_dirs() -> list[Path]:
    import lottery
    import spark_jobs

    return [Path(pkg.__file__).resolve().parent for pkg in (lottery, spark_jobs)]


def build_py_files(dest: str | os.PathLike) -> Path:
    """A zip for --py-files with the `lottery` and `spark_jobs` packages
    (deterministic: sorted, fixed timestamps)."""
    dest = Path(dest)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for pkg in _package_dirs():
            for path in sorted(pkg.rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                info = zipfile.ZipInfo(str(path.relative_to(pkg.parent)), date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                z.writestr(info, path.read_bytes())
    return dest


def _provides(entry: str, package: str) -> bool:
    """Whether one --py-files entry (a zip or a directory) holds `package`."""
    local = entry[len("file:"):] if entry.startswith("file:") else entry
    init = f"{package}/__init__.py"
    try:
        if zipfile.is_zipfile(local):
            with zipfile.ZipFile(local) as z:
                return init in z.namelist()
        return os.path.isfile(os.path.join(local, init))
    except OSError:
        return False


def ship_code(spark, tmpdir: Path) -> str:
    """Make `lottery` and `spark_jobs` importable on the executors unless --py-files already does."""
    sc = spark.sparkContext
    given = sc.getConf().get("spark.submit.pyFiles", "") or ""
    entries = [e.strip() for e in given.split(",") if e.strip()]
    if all(any(_provides(e, pkg) for e in entries) for pkg in SHIPPED_PACKAGES):
        return "given with --py-files"
    zpath = build_py_files(tmpdir / "lottery.zip")
    sc.addPyFile(str(zpath))
    return f"shipped {zpath.name} (built from {', '.join(str(d) for d in _package_dirs())})"


def create_session(app_name: str = "preprocess_images"):
    from pyspark.sql import SparkSession

    if not os.environ.get("PYSPARK_PYTHON"):
        # Executors run the driver's interpreter (same venv path on a shared filesystem).
        # PySpark reads the variable when the SparkContext is created.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    builder = SparkSession.builder.appName(app_name).config("spark.ui.showConsoleProgress", "false")
    return builder.getOrCreate()


class Progress(threading.Thread):
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

    def sample(self) -> None:
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
                self.sample()
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


def partial(fn, **kwargs):
    def bound(rows):
        return fn(rows, **kwargs)
    return bound
