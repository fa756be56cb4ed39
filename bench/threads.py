"""Throughput of parallel training processes against their thread count, per Keras backend.

Why the DAG gives each training task ``cores // parallel tasks`` threads: on a CPU machine,
processes that each ask for every core oversubscribe it. This benchmark trains LeNet-300-100 on
Fashion-MNIST (the engine's own data pipeline, model and compile) in P processes with T threads
each, all in one run, and reports total images/s relative to one process using every core.

With ``--backends tensorflow,jax`` it measures Keras on TensorFlow (the tf.data pipeline) and on
JAX (the numpy pipeline, XLA:CPU) side by side, layout by layout, alternating: the raw step rates
behind ``make run``'s choice of backend and its compute floor (docs/benchmarks.md).

    .venv/bin/python -m bench.threads [--steps 1400] [--backends tensorflow,jax] [--write-docs]
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
from lottery.session import build_model, open_data
from lottery.training import compile_model
cfg = ExperimentConfig()
train, _, spe = open_data(cfg, {data!r})  # the backend's own pipeline, the split cached in memory
model = build_model(cfg, train, seed=0)
compile_model(model, cfg, spe)
model.fit(train.batches(cfg.batch_size, seed=0, epoch=0).take(50), epochs=1, steps_per_epoch=50, verbose=0)  # warm-up
sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()  # start together
start = time.perf_counter()
steps, done, epoch = {steps}, 0, 1
while done < steps:  # one fit call per epoch, as the engine trains (lottery.training.TrainingRun)
    n = min(spe, steps - done)
    model.fit(train.batches(cfg.batch_size, seed=0, epoch=epoch).take(n), epochs=1, steps_per_epoch=n, verbose=0)
    done, epoch = done + n, epoch + 1
elapsed = time.perf_counter() - start
print(json.dumps({{"images": steps * cfg.batch_size, "seconds": elapsed}}))
"""


def run(data: Path, processes: int, threads: int, steps: int, backend: str = "tensorflow") -> float:
    """Total images/s of ``processes`` concurrent trainers with ``threads`` threads each."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "KERAS_BACKEND": backend}
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
    parser.add_argument("--backends", default="tensorflow",
                        help="comma-separated Keras backends, measured side by side (tensorflow,jax)")
    parser.add_argument("--layouts", default="", help="processes x threads to measure, e.g. 2x1,1x2 (default: 1xC, Cx1, CxC, 2Cx1)")
    parser.add_argument("--write-docs", action="store_true", help="update the section in docs/benchmarks.md")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    layouts = [(1, cores)] + [(p, t) for p, t in ((cores, 1), (cores, cores), (2 * cores, 1)) if (p, t) != (1, cores)]
    if args.layouts:
        layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from tests.datasets import make_fashion_mnist_shards

            data = make_fashion_mnist_shards(tmp, 60000, 1000, encoding="raw")
        # layout by layout, the backends in turn: a drift of the machine's speed hits both alike
        figures = {(p, t): {b: run(data, p, t, args.steps, b) for b in backends} for p, t in layouts}
    table = format_table(figures, backends, cores, args.steps)
    print(table)
    if args.write_docs:
        from bench.docs import update_section

        update_section("Training processes and thread pools (`bench/threads.py`)", table, key="threads")


def format_table(figures: dict, backends: list[str], cores: int, steps: int) -> str:
    base = next(iter(figures.values()))
    lines = [
        f"Machine: {cores} cores. LeNet-300-100, Fashion-MNIST, batch 128, {steps} timed steps per process, "
        "all processes started together; total images/s over the wall time of the slowest; "
        f"each layout measured with {' and '.join(backends)} in turn.",
        "",
        "| processes x threads | " + " | ".join(f"{b} images/s (vs first row)" for b in backends)
        + (f" | {backends[1]} / {backends[0]}" if len(backends) == 2 else "") + " |",
        "|---|" + "---|" * (len(backends) + (len(backends) == 2)),
    ]
    for (p, t), rates in figures.items():
        cells = [f"{rates[b]:,.0f} ({rates[b] / base[b]:.2f}x)" for b in backends]
        if len(backends) == 2:
            cells.append(f"{rates[backends[1]] / rates[backends[0]]:.2f}x")
        lines.append(f"| {p} x {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
