"""Packed training throughput (lottery/packed.py): LeNet-300-100 tickets side by side, against one
ticket trained alone, on the current JAX device.

For each pack size P (1, 2, 4, 8, 16, 20 by default) it stacks P tickets (the same start weights,
P different random masks at 80% sparsity) and times the packed train step (``jax.jit(jax.vmap)``,
the engine's own `PackedSteps`) on Fashion-MNIST batches of the default batch size; the baseline is
one ticket trained alone by ``model.fit`` (the sequential path). Reports images/s per ticket and in
total, and the total against the one-ticket baseline. Batches sit on the device, so this measures
the step, not the input pipeline.

On a CPU the gain is small (the step is bound by arithmetic there, and a pack of P costs about P
steps); on a GPU, where a LeNet step at batch 128 is bound by dispatch, the acceptance asks for a
total of at least 10x one ticket's. Needs JAX, not TensorFlow (KERAS_BACKEND=jax is set here):

    .venv/bin/python -m bench.packed [--packs 1,2,4,8,16,20] [--seconds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["KERAS_BACKEND"] = "jax"

BATCHES_ON_DEVICE = 8


def _setup(batch_size: int):
    """The engine's model, compiled as a ticket's, and a few Fashion-MNIST batches on the device."""
    import jax.numpy as jnp
    import numpy as np

    from lottery.config import ExperimentConfig
    from lottery.data.fetch import load_fashion_mnist_arrays
    from lottery.models import build_model
    from lottery.training import compile_model

    cfg = ExperimentConfig(batch_size=batch_size)
    images, labels = load_fashion_mnist_arrays("train", limit=BATCHES_ON_DEVICE * batch_size)
    x = ((images.astype(np.float32) - 72.94) / 90.02)[..., None]  # Fashion-MNIST's mean / std
    y = labels.astype(np.int32)
    batches = [(jnp.asarray(x[i:i + batch_size]), jnp.asarray(y[i:i + batch_size]))
               for i in range(0, len(y), batch_size)]
    model = build_model(cfg.model, (28, 28, 1), 10, seed=cfg.seed)
    compile_model(model, cfg, steps_per_epoch=468)
    return cfg, model, batches, (x, y)


def _stacked_state(steps, model, pack: int):
    """``pack`` tickets: the model's start state with a different random 80% mask each."""
    import jax.numpy as jnp
    import numpy as np

    from lottery.models import prunable_weights
    from lottery.pruning import apply_mask, remove_mask

    start = [[np.asarray(v.value) for v in group] for group in steps.variables()]
    states = []
    for ticket in range(pack):
        rng = np.random.default_rng(ticket)
        for group, values in zip(steps.variables(), start):
            for variable, value in zip(group, values):
                variable.assign(value)
        apply_mask(model, {p: rng.random(v.shape) >= 0.8 for p, v in prunable_weights(model).items()})
        states.append(steps.snapshot())
    remove_mask(model)
    return tuple([jnp.stack([s[g][k] for s in states]) for k in range(len(states[0][g]))] for g in range(3))


def time_packed(steps, model, batches, pack: int, seconds: float) -> float:
    """Images/s per ticket of the packed step at pack size ``pack`` (compile excluded)."""
    import jax

    tv, ntv, ov = _stacked_state(steps, model, pack)
    tv, ntv, ov, loss, _ = steps.train(tv, ntv, ov, *batches[0])  # compile
    jax.block_until_ready(loss)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 5:
        tv, ntv, ov, loss, _ = steps.train(tv, ntv, ov, *batches[done % len(batches)])
        done += 1
    jax.block_until_ready((tv, loss))
    return done * batches[0][1].shape[0] / (time.perf_counter() - started)


def time_alone(model, arrays, batch_size: int, seconds: float) -> float:
    """Images/s of one ticket trained alone by ``model.fit`` (the sequential path), compile excluded."""
    x, y = arrays
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)  # compile
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 5 * BATCHES_ON_DEVICE:
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        done += len(y) // batch_size
    return done * batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", default="1,2,4,8,16,20", help="pack sizes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per pack size (after compiling)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    import jax

    from lottery.packed import PackedSteps

    cfg, model, batches, arrays = _setup(args.batch_size)
    device = jax.devices()[0]
    alone = time_alone(model, arrays, args.batch_size, args.seconds)
    steps = PackedSteps(model)
    rows = [{"mode": "alone (model.fit)", "pack": 1, "per_ticket": alone, "total": alone, "vs_alone": 1.0}]
    for pack in (int(p) for p in args.packs.split(",")):
        per_ticket = time_packed(steps, model, batches, pack, args.seconds)
        rows.append({"mode": "packed", "pack": pack, "per_ticket": per_ticket, "total": per_ticket * pack,
                     "vs_alone": per_ticket * pack / alone})
    print(f"LeNet-300-100, batch {args.batch_size}, {cfg.optimizer}, on {device.platform} ({device.device_kind})")
    print(f"{'mode':<18} {'pack':>4} {'img/s per ticket':>17} {'img/s total':>12} {'total / alone':>14}")
    for r in rows:
        print(f"{r['mode']:<18} {r['pack']:>4} {r['per_ticket']:>17,.0f} {r['total']:>12,.0f} {r['vs_alone']:>13.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"{device.platform} {device.device_kind}", "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
