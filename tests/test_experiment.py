"""The science of the engine, end to end on small real runs: rewinding, masking, retraining.

Real TensorFlow and Keras, a tiny learnable data set in the real shard format, short schedules.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lottery.dense import dense_result, run_dense
from lottery.late_reset import retrain
from lottery.masks import make_masks
from lottery.paths import Workdir
from lottery.report import summarize
from lottery.config import ExperimentConfig
from lottery.errors import CorruptArtifactError, WorkdirMismatchError
from tests.datasets import make_synthetic_shards
from tests.helpers import kill_at, tiny_training

ROOT = Path(__file__).resolve().parents[1]

# 256 images / batch 32 = 8 iterations per epoch; 3 epochs = 24 iterations.
TINY = tiny_training(rewind_points=["0it", "3it", "1ep", "1ep4it"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("data"), 256, 96, shape=(8, 8, 1), num_classes=3)


@pytest.fixture(scope="module")
def dense_workdir(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("exp") / "w"
    cfg = ExperimentConfig.from_dict(TINY)
    result = run_dense(cfg, data_dir, workdir, threads=1)
    assert result["skipped"] is False
    return workdir


def _load_model(path):
    import keras

    return keras.models.load_model(path, compile=False)


def _compiled_model(workdir, data_dir):
    from lottery.data.pipeline import ShardedDataset
    from lottery.models import build_model
    from lottery.training import compile_model

    cfg, _ = Workdir(workdir).load()
    train = ShardedDataset(data_dir, "train")
    model = build_model(cfg.model, tuple(train.image_shape), train.num_classes, seed=cfg.seed)
    compile_model(model, cfg, train.steps_per_epoch(cfg.batch_size))
    return model


def test_dense_writes_every_artifact(dense_workdir):
    dense = dense_workdir / "dense"
    for label in ("0it", "3it", "1ep", "1ep4it"):
        assert (dense / "rewind" / f"{label}.npz").exists()
    assert (dense / "final.keras").exists() and (dense / "metrics.csv").exists()
    result = json.loads((dense / "result.json").read_text())
    assert result["epochs"] == 3 and result["steps"] == 24
    assert [row["step"] for row in result["curve"]] == [8, 16, 24]
    assert result["rewind_steps"] == {"0it": 0, "3it": 3, "1ep": 8, "1ep4it": 12}
    assert result["val_accuracy"] > 0.6, "the synthetic task is learnable"
    assert json.loads((dense_workdir / "config.json").read_text())["training_steps"] == "3ep"
    assert not (dense / "checkpoint.npz").exists() and not (dense / "checkpoint.json").exists()


def test_rerunning_a_finished_dense_run_is_a_noop(dense_workdir, data_dir, caplog):
    before = (dense_workdir / "dense" / "final.keras").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="lottery"):
        result = run_dense(ExperimentConfig.from_dict(TINY), data_dir, dense_workdir)
    assert result["skipped"] is True
    assert "already done" in caplog.text
    assert (dense_workdir / "dense" / "final.keras").stat().st_mtime_ns == before


def test_a_workdir_is_never_shared_by_two_configs(dense_workdir, data_dir):
    with pytest.raises(WorkdirMismatchError, match="different config"):
        run_dense(ExperimentConfig.from_dict({**TINY, "seed": 1}), data_dir, dense_workdir)


def test_a_workdir_matches_a_config_by_experiment_id(dense_workdir, data_dir):
    """The controls and the spelling of the levels are not the experiment: the workdir is reused."""
    same = ExperimentConfig.from_dict({**TINY, "controls": False, "control_sparsities": []})
    assert run_dense(same, data_dir, dense_workdir)["skipped"] is True


def test_rewind_checkpoint_restores_weights_slots_and_learning_rate(dense_workdir, data_dir):
    from lottery.files import load_arrays
    from lottery.training import load_checkpoint, make_schedule, training_state

    cfg, _ = Workdir(dense_workdir).load()
    saved, meta = load_arrays(dense_workdir / "dense" / "rewind" / "1ep4it.npz")
    model = _compiled_model(dense_workdir, data_dir)
    load_checkpoint(dense_workdir / "dense" / "rewind" / "1ep4it.npz", model)
    restored = training_state(model)
    assert restored.keys() == saved.keys()
    for key in saved:
        np.testing.assert_array_equal(restored[key], saved[key], err_msg=key)
    momenta = [k for k in saved if k.endswith("_momentum")]
    assert momenta and all(np.any(saved[k] != 0) for k in momenta), "SGD momentum slots are part of the state"
    assert int(np.asarray(model.optimizer.iterations)) == 12 == meta["step"]
    # Past warm-up (4 it), before the milestone (2ep = 16 it): the base learning rate.
    expected_lr = make_schedule(cfg, 8).value_at(12)
    assert expected_lr == pytest.approx(0.05)
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(expected_lr, rel=1e-7)
    assert meta["lr"] == pytest.approx(expected_lr, rel=1e-7)
    assert (meta["epoch"], meta["batch_in_epoch"]) == (1, 4)


def test_masks_come_from_the_final_weights(dense_workdir):
    from lottery.models import output_kernel_path, prunable_weights
    from lottery.pruning import load_mask, magnitude_masks

    descriptors = make_masks(dense_workdir)
    assert [d["mask_id"] for d in descriptors] == ["sp50.000", "sp90.000"]
    model = _load_model(dense_workdir / "dense" / "final.keras")
    final = {p: np.asarray(v) for p, v in prunable_weights(model).items()}
    mask, meta = load_mask(dense_workdir / "masks" / "sp90.000.npz")
    expected = magnitude_masks(final, 0.9, scope="global", output_path=output_kernel_path(model), output_factor=0.5)
    assert mask.keys() == expected.keys()
    for path in mask:
        np.testing.assert_array_equal(mask[path], expected[path])
    # ... and not from the initial weights.
    from lottery.files import load_arrays

    start, _ = load_arrays(dense_workdir / "dense" / "rewind" / "0it.npz")
    from_init = magnitude_masks({p: start[f"model:{p}"] for p in final}, 0.9, scope="global",
                                output_path=output_kernel_path(model), output_factor=0.5)
    assert any(np.any(from_init[p] != mask[p]) for p in mask)
    assert meta["source"] == "dense/final.keras"


def test_retrained_ticket_keeps_pruned_weights_at_exactly_zero(dense_workdir):
    from lottery.models import prunable_weights
    from lottery.pruning import load_mask

    make_masks(dense_workdir)
    [result] = retrain(dense_workdir, ["sp90.000"], "3it", threads=1)
    ticket = Path(result["ticket"])
    assert ticket.name == "sp90.000__3it"
    saved = json.loads((ticket / "result.json").read_text())
    assert saved["rewind_step"] == 3 and saved["curve"][0]["step"] == 8 and saved["curve"][-1]["step"] == 24
    mask, _ = load_mask(dense_workdir / "masks" / "sp90.000.npz")
    model = _load_model(ticket / "model.keras")
    weights = {p: np.asarray(v) for p, v in prunable_weights(model).items()}
    for path, keep in mask.items():
        assert np.all(weights[path][~keep] == 0.0), path
        assert np.all(np.signbit(weights[path][~keep]) == False), f"{path}: -0.0 is not a clean zero"  # noqa: E712
        assert np.count_nonzero(weights[path][keep]) > 0.9 * keep.sum()
    for variable in model.weights:  # biases are never pruned
        if variable.path.endswith("bias"):
            assert np.count_nonzero(np.asarray(variable)) > 0


def test_rerunning_a_finished_ticket_is_a_noop(dense_workdir, caplog):
    make_masks(dense_workdir)
    retrain(dense_workdir, [1], 2, threads=1)
    with caplog.at_level("INFO", logger="lottery"):
        [again] = retrain(dense_workdir, [1], 2, threads=1)
    assert again["skipped"] is True and "already done" in caplog.text


def test_all_ones_mask_from_rewind_zero_reproduces_the_dense_run(tmp_path, data_dir):
    from lottery.pruning import save_mask

    workdir = tmp_path / "w"
    cfg = ExperimentConfig.from_dict({**TINY, "sparsities": [0.5]})
    run_dense(cfg, data_dir, workdir, threads=1)
    make_masks(workdir)
    final = _load_model(workdir / "dense" / "final.keras")
    from lottery.models import prunable_weights

    ones = {p: np.ones(v.shape, bool) for p, v in prunable_weights(final).items()}
    save_mask(workdir / "masks" / "sp50.000.npz", ones, {"mask_id": "sp50.000", "report": {"kept": 1, "total": 1}})
    [result] = retrain(workdir, [0], "0it", threads=1)
    dense = dense_result(workdir)["curve"]
    ticket = json.loads((Path(result["ticket"]) / "result.json").read_text())["curve"]
    assert [r["step"] for r in ticket] == [r["step"] for r in dense]
    for mine, theirs in zip(ticket, dense):
        assert mine["val_accuracy"] == theirs["val_accuracy"]
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-6, abs=1e-7)
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
    retrained = _load_model(Path(result["ticket"]) / "model.keras")
    for a, b in zip(retrained.weights, final.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=a.path)


def test_controls(dense_workdir):
    from lottery.pruning import load_mask, mask_report

    make_masks(dense_workdir)
    [pruned] = retrain(dense_workdir, ["sp50.000"], "1ep", control="random_prune", threads=1)
    ticket = Path(pruned["ticket"])
    assert ticket.name == "sp50.000__1ep__random_prune"
    original, _ = load_mask(dense_workdir / "masks" / "sp50.000.npz")
    random_mask, _ = load_mask(ticket / "mask.npz")
    assert mask_report(random_mask)["layers"] == mask_report(original)["layers"]
    assert any(np.any(random_mask[p] != original[p]) for p in original)
    [reinit] = retrain(dense_workdir, ["sp50.000"], "1ep", control="random_reinit", threads=1)
    assert Path(reinit["ticket"]).name == "sp50.000__1ep__random_reinit"
    rows = summarize(dense_workdir)
    statuses = {(r["mask_id"], r["rewind"], r["control"]): r["status"] for r in rows}
    assert statuses[("sp50.000", "1ep", "random_prune")] == "ok"
    assert statuses[("sp50.000", "1ep", "random_reinit")] == "ok"
    assert (dense_workdir / "results.csv").exists()


def _masked_copy(tmp_path, dense_workdir):
    """A private copy of the dense work directory, with masks and no tickets."""
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(dense_workdir, workdir)
    shutil.rmtree(workdir / "tickets", ignore_errors=True)
    make_masks(workdir)
    return workdir


def test_damaged_rewind_checkpoint_is_refused_and_reported(tmp_path, dense_workdir):
    workdir = _masked_copy(tmp_path, dense_workdir)
    path = workdir / "dense" / "rewind" / "1ep.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptArtifactError, match="1ep.npz"):
        retrain(workdir, 0, "1ep", threads=1)
    rows = summarize(workdir)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["mask_id"], r["rewind"]) for r in failed] == [("sp50.000", "1ep")]
    assert "1ep.npz" in failed[0]["error"]
    assert (workdir / "dense" / "final.keras").exists(), "nothing already computed is lost"


def test_a_rewind_checkpoint_with_a_flipped_byte_is_refused(tmp_path, dense_workdir):
    workdir = _masked_copy(tmp_path, dense_workdir)
    path = workdir / "dense" / "rewind" / "3it.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size: its record's sha256 tells
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"rewind/3it.npz: its sha256 differs from 3it.json .*lottery dense"):
        retrain(workdir, 0, "3it", threads=1)
    assert [r["status"] for r in summarize(workdir) if r["rewind"] == "3it" and r["mask_id"] == "sp50.000"] == ["failed"]


def test_a_damaged_dense_run_is_named_and_trained_again(tmp_path, dense_workdir, data_dir, caplog):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(dense_workdir, workdir)
    before = json.loads((workdir / "dense" / "result.json").read_text())
    assert set(before["files"]) == {"final.keras", "metrics.csv"}
    assert before["arrays"] == ["rewind/0it.npz", "rewind/3it.npz", "rewind/1ep.npz", "rewind/1ep4it.npz"]
    final = workdir / "dense" / "final.keras"
    final.write_bytes(final.read_bytes()[:100])
    with caplog.at_level("INFO", logger="lottery"):
        result = run_dense(ExperimentConfig.from_dict(TINY), data_dir, workdir, threads=1)
    assert result["skipped"] is False and "dense: damaged, training it again: final.keras: 100 bytes, result.json says" in caplog.text
    assert result["val_accuracy"] == before["val_accuracy"], "the same config and seed: the same run"
    for a, b in zip(_load_model(final).weights, _load_model(dense_workdir / "dense" / "final.keras").weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _dense_cli(data_dir, workdir, config_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return [sys.executable, "-m", "lottery", "dense", "--config", str(config_path), "--data", str(data_dir),
            "--workdir", str(workdir), "--threads", "1"], env


@pytest.mark.slow
def test_a_killed_dense_run_resumes_to_the_same_result(tmp_path, data_dir, dense_workdir):
    """SIGKILL after the first epoch's checkpoint, rerun: the same final weights, bit for bit, as
    the run never killed (``dense_workdir``: the same config and data)."""
    config_path = tmp_path / "cfg.json"
    config_path.write_text(json.dumps(TINY))
    killed, whole = tmp_path / "killed", dense_workdir
    cmd, env = _dense_cli(data_dir, killed, config_path)
    checkpoint = killed / "dense" / "checkpoint.npz"
    kill_at(cmd, env, checkpoint)
    assert checkpoint.exists() and not (killed / "dense" / "result.json").exists(), "the run was not killed mid-training"
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    a = _load_model(killed / "dense" / "final.keras")
    b = _load_model(whole / "dense" / "final.keras")
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=x.path)
    ra = json.loads((killed / "dense" / "result.json").read_text())
    rb = json.loads((whole / "dense" / "result.json").read_text())
    assert [r["val_loss"] for r in ra["curve"]] == [r["val_loss"] for r in rb["curve"]]


@pytest.mark.slow
def test_dense_training_and_retraining_under_mirrored_strategy(tmp_path):
    """Two logical CPU devices stand in for two GPUs: the same runners use MirroredStrategy."""
    data_dir = make_synthetic_shards(tmp_path, 256, 96, shape=(8, 8, 1), num_classes=3)
    config_path = tmp_path / "cfg.json"
    config_path.write_text(json.dumps(TINY))
    workdir = tmp_path / "w"
    cmd, env = _dense_cli(data_dir, workdir, config_path)
    env["KERAS_BACKEND"] = "tensorflow"  # MirroredStrategy; test_jax_backend covers JAX's DataParallel
    split = [sys.executable, "-m", "tests.logical_cpus", "2"]  # two logical CPU devices in the process
    run = subprocess.run([*split, *cmd[2:]], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "MirroredStrategy over 2 devices" in run.stderr
    result = json.loads((workdir / "dense" / "result.json").read_text())
    assert result["replicas"] == 2 and result["val_accuracy"] > 0.6
    make_masks(workdir)  # no training: in this process
    step = ["retrain", "--workdir", str(workdir), "--mask", "1", "--rewind", "1ep"]
    run = subprocess.run([*split, "lottery", *step], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    from lottery.models import prunable_weights
    from lottery.pruning import load_mask

    mask, _ = load_mask(workdir / "masks" / "sp90.000.npz")
    model = _load_model(workdir / "tickets" / "sp90.000__1ep" / "model.keras")
    weights = {p: np.asarray(v) for p, v in prunable_weights(model).items()}
    assert all(np.all(weights[p][~keep] == 0.0) for p, keep in mask.items())


def test_a_damaged_mask_is_recomputed_not_used(tmp_path, dense_workdir, caplog):
    import shutil

    from lottery.pruning import load_mask

    workdir = tmp_path / "copy"
    shutil.copytree(dense_workdir, workdir)
    make_masks(workdir)
    good, _ = load_mask(workdir / "masks" / "sp90.000.npz")
    path = workdir / "masks" / "sp90.000.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="lottery"):
        make_masks(workdir)
    assert "sp90.000.npz" in caplog.text and "recomputing" in caplog.text
    again, _ = load_mask(path)
    assert all(np.array_equal(again[p], good[p]) for p in good)


def test_eval_batch_is_a_multiple_of_the_training_batch_capped_by_image_size():
    from lottery.training import eval_batch_size

    assert eval_batch_size(128, (28, 28, 1)) == 1024
    assert eval_batch_size(60, (28, 28, 1)) == 1020
    assert eval_batch_size(128, (32, 32, 3)) == 256
    assert eval_batch_size(128, (224, 224, 3)) == 128  # large images keep the training batch
    assert eval_batch_size(2048, (28, 28, 1)) == 2048


def test_a_workdir_of_another_format_version_is_refused_naming_both(dense_workdir, data_dir):
    from lottery.files import read_json, write_json
    from lottery.paths import FORMAT_VERSION

    run_json = dense_workdir / "run.json"
    run = read_json(run_json)
    assert run["format_version"] == FORMAT_VERSION
    try:
        for found, named in ((FORMAT_VERSION + 1, f"format version {FORMAT_VERSION + 1}"), (None, "format version none")):
            write_json(run_json, {**run, "format_version": found} if found else
                       {k: v for k, v in run.items() if k != "format_version"})
            for step in (lambda: run_dense(ExperimentConfig.from_dict(TINY), data_dir, dense_workdir),
                         lambda: Workdir(dense_workdir).load()):
                with pytest.raises(WorkdirMismatchError, match=f"{named}.* reads format version {FORMAT_VERSION} only"):
                    step()
    finally:
        write_json(run_json, run)
    assert run_dense(ExperimentConfig.from_dict(TINY), data_dir, dense_workdir)["skipped"] is True
