#!/usr/bin/env python3
"""The GPU benchmark in one command: Keras on JAX, a markdown table for docs/benchmarks.md.

    python -m bench.gpu                 # on the GPU machine, from the repository root (about 6 minutes)
    KERAS_BACKEND=jax python -m bench.gpu --quick     # a CPU smoke run of the same code, ResNet-20 for ResNet-50

Where Keras is not installed (a GPU machine with JAX + CUDA, no TensorFlow, no network), it installs
Keras and its missing dependencies from the wheels in `--wheels` (default `.whl/`) into
`/tmp/lottery-site` and starts again with that on `PYTHONPATH`.  Download them here with
(Python 3.12, manylinux x86-64; `.whl/` is git-ignored):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        keras==3.15.1 namex==0.1.0 optree==0.20.0 google-crc32c==1.9.0

(Pillow, numpy, h5py, rich, absl-py, ml-dtypes and packaging are on that machine already.)  Put the
Debian package's Fashion-MNIST files (`/usr/share/datasets/fashion-mnist/*.gz`) in
`.whl/fashion-mnist/` to use the real Fashion-MNIST there; without them a synthetic 28 x 28 set of
the same size stands in (the table says which).

It builds, with the project's pure-Python writer (`tests.datasets.write_dataset`: the record format
of `lottery.data`, no Spark), a 224 px JPEG set and Fashion-MNIST, then measures (train steps on
one batch held on the device, `train_on_batch`, after a compile step; on the real stream, `model.fit`
one epoch at a time): ResNet-50 bfloat16 at batch
256 on a synthetic batch and fed by the real stream (`random_resized_crop`, the worker processes of
`lottery.data.arrays`), dense and with a 90% mask (and checks the pruned weights stay 0.0), the
input stream alone, ResNet-20 (32 px) and LeNet-300-100 (Fashion-MNIST) step rates.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/lottery-site")


def ensure_keras(wheels: Path) -> None:
    """Install Keras from `wheels` and re-execute this benchmark when it is not importable."""
    if importlib.util.find_spec("keras") is not None:
        return
    found = sorted(str(p) for p in wheels.glob("*.whl"))
    if not found:
        sys.exit(f"keras is not installed and {wheels} holds no wheels: see `python -m bench.gpu --help`")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *found], check=True)
    path = os.pathsep.join([str(SITE), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("KERAS_BACKEND", "jax")
    os.execve(sys.executable, [sys.executable, "-m", "bench.gpu", *sys.argv[1:]], env)


def build_data(root: Path, n224: int, size: int, fm_source: Path | None, fm_limit: int) -> tuple[Path, Path, str]:
    """(224 px JPEG set, Fashion-MNIST set, the Fashion-MNIST source) under `root`, written once."""
    import numpy as np

    from tests.datasets import synthetic_arrays, write_dataset

    big = root / f"jpeg{size}-{n224}"
    if not (big / "manifest.json").is_file():
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (16, size // 8, size // 8, 3), dtype=np.uint8)
        images = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)  # blocky, JPEG-friendly, 16 templates
        examples = [(np.roll(images[i % 16], i, axis=1), i % 10, f"train/{i:06d}.jpg") for i in range(n224)]
        write_dataset(big, {"train": examples, "val": examples[:256]}, [f"c{k}" for k in range(10)],
                      encoding="jpeg", jpeg_quality=90, num_shards={"train": 16, "val": 1})
    fm = root / f"fashion-mnist-{fm_limit}"
    source = "synthetic 28x28x1 (Fashion-MNIST files not found)"
    if fm_source is not None and (fm_source / "train-images-idx3-ubyte.gz").is_file():
        source = f"Fashion-MNIST ({fm_source})"
    if not (fm / "manifest.json").is_file():
        if fm_source is not None and source.startswith("Fashion"):
            from lottery.data.fetch import load_fashion_mnist_arrays

            splits = {s: load_fashion_mnist_arrays(s, limit=fm_limit, source_dir=fm_source) for s in ("train", "val")}
        else:
            splits = {s: synthetic_arrays(fm_limit, (28, 28, 1), 10, 0, k) for k, s in enumerate(("train", "val"))}
        write_dataset(fm, {s: [(x, int(y), f"{s}/{i}.png") for i, (x, y) in enumerate(zip(*a))] for s, a in splits.items()},
                      [f"c{k}" for k in range(10)], encoding="png", num_shards=4)
    return big, fm, source


def synthetic_rate(model, batch, seconds: float) -> float:
    """img/s of `train_on_batch` on one batch already on the device (after a compile step)."""
    import keras

    x, y = (keras.ops.convert_to_tensor(a) for a in batch)
    model.train_on_batch(x, y)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or steps < 3:
        model.train_on_batch(x, y)
        steps += 1
    return steps * int(x.shape[0]) / (time.perf_counter() - started)


def stream_step_rate(model, ds, batch_size: int, augmentation: str, seconds: float) -> float:
    """img/s of `model.fit` fed by the real stream, one epoch per `fit` as the engine trains (the
    step is dispatched asynchronously, the next batch is taken while the device computes); after
    a two-batch warm-up `fit`."""
    model.fit(ds.batches(batch_size, seed=0, epoch=0, augmentation=augmentation).take(2), epochs=1, verbose=0)
    images, epoch, started = 0, 1, time.perf_counter()
    while time.perf_counter() - started < seconds:
        stream = ds.batches(batch_size, seed=0, epoch=epoch, augmentation=augmentation)
        model.fit(stream, epochs=1, verbose=0)
        images += len(stream) * batch_size
        epoch += 1
    return images / (time.perf_counter() - started)


def compiled(name: str, shape, policy: str, mask_sparsity: float = 0.0):
    """A compiled model (SGD, the engine's loss), with a magnitude mask when asked; (model, mask)."""
    import keras

    from lottery import models
    from lottery.pruning import apply_mask, magnitude_masks

    keras.mixed_precision.set_global_policy(policy)
    model = models.build_model(name, tuple(shape), 10, seed=0)
    mask = None
    if mask_sparsity:
        weights = {p: keras.ops.convert_to_numpy(v) for p, v in models.prunable_weights(model).items()}
        mask = magnitude_masks(weights, mask_sparsity)
        apply_mask(model, mask)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    return model, mask


def pruned_nonzero(model, mask) -> int:
    import keras
    import numpy as np

    from lottery import models

    values = {p: keras.ops.convert_to_numpy(v) for p, v in models.prunable_weights(model).items()}
    return int(sum(np.count_nonzero(values[p][~keep]) for p, keep in mask.items()))


def resnet50_rows(big: Path, args) -> list[tuple]:
    import numpy as np

    from lottery.data.arrays import ArrayDataset

    ds = ArrayDataset(big, "train", workers=args.workers)
    rows = []
    from lottery.input_bench import stream_rate

    rate = stream_rate(ds, args.batch, "random_resized_crop", args.seconds)
    rows.append(("input stream alone (random_resized_crop, cache=False)", args.batch, f"{ds.workers} workers", rate, ""))
    batch = (np.random.default_rng(0).standard_normal((args.batch, *ds.image_shape)).astype(np.float32),
             np.zeros((args.batch,), np.int32))
    for sparsity in (0.0, 0.9):
        model, mask = compiled(args.big_model, ds.image_shape, "mixed_bfloat16", sparsity)
        label = "dense" if not sparsity else "90% masked"
        synthetic = synthetic_rate(model, batch, args.seconds)
        rows.append((f"{args.big_model} bf16 {label}, synthetic batch on the device", args.batch, "mixed_bfloat16",
                     synthetic, ""))
        real = stream_step_rate(model, ds, args.batch, "random_resized_crop", args.seconds)
        note = f"{real / synthetic:.2f} x synthetic"
        if mask is not None:
            note += f"; pruned weights non-zero after training: {pruned_nonzero(model, mask)}"
        rows.append((f"{args.big_model} bf16 {label}, real stream", args.batch, "mixed_bfloat16", real, note))
    ds.close()
    return rows


def small_rows(fm: Path, args) -> list[tuple]:
    import numpy as np

    rows = []
    rng = np.random.default_rng(0)
    models = [("resnet20", (32, 32, 3), "mixed_bfloat16"), ("resnet20", (32, 32, 3), "float32")]
    for name, shape, policy in [*models[:0 if args.quick else 2], ("lenet_300_100", (28, 28, 1), "float32")]:
        model, _ = compiled(name, shape, policy)
        batch = (rng.standard_normal((args.small_batch, *shape)).astype(np.float32), np.zeros((args.small_batch,), np.int32))
        rows.append((f"{name} {shape[0]}x{shape[1]}x{shape[2]}, synthetic batch on the device", args.small_batch, policy,
                     synthetic_rate(model, batch, args.seconds), ""))
    from lottery.data.arrays import ArrayDataset

    ds = ArrayDataset(fm, "train", cache=True)
    rows.append(("lenet_300_100, Fashion-MNIST stream (cache=True)", args.small_batch, "float32",
                 stream_step_rate(model, ds, args.small_batch, "none", args.seconds), ""))
    return rows


def table(rows: list[tuple], device: str, args, fm_source: str, took: float) -> str:
    import jax
    import keras

    lines = [f"Device: **{device}** ({jax.default_backend()}), JAX {jax.__version__}, Keras {keras.__version__}, "
             f"{len(os.sched_getaffinity(0))} host cores; {time.strftime('%Y-%m-%d')}; `python -m bench.gpu"
             f"{' --quick' if args.quick else ''}` ({took:.0f} s). 224 px set: {args.n224} synthetic JPEGs "
             f"({args.size} px) written by `tests.datasets.write_dataset`; small set: {fm_source}. "
             f"Synthetic: `train_on_batch` on one device-resident batch; real stream: `model.fit` epochs "
             f"(workers: {args.workers or 'the cores'}); {args.seconds:g} s each after a compile step.", "",
             "| what | batch | policy / reader | img/s | note |", "|---|---|---|---|---|"]
    lines += [f"| {what} | {b} | {p} | {rate:,.0f} | {note} |" for what, b, p, rate, note in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run of the same code")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl")
    p.add_argument("--work", type=Path, default=Path("/tmp/lottery-gpu-bench"))
    p.add_argument("--seconds", type=float, default=None, help="time per measurement (default 10, quick 1)")
    p.add_argument("--workers", type=int, default=None, help="data workers (default: the cores)")
    p.add_argument("--write-docs", action="store_true", help="also update docs/benchmarks.md")
    args = p.parse_args(argv)
    ensure_keras(args.wheels)
    started = time.monotonic()
    args.seconds = args.seconds or (1.0 if args.quick else 10.0)
    args.batch, args.small_batch = (8, 16) if args.quick else (256, 128)
    args.size, args.n224 = (32, 48) if args.quick else (224, 10240)
    args.big_model = "resnet20" if args.quick else "resnet50"  # ResNet-50 compiles for minutes on a CPU
    fm_dir = next((d for d in (Path("/usr/share/datasets/fashion-mnist"), args.wheels / "fashion-mnist")
                   if (d / "train-images-idx3-ubyte.gz").is_file()), None)
    big, fm, fm_source = build_data(args.work, args.n224, args.size, fm_dir, 2000 if args.quick else 60000)
    print(f"data ready in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    import jax

    device = jax.devices()[0].device_kind
    rows = resnet50_rows(big, args) + small_rows(fm, args)
    text = table(rows, device, args, fm_source, time.monotonic() - started)
    print(text)
    if args.write_docs:
        from bench.docs import update_section

        update_section(f"Keras on JAX on a GPU ({device})", text, key="gpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
