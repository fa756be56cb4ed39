"""Iterative magnitude pruning, the three rewind modes and replicates, on small real runs.

A chain of levels per rewind point (lottery.imp), each level pruned from the level before's trained
weights; what each rewind mode restores; replicates as experiments of their own.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lottery.config import ExperimentConfig
from lottery.dense import run_dense
from lottery.imp import run_chain
from lottery.late_reset import retrain
from lottery.paths import Workdir, prepare_replicates
from lottery.plan import RunPlan
from tests.datasets import make_synthetic_shards
from tests.helpers import kill_at, tiny_training

ROOT = Path(__file__).resolve().parents[1]
LEVELS = [0.2, 0.36, 0.488, 0.5904]  # 20% of the remaining weights a level
IMP = tiny_training(pruning_schedule="iterative", sparsities=LEVELS, pruning_scope="layerwise")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("data"), 256, 96, shape=(8, 8, 1), num_classes=3)


def _dense(tmp_path, data_dir, conf) -> Workdir:
    workdir = Workdir(tmp_path / "w")
    run_dense(ExperimentConfig.from_dict(conf), data_dir, workdir, threads=1)
    return workdir


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_dir):
    """A finished chain of three levels at rewind point 1ep."""
    workdir = _dense(tmp_path_factory.mktemp("imp"), data_dir, IMP)
    results = run_chain(workdir, "1ep", levels=3, threads=1)
    assert [r["level"] for r in results] == [1, 2, 3] and not any(r["skipped"] for r in results)
    return workdir


def _level(workdir: Workdir, level: int, rewind: str = "1ep") -> Path:
    return workdir.tickets_dir / f"{RunPlan.from_config(workdir.load()[0]).masks[level - 1].mask_id}__{rewind}"


def _model_weights(path: Path) -> dict:
    import keras

    from lottery.models import prunable_weights

    model = keras.models.load_model(path, compile=False)
    return {p: np.asarray(v) for p, v in prunable_weights(model).items()}, model


def test_each_level_is_pruned_from_the_level_before_s_trained_weights(chain):
    from lottery.models import output_kernel_path
    from lottery.pruning import iterative_masks, load_mask

    masks, sources = [], [chain.final_model] + [_level(chain, k) / "model.keras" for k in (1, 2)]
    for level in (1, 2, 3):
        mask, meta = load_mask(_level(chain, level) / "mask.npz")
        result = json.loads((_level(chain, level) / "result.json").read_text())
        assert (result["schedule"], result["level"], meta["level"]) == ("iterative", level, level)
        weights, model = _model_weights(sources[level - 1])
        prior = masks[-1] if masks else None
        expected = iterative_masks(weights, prior, 0.2, scope="layerwise", output_path=output_kernel_path(model), output_factor=0.5)
        assert mask.keys() == expected.keys() and all(np.array_equal(mask[p], expected[p]) for p in mask), level
        assert meta["source"] == str(Path(sources[level - 1]).relative_to(chain.path))
        if prior is not None:
            assert all(not np.any(mask[p] & ~prior[p]) for p in mask), "a subset of the level before's mask"
            for p in mask:  # exact counts: 20% of each hidden layer's remaining weights, 10% of the output layer's
                rate = 0.1 if p == output_kernel_path(model) else 0.2
                assert prior[p].sum() - mask[p].sum() == round(rate * prior[p].sum()), (level, p)
            dense, _ = _model_weights(chain.final_model)  # ... ranked by the trained level, not the dense network
            from_dense = iterative_masks(dense, prior, 0.2, scope="layerwise", output_path=output_kernel_path(model), output_factor=0.5)
            assert any(np.any(from_dense[p] != mask[p]) for p in mask)
        masks.append(mask)
        trained, model = _model_weights(_level(chain, level) / "model.keras")
        assert all(np.all(trained[p][~mask[p]] == 0.0) for p in mask)
        assert not any("bias" in p or "gamma" in p or "beta" in p or "moving" in p for p in mask), "only kernels are pruned"
        assert all(np.count_nonzero(np.asarray(v)) for v in model.weights if v.path.endswith("bias"))


@pytest.mark.parametrize("damaged", ["model.keras", "mask.npz"])
def test_a_finished_chain_is_a_noop_and_a_damaged_level_is_trained_again(chain, caplog, damaged):
    files = {k: _level(chain, k) / "result.json" for k in (1, 2, 3)}
    before = {k: (f.stat().st_mtime_ns, json.loads(f.read_text())["val_accuracy"]) for k, f in files.items()}
    assert all(r["skipped"] for r in run_chain(chain, 1, levels=3, threads=1))
    target = _level(chain, 2) / damaged
    target.write_bytes(target.read_bytes()[:-10])
    with caplog.at_level("INFO", logger="lottery"):
        again = run_chain(chain, "1ep", levels=3, threads=1)
    assert [r["skipped"] for r in again] == [True, False, True]
    assert f"{damaged}" in caplog.text and "damaged" in caplog.text and "level 2/3" in caplog.text
    after = {k: (f.stat().st_mtime_ns, json.loads(f.read_text())["val_accuracy"]) for k, f in files.items()}
    assert after[1] == before[1] and after[3] == before[3]
    assert after[2][1] == before[2][1] and after[2][0] > before[2][0]  # retrained, to the same result


def test_a_chain_killed_in_level_3_resumes_at_level_3(tmp_path, chain, data_dir):
    workdir = _dense(tmp_path, data_dir, IMP)
    third = _level(workdir, 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lottery", "imp", "--workdir", str(workdir), "--rewind", "1ep", "--levels", "3", "--threads", "1"]
    kill_at(cmd, env, third / "checkpoint.npz")
    assert (third / "checkpoint.npz").exists() and not (third / "result.json").exists()
    done = {k: {f.name: f.stat().st_mtime_ns for f in _level(workdir, k).iterdir()} for k in (1, 2)}
    results = run_chain(workdir, "1ep", levels=3, threads=1)
    assert [r["skipped"] for r in results] == [True, True, False]
    assert done == {k: {f.name: f.stat().st_mtime_ns for f in _level(workdir, k).iterdir()} for k in (1, 2)}
    resumed = json.loads((third / "result.json").read_text())
    uninterrupted = json.loads((_level(chain, 3) / "result.json").read_text())
    assert [r["val_accuracy"] for r in resumed["curve"]] == [r["val_accuracy"] for r in uninterrupted["curve"]]


def test_controls_of_an_iterative_run_use_the_level_s_mask(chain):
    from lottery.pruning import load_mask

    [result] = retrain(chain, [1], "1ep", control="random_prune", threads=1)
    level, _ = load_mask(_level(chain, 2) / "mask.npz")
    drawn, _ = load_mask(Path(result["ticket"]) / "mask.npz")
    assert {p: int(m.sum()) for p, m in drawn.items()} == {p: int(m.sum()) for p, m in level.items()}
    assert any(np.any(drawn[p] != level[p]) for p in level)
    with pytest.raises(Exception, match="imp --workdir .* --rewind 0it --levels 2"):
        retrain(chain, [1], "0it", control="random_reinit", threads=1)


# ---- the rewind modes ---------------------------------------------------------------------------
def _started(workdir: Workdir, data_dir, rewind: str):
    """A compiled model brought to the start of ticket (level 1, ``rewind``) as its retraining starts it."""
    from lottery.masks import make_masks
    from lottery.session import build_model, open_data, session
    from lottery.ticket import Ticket
    from lottery.training import compile_model

    make_masks(workdir)
    cfg, run_info = workdir.load()
    with session(cfg, 1):
        train, _, spe = open_data(cfg, data_dir)
        model = build_model(cfg, train)
        compile_model(model, cfg, spe)
        start = Ticket(workdir, cfg, run_info, RunPlan.from_config(cfg).masks[0], rewind).start(model, train, spe)
    return model, start, spe


def _state(model):
    from lottery.training import training_state

    return training_state(model)


@pytest.mark.parametrize("mode", ["full", "weights", "learning_rate"])
def test_each_rewind_mode_restores_what_it_says(tmp_path, data_dir, mode):
    import keras

    from lottery.files import load_arrays
    from lottery.training import make_schedule

    workdir = _dense(tmp_path, data_dir, tiny_training(rewind_mode=mode, rewind_points=["3it", "1ep"]))
    model, start, spe = _started(workdir, data_dir, "1ep")
    rewound, _ = load_arrays(workdir.rewind_checkpoint("1ep"))
    state = _state(model)
    slots = [k for k in rewound if k.endswith("_momentum")]
    assert slots and all(np.any(rewound[k] != 0) for k in slots)
    if mode == "full":
        assert all(np.array_equal(state[k], rewound[k]) for k in slots), "full: the rewind point's optimizer slots"
    else:
        assert all(not np.any(state[k]) for k in slots), f"{mode}: a fresh optimizer (zero slots)"
    assert start.step == 8 == int(np.asarray(model.optimizer.iterations)), "every mode: the rewind point's iteration"
    cfg, _ = workdir.load()
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(make_schedule(cfg, spe).value_at(8), rel=1e-7)
    final = {v.path: np.asarray(v) for v in keras.models.load_model(workdir.final_model, compile=False).weights}
    source = final if mode == "learning_rate" else {k.removeprefix("model:"): v for k, v in rewound.items() if k.startswith("model:")}
    for variable in model.weights:
        kept = start.mask.get(variable.path, np.ones(variable.shape, bool))
        np.testing.assert_array_equal(np.asarray(variable)[kept], source[variable.path][kept], err_msg=f"{mode}: {variable.path}")


def test_a_rewind_mode_changes_the_id_and_the_default_keeps_it():
    base = ExperimentConfig.from_dict({})
    assert ExperimentConfig.from_dict({"rewind_mode": "full", "pruning_schedule": "one_shot", "replicates": 1}).id_fields() == {}
    assert base.replace(rewind_mode="weights").id_fields() == {"rewind_mode": "weights"}
    assert base.replace(pruning_schedule="iterative").id_fields() == {"pruning_schedule": "iterative"}


# ---- replicates ---------------------------------------------------------------------------------
def test_replicates_are_experiments_of_their_own_and_more_reuse_the_finished(tmp_path, data_dir):
    conf = tiny_training(training_steps="1ep", rewind_points=["0it"], lr_milestones=[], warmup_steps="0it")
    cfg = ExperimentConfig.from_dict({**conf, "seed": 5, "replicates": 2})
    replicate_set, workdirs = prepare_replicates(tmp_path, cfg, data_dir)
    assert [w.load()[0].seed for w in workdirs] == [5, 6] and len({w.name for w in workdirs}) == 2
    assert workdirs[0].name == Workdir.for_experiment(tmp_path, ExperimentConfig.from_dict({**conf, "seed": 5}), data_dir).name
    assert replicate_set.name == f"{workdirs[0].name}-x2" and replicate_set.load()[1] == workdirs
    assert not any(run_dense(w.load()[0], data_dir, w, threads=1)["skipped"] for w in workdirs)
    from lottery.files import load_arrays

    starts = [load_arrays(w.rewind_checkpoint("0it"))[0] for w in workdirs]
    assert any(not np.array_equal(starts[0][k], starts[1][k]) for k in starts[0] if k.startswith("model:")), "distinct seeds"
    more_set, more = prepare_replicates(tmp_path, cfg.replace(replicates=3), data_dir)
    assert more[:2] == workdirs and more_set.name.endswith("-x3")
    assert [run_dense(w.load()[0], data_dir, w, threads=1)["skipped"] for w in more] == [True, True, False]
