"""Instability analysis (linear mode connectivity) on small real runs: the two copies, the path
between them, BatchNorm statistics recomputed along it, and the step's idempotence and resumption.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from lottery.config import ExperimentConfig
from lottery.dense import run_dense
from lottery.errors import MissingArtifactError
from lottery.files import read_json
from lottery.interpolation import error_barrier, interpolate, interpolation_path, lerp, model_weights, recompute_batchnorm
from lottery.masks import make_masks
from lottery.paths import Workdir
from lottery.stability import copy_seed, run_stability, train_copy
from tests.datasets import make_synthetic_shards, write_dataset
from tests.helpers import kill_at, tiny_training

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_training()  # 8 iterations an epoch, 3 epochs; rewind points 0it and 1ep; masks sp50.000, sp90.000


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("data"), 256, 96, shape=(8, 8, 1), num_classes=3)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, data_dir) -> Workdir:
    """A finished dense run and its masks; no stability yet (copied by the tests that change it)."""
    workdir = Workdir(tmp_path_factory.mktemp("dense") / "w")
    run_dense(ExperimentConfig.from_dict(TINY), data_dir, workdir, threads=1)
    make_masks(workdir)
    return workdir


@pytest.fixture(scope="module")
def studied(tmp_path_factory, dense) -> Workdir:
    """The dense network's analysis at rewind point 1ep, done."""
    workdir = _copy(tmp_path_factory.mktemp("studied"), dense)
    result = run_stability(workdir, "1ep", threads=1)
    assert result["skipped"] is False and result["stability"] == "dense__1ep"
    return workdir


def _copy(tmp_path: Path, workdir: Workdir) -> Workdir:
    shutil.copytree(workdir, tmp_path / "w")
    return Workdir(tmp_path / "w")


def _result(workdir: Workdir, name: str = "dense__1ep") -> dict:
    return read_json(workdir.stability(name).result, sealed=True)


def _weights(path: Path) -> dict:
    import keras

    return model_weights(keras.models.load_model(path, compile=False))


def _mtimes(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def test_copies_start_at_the_rewind_point_and_differ_only_in_their_data_order(studied):
    result, paths = _result(studied), studied.stability("dense__1ep")
    assert result["data_seeds"] == {"a": 0, "b": copy_seed(0, "b")} and copy_seed(0, "b") != 0
    assert (result["network"], result["mask_id"], result["rewind_step"], result["rewind_mode"]) == ("dense", None, 8, "full")
    copy_a, copy_b = (read_json(paths.copy(c).result, sealed=True) for c in "ab")
    assert [r["step"] for r in copy_a["curve"]] == [16, 24] == [r["step"] for r in copy_b["curve"]]
    # copy a is the dense run continued from 1ep with its own data order: the dense network, bit for bit
    dense = _weights(studied.final_model)
    assert all(np.array_equal(w, dense[p]) for p, w in _weights(paths.copy("a").model).items())
    assert any(not np.array_equal(w, dense[p]) for p, w in _weights(paths.copy("b").model).items())
    assert not any(paths.copy(c).checkpoint.exists() for c in "ab")
    assert studied.stability_results() == [paths.result]


def test_the_path_s_endpoints_are_the_copies_own_evaluations(studied):
    result = _result(studied)
    path, ends = result["path"], result["endpoints"]
    assert [row["alpha"] for row in path] == [i / 10 for i in range(11)] and result["points"] == 11
    assert set(path[0]) == {"alpha", "loss", "accuracy", "train_loss", "train_accuracy"}
    for row, end in ((path[0], ends["a"]), (path[-1], ends["b"])):
        assert row["accuracy"] == end["val_accuracy"]
        assert row["loss"] == pytest.approx(end["val_loss"], rel=1e-6)
    assert result["instability"] == error_barrier(path) and result["instability_train"] == error_barrier(path, "train_accuracy")
    assert result["batchnorm"] == "none" and result["train_subset"]["batches"] == 8


def _compiled(workdir: Workdir, data_dir):
    """The experiment's model, compiled as the step compiles it, and its data."""
    from lottery.session import build_model, open_data, session
    from lottery.training import compile_model, eval_batch_size

    cfg, _ = workdir.load()
    with session(cfg, 1):
        train, val, spe = open_data(cfg, data_dir)
        model = build_model(cfg, train)
        compile_model(model, cfg, spe)
    return model, val.eval_batches(eval_batch_size(cfg.batch_size, val.image_shape)), train.batches(32, seed=0, epoch=0)


def test_identical_endpoints_give_a_flat_path_and_no_instability(studied, data_dir):
    a = _weights(studied.stability("dense__1ep").copy("a").model)
    assert all(np.array_equal(lerp(w, w, alpha), w) for w in a.values() for alpha in (0.1, 0.3, 0.7))
    model, val, train = _compiled(studied, data_dir)
    path = interpolation_path(model, a, a, points=5, val=val, train=train)
    assert all({k: v for k, v in row.items() if k != "alpha"} == {k: v for k, v in path[0].items() if k != "alpha"} for row in path)
    assert error_barrier(path) == 0.0 and error_barrier(path, "train_accuracy") == 0.0


# ---- the path function on two networks of any one architecture ---------------------------------------
def _xor_examples(n: int, seed: int) -> list:
    """Noise images whose class is whether exactly one of two corners is bright: no linear rule."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 128, size=(n, 8, 8, 1), dtype=np.uint8)
    first, second = rng.integers(0, 2, n), rng.integers(0, 2, n)
    images[first == 1, :4, :4] += 100
    images[second == 1, 4:, 4:] += 100
    return [(images[i], int(first[i] ^ second[i]), f"{i:04d}") for i in range(n)]


def _batchnorm_mlp(seed: int):
    """8x8x1 -> dense 8 -> BatchNorm -> ReLU -> 2 logits, compiled as the engine compiles."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Dense(8, name="hidden")(keras.layers.Flatten()(inputs))
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(x))
    model = keras.Model(inputs, keras.layers.Dense(2, name="output")(x))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    """Two independently initialised BatchNorm networks trained on the same data (6 epochs each)."""
    from lottery.data.arrays import ArrayDataset

    data = tmp_path_factory.mktemp("xor") / "xor"
    write_dataset(data, {"train": _xor_examples(256, 0), "val": _xor_examples(96, 1)}, ["same", "different"],
                  num_shards={"train": 2, "val": 1})
    train, val = ArrayDataset(data, "train", cache=True), ArrayDataset(data, "val", cache=True)
    ends = []
    for seed in (0, 1):
        model = _batchnorm_mlp(seed)
        for epoch in range(6):
            model.fit(train.batches(32, seed=0, epoch=epoch), epochs=1, verbose=0, shuffle=False)
        ends.append(model_weights(model))
    return model, ends, val.eval_batches(96), train.batches(32, seed=0, epoch=0)


def test_independently_initialised_networks_show_a_clear_barrier(independent):
    model, (a, b), val, train = independent
    path = interpolation_path(model, a, b, points=11, val=val, train=train, bn_batches=train)
    assert error_barrier(path) > 10 and error_barrier(path, "train_accuracy") > 10, path
    assert min(row["accuracy"] for row in path[3:8]) < min(path[0]["accuracy"], path[-1]["accuracy"]) - 0.1


def test_batchnorm_statistics_are_recomputed_for_each_interpolated_network(independent):
    import keras

    model, (a, b), val, train = independent
    interpolate(model, a, b, 0.5)
    stale = model_weights(model)
    assert np.array_equal(stale["bn/moving_mean"], lerp(a["bn/moving_mean"], b["bn/moving_mean"], 0.5))
    stale_eval = model.evaluate(val, verbose=0, return_dict=True)
    assert recompute_batchnorm(model, train) == 8
    fresh = model_weights(model)
    hidden = [np.reshape(x, (len(x), -1)) @ stale["hidden/kernel"] + stale["hidden/bias"] for x, _ in train]
    np.testing.assert_allclose(fresh["bn/moving_mean"], np.mean([h.mean(0) for h in hidden], 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fresh["bn/moving_variance"], np.mean([h.var(0) for h in hidden], 0), rtol=1e-4, atol=1e-5)
    assert all(np.array_equal(fresh[p], stale[p]) for p in stale if "moving" not in p), "only the statistics change"
    assert [layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)] == [0.99]
    assert model.evaluate(val, verbose=0, return_dict=True)["loss"] != pytest.approx(stale_eval["loss"], rel=1e-3)
    recomputed = interpolation_path(model, a, b, points=3, val=val, bn_batches=train)
    interpolated = interpolation_path(model, a, b, points=3, val=val)
    assert recomputed[1]["loss"] != pytest.approx(interpolated[1]["loss"], rel=1e-3)


# ---- a ticket's copies --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ticket_studied(tmp_path_factory, dense) -> Workdir:
    workdir = _copy(tmp_path_factory.mktemp("ticket"), dense)
    result = run_stability(workdir, 0, "sp90.000", points=3, threads=1)
    assert result["stability"] == "sp90.000__0it" and result["points"] == 3
    return workdir


def test_a_ticket_s_copies_keep_its_mask_along_the_path(ticket_studied, data_dir):
    from lottery.pruning import load_mask, mask_report

    mask, _ = load_mask(ticket_studied.mask_file("sp90.000"))
    result = _result(ticket_studied, "sp90.000__0it")
    assert (result["network"], result["mask_id"], result["rewind"]) == ("ticket", "sp90.000", "0it")
    assert result["remaining"] == mask_report(mask)["kept"] / mask_report(mask)["total"]
    ends = [_weights(ticket_studied.stability("sp90.000__0it").copy(c).model) for c in "ab"]
    assert all(np.all(w[p][~keep] == 0.0) for w in ends for p, keep in mask.items())
    model, val, _ = _compiled(ticket_studied, data_dir)
    interpolate(model, *ends, 0.5, mask)
    assert all(np.all(model_weights(model)[p][~keep] == 0.0) for p, keep in mask.items())
    path, keep = next(iter(mask.items()))
    ends[1][path] = np.where(keep, ends[1][path], 1.0).astype(ends[1][path].dtype)
    with pytest.raises(ValueError, match=f"endpoint b: pruned weights of {path} are not zero"):
        interpolate(model, *ends, 0.5, mask)


def test_an_iterative_level_s_study_reads_the_level_s_mask(tmp_path, data_dir):
    conf = tiny_training(pruning_schedule="iterative", sparsities=[0.2, 0.36])
    workdir = Workdir(tmp_path / "w").prepare(ExperimentConfig.from_dict(conf), data_dir)
    with pytest.raises(MissingArtifactError, match=r"tickets/sp20.000__1ep/mask.npz does not exist.*imp --workdir .* --rewind 1ep"):
        run_stability(workdir, "1ep", 0)
    with pytest.raises(MissingArtifactError, match=r"dense/rewind/1ep.npz does not exist.*lottery dense"):
        run_stability(workdir, "1ep")


# ---- idempotent, resumable -----------------------------------------------------------------------------
def test_a_finished_study_is_a_noop_and_other_points_redo_only_the_path(tmp_path, studied, caplog):
    directory = studied.stability("dense__1ep").dir
    before = _mtimes(directory)
    with caplog.at_level("INFO", logger="lottery"):
        again = run_stability(studied, "1ep", points=11)
    assert again["skipped"] is True and "stability dense__1ep: already done" in caplog.text
    assert _mtimes(directory) == before
    workdir = _copy(tmp_path, studied)
    copies = {k: v for k, v in _mtimes(workdir.stability("dense__1ep").dir).items() if k.startswith("copy_")}
    five = run_stability(workdir, "1ep", points=5)
    assert five["skipped"] is False and [row["alpha"] for row in _result(workdir)["path"]] == [0, 0.25, 0.5, 0.75, 1]
    assert _result(workdir)["path"][::2] == _result(studied)["path"][::5], "alpha 0, 0.5 and 1: the same networks"
    assert copies == {k: v for k, v in _mtimes(workdir.stability("dense__1ep").dir).items() if k.startswith("copy_")}


def test_a_damaged_copy_is_named_and_trained_again(tmp_path, studied, caplog):
    workdir = _copy(tmp_path, studied)
    paths = workdir.stability("dense__1ep")
    model = paths.copy("b").model
    model.write_bytes(model.read_bytes()[:-10])
    copy_a = _mtimes(paths.copy("a").dir)
    with caplog.at_level("INFO", logger="lottery"):
        result = run_stability(workdir, "1ep", threads=1)
    assert result["skipped"] is False
    assert "stability dense__1ep: damaged, computing it again: copy_b/model.keras" in caplog.text
    assert "stability dense__1ep copy b: damaged, training it again: model.keras" in caplog.text
    assert "copy a: already done" in caplog.text and _mtimes(paths.copy("a").dir) == copy_a
    assert _result(workdir)["path"] == _result(studied)["path"], "retrained to the same network"


def test_a_killed_copy_resumes_from_its_checkpoint_to_the_same_result(tmp_path, dense, studied, caplog):
    workdir = _copy(tmp_path, dense)
    checkpoint = workdir.stability("dense__1ep").copy("b").checkpoint
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lottery", "stability", "--workdir", str(workdir), "--rewind", "1ep", "--copy", "b", "--threads", "1"]
    kill_at(cmd, env, checkpoint)
    assert checkpoint.exists() and not checkpoint.with_name("result.json").exists(), "not killed mid-training"
    assert not workdir.stability("dense__1ep").copy("a").dir.exists(), "--copy b trains copy b only"
    with caplog.at_level("INFO", logger="lottery"):
        copy_b = train_copy(workdir, "1ep", "b", threads=1)
    assert copy_b["skipped"] is False and "copy b: resuming from the checkpoint at step 16" in caplog.text
    assert run_stability(workdir, "1ep", threads=1)["skipped"] is False
    assert _result(workdir)["path"] == _result(studied)["path"]
    resumed, whole = (_weights(w.stability("dense__1ep").copy("b").model) for w in (workdir, studied))
    assert all(np.array_equal(resumed[p], whole[p]) for p in whole), "the same network, bit for bit"
    for which in "ab":
        resumed, whole = (read_json(w.stability("dense__1ep").copy(which).result, sealed=True) for w in (workdir, studied))
        assert [r["val_loss"] for r in resumed["curve"]] == [r["val_loss"] for r in whole["curve"]]


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (dict(rewind="1ep", points=2), "points 2: the path needs at least 3 points"),
    (dict(rewind="1ep", points=True), "points True"),
    (dict(rewind="5ep"), "unknown rewind point '5ep': this experiment's rewind points are 0it, 1ep"),
    (dict(rewind=2), "rewind index 2 is out of range"),
    (dict(rewind="1ep", mask="sp33.000"), "unknown mask 'sp33.000': this experiment's masks are sp50.000, sp90.000"),
    (dict(rewind="1ep", mask=5), "mask index 5 is out of range"),
])
def test_bad_input_is_refused_naming_it(studied, call, message):
    with pytest.raises(ValueError, match=message):
        run_stability(studied, **call)


def test_the_cli_refuses_bad_input_and_a_mask_not_made(tmp_path, dense, capsys):
    from lottery.cli import main

    assert main(["stability", "--workdir", str(dense), "--rewind", "1ep", "--points", "2"]) == 2
    assert "points 2: the path needs at least 3 points" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown copy 'c'"):
        train_copy(dense, "1ep", "c")
    workdir = _copy(tmp_path, dense)
    shutil.rmtree(workdir.masks_dir)
    assert main(["stability", "--workdir", str(workdir), "--rewind", "1ep", "--mask", "1"]) == 2
    err = capsys.readouterr().err
    assert "masks/sp90.000.npz does not exist: run `python -m lottery masks --workdir" in err
    assert not workdir.stability_dir.exists(), "nothing written for a refused study"
