"""Throughput of parallel training processes against their TensorFlow thread count.

Why the DAG gives each training task ``cores // parallel tasks`` threads: on a CPU machine,
processes that each ask for every core oversubscribe it. This benchmark trains LeNet-300-100 on
Fashion-MNIST (the engine's own data pipeline, model and compile) in P processes with T threads
each, all in one run, and reports total images/s relative to one process using every core.

    .venv/bin/python -m bench.threads [--steps 1400] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


WORKER = r"""
import json, os, sys, time
from lottery.data import runtime
runtime.configure_threads({threads})
import keras
from lottery.config import ExperimentConfig
from lottery.data.pipeline import ShardedDataset
from lottery.models import build_model
from lottery.training import compile_model
cfg = ExperimentConfig()
train = ShardedDataset({data!r}, "train", cache=True)
spe = train.steps_per_epoch(cfg.batch_size)
model = build_model(cfg.model, train.image_shape, train.num_classes, seed=0)
compile_model(model, cfg, spe)
model.fit(train.batches(cfg.batch_size, seed=0, epoch=0).take(50), epochs=1, verbose=0)  # warm-up
sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()  # start together
start = time.perf_counter()
steps = {steps}
# Consecutive epochs' streams in one fit call: a long window, so fit's own set-up is not what is timed.
stream = train.batches(cfg.batch_size, seed=0, epoch=1)
for epoch in range(2, 2 + steps // spe):
    stream = stream.concatenate(train.batches(cfg.batch_size, seed=0, epoch=epoch))
model.fit(stream.take(steps), epochs=1, steps_per_epoch=steps, verbose=0)
elapsed = time.perf_counter() - start
print(json.dumps({{"images": steps * cfg.batch_size, "seconds": elapsed}}))
"""


def run(data: Path, processes: int, threads: int, steps: int) -> float:
    """Total images/s of ``processes`` concurrent trainers with ``threads`` threads each."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    code = WORKER.format(threads=threads, data=str(data), steps=steps)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env) for _ in range(processes)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    wall = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.readline()) for p in procs]
    wall = time.perf_counter() - wall
    for p in procs:
        p.wait()
    return sum(r["images"] for r in results) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1400, help="timed training steps per process (batch 128; an epoch of Fashion-MNIST is 468)")
    parser.add_argument("--data", type=Path, help="a Fashion-MNIST data dir (default: written to a temp dir)")
    parser.add_argument("--write-docs", action="store_true", help="update the section in docs/benchmarks.md")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from tests.datasets import make_fashion_mnist_shards

            data = make_fashion_mnist_shards(tmp, 60000, 1000, encoding="raw")
        layouts = [(1, cores)] + [(p, t) for p, t in ((cores, 1), (cores, cores), (2 * cores, 1)) if (p, t) != (1, cores)]
        figures = [(p, t, run(data, p, t, args.steps)) for p, t in layouts]
    base = figures[0][2]
    lines = [
        f"Machine: {cores} cores. LeNet-300-100, Fashion-MNIST, batch 128, {args.steps} timed steps per process, "
        "all processes started together; total images/s over the wall time of the slowest.",
        "",
        "| processes x threads | images/s (total) | vs 1 x all cores |",
        "|---|---|---|",
    ]
    lines += [f"| {p} x {t} | {ips:,.0f} | {ips / base:.2f}x |" for p, t, ips in figures]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        from bench.docs import update_section

        update_section("Training processes and thread pools (`bench/threads.py`)", table, key="threads")


if __name__ == "__main__":
    main()
