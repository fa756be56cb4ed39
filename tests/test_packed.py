"""Packed training (lottery/packed.py) on the JAX backend, on the CPU, in a Python where TensorFlow
cannot be imported (tests/test_jax_backend.py's `jax_env`): a ticket trained in a pack matches its
training alone within floating-point reassociation, keeps its pruned weights at exactly 0.0, and
writes the same artifacts; a pack that does not fit is halved; a killed pack resumes ticket by ticket.
"""

import json
import shutil
import textwrap

import pytest

from tests.datasets import make_fashion_mnist_shards
from tests.helpers import kill_at, tiny_training
from tests.test_jax_backend import _run, jax_env  # noqa: F401  (the fixture)

# 512 Fashion-MNIST images / batch 32 = 16 iterations per epoch; tickets rewind to 1ep: 2 epochs.
CONFIG = tiny_training(sparsities=[0.5, 0.8, 0.9], augmentation="none", jit_compile=True, drop=("warmup_steps",))
# Within floating-point reassociation: what docs/packing.md reports (measured: about 3e-8).
WEIGHT_TOLERANCE = 1e-5
ACCURACY_TOLERANCE = 1e-3

COMPARE = textwrap.dedent("""
    import json, logging, shutil, sys
    from pathlib import Path
    import keras, numpy as np
    from lottery import packed
    from lottery.late_reset import retrain
    from lottery.models import prunable_weights
    from lottery.pruning import load_mask

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    workdir, out = Path(sys.argv[1]), {}
    if sys.argv[2] == "oom":  # a device that cannot hold a pack above 2 tickets
        train = packed.PackedSteps.__init__
        def init(self, model):
            train(self, model)
            step = self.train
            def guarded(tv, *args):
                if tv[0].shape[0] > 2:
                    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
                return step(tv, *args)
            self.train = guarded
        packed.PackedSteps.__init__ = init

    traces = []  # keras.Model.train_step runs once per trace of the (unpacked) train step
    step = keras.Model.train_step
    keras.Model.train_step = lambda self, *args: traces.append(1) or step(self, *args)

    def weights(ticket):
        model = keras.models.load_model(ticket / "model.keras", compile=False)
        return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}, model

    for control in sys.argv[3:]:
        control = None if control == "ticket" else control
        runs = {}
        for pack in (1, 3):
            copy = workdir.parent / f"{control}-{pack}"
            shutil.copytree(workdir, copy)
            before = len(traces)
            runs[pack] = (copy, retrain(copy, "all", "1ep", control=control, pack=pack, threads=1))
            out.setdefault("_traces", []).append(len(traces) - before)
        for alone, together in zip(runs[1][1], runs[3][1]):
            a, b = Path(alone["ticket"]), Path(together["ticket"])
            wa, model = weights(a)
            wb, _ = weights(b)
            mask, _ = load_mask(b / "mask.npz" if control == "random_prune" else workdir / "masks" / f"{alone['mask_id']}.npz")
            ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
            out[b.name] = {
                "files": sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir()),
                "pack": [ra.get("pack"), rb.get("pack")],
                "max_abs_weight_diff": float(max(np.max(np.abs(wa[p] - wb[p])) for p in wa)),
                "pruned_nonzero": int(sum(np.count_nonzero(wb[p][~keep]) for p, keep in mask.items())),
                "val_accuracy": [ra["val_accuracy"], rb["val_accuracy"]],
                "max_curve_val_acc_diff": max(abs(x["val_accuracy"] - y["val_accuracy"]) for x, y in zip(ra["curve"], rb["curve"])),
                "max_curve_loss_diff": max(abs(x[k] - y[k]) for x, y in zip(ra["curve"], rb["curve"]) for k in ("train_loss", "val_loss")),
                "steps": [[r["step"] for r in ra["curve"]], [r["step"] for r in rb["curve"]]],
                "lr": [[r["lr"] for r in ra["curve"]], [r["lr"] for r in rb["curve"]]],
                "wall_s": [ra["wall_s"], rb["wall_s"]],
                "timings": "timings" in ra or "timings" in rb,
            }
    print("RESULT", json.dumps(out))
""")


@pytest.fixture(scope="module")
def jax_workdir(jax_env, tmp_path_factory):
    """Fashion-MNIST (512 train / 256 val), dense and masks trained on JAX."""
    python, env = jax_env
    root = tmp_path_factory.mktemp("packed")
    data = make_fashion_mnist_shards(root, 512, 256)
    config = root / "config.json"
    config.write_text(json.dumps(CONFIG))
    workdir = root / "w"
    _run(python, env, "-m", "lottery", "dense", "--config", str(config), "--data", str(data), "--workdir", str(workdir),
         "--threads", "1")
    _run(python, env, "-m", "lottery", "masks", "--workdir", str(workdir))
    return workdir


def _compare(jax_env, jax_workdir, tmp_path, mode, *controls):
    python, env = jax_env
    workdir = tmp_path / "w"
    shutil.copytree(jax_workdir, workdir)
    r = _run(python, env, "-c", COMPARE, str(workdir), mode, *controls, timeout=600)
    return json.loads(r.stdout.split("RESULT", 1)[1]), r.stderr


def _assert_close(out: dict) -> None:
    traces = out.pop("_traces")
    assert traces[0::2] == [1] * (len(traces) // 2), f"three tickets one after another, one trace (JAX): {traces}"
    assert traces[1::2] == [0] * (len(traces) // 2), "a pack does not use the unpacked step"
    for name, c in out.items():
        assert c["files"], f"{name}: the same artifacts as alone"
        assert c["pack"] == [None, 3], name
        assert c["pruned_nonzero"] == 0, f"{name}: pruned weights must stay exactly 0.0"
        assert c["max_abs_weight_diff"] <= WEIGHT_TOLERANCE, (name, c)
        assert abs(c["val_accuracy"][0] - c["val_accuracy"][1]) <= ACCURACY_TOLERANCE, (name, c)
        assert c["max_curve_val_acc_diff"] <= ACCURACY_TOLERANCE, (name, c)
        assert c["steps"][0] == c["steps"][1] == [32, 48] and c["lr"][0] == c["lr"][1], (name, c)
        assert not c["timings"] and min(c["wall_s"]) > 0, (name, c)


def test_a_packed_ticket_matches_its_training_alone(jax_env, jax_workdir, tmp_path):
    """Tickets and both controls, three to a pack, against the same tickets one by one."""
    out, stderr = _compare(jax_env, jax_workdir, tmp_path, "plain", "ticket", "random_prune", "random_reinit")
    assert len(out) == 10
    _assert_close(out)
    assert stderr.count("retrain: a pack of 3 tickets from step 16") == 3
    print(json.dumps({k: (v["max_abs_weight_diff"], v["max_curve_loss_diff"], v["val_accuracy"]) for k, v in out.items()}))


def test_a_pack_that_does_not_fit_is_halved(jax_env, jax_workdir, tmp_path):
    out, stderr = _compare(jax_env, jax_workdir, tmp_path, "oom", "ticket")
    assert "a pack of 3 tickets does not fit (RESOURCE_EXHAUSTED" in stderr and "packs of 1 and 2 instead" in stderr
    assert [c["pack"][1] for name, c in out.items() if name != "_traces"] == [1, 2, 2]
    for name, c in out.items():
        if name == "_traces":
            continue
        c["pack"] = [None, 3]  # the rest of the check as for a full pack
    _assert_close(out)


@pytest.mark.slow
def test_a_killed_pack_reruns_only_its_missing_tickets(jax_env, jax_workdir, tmp_path):
    """Packs of 2 over 3 tickets: SIGKILL once the first pack is done and the second has an epoch
    checkpoint; the rerun leaves the first pack's tickets untouched and resumes the third."""
    python, env = jax_env
    workdir = tmp_path / "w"
    shutil.copytree(jax_workdir, workdir)
    cmd = [python, "-m", "lottery", "retrain", "--workdir", str(workdir), "--mask", "all", "--rewind", "1ep", "--pack", "2"]
    tickets = workdir / "tickets"
    kill_at(cmd, env, tickets / "sp90.000__1ep" / "checkpoint.npz", tickets / "sp80.000__1ep" / "result.json")
    assert (tickets / "sp90.000__1ep" / "checkpoint.npz").exists() and not (tickets / "sp90.000__1ep" / "result.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for name in ("sp50.000__1ep", "sp80.000__1ep") for p in (tickets / name).iterdir()}
    r = _run(python, env, *cmd[1:], timeout=600)
    assert [t["skipped"] for t in json.loads(r.stdout)] == [True, True, False]
    assert "retrain sp90.000__1ep: resuming from the checkpoint" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes, "the finished tickets are untouched"

