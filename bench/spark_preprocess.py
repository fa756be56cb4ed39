#!/usr/bin/env python3
"""Benchmark: the Spark preprocessing job on an ImageNet-like corpus, against a plain
multiprocessing Pillow loop on the same cores; its peak memory at two sizes; its scaling on a
loopback standalone cluster; and what the whole of ImageNet would take.

    python -m bench.spark_preprocess --count 2000                     # the comparison only
    python -m bench.spark_preprocess --count 50000 --memory-sizes 10000,50000 \\
        --cluster-count 10000 --write-docs                            # everything, into docs/benchmarks.md

1. The corpus (`bench.imagenet_like`, generated once and cached in --cache-dir): ImageNet's
   layout and statistics: 1,000 WordNet-id classes in train/, a flat val/ (1 image in 25) labelled
   by LOC_val_solution.csv, JPEGs of ~110 KB around 400x350 with long tails of sizes, and a few
   CMYK JPEGs, grayscale JPEGs and PNGs named .JPEG.
2. Spark: `spark-submit --master local[N] spark_jobs/preprocess_images.py --val-labels
   LOC_val_solution.csv --image-size 224 --encoding jpeg ...` (N = --cores), timed from the
   manifest: start-up (spark-submit launch -> first Spark job) and the work after start-up.
3. The plain loop: a `multiprocessing.Pool(N)` doing the same work with the same functions
   (`sharding.assign` with the same val labels, `images.transform_image`, `images.encode_record`,
   `lottery.data.tfrecord.write_shard`) into the same shards, streamed shard by shard so that its
   memory does not grow with the corpus either. The shards must come out byte-identical (checked).
4. CPU: user + system time of every process of a run (Spark's polled in /proc, the plain loop's
   from getrusage), so CPU ms per image compare fairly on a shared machine, where wall-clock
   images/s depend on the others' load. Peak memory: the peak RSS (VmHWM) of each process, by role:
   the JVM (in local mode driver and executor in one), the Python driver, the largest Python
   worker, and the plain loop's parent and largest worker. `--memory-sizes A,B` runs both at the
   two sizes (the smaller corpus: the larger one's first images) and reports each role's peak at
   both and the ratio (flat memory: the ratio stays near 1).
5. `--cluster-count M`: a standalone master and two 1-core workers on 127.0.0.1 (a free port for
   the master, ports the OS picks for the rest), the job on M images with 1 executor of 1 core,
   then with 2, the cluster stopped at the end whatever happens; throughput after
   start-up, and a fit t(N) = a + b/N seconds per image that projects the full ImageNet (1,281,167
   train + 50,000 val images) on N executors, beside local[N] on this machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from bench.docs import DOCS, update_section
from bench.imagenet_like import Corpus, describe, ensure_corpus
from lottery.data.manifest import read_manifest, shard_name
from lottery.data.tfrecord import write_shard
from spark_jobs.preprocess import images
from spark_jobs.preprocess.labels import resolve_val_labels
from spark_jobs.preprocess.sharding import SPLITS, ShardPlan, assign, shard_key
from lottery.deploy.cluster import SPARK_MASTER_READY, SPARK_WORKER_READY, spark_master_argv, spark_worker_argv
from lottery.deploy.supervisor import Supervisor, free_port, stop_groups
from spark_jobs.preprocess.spark import JVM_CONF, JVM_OPTIONS, submit_env

REPO = Path(__file__).resolve().parents[1]

IMAGENET_IMAGES = 1_281_167 + 50_000      # ILSVRC-2012 train + val
PROJECTED_EXECUTORS = (1, 2, 8, 20, 64)
# The goals the figures are held against.
THROUGHPUT_GOAL = 0.8       # Spark after start-up / plain loop, images per second
CPU_GOAL = 1.25             # Spark after start-up / plain loop, CPU ms per image
MEMORY_GOAL = 1.10          # peak RSS at the larger size / at the smaller one, per role


# ---------------------------------------------------------------------------------------------
# CPU time and peak memory of a set of processes, from /proc (the machine may be shared: CPU
# seconds per image are the fair comparison, wall-clock images/s the one people feel)
# ---------------------------------------------------------------------------------------------

def role_of(cmd: list[str], parent_cmd: list[str]) -> str:
    """What a process of a Spark run is, from its command line (and its parent's)."""
    exe, text = os.path.basename(cmd[0]) if cmd else "", " ".join(cmd)
    if exe.startswith("java"):
        for marker, role in (("CoarseGrainedExecutorBackend", "executor JVM"), ("deploy.worker.Worker", "worker JVM"),
                             ("deploy.master.Master", "master JVM"), ("SparkSubmit", "driver JVM")):
            if marker in text:
                return role
        return "other"      # e.g. spark-class's launcher, which lives for a second
    if exe.startswith("python"):
        if "pyspark.daemon" in text:
            # the daemon forks the workers, which keep its command line
            return "Python worker" if "pyspark.daemon" in " ".join(parent_cmd) else "Python daemon"
        if "pyspark.worker" in text:
            return "Python worker"
        if "preprocess_images.py" in text:
            return "Python driver"
    return "other"


@dataclasses.dataclass
class _Proc:
    cmd: list[str]
    ppid: int
    cpu_s: float = 0.0
    hwm_kb: int = 0


class ProcessMonitor(threading.Thread):
    """Polls /proc every `interval` s for the processes `member(pid, session id, parent pid)`
    accepts: each one's latest user+system CPU time and its peak RSS (VmHWM, which the kernel
    keeps, so a peak between two polls is not missed; a process that lives less than a poll
    interval is: Spark's are long-lived), and the peak of their RSS summed at one poll."""

    def __init__(self, member: Callable[[int, int, int], bool], interval: float = 0.25):
        super().__init__(daemon=True)
        self.member, self.interval = member, interval
        self.procs: dict[tuple[int, int], _Proc] = {}
        self.timeline: list[tuple[float, float]] = []   # (time, CPU seconds so far)
        self.peak_total_kb = 0
        self.lock = threading.Lock()     # `sample` runs in this thread and, at the end, in the caller's
        self.done = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")

    @classmethod
    def sessions(cls, *sids: int) -> "ProcessMonitor":
        """Every process of these sessions (a Popen with start_new_session: its id is its session's)."""
        wanted = set(sids)
        return cls(lambda pid, sid, ppid: sid in wanted)

    @classmethod
    def this_process_and_children(cls) -> "ProcessMonitor":
        """This process and its children in its own session (a Pool's workers, not a spark-submit)."""
        me, my_sid = os.getpid(), os.getsid(0)
        return cls(lambda pid, sid, ppid: pid == me or (ppid == me and sid == my_sid))

    def sample(self) -> None:
        with self.lock:
            self._sample()

    def _sample(self) -> None:
        total_kb = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ppid, sid = int(fields[1]), int(fields[3])
                if not self.member(pid, sid, ppid):
                    continue
                key = (pid, int(fields[19]))      # start time: tells reused pids apart
                proc = self.procs.get(key) or _Proc([], ppid)
                proc.cmd = _cmdline(pid) or proc.cmd    # again: one seen between fork and exec; a zombie has none
                proc.cpu_s = (int(fields[11]) + int(fields[12])) / self.tick
                hwm, rss = _memory_kb(pid)
            except (OSError, ValueError, IndexError):
                continue        # it ended meanwhile
            proc.hwm_kb = max(proc.hwm_kb, hwm)
            self.procs[key] = proc
            total_kb += rss
        self.peak_total_kb = max(self.peak_total_kb, total_kb)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()
            self.timeline.append((time.time(), self.cpu_s()))

    def cpu_s(self) -> float:
        with self.lock:
            return sum(p.cpu_s for p in self.procs.values())

    def cpu_at(self, when: float) -> float:
        """CPU seconds used up to `when` (the last sample before it)."""
        before = [cpu for t, cpu in self.timeline if t <= when]
        return before[-1] if before else 0.0

    def peaks_by_role(self, role: Callable[[int, list[str], list[str]], str] | None = None) -> dict[str, int]:
        """The largest peak RSS (KB) among the processes of each role: `role(pid, command line,
        parent's command line)`, by default `role_of` a Spark run's processes."""
        role = role or (lambda pid, cmd, parent_cmd: role_of(cmd, parent_cmd))
        cmd_of = {pid: p.cmd for (pid, _), p in self.procs.items()}
        peaks: dict[str, int] = {}
        for (pid, _), p in self.procs.items():
            r = role(pid, p.cmd, cmd_of.get(p.ppid, []))
            peaks[r] = max(peaks.get(r, 0), p.hwm_kb)
        peaks["all processes together (sum of RSS)"] = self.peak_total_kb
        return peaks

    def stop(self) -> float:
        self.done.set()
        self.join()
        self.sample()
        return self.cpu_s()


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def _memory_kb(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process in KB (0, 0 for a zombie)."""
    hwm = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return hwm, rss


def reset_peak_rss() -> None:
    """Start this process's VmHWM again from its current RSS (Linux: clear_refs 5), so that the
    plain loop's parent is measured for its own run."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _own_cpu() -> float:
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def steady_rate(timeline: list, total: int, lo: float = 0.2, hi: float = 0.9) -> float | None:
    """Files per second between the moments `lo` and `hi` of the files were done (no warm-up, no tail)."""
    a = next(((t, n) for t, n in timeline if n >= lo * total), None)
    b = next(((t, n) for t, n in reversed(timeline) if n <= hi * total), None)
    if a is None or b is None or b[0] <= a[0]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


# ---------------------------------------------------------------------------------------------
# the Spark run
# ---------------------------------------------------------------------------------------------

def spark_submit_cmd(corpus: Corpus, out: Path, master_args: list[str], args) -> list[str]:
    return [str(Path(sys.executable).parent / "spark-submit"), *master_args,
            "--conf", "spark.ui.enabled=false", "--driver-memory", args.driver_memory,
            *[arg for key in JVM_CONF for arg in ("--conf", f"{key}={args.jvm_options}")],
            str(REPO / "spark_jobs" / "preprocess_images.py"), "--input", str(corpus.root), "--output", str(out),
            "--val-labels", str(corpus.labels),
            "--image-size", str(args.image_size), "--encoding", "jpeg", "--jpeg-quality", str(args.jpeg_quality),
            "--shard-mb", str(args.shard_mb), "--progress-interval", "0", "--force"]


def run_spark(corpus: Corpus, out: Path, master_args: list[str], args, also_watch: Iterable[int] = ()) -> dict:
    """One spark-submit; its timings (from the manifest), CPU and peak memory by role. `also_watch`:
    the sessions of a standalone cluster's processes, whose executors do the work."""
    cmd = spark_submit_cmd(corpus, out, master_args, args)
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=submit_env(),
                            start_new_session=True)
    monitor = ProcessMonitor.sessions(proc.pid, *also_watch)
    monitor.start()
    try:
        stdout, stderr = proc.communicate()
        ended = time.time()
    finally:
        stop_groups({"spark-submit": proc.pid}, {}, procs={"spark-submit": proc})   # interrupted: leave none behind
        cpu_s = monitor.stop()
    if proc.returncode != 0:
        sys.stderr.write(stdout[-5000:] + stderr[-5000:])
        raise SystemExit(f"spark job failed with exit status {proc.returncode}")
    manifest = read_manifest(out)
    t = manifest["timings"]
    n = manifest["input_fingerprint"]["files"]
    return {"manifest": manifest, "files": n, "wall_s": ended - launched, "cpu_s": cpu_s,
            "cpu_after_s": cpu_s - monitor.cpu_at(t["first_job_at"]),
            "steady_ips": steady_rate(t.get("decode_progress", []), n),
            "startup_s": t["first_job_at"] - launched, "session_s": t["session_start_s"],
            "work_s": t["finished_at"] - t["first_job_at"],
            "stages": {k: t[k] for k in ("listing_s", "probe_s", "process_s") if k in t},
            "memory_kb": monitor.peaks_by_role(),
            "log": [l for l in stdout.splitlines() if "preprocess_images INFO" in l]}


# ---------------------------------------------------------------------------------------------
# the plain multiprocessing loop: the same work with the same functions
# ---------------------------------------------------------------------------------------------

CHUNK = 32      # files per pool task
_T: images.Transform | None = None
_ROOT: str = ""


def _init(t: images.Transform, root: str) -> None:
    global _T, _ROOT
    _T, _ROOT = t, root


def _plain_chunk(items: list[tuple[int, str, str, int, str]]):
    """Records of some files, in the order given; the training pixels' histogram; files done."""
    records = []
    stats = images.HistogramStats(_T.channels)
    for p, key, rel, label, split in items:
        with open(os.path.join(_ROOT, rel), "rb") as f:
            data = f.read()
        try:
            pixels = images.transform_image(data, _T)
        except images.BadImage:
            continue
        if split == "train":
            stats.update(pixels)
        records.append((p, images.encode_record(pixels, label, rel, _T)))
    return records, stats.hist, len(items)


def plain_items(root: Path, plan: ShardPlan, classes: list[str], val_labels: dict[str, str]) -> list[tuple]:
    """(partition, shard key, path, label, split) of every file with a class, in shard order:
    the order the records have in the shards."""
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for split in SPLITS:
        for dirpath, _, files in os.walk(root / split):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                s, cls = assign(rel, derived_val=False, val_fraction=0.1, seed=0, val_labels=val_labels)
                if cls in index:
                    key = shard_key(rel)
                    items.append((plan.partition(s, key), key, rel, index[cls], s))
    items.sort()
    return items


def write_shards_in_order(out: Path, plan: ShardPlan, records: Iterator[tuple[int, bytes]]) -> dict:
    """Write every shard of the plan from a stream of (partition, record) in partition order
    (a shard with no records is written empty, as the job writes it)."""
    entries = {}
    groups = itertools.groupby(records, key=lambda pr: pr[0])
    current = next(groups, None)
    for p in range(plan.total):
        split, i, n = plan.shard_of(p)
        has_records = current is not None and current[0] == p
        rows = (rec for _, rec in current[1]) if has_records else ()
        entries[(split, i)] = write_shard(out / shard_name(split, i, n), rows)
        if has_records:
            current = next(groups, None)
    return entries


def _records(pool, chunks: list[list[tuple]], hist: np.ndarray, timeline: list, t0: float) -> Iterator[tuple[int, bytes]]:
    """The records of all chunks in order (imap), so that the parent writes each shard as its
    records arrive and holds only the chunks that came back early."""
    done = 0
    for recs, h, n in pool.imap(_plain_chunk, chunks):
        hist += h
        done += n
        timeline.append((time.time() - t0, done))
        yield from recs


def run_plain(corpus: Corpus, out: Path, cores: int, t: images.Transform, plan: ShardPlan, classes: list[str]) -> dict:
    t0 = time.time()
    cpu0 = _own_cpu()
    reset_peak_rss()
    monitor = ProcessMonitor.this_process_and_children()
    monitor.start()
    val_labels = resolve_val_labels(corpus.labels, corpus.root / "val", classes)
    items = plain_items(corpus.root, plan, classes, val_labels)
    chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
    hist = np.zeros((t.channels, 256), dtype=np.int64)
    timeline: list[tuple[float, int]] = []
    out.mkdir(parents=True)
    with mp.Pool(cores, initializer=_init, initargs=(t, str(corpus.root))) as pool:
        entries = write_shards_in_order(out, plan, _records(pool, chunks, hist, timeline, t0))
        monitor.sample()    # the workers' final peaks, before the pool ends them
    wall_s = time.time() - t0
    monitor.stop()
    me = os.getpid()
    peaks = monitor.peaks_by_role(lambda pid, cmd, parent_cmd: "plain loop parent" if pid == me else "plain loop worker")
    return {"files": len(items), "wall_s": wall_s, "cpu_s": _own_cpu() - cpu0, "entries": entries,
            "steady_ips": steady_rate(timeline, len(items)), "memory_kb": peaks}


# ---------------------------------------------------------------------------------------------
# a loopback standalone cluster: a master and 1-core workers on 127.0.0.1
# ---------------------------------------------------------------------------------------------

class LoopbackCluster:
    """A standalone master and `workers` workers of 1 core each on 127.0.0.1, started and stopped by
    the project's `Supervisor` with the loopback cluster's own commands (`lottery.deploy.cluster`).
    Each process has its own session (the executors a worker starts are in its group and session);
    leaving the `with` block stops them all, also on an error or an interrupt."""

    READY_TIMEOUT = 120

    def __init__(self, workdir: Path, workers: int, worker_memory: str):
        self.workdir, self.workers, self.worker_memory = workdir, workers, worker_memory
        self.url = ""
        self.supervisor = Supervisor(workdir)
        self.env = submit_env()

    def __enter__(self) -> "LoopbackCluster":
        sup, deadline = self.supervisor, time.monotonic() + self.READY_TIMEOUT
        try:
            port = free_port()
            self.url = f"spark://127.0.0.1:{port}"
            sup.start("master", spark_master_argv(port, free_port()), self.env)
            sup.wait_log("master", SPARK_MASTER_READY, deadline)
            for i in range(self.workers):
                sup.start(f"worker-{i}", spark_worker_argv(self.url, cores=1, memory=self.worker_memory,
                                                           work_dir=self.workdir / "work"), self.env)
                sup.wait_log(f"worker-{i}", SPARK_WORKER_READY, deadline)
        except BaseException:
            sup.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.supervisor.stop()

    @property
    def sessions(self) -> list[int]:
        return list(self.supervisor.pids.values())

    def master_args(self, executors: int, executor_memory: str) -> list[str]:
        """spark-submit's options for `executors` executors of 1 core each."""
        return ["--master", self.url, "--total-executor-cores", str(executors),
                "--conf", "spark.executor.cores=1", "--executor-memory", executor_memory]


def run_cluster(corpus: Corpus, tmp: Path, args) -> dict[int, dict]:
    """The job on a loopback cluster of two 1-core workers, with 1 executor, then with 2."""
    workdir = tmp / "cluster"
    workdir.mkdir()
    runs = {}
    print("starting a standalone master and 2 workers of 1 core on 127.0.0.1 ...", file=sys.stderr, flush=True)
    with LoopbackCluster(workdir, workers=2, worker_memory=args.worker_memory) as cluster:
        for executors in (1, 2):
            print(f"  spark-submit --master {cluster.url} with {executors} executor(s) of 1 core, "
                  f"{corpus.count} images ...", file=sys.stderr, flush=True)
            out = tmp / f"cluster{executors}"
            runs[executors] = run_spark(corpus, out, cluster.master_args(executors, args.executor_memory), args,
                                        also_watch=cluster.sessions)
            r = runs[executors]
            print(f"  {r['startup_s']:.1f} s start-up, {r['work_s']:.1f} s after it "
                  f"({r['files'] / r['work_s']:.1f} images/s)", file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return runs


# ---------------------------------------------------------------------------------------------
# the projection to the whole of ImageNet
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ScalingFit:
    """Seconds per image on N executors: t(N) = serial + parallel / N."""
    serial: float
    parallel: float
    note: str = ""

    def per_image(self, n: int) -> float:
        return self.serial + self.parallel / n

    @classmethod
    def from_two(cls, t1: float, t2: float) -> "ScalingFit":
        """The fit through t(1) = t1 and t(2) = t2 (clamped: neither part below zero)."""
        serial, parallel = 2 * t2 - t1, 2 * (t1 - t2)
        if serial < 0:
            return cls(0.0, t1, "2 executors were more than twice as fast as 1: taken as perfect scaling")
        if parallel < 0:
            return cls(t2, 0.0, "2 executors were slower than 1: taken as no scaling")
        return cls(serial, parallel)


def hours(seconds: float) -> str:
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def projections(res: dict) -> list[tuple[str, float, float, float, float | None]]:
    """(set-up, ms per image, start-up s, projected seconds with the after-start-up rate,
    projected seconds with the steady-state rate) for the whole of ImageNet."""
    n = IMAGENET_IMAGES
    s, p = res["spark"], res["plain"]
    rows = [(f"plain loop, {res['cores']} processes", p["wall_s"] / p["files"], 0.0,
             _steady_per_image(p)),
            (f"Spark local[{res['cores']}]", s["work_s"] / s["files"], s["startup_s"], _steady_per_image(s))]
    cl = res.get("cluster")
    if cl:
        fit, steady_fit = res["fit"], res.get("steady_fit")
        startup = (cl[1]["startup_s"] + cl[2]["startup_s"]) / 2
        for e in PROJECTED_EXECUTORS:
            rows.append((f"standalone, {e} executor{'s' if e > 1 else ''} of 1 core", fit.per_image(e), startup,
                         steady_fit.per_image(e) if steady_fit else None))
    return [(name, 1000 * per, startup, startup + n * per, startup + n * steady if steady else None)
            for name, per, startup, steady in rows]


def _steady_per_image(run: dict) -> float | None:
    return 1 / run["steady_ips"] if run.get("steady_ips") else None


def fit_cluster(cl: dict[int, dict]) -> tuple[ScalingFit, ScalingFit | None]:
    after = ScalingFit.from_two(*(cl[e]["work_s"] / cl[e]["files"] for e in (1, 2)))
    steady = None
    if all(cl[e].get("steady_ips") for e in (1, 2)):
        steady = ScalingFit.from_two(*(1 / cl[e]["steady_ips"] for e in (1, 2)))
    return after, steady


# ---------------------------------------------------------------------------------------------
# one comparison: the Spark job, then the plain loop on its shard plan
# ---------------------------------------------------------------------------------------------

def compare_once(corpus: Corpus, tmp: Path, tag: str, args, show_log: bool = False) -> tuple[dict, dict, bool]:
    """(Spark run, plain run, whether their shards are byte-identical)."""
    spark_out, plain_out = (tmp / re.sub(r"\W+", "-", f"{what}-{tag}") for what in ("spark", "plain"))
    print(f"[{tag}] spark-submit --master local[{args.cores}], {corpus.count} images ...", file=sys.stderr, flush=True)
    spark = run_spark(corpus, spark_out, ["--master", f"local[{args.cores}]"], args)
    m = spark["manifest"]
    if show_log:
        for line in spark["log"]:
            print("  " + line.split(" INFO ", 1)[-1][:200], file=sys.stderr)
    t = images.Transform(channels=m["image_shape"][2], size=args.image_size, resize="shorter-side-crop",
                         encoding="jpeg", jpeg_quality=args.jpeg_quality)
    counts = tuple(len(m["splits"][s]["shards"]) for s in SPLITS)
    plan = ShardPlan.of(SPLITS, counts)
    print(f"[{tag}] plain multiprocessing loop ({args.cores} processes) ...", file=sys.stderr, flush=True)
    plain = run_plain(corpus, plain_out, args.cores, t, plan, m["classes"])
    identical = all(plain["entries"][(s, i)]["sha256"] == sh["sha256"]
                    for s in SPLITS for i, sh in enumerate(m["splits"][s]["shards"]))
    print(f"  spark: {spark['wall_s']:.1f} s total, {spark['work_s']:.1f} s after start-up, "
          f"{spark['cpu_s']:.1f} CPU s; plain: {plain['wall_s']:.1f} s, {plain['cpu_s']:.1f} CPU s; "
          f"shards identical: {identical}", file=sys.stderr, flush=True)
    shutil.rmtree(spark_out, ignore_errors=True)
    shutil.rmtree(plain_out, ignore_errors=True)
    return spark, plain, identical


# ---------------------------------------------------------------------------------------------
# the report (markdown)
# ---------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu})" if cpu else f"{os.cpu_count()} CPUs"


def _goal(ok: bool) -> str:
    return "met" if ok else "**not met**"


def header(res: dict) -> str:
    a = res["args"]
    opts = [f"--count {a.count}", f"--cores {a.cores}", f"--repeat {res['repeat']}"]
    if a.memory_sizes:
        opts.append(f"--memory-sizes {','.join(str(x) for x in a.memory_sizes)}")
    if a.cluster_count:
        opts.append(f"--cluster-count {a.cluster_count}")
    if a.jvm_options != JVM_OPTIONS:
        opts.append(f"--jvm-options='{a.jvm_options}'")
    return (f"`python -m bench.spark_preprocess {' '.join(opts)}`: {describe(res['corpus'])}; -> "
            f"{a.image_size}x{a.image_size} shorter-side-crop, jpeg q{a.jpeg_quality}, {a.cores} processes / "
            f"local[{a.cores}], the val labels from LOC_val_solution.csv (`--val-labels`). {res['machine']}; "
            f"Spark {res['spark_version']}; load average before the runs {res['load']}; {res['date']}. "
            f"Median of {res['repeat']} alternating runs of each.")


def comparison(res: dict) -> list[str]:
    s, p = res["spark"], res["plain"]
    n = s["files"]
    plain_ips, after_ips = n / p["wall_s"], n / s["work_s"]
    rows = [("plain multiprocessing Pillow loop", p["wall_s"], plain_ips, p["cpu_s"]),
            ("Spark, after start-up", s["work_s"], after_ips, s["cpu_after_s"]),
            ("Spark, whole spark-submit", s["wall_s"], n / s["wall_s"], s["cpu_s"])]
    lines = ["| run | seconds | images/s | ratio to plain | CPU seconds | ms CPU per image |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, sec, ips, cpu in rows:
        lines.append(f"| {name} | {sec:.1f} | {ips:.1f} | {ips / plain_ips:.2f} | {cpu:.1f} | {1000 * cpu / n:.2f} |")
    lines.append(f"| Spark start-up (spark-submit launch -> first Spark job) | {s['startup_s']:.1f} | | | | |")
    if s.get("steady_ips") and p.get("steady_ips"):
        lines.append(f"| steady state (20%-90% of the files done): plain | | {p['steady_ips']:.1f} | 1.00 | | |")
        lines.append(f"| steady state (20%-90% of the files done): Spark decode/write stage | | "
                     f"{s['steady_ips']:.1f} | {s['steady_ips'] / p['steady_ips']:.2f} | | |")
    speed = after_ips / plain_ips
    cpu_ratio = (s["cpu_after_s"] / n) / (p["cpu_s"] / n)
    st = s["stages"]
    lines += ["",
              f"Throughput after start-up, Spark / plain: **{speed:.2f}** (goal >= {THROUGHPUT_GOAL}: "
              f"{_goal(speed >= THROUGHPUT_GOAL)}). CPU per image after start-up, Spark (the JVM and every "
              f"Python process) / plain (the parent and its workers): {1000 * s['cpu_after_s'] / n:.2f} / "
              f"{1000 * p['cpu_s'] / n:.2f} ms = **{cpu_ratio:.2f}** (goal <= {CPU_GOAL}: {_goal(cpu_ratio <= CPU_GOAL)}). "
              f"Spark after start-up = listing {st.get('listing_s', 0):.1f} s + probe {st.get('probe_s', 0):.1f} s + "
              f"decode/write {st.get('process_s', 0):.1f} s + manifest/publish; SparkSession creation took "
              f"{s['session_s']:.1f} s of the start-up. Shards byte-identical between the two runs "
              f"(at every size below too): {'yes' if res['identical'] else '**NO**'}."]
    return lines


SPARK_ROLES = (("driver JVM", "JVM (local mode: driver and executor)"), ("Python driver", "Python driver"),
               ("Python daemon", "Python worker daemon (forks the workers)"),
               ("Python worker", "Python worker (the largest)"),
               ("all processes together (sum of RSS)", "Spark, all processes together (sum of RSS)"))
PLAIN_ROLES = (("plain loop parent", "plain loop parent"), ("plain loop worker", "plain loop worker (the largest)"),
               ("all processes together (sum of RSS)", "plain loop, all processes together (sum of RSS)"))


def memory(res: dict) -> list[str]:
    sizes = sorted(res["by_size"])
    if len(sizes) < 2:
        return []
    lo, hi = sizes[0], sizes[-1]
    lines = ["", f"### Peak memory at {lo} and {hi} images", "",
             f"| process | peak RSS, {lo} images (MB) | peak RSS, {hi} images (MB) | ratio |",
             "|---|---:|---:|---:|"]
    ratios = []
    for kind, roles in (("spark", SPARK_ROLES), ("plain", PLAIN_ROLES)):
        for key, name in roles:
            a, b = (res["by_size"][n][kind]["memory_kb"].get(key) for n in (lo, hi))
            if not a or not b:
                continue
            if kind == "spark":
                ratios.append(b / a)
            lines.append(f"| {name} | {a / 1024:.0f} | {b / 1024:.0f} | {b / a:.2f} |")
    worst = max(ratios) if ratios else float("nan")
    lines += ["", f"Each process's peak resident memory (VmHWM from /proc, polled every 0.25 s; a forked "
                  f"worker's RSS counts the pages it shares with its parent). Largest ratio of Spark's "
                  f"processes {worst:.2f} (goal: each within {MEMORY_GOAL:.2f}: {_goal(worst <= MEMORY_GOAL)}); "
                  f"the plain loop's are for comparison."]
    return lines


def cluster(res: dict) -> list[str]:
    cl = res.get("cluster")
    if not cl:
        return []
    n = cl[1]["files"]
    base = n / cl[1]["work_s"]
    lines = ["", f"### Scaling on a loopback standalone cluster ({n} images)", "",
             "| executors of 1 core | start-up s | seconds after start-up | images/s after start-up | "
             "speed-up | steady-state images/s | ms CPU per image after start-up |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for e in (1, 2):
        r = cl[e]
        ips = n / r["work_s"]
        steady = f"{r['steady_ips']:.1f}" if r.get("steady_ips") else ""
        lines.append(f"| {e} | {r['startup_s']:.1f} | {r['work_s']:.1f} | {ips:.1f} | {ips / base:.2f} | {steady} | "
                     f"{1000 * r['cpu_after_s'] / n:.2f} |")
    lines += ["", "A master and two workers (`--cores 1`) on 127.0.0.1, started from the venv's pyspark; the "
                  "job submitted in client mode with `--total-executor-cores 1` or `2` and "
                  "`spark.executor.cores=1`. The CPU includes the master's, the workers' and the executors' "
                  "processes."]
    return lines


def projection(res: dict) -> list[str]:
    lines = ["", f"### Projection: the whole of ImageNet ({IMAGENET_IMAGES:,} images) on this machine and on a cluster", "",
             "| set-up | wall ms per image after start-up | start-up s | projected, after-start-up rate | "
             "projected, steady-state rate |",
             "|---|---:|---:|---:|---:|"]
    for name, ms, startup, total, steady_total in projections(res):
        lines.append(f"| {name} | {ms:.2f} | {startup:.0f} | {hours(total)} | "
                     f"{hours(steady_total) if steady_total else ''} |")
    text = (f"Projected time = start-up + {IMAGENET_IMAGES:,} x seconds per image. The after-start-up rate "
            f"spreads the run's fixed costs (listing, probe, JIT warm-up, Python worker start) over its images, "
            f"so it overstates the time of a larger run; the steady-state rate (20%-90% of the files done) "
            f"leaves them out, so it understates it slightly.")
    if res.get("cluster"):
        fit = res["fit"]
        text += (f" The cluster rows fit t(N) = a + b/N seconds per image exactly through the 1- and 2-executor "
                 f"runs: a = {1000 * fit.serial:.2f} ms (the part more executors do not shrink: the driver, and on "
                 f"this machine the cores the executors share with the driver, master and workers), b = "
                 f"{1000 * fit.parallel:.2f} ms (the executors' work){'; ' + fit.note if fit.note else ''}; "
                 f"start-up: the mean of the two runs'. Two executors on a {os.cpu_count()}-core machine are a "
                 f"lower bound on the scaling: they compete with the driver JVM, the master, the workers and "
                 f"the machine's other work for the same cores, so a comes out too large and the projection "
                 f"for many executors too slow; on the other hand it assumes the input (~140 GB for ImageNet) "
                 f"reaches every executor as fast as this machine's page cache does.")
    return lines + ["", text]


def report(res: dict) -> str:
    return "\n".join([header(res), "", *comparison(res), *memory(res), *cluster(res), *projection(res)])


# ---------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive whole number, not {text!r}")
    return int(text)


def _sizes(text: str) -> list[int]:
    sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    if len(sizes) != 2 or sizes[0] < 1:
        raise argparse.ArgumentTypeError("two different positive counts, e.g. 10000,50000")
    return sizes


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=_positive, default=50000, help="images of the comparison (default 50000)")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "build" / "bench", help="where the images are kept")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="processes / local[N] (default: all)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--jpeg-quality", type=int, default=95)
    ap.add_argument("--shard-mb", type=float, default=100.0)
    ap.add_argument("--driver-memory", default="2g")
    ap.add_argument("--jvm-options", default=JVM_OPTIONS,
                    help="JVM options of the Spark driver and executors (default: the DAG's, "
                         f"{JVM_OPTIONS!r}; '' for Spark's own)")
    ap.add_argument("--repeat", type=_positive, default=1,
                    help="run Spark and the plain loop this many times, alternating; report the median of each")
    ap.add_argument("--memory-sizes", type=_sizes, default=None, metavar="A,B",
                    help="also run both at these two sizes and report each process's peak memory at both "
                         "(a size equal to --count reuses that run)")
    ap.add_argument("--cluster-count", type=_positive, default=None, metavar="M",
                    help="also run the job on M images on a loopback standalone cluster with 1 and 2 "
                         "executors of 1 core, and project the whole of ImageNet")
    ap.add_argument("--executor-memory", default="1g", help="with --cluster-count (default 1g)")
    ap.add_argument("--worker-memory", default="2g", help="with --cluster-count: what each worker offers (default 2g)")
    ap.add_argument("--write-docs", action="store_true", help=f"update the section in {DOCS.relative_to(REPO)}")
    return ap.parse_args(argv)


def warm_page_cache(corpus: Corpus) -> None:
    """Read every file once, so that the first run (Spark's) does not pay for a cold page cache
    that the runs after it would not."""
    for dirpath, _, files in os.walk(corpus.root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def ensure_corpora(args) -> dict[int, Corpus]:
    """Every corpus the run needs, the largest first (the others are its first images, linked)."""
    counts = {args.count, *(args.memory_sizes or ()), *([args.cluster_count] if args.cluster_count else [])}
    return {n: ensure_corpus(args.cache_dir, n, args.cores) for n in sorted(counts, reverse=True)}


def median_comparison(corpus: Corpus, tmp: Path, args) -> tuple[dict, dict, bool]:
    """Spark and the plain loop --repeat times, alternating so that a change in the machine's load
    hits both; the median run of each (by its own headline time), and whether all shards matched."""
    spark_runs, plain_runs, identical = [], [], True
    for r in range(args.repeat):
        spark, plain, same = compare_once(corpus, tmp, f"{r + 1}/{args.repeat}", args, show_log=r == 0)
        spark_runs.append(spark)
        plain_runs.append(plain)
        identical &= same
    spark = sorted(spark_runs, key=lambda x: x["work_s"])[len(spark_runs) // 2]
    plain = sorted(plain_runs, key=lambda x: x["wall_s"])[len(plain_runs) // 2]
    return spark, plain, identical


def memory_runs(corpora: dict[int, Corpus], tmp: Path, args, main_run: dict) -> tuple[dict[int, dict], bool]:
    """{size: {"spark": run, "plain": run}} at each --memory-sizes (the main run where the size is
    --count's), and whether all their shards matched."""
    by_size, identical = {}, True
    for n in args.memory_sizes or ():
        if n == args.count:
            by_size[n] = main_run
            continue
        spark, plain, same = compare_once(corpora[n], tmp, f"{n} images", args)
        by_size[n] = {"spark": spark, "plain": plain}
        identical &= same
    return by_size, identical


def main(argv=None) -> int:
    args = parse_args(argv)
    # a SIGTERM unwinds like Ctrl-C, so that the `finally`s stop spark-submit and the cluster
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    corpora = ensure_corpora(args)
    print(f"corpus: {describe(corpora[args.count].info)}", file=sys.stderr, flush=True)
    warm_page_cache(corpora[max(corpora)])     # the others are its first images
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-spark-preprocess-", dir=args.cache_dir) as tmp:
        tmp = Path(tmp)
        spark, plain, identical = median_comparison(corpora[args.count], tmp, args)
        by_size, same = memory_runs(corpora, tmp, args, {"spark": spark, "plain": plain})
        cluster_runs = run_cluster(corpora[args.cluster_count], tmp, args) if args.cluster_count else None
    res = {"args": args, "load": load, "repeat": args.repeat, "corpus": corpora[args.count].info,
           "cores": args.cores, "machine": machine(), "spark_version": spark["manifest"]["spark_version"],
           "date": dt.date.today().isoformat(), "spark": spark, "plain": plain, "identical": identical and same,
           "by_size": by_size, "cluster": cluster_runs}
    if cluster_runs:
        res["fit"], res["steady_fit"] = fit_cluster(cluster_runs)
    text = report(res)
    print(text)
    if args.write_docs:
        update_section("Spark preprocessing vs a plain Pillow loop", text, key="spark-preprocess")
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
