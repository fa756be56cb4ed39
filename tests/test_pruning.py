"""Magnitude masks, the random control, mask files and masks that survive training."""
import json

import keras
import numpy as np
import pytest

from lottery.errors import CorruptArtifactError
from lottery.models import build_model, output_kernel_path, prunable_weights
from lottery.pruning import (
    MaskConstraint,
    apply_mask,
    iterative_masks,
    load_mask,
    magnitude_masks,
    mask_report,
    random_prune_like,
    remove_mask,
    save_mask,
)

SPARSITIES = [0.0, 0.2, 0.5, 0.9, 1 - 0.8**20, 1.0]


def make_weights(seed=0, ties=False):
    rng = np.random.default_rng(seed)
    shapes = {"conv1/kernel": (3, 3, 3, 8), "conv2/kernel": (3, 3, 8, 8), "fc1/kernel": (128, 37), "output/kernel": (37, 10)}
    weights = {}
    for path, shape in shapes.items():
        w = rng.normal(size=shape).astype(np.float32)
        if ties:  # few distinct magnitudes, both signs: many exact ties
            w = np.round(w * 2) / 2
        weights[path] = w
    return weights


def kept(mask):
    return {p: int(m.sum()) for p, m in mask.items()}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_global_removes_exact_count_with_one_threshold(sparsity, ties):
    weights = make_weights(ties=ties)
    mask = magnitude_masks(weights, sparsity)
    total = sum(w.size for w in weights.values())
    assert list(mask) == list(weights)
    assert all(m.dtype == bool and m.shape == weights[p].shape for p, m in mask.items())
    assert total - sum(kept(mask).values()) == round(sparsity * total)
    kept_abs = np.concatenate([np.abs(weights[p][m]) for p, m in mask.items()])
    pruned_abs = np.concatenate([np.abs(weights[p][~m]) for p, m in mask.items()])
    if kept_abs.size and pruned_abs.size:
        assert kept_abs.min() >= pruned_abs.max()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_layerwise_removes_exact_count_per_layer(sparsity, ties):
    weights = make_weights(ties=ties)
    mask = magnitude_masks(weights, sparsity, scope="layerwise")
    for path, m in mask.items():
        w = weights[path]
        assert w.size - m.sum() == round(sparsity * w.size), path
        if 0 < m.sum() < m.size:
            assert np.abs(w[m]).min() >= np.abs(w[~m]).max()


def test_global_is_not_layerwise():
    # Layers of very different scales: a single global threshold prunes the small layer harder.
    weights = make_weights()
    weights["conv1/kernel"] = weights["conv1/kernel"] * 0.01
    mask = magnitude_masks(weights, 0.5)
    assert mask["conv1/kernel"].sum() == 0
    assert mask_report(mask)["dead_layers"] == ["conv1/kernel"]


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("factor", [0.5, 3.0])
def test_output_factor(scope, factor):
    weights = make_weights()
    sparsity = 0.6
    mask = magnitude_masks(weights, sparsity, scope=scope, output_path="output/kernel", output_factor=factor)
    out = weights["output/kernel"]
    out_rate = min(1.0, factor * sparsity)
    assert out.size - mask["output/kernel"].sum() == round(out_rate * out.size)
    rest = [p for p in weights if p != "output/kernel"]
    if scope == "global":
        total = sum(weights[p].size for p in rest)
        assert total - sum(mask[p].sum() for p in rest) == round(sparsity * total)
        # The other layers are ranked without the output layer.
        expected = magnitude_masks({p: weights[p] for p in rest}, sparsity)
        assert all(np.array_equal(mask[p], expected[p]) for p in rest)
    else:
        for p in rest:
            assert weights[p].size - mask[p].sum() == round(sparsity * weights[p].size)


def test_output_factor_one_means_plain_global():
    weights = make_weights()
    plain = magnitude_masks(weights, 0.7)
    same = magnitude_masks(weights, 0.7, output_path="output/kernel", output_factor=1.0)
    assert all(np.array_equal(plain[p], same[p]) for p in weights)


def test_prior_mask_keeps_pruned_weights_pruned():
    weights = make_weights()
    first = magnitude_masks(weights, 0.5)
    # An unlucky ticket: surviving weights are exactly zero too (ties with the pruned ones).
    trained = {p: np.where(m, w, 0.0).astype(np.float32) for (p, w), m in zip(weights.items(), first.values())}
    trained["conv1/kernel"].flat[np.flatnonzero(first["conv1/kernel"])[:20]] = 0.0
    second = magnitude_masks(trained, 0.6, prior_mask=first)
    assert all(not np.any(second[p] & ~first[p]) for p in weights)
    total = sum(w.size for w in weights.values())
    assert total - sum(kept(second).values()) == round(0.6 * total)
    with pytest.raises(ValueError, match="come back"):
        magnitude_masks(trained, 0.3, prior_mask=first)


def _train_a_little(weights, mask, seed):
    """Stand-in for a level's retraining: the kept weights move, the pruned ones stay 0."""
    rng = np.random.default_rng(seed)
    return {p: np.where(mask[p], w + rng.normal(scale=0.5, size=w.shape), 0.0).astype(np.float32) for p, w in weights.items()}


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_iterative_levels_remove_the_rate_of_the_remaining_weights_exactly(scope):
    """Frankle & Carbin's LeNet recipe: 20% of the remaining weights a level, the output layer at 10%."""
    weights, out = make_weights(), "output/kernel"
    rest = [p for p in weights if p != out]
    groups = [rest] if scope == "global" else [[p] for p in rest]
    mask = {p: np.ones(w.shape, bool) for p, w in weights.items()}
    for level in range(1, 9):
        trained = _train_a_little(weights, mask, seed=level)
        new = iterative_masks(trained, mask if level > 1 else None, 0.2, scope=scope, output_path=out, output_factor=0.5)
        assert all(not np.any(new[p] & ~mask[p]) for p in weights), "a level's mask is a subset of the level before's"
        for group in groups:
            before, after = sum(int(mask[p].sum()) for p in group), sum(int(new[p].sum()) for p in group)
            assert before - after == round(0.2 * before), (level, group)
        assert mask[out].sum() - new[out].sum() == round(0.1 * mask[out].sum())
        # The smallest surviving magnitudes of the trained weights went: among the weights kept before.
        for group in groups:
            pruned_now = np.concatenate([np.abs(trained[p][mask[p] & ~new[p]]) for p in group])
            kept_now = np.concatenate([np.abs(trained[p][new[p]]) for p in group])
            assert pruned_now.max() <= kept_now.min()
        mask = new
    total = sum(w.size for p, w in weights.items() if p != out)
    left = sum(int(mask[p].sum()) for p in rest) / total
    assert left == pytest.approx(0.8**8, abs=0.01)


def test_iterative_masks_rank_the_given_weights_not_the_first_ones():
    weights = make_weights()
    first = iterative_masks(weights, None, 0.5)
    trained = _train_a_little(weights, first, seed=7)
    from_trained = iterative_masks(trained, first, 0.5)
    from_start = iterative_masks({p: np.where(first[p], w, 0) for p, w in weights.items()}, first, 0.5)
    assert any(np.any(from_trained[p] != from_start[p]) for p in weights)


def test_bad_arguments():
    weights = make_weights()
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_masks(weights, 1.5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(weights, 0.5, scope="per_layer")
    with pytest.raises(ValueError, match="output_path"):
        magnitude_masks(weights, 0.5, output_path="nope/kernel", output_factor=0.5)
    weights["fc1/kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match="fc1/kernel"):
        magnitude_masks(weights, 0.5)


def test_random_prune_like_keeps_layer_counts():
    mask = magnitude_masks(make_weights(), 0.8)
    control = random_prune_like(mask, seed=1)
    assert list(control) == list(mask)
    assert kept(control) == kept(mask)
    assert any(not np.array_equal(control[p], mask[p]) for p in mask)
    again = random_prune_like(mask, seed=1)
    assert all(np.array_equal(control[p], again[p]) for p in mask)
    other = random_prune_like(mask, seed=2)
    assert any(not np.array_equal(control[p], other[p]) for p in mask)


def test_mask_report_counts():
    weights = make_weights()
    mask = magnitude_masks(weights, 0.75, scope="layerwise")
    report = mask_report(mask, weights)
    assert report["total"] == sum(w.size for w in weights.values())
    assert report["kept"] == sum(kept(mask).values())
    assert report["sparsity"] == (report["total"] - report["kept"]) / report["total"]
    layer = report["layers"]["fc1/kernel"]
    assert layer["shape"] == [128, 37] and layer["total"] == 128 * 37
    assert layer["kept"] == 128 * 37 - round(0.75 * 128 * 37)
    assert layer["min_kept_abs"] >= layer["max_pruned_abs"]
    assert report["dead_layers"] == []
    json.dumps(report)


# --- mask files --------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    weights = make_weights()
    mask = magnitude_masks(weights, 0.9)
    path = tmp_path / "masks" / "level_03.npz"
    meta = {"level": 3, "sparsity": 0.9}
    save_mask(path, mask, meta)
    loaded, loaded_meta = load_mask(path)
    assert loaded_meta == meta
    assert list(loaded) == list(mask)
    assert all(loaded[p].dtype == bool and np.array_equal(loaded[p], mask[p]) for p in mask)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["meta"] == meta and info["bytes"] == path.stat().st_size
    assert len(info["sha256"]) == 64 and info["checksum"].startswith("sha256:")
    # Keys with '/' are plain npz keys; the file is byte-for-byte reproducible.
    assert set(np.load(path).keys()) == set(mask)
    first = path.read_bytes()
    save_mask(path, mask, meta)
    assert path.read_bytes() == first
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate_and_rehash", "no_report", "unsealed_report"])
def test_damaged_mask_is_refused(tmp_path, damage):
    path = tmp_path / "mask.npz"
    save_mask(path, magnitude_masks(make_weights(), 0.5), {})
    data = path.read_bytes()
    report = path.with_suffix(".json")
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate_and_rehash":  # the record (sealed again) matches, the zip is still broken
        import hashlib

        from lottery.files import write_json

        path.write_bytes(data[: len(data) // 2])
        info = json.loads(report.read_text())
        info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        info["bytes"] = path.stat().st_size
        del info["checksum"]
        write_json(report, info, sealed=True)
    elif damage == "unsealed_report":  # the right record, but nothing vouches for the report itself
        info = json.loads(report.read_text())
        del info["checksum"]
        report.write_text(json.dumps(info))
    else:
        report.unlink()
    with pytest.raises(CorruptArtifactError, match="mask.npz"):
        load_mask(path)


# --- applying masks ----------------------------------------------------------


def small_model(name="lenet_300_100", input_shape=(6, 6, 1), seed=0):
    return build_model(name, input_shape, 4, seed=seed)


def random_mask(model, sparsity=0.7):
    weights = {p: v.numpy() for p, v in prunable_weights(model).items()}
    return magnitude_masks(weights, sparsity, output_path=output_kernel_path(model), output_factor=0.5)


def fit(model, optimizer, steps=200, batch_size=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch_size, *model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, model.output_shape[-1], size=steps * batch_size)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)


OPTIMIZERS = {
    "sgd_nesterov_wd": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize(
    "model_name,input_shape,optimizer",
    [("lenet_300_100", (6, 6, 1), name) for name in OPTIMIZERS] + [("conv2", (6, 6, 2), "sgd_nesterov_wd")],
)
def test_pruned_weights_stay_exactly_zero_while_training(model_name, input_shape, optimizer):
    model = small_model(model_name, input_shape)
    mask = random_mask(model)
    before = {p: v.numpy().copy() for p, v in prunable_weights(model).items()}
    apply_mask(model, mask)
    for path, variable in prunable_weights(model).items():
        w = variable.numpy()
        assert np.all(w[~mask[path]] == 0.0) and not np.any(np.signbit(w[~mask[path]])), path
        assert np.array_equal(w[mask[path]], before[path][mask[path]]), path
    fit(model, OPTIMIZERS[optimizer]())
    for path, variable in prunable_weights(model).items():
        w = variable.numpy()
        pruned = w[~mask[path]]
        assert np.all(pruned == 0.0) and not np.any(np.signbit(pruned)), f"{path}: pruned weights moved"
        assert not np.allclose(w[mask[path]], before[path][mask[path]]), f"{path}: surviving weights did not train"


def test_without_constraint_pruned_weights_move():
    """The control that shows the test above can fail."""
    model = small_model()
    mask = random_mask(model)
    apply_mask(model, mask)
    remove_mask(model)
    assert all(v.constraint is None for v in prunable_weights(model).values())
    fit(model, OPTIMIZERS["sgd_nesterov_wd"](), steps=20)
    moved = [p for p, v in prunable_weights(model).items() if np.any(v.numpy()[~mask[p]] != 0.0)]
    assert moved


def test_apply_mask_keeps_an_existing_constraint_and_reapplies():
    model = small_model()
    variable = prunable_weights(model)["fc1/kernel"]
    variable.constraint = keras.constraints.NonNeg()
    mask = random_mask(model)
    apply_mask(model, mask)
    apply_mask(model, mask)  # idempotent: no stacked mask constraints
    assert isinstance(variable.constraint, MaskConstraint)
    assert isinstance(variable.constraint.inner, keras.constraints.NonNeg)
    remove_mask(model)
    assert isinstance(variable.constraint, keras.constraints.NonNeg)


def test_apply_mask_refuses_foreign_masks():
    model = small_model()
    mask = random_mask(model)
    with pytest.raises(ValueError, match="nope/kernel"):
        apply_mask(model, {**mask, "nope/kernel": np.ones((2, 2), bool)})
    with pytest.raises(ValueError, match="fc2/kernel"):
        apply_mask(model, {**mask, "fc2/kernel": np.ones((3, 3), bool)})


def test_masked_model_saves_and_loads(tmp_path):
    model = small_model()
    mask = random_mask(model)
    apply_mask(model, mask)
    fit(model, OPTIMIZERS["adam"](), steps=5)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for (p, v), w in zip(prunable_weights(loaded).items(), prunable_weights(model).values()):
        assert np.array_equal(v.numpy(), w.numpy()), p
        assert np.all(v.numpy()[~mask[p]] == 0.0)
        assert v.constraint is None  # masks are re-applied explicitly, never serialised
    apply_mask(loaded, mask)


def test_a_compiled_model_switches_masks_without_retracing():
    """Once the optimizer is built, the mask lives in an optimizer variable: applying another mask
    assigns it, the compiled step keeps running (no new trace) and keeps the new mask's zeros."""
    from lottery.pruning import is_mask_state
    from lottery.training import optimizer_state

    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6, 6, 1)).astype(np.float32), rng.integers(0, 4, size=64)
    first = random_mask(model, 0.5)
    apply_mask(model, first)
    constraints = {p: v.constraint for p, v in prunable_weights(model).items()}
    assert sum(is_mask_state(v) for v in model.optimizer.variables) == len(first)
    assert not any(is_mask_state(v) for v in optimizer_state(model.optimizer)), "checkpoints leave the masks out"
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    function = model.train_function
    for p, v in prunable_weights(model).items():  # revive every weight, then switch to another mask
        v.assign(v.numpy() + 0.01)
    second = {p: ~keep for p, keep in first.items()}
    apply_mask(model, second)
    assert all(v.constraint is constraints[p] for p, v in prunable_weights(model).items()), "the same constraints"
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert model.train_function is function
    for path, variable in prunable_weights(model).items():
        w = variable.numpy()
        assert np.all(w[~second[path]] == 0.0), f"{path}: the second mask holds in the compiled step"
        assert np.count_nonzero(w[second[path]]) > 0.9 * second[path].sum(), path
