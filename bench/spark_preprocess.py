#!/usr/bin/env python3
"""Benchmark: the Spark preprocessing job vs a plain multiprocessing Pillow loop, same cores.

    python -m bench.spark_preprocess --count 4000            # figures as a markdown table
    python -m bench.spark_preprocess --count 20000 --write-docs   # and update docs/benchmarks.md

1. Generates (once, cached in --cache-dir) an ImageNet-like folder: `--count` JPEGs of about
   500x375 (random sizes 440-560 x 330-420, some portrait) with noise, gradients and shapes,
   10 classes, 10% of them in val/.
2. Runs `spark-submit --master local[N] spark_jobs/preprocess_images.py ... --image-size 224
   --encoding jpeg` (N = --cores, default all) and reads its timings from the manifest:
   start-up (spark-submit launch -> first Spark job) and the work after start-up.
3. Runs the same work as a plain `multiprocessing.Pool(N)` loop: read, verify + load, convert,
   resize, encode with the same functions and encoders, write the same TFRecord shards
   (`lottery.data.tfrecord.write_shard`) with the same shard assignment; the shards must come out
   byte-identical to Spark's (checked).
Reports images/s of both, Spark's start-up time and the ratio Spark-after-start-up / plain.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from lottery.data.manifest import read_manifest, shard_name
from lottery.data.tfrecord import write_shard
from lottery.files import atomic_path
from spark_jobs.preprocess import images
from spark_jobs.preprocess.sharding import SPLITS, ShardPlan, assign, shard_key

REPO = Path(__file__).resolve().parents[1]

GENERATOR_VERSION = 2
NUM_CLASSES = 10
VAL_EVERY = 10          # every 10th image goes to val/
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench/spark_preprocess.py:begin -->", "<!-- bench/spark_preprocess.py:end -->"


# ---------------------------------------------------------------------------------------------
# the synthetic ImageNet-like folder
# ---------------------------------------------------------------------------------------------

def _make_image(item: tuple[str, int]) -> int:
    from PIL import Image, ImageDraw

    path, seed = item
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(440, 561)), int(rng.integers(330, 421))
    if rng.random() < 0.15:
        w, h = h, w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, (2, 3)).astype(np.float32)
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img += rng.normal(0, rng.uniform(5, 30), (h, w, 3)).astype(np.float32)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(2, 12)))
    with atomic_path(path) as tmp:
        im.save(tmp, "JPEG", quality=90)
    return os.path.getsize(path)


def ensure_dataset(cache_dir: Path, count: int, procs: int) -> Path:
    """The cached folder for `count` images (generated once; a marker file says it is complete)."""
    root = cache_dir / f"imagenet-like-{count}"
    marker = root / ".complete.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("version") == GENERATOR_VERSION and info.get("count") == count:
            return root
    if root.exists():
        shutil.rmtree(root)
    items = []
    for i in range(count):
        split = "val" if (i // NUM_CLASSES) % VAL_EVERY == VAL_EVERY - 1 else "train"
        d = root / split / f"n{i % NUM_CLASSES:08d}"
        d.mkdir(parents=True, exist_ok=True)
        items.append((str(d / f"img_{i:07d}.JPEG"), i))
    t0 = time.time()
    print(f"generating {count} JPEGs in {root} ...", file=sys.stderr, flush=True)
    with mp.Pool(procs) as pool:
        sizes = pool.map(_make_image, items, chunksize=32)
    marker.write_text(json.dumps({"version": GENERATOR_VERSION, "count": count, "bytes": sum(sizes),
                                  "seconds": round(time.time() - t0, 1)}))
    return root


# ---------------------------------------------------------------------------------------------
# CPU time of a process tree (the machine may be shared: CPU seconds per image are the fair
# comparison, wall-clock images/s the one people feel)
# ---------------------------------------------------------------------------------------------

class SessionCPU(threading.Thread):
    """Polls /proc for the processes of one session id and keeps each one's latest user+system
    CPU time (processes that live less than a poll interval are missed: Spark's are long-lived)."""

    def __init__(self, sid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.sid, self.interval = sid, interval
        self.seen: dict[tuple[int, int], float] = {}
        self.timeline: list[tuple[float, float]] = []
        self.done = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) != self.sid:      # field 6 of stat: session id
                continue
            start = int(fields[19])             # field 22: start time (tells reused pids apart)
            self.seen[(int(name), start)] = (int(fields[11]) + int(fields[12])) / self.tick

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()
            self.timeline.append((time.time(), sum(self.seen.values())))

    def at(self, when: float) -> float:
        """CPU seconds used up to `when` (the last sample before it)."""
        before = [cpu for t, cpu in self.timeline if t <= when]
        return before[-1] if before else 0.0

    def stop(self) -> float:
        self.done.set()
        self.join()
        return sum(self.seen.values())


def _own_cpu() -> float:
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


# ---------------------------------------------------------------------------------------------
# the Spark run
# ---------------------------------------------------------------------------------------------

def run_spark(root: Path, out: Path, cores: int, args) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", f"local[{cores}]",
           "--conf", "spark.ui.enabled=false", "--driver-memory", args.driver_memory,
           *(["--driver-java-options", args.jvm_options] if args.jvm_options else []),
           str(REPO / "spark_jobs" / "preprocess_images.py"), "--input", str(root), "--output", str(out),
           "--image-size", str(args.image_size), "--encoding", "jpeg", "--jpeg-quality", str(args.jpeg_quality),
           "--shard-mb", str(args.shard_mb), "--progress-interval", "0", "--force"]
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    cpu = SessionCPU(proc.pid)
    cpu.start()
    stdout, stderr = proc.communicate()
    ended = time.time()
    cpu_s = cpu.stop()
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"spark job failed with exit status {proc.returncode}")
    manifest = read_manifest(out)
    t = manifest["timings"]
    n = manifest["input_fingerprint"]["files"]
    return {"manifest": manifest, "files": n, "wall_s": ended - launched, "cpu_s": cpu_s,
            "cpu_after_s": cpu_s - cpu.at(t["first_job_at"]),
            "steady_ips": steady_rate(t.get("decode_progress", []), n),
            "startup_s": t["first_job_at"] - launched, "session_s": t["session_start_s"],
            "work_s": t["finished_at"] - t["first_job_at"],
            "stages": {k: t[k] for k in ("listing_s", "probe_s", "process_s") if k in t},
            "log": [l for l in proc.stdout.splitlines() if "preprocess_images INFO" in l]}


# ---------------------------------------------------------------------------------------------
# the plain multiprocessing loop: the same work with the same functions
# ---------------------------------------------------------------------------------------------

_T: images.Transform | None = None
_ROOT: str = ""


def _init(t: images.Transform, root: str) -> None:
    global _T, _ROOT
    _T, _ROOT = t, root


def _plain_chunk(items: list[tuple[str, int, str, int, str]]):
    out, skipped = [], []
    stats = images.HistogramStats(_T.channels)
    for rel, p, key, label, split in items:
        with open(os.path.join(_ROOT, rel), "rb") as f:
            data = f.read()
        try:
            pixels = images.transform_image(data, _T)
        except images.BadImage as e:
            skipped.append({"path": rel, "reason": e.reason})
            continue
        if split == "train":
            stats.update(pixels)
        out.append(((p, key, rel), images.encode_record(pixels, label, rel, _T)))
    return out, skipped, stats.hist


def run_plain(root: Path, out: Path, cores: int, t: images.Transform, plan: ShardPlan, classes: list[str]) -> dict:
    t0 = time.time()
    cpu0 = _own_cpu()
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for split in ("train", "val"):
        for dirpath, _, files in os.walk(root / split):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                s, cls = assign(rel, derived_val=False, val_fraction=0.1, seed=0)
                key = shard_key(rel)
                items.append((rel, plan.partition(s, key), key, index[cls], s))
    chunks = [items[i:i + 32] for i in range(0, len(items), 32)]
    per_shard: dict[int, list] = {p: [] for p in range(plan.total)}
    hist = np.zeros((t.channels, 256), dtype=np.int64)
    timeline = []
    with mp.Pool(cores, initializer=_init, initargs=(t, str(root))) as pool:
        for recs, skipped, h in pool.imap_unordered(_plain_chunk, chunks):
            hist += h
            for k, rec in recs:
                per_shard[k[0]].append((k, rec))
            timeline.append((time.time() - t0, (timeline[-1][1] if timeline else 0) + len(recs) + len(skipped)))
    out.mkdir(parents=True)
    entries = {}
    for p, rows in per_shard.items():
        rows.sort(key=lambda kv: kv[0])
        split, i, n = plan.shard_of(p)
        entries[(split, i)] = write_shard(out / shard_name(split, i, n), (r for _, r in rows))
    return {"files": len(items), "wall_s": time.time() - t0, "cpu_s": _own_cpu() - cpu0, "entries": entries,
            "steady_ips": steady_rate(timeline, len(items))}


def steady_rate(timeline: list, total: int, lo: float = 0.2, hi: float = 0.9) -> float | None:
    """Files per second between the moments `lo` and `hi` of the files were done (no warm-up, no tail)."""
    a = next(((t, n) for t, n in timeline if n >= lo * total), None)
    b = next(((t, n) for t, n in reversed(timeline) if n <= hi * total), None)
    if a is None or b is None or b[0] <= a[0]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


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


def table(res: dict) -> str:
    s, p = res["spark"], res["plain"]
    n, cores = s["files"], res["cores"]
    plain = n / p["wall_s"]
    spark_after = n / s["work_s"]
    rows = [
        ("plain multiprocessing Pillow loop", p["wall_s"], plain, 1.0, p["cpu_s"]),
        ("Spark, after start-up", s["work_s"], spark_after, spark_after / plain, s["cpu_after_s"]),
        ("Spark, whole spark-submit", s["wall_s"], n / s["wall_s"], n / s["wall_s"] / plain, s["cpu_s"]),
    ]
    jvm = f" --jvm-options={res['jvm_options']}" if res["jvm_options"] else ""
    lines = [f"`python -m bench.spark_preprocess --count {res['count']} --cores {cores} --repeat {res['repeat']}{jvm}`: "
             f"{res['count']} JPEGs (~{res['avg_kb']:.0f} KB, ~500x375) -> {res['image_size']}x{res['image_size']} "
             f"shorter-side-crop, jpeg q{res['jpeg_quality']}, {cores} processes / local[{cores}]; "
             f"{res['machine']}; Spark {res['spark_version']}; load average before the runs {res['load']}; {res['date']}. "
             f"Median of {res['repeat']} alternating runs of each.",
             "",
             "| run | seconds | images/s | ratio to plain | CPU seconds | ms CPU per image |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, sec, ips, ratio, cpu in rows:
        cpu_cols = f"{cpu:.1f} | {1000 * cpu / n:.1f}" if cpu is not None else "| "
        lines.append(f"| {name} | {sec:.1f} | {ips:.1f} | {ratio:.2f} | {cpu_cols} |")
    lines.append(f"| Spark start-up (spark-submit launch -> first Spark job) | {s['startup_s']:.1f} | | | | |")
    if s.get("steady_ips") and p.get("steady_ips"):
        lines.append(f"| steady state (20%-90% of the files done): plain | | {p['steady_ips']:.1f} | 1.00 | | |")
        lines.append(f"| steady state (20%-90% of the files done): Spark decode/write stage | | "
                     f"{s['steady_ips']:.1f} | {s['steady_ips'] / p['steady_ips']:.2f} | | |")
    st = s["stages"]
    cpu_ratio = p["cpu_s"] / s["cpu_after_s"]
    lines += ["", f"Spark after start-up = listing {st.get('listing_s', 0):.1f} s + probe {st.get('probe_s', 0):.1f} s + "
                  f"decode/write {st.get('process_s', 0):.1f} s + manifest/publish; SparkSession creation took "
                  f"{s['session_s']:.1f} s of the start-up. CPU efficiency after start-up (plain CPU seconds / Spark "
                  f"CPU seconds, JVM and Python workers included): {cpu_ratio:.2f}. Shards byte-identical between "
                  f"the two runs: "
                  f"{'yes' if res['identical'] else 'NO'}."]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    section = f"{BEGIN}\n## Spark preprocessing vs a plain Pillow loop\n\n{text}\n{END}\n"
    if DOCS.exists():
        content = DOCS.read_text()
        if BEGIN in content and END in content:
            content = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", lambda _: section, content,
                             flags=re.S)
        else:
            content = content.rstrip("\n") + "\n\n" + section
    else:
        content = "# Benchmarks\n\n" + section
    DOCS.write_text(content)
    print(f"updated {DOCS}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="number of JPEGs (default 20000)")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "build" / "bench", help="where the images are kept")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="processes / local[N] (default: all)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--jpeg-quality", type=int, default=95)
    ap.add_argument("--shard-mb", type=float, default=100.0)
    ap.add_argument("--driver-memory", default="2g")
    ap.add_argument("--jvm-options", default="",
                    help="extra JVM options of the Spark driver (local mode: also the executor), "
                         "e.g. -XX:TieredStopAtLevel=1")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run Spark and the plain loop this many times, alternating; report the median of each")
    ap.add_argument("--write-docs", action="store_true", help=f"update the section in {DOCS.relative_to(REPO)}")
    args = ap.parse_args(argv)

    root = ensure_dataset(args.cache_dir, args.count, args.cores)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    info = json.loads((root / ".complete.json").read_text())
    spark_runs, plain_runs, identical = [], [], True
    with tempfile.TemporaryDirectory(prefix="bench-spark-preprocess-", dir=args.cache_dir) as tmp:
        tmp = Path(tmp)
        for r in range(max(1, args.repeat)):
            # alternate the two so that a change in the machine's load hits both
            print(f"[{r + 1}/{args.repeat}] spark-submit --master local[{args.cores}] ...", file=sys.stderr, flush=True)
            spark = run_spark(root, tmp / f"spark{r}", args.cores, args)
            m = spark["manifest"]
            if r == 0:
                for line in spark["log"]:
                    print("  " + line.split(" INFO ", 1)[-1][:200], file=sys.stderr)
            h, w, c = m["image_shape"]
            t = images.Transform(channels=c, size=args.image_size, resize="shorter-side-crop", encoding="jpeg",
                              jpeg_quality=args.jpeg_quality)
            counts = tuple(len(m["splits"][s]["shards"]) for s in SPLITS)
            plan = ShardPlan(SPLITS, counts, (0, counts[0]))
            print(f"[{r + 1}/{args.repeat}] plain multiprocessing loop ({args.cores} processes) ...",
                  file=sys.stderr, flush=True)
            plain = run_plain(root, tmp / f"plain{r}", args.cores, t, plan, m["classes"])
            identical &= all(plain["entries"][(s, i)]["sha256"] == sh["sha256"]
                             for s in SPLITS for i, sh in enumerate(m["splits"][s]["shards"]))
            print(f"  spark: {spark['wall_s']:.1f} s total, {spark['work_s']:.1f} s after start-up, "
                  f"{spark['cpu_s']:.1f} CPU s; plain: {plain['wall_s']:.1f} s, {plain['cpu_s']:.1f} CPU s",
                  file=sys.stderr, flush=True)
            spark_runs.append(spark)
            plain_runs.append(plain)
            shutil.rmtree(tmp / f"spark{r}", ignore_errors=True)
            shutil.rmtree(tmp / f"plain{r}", ignore_errors=True)
    # the median run of each (by its own headline time)
    spark = sorted(spark_runs, key=lambda x: x["work_s"])[len(spark_runs) // 2]
    plain = sorted(plain_runs, key=lambda x: x["wall_s"])[len(plain_runs) // 2]
    res = {"load": load, "count": args.count, "cores": args.cores, "image_size": args.image_size,
           "jpeg_quality": args.jpeg_quality, "repeat": len(spark_runs), "jvm_options": args.jvm_options,
           "avg_kb": info["bytes"] / args.count / 1024, "machine": machine(), "spark_version": m["spark_version"],
           "date": dt.date.today().isoformat(), "spark": spark, "plain": plain, "identical": identical}
    text = table(res)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
