#!/usr/bin/env python3
"""CPU acceptance benchmark of the input pipelines, side by side in one run.

    python -m bench.input_pipeline                       # build the data set once, measure, print ratios
    python -m bench.input_pipeline --write-docs          # and update its section of docs/benchmarks.md
    python -m bench.input_pipeline --data DIR            # measure an existing 224 px JPEG data set

1. Builds (once, kept in --cache-dir) a 224 px JPEG data set *written by the Spark job*: an image
   folder of `--count` Fashion-MNIST images upscaled to 224 x 224 RGB JPEGs (10 classes), then
   `spark-submit --master local[*] spark_jobs/preprocess_images.py --image-size 224 --encoding jpeg`.
2. Measures, alternating for `--rounds` rounds, each in a fresh process (`python -m
   lottery.input_bench`, the user-facing probe, `--seconds` each), batch `--batch-size`, the
   `--augmentation` stream (default `random_resized_crop`, the ImageNet recipe):
   tf.data (TensorFlow backend, all cores), the JAX-path stream with 1 worker and with 2 workers.
3. Prints each figure (median of the rounds), the ratios and the acceptance verdict:
   JAX stream (2 workers) >= 1.0 x tf.data, 2 workers >= 1.7 x 1 worker.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "input-pipeline"
RUNS = (("tf.data", "tensorflow", None), ("JAX stream, 1 worker", "jax", 1), ("JAX stream, 2 workers", "jax", 2))


def make_image_folder(root: Path, count: int) -> Path:
    """`count` Fashion-MNIST training images as 224 x 224 RGB JPEGs in class folders."""
    import numpy as np
    from PIL import Image

    from lottery.data.fetch import load_fashion_mnist_arrays

    images, labels = load_fashion_mnist_arrays("train", limit=count)
    rng = np.random.default_rng(0)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / "train" / f"{int(label):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.integers(60, 256, 3).astype(np.float32) / 255  # colour, so the three channels differ
        rgb = (np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), np.float32)[:, :, None] * tint)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def build_dataset(cache_dir: Path, count: int) -> Path:
    out = cache_dir / f"fm224-jpeg-{count}"
    if (out / "manifest.json").is_file():
        return out
    folder = cache_dir / f"fm224-images-{count}"
    if not (folder / "train").is_dir():
        print(f"writing {count} 224 px JPEGs to {folder}", file=sys.stderr, flush=True)
        make_image_folder(folder, count)
    from spark_jobs.preprocess.spark import submit_env

    env = submit_env()
    cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[*]", "--conf", "spark.ui.enabled=false",
           str(REPO / "spark_jobs" / "preprocess_images.py"), "--input", str(folder), "--output", str(out),
           "--image-size", "224", "--encoding", "jpeg", "--jpeg-quality", "90", "--num-shards", "8",
           "--progress-interval", "0"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def measure(data: Path, backend: str, workers: int | None, args) -> float:
    """One fresh `python -m lottery.input_bench` run; its last line is `input img/s: <number>`."""
    cmd = [sys.executable, "-m", "lottery.input_bench", "--data", str(data), "--augmentation", args.augmentation,
           "--batch-size", str(args.batch_size), "--seconds", str(args.seconds)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.seconds * 4 + 120)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    match = re.fullmatch(r"input img/s: ([0-9.]+)", last)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return float(match.group(1))


def report(rates: dict[str, list[float]], args, data: Path) -> str:
    med = {name: statistics.median(v) for name, v in rates.items()}
    tf_rate, one, two = (med[name] for name, _, _ in RUNS)
    lines = [f"Machine: {platform.node()}, {len(os.sched_getaffinity(0))} cores ({platform.processor() or platform.machine()}); "
             f"{time.strftime('%Y-%m-%d')}. Data: `{data.name}` (224 x 224 x 3 JPEG, written by the Spark job), "
             f"split train, batch {args.batch_size}, `{args.augmentation}`; median of {args.rounds} alternating rounds "
             f"of {args.seconds:g} s each, every figure from a fresh `python -m lottery.input_bench` process.", "",
             "| stream | img/s | runs |", "|---|---|---|"]
    for name, values in rates.items():
        lines.append(f"| {name} | {med[name]:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} |")
    ok1, ok2 = two >= tf_rate, two >= 1.7 * one
    lines += ["", f"- JAX stream (2 workers) / tf.data: **{two / tf_rate:.2f}** (acceptance >= 1.0: {'pass' if ok1 else 'FAIL'})",
              f"- 2 workers / 1 worker: **{two / one:.2f}** (acceptance >= 1.7: {'pass' if ok2 else 'FAIL'})",
              "", "Command: `python -m bench.input_pipeline --write-docs`."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="an existing data set (else one is built)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lottery-bench")
    p.add_argument("--count", type=int, default=3000, help="images of the built data set")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--augmentation", default="random_resized_crop")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    started = time.monotonic()
    data = args.data or build_dataset(args.cache_dir, args.count)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in RUNS}
    for r in range(args.rounds):
        for name, backend, workers in RUNS:
            rates[name].append(measure(data, backend, workers, args))
            print(f"[round {r + 1}/{args.rounds}] {name}: {rates[name][-1]:,.0f} img/s", file=sys.stderr, flush=True)
    text = report(rates, args, data)
    print(text)
    print(f"(benchmark took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.write_docs:
        from bench.docs import update_section

        update_section("Input pipelines on the CPU: tf.data vs the JAX-path worker stream", text, key=KEY)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
