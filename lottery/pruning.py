"""Magnitude pruning, the random-pruning control, mask files and applying masks.

A mask is a dict `{variable.path: np.ndarray[bool]}` (True = kept) over the
prunable weights of `lottery.models.prunable_weights`.

In every pruning group (all layers, or one layer) exactly `round(rate * size)`
weights are removed, ranked by a stable argsort: ties (the zeros of an already
pruned ticket) are broken by position and never change the counts. Like OpenLTH,
global pruning protects no layer; `mask_report` lists the dead ones.

Keras 3 / numpy only: no TensorFlow import, so this runs on the JAX backend.
"""

import re
from pathlib import Path

import keras
import numpy as np

from lottery.files import load_arrays, save_arrays
from lottery.models import prunable_weights

SCOPES = ("global", "layerwise")
# Weight paths become zip member names in the .npz; keep them boring.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


# --- magnitude pruning -------------------------------------------------------


def _numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def _prune_group(magnitudes, rate, paths, of_remaining=False):
    """Masks for one group of layers pruned together at `rate`: of all its weights, or with
    `of_remaining` of those still kept (magnitude >= 0; a prior mask's removed weights are -1)."""
    flat = np.concatenate([magnitudes[p].ravel() for p in paths])
    removed_before = int(np.sum(flat < 0)) if of_remaining else 0
    num_remove = removed_before + int(round(rate * (flat.size - removed_before))) if of_remaining else int(round(rate * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    order = np.argsort(flat, kind="stable")
    keep[order[:num_remove]] = False
    masks, start = {}, 0
    for p in paths:
        size = magnitudes[p].size
        masks[p] = keep[start:start + size].reshape(magnitudes[p].shape)
        start += size
    return masks


def magnitude_masks(weights, sparsity, *, scope="global", output_path=None,
                    output_factor=1.0, prior_mask=None):
    """{path: bool array, True = kept} in the order of `weights` (numpy or Keras variables),
    removing the fraction `sparsity` of smallest magnitudes: across all layers ("global" scope) or
    in each layer. The output layer (`output_path`) is ranked on its own at
    `min(1, output_factor * sparsity)` when `output_factor != 1`. The weights `prior_mask`
    removed rank below every other, so they stay removed (ValueError if any would come back)."""
    sparsity = float(sparsity)
    output_factor = float(output_factor)
    _check_arguments(weights, sparsity, scope, output_path, output_factor)
    magnitudes = _magnitudes(weights, prior_mask)
    paths = list(weights)
    masks = {}
    for group_paths, rate in _ranking_groups(paths, sparsity, scope, output_path, output_factor):
        if group_paths:
            masks.update(_prune_group(magnitudes, rate, group_paths))
    if prior_mask is not None:
        revived = [p for p in paths if np.any(masks[p] & ~np.asarray(prior_mask[p], dtype=bool))]
        if revived:
            raise ValueError(
                f"sparsity {sparsity} is below the prior mask's in {revived}: weights would come back"
            )
    return {p: masks[p] for p in paths}


def iterative_masks(weights, prior_mask, rate, *, scope="global", output_path=None, output_factor=1.0):
    """One level of iterative magnitude pruning: of the weights `prior_mask` kept (None: all), remove
    `round(rate * kept)` with the smallest magnitude in `weights` (the previous level's trained
    weights) in each group: across all layers ("global") or in each layer, the output layer
    (`output_path`) ranked on its own at `min(1, output_factor * rate)` when the factor is not 1.
    The result is a subset of `prior_mask`."""
    rate, output_factor = float(rate), float(output_factor)
    _check_arguments(weights, rate, scope, output_path, output_factor)
    magnitudes = _magnitudes(weights, prior_mask)
    masks = {}
    for group_paths, group_rate in _ranking_groups(list(weights), rate, scope, output_path, output_factor):
        if group_paths:
            masks.update(_prune_group(magnitudes, group_rate, group_paths, of_remaining=True))
    return {p: masks[p] for p in weights}


def _check_arguments(weights, sparsity, scope, output_path, output_factor):
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1]; got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    if output_factor < 0:
        raise ValueError(f"output_factor must be >= 0; got {output_factor}")
    if not weights:
        raise ValueError("no weights to prune")
    if output_path is not None and output_path not in weights:
        raise ValueError(f"output_path {output_path!r} is not among the weights: {list(weights)}")


def _magnitudes(weights, prior_mask):
    """|w| per path (float); a prior mask's removed weights rank below every surviving one (-1)."""
    magnitudes = {}
    for p, w in weights.items():
        magnitude = np.abs(_numpy(w))
        if magnitude.dtype not in (np.float32, np.float64):
            magnitude = magnitude.astype(np.float32)
        if not np.all(np.isfinite(magnitude)):
            raise ValueError(f"weight {p!r} has NaN or infinite values: cannot rank by magnitude")
        magnitudes[p] = magnitude
    if prior_mask is not None:
        missing = sorted(set(weights) - set(prior_mask))
        if missing:
            raise ValueError(f"prior_mask lacks the weights {missing}")
        for p in magnitudes:
            prior = np.asarray(prior_mask[p], dtype=bool)
            if prior.shape != magnitudes[p].shape:
                raise ValueError(f"prior_mask[{p!r}] has shape {prior.shape}, the weight {magnitudes[p].shape}")
            magnitudes[p] = np.where(prior, magnitudes[p], magnitudes[p].dtype.type(-1))
    return magnitudes


def _ranking_groups(paths, sparsity, scope, output_path, output_factor):
    """(paths ranked together, rate) pairs: one global group (the output layer apart when its
    factor is not 1), or one group per layer."""
    output_rate = min(1.0, output_factor * sparsity)
    if scope != "global":
        return [([p], output_rate if p == output_path else sparsity) for p in paths]
    if output_path is not None and output_factor != 1.0:
        return [([p for p in paths if p != output_path], sparsity), ([output_path], output_rate)]
    return [(paths, sparsity)]


def random_prune_like(mask, seed):
    """A random mask with exactly the same number of kept weights in every layer."""
    rng = np.random.default_rng(int(seed))
    result = {}
    for path in sorted(mask):  # independent of the dict's order
        layer = np.asarray(mask[path], dtype=bool)
        kept = int(layer.sum())
        flat = np.zeros(layer.size, dtype=bool)
        flat[rng.permutation(layer.size)[:kept]] = True
        result[path] = flat.reshape(layer.shape)
    return {path: result[path] for path in mask}


def mask_report(mask, weights=None):
    """Exact per-layer and total counts. With `weights`, also the largest
    pruned and smallest kept magnitude of each layer."""
    layers, total, kept = {}, 0, 0
    for path, layer in mask.items():
        layer = np.asarray(layer, dtype=bool)
        n, k = int(layer.size), int(layer.sum())
        entry = {
            "shape": list(layer.shape),
            "total": n,
            "kept": k,
            "sparsity": (n - k) / n if n else 0.0,
        }
        if weights is not None:
            magnitude = np.abs(_numpy(weights[path]))
            entry["max_pruned_abs"] = float(magnitude[~layer].max()) if k < n else None
            entry["min_kept_abs"] = float(magnitude[layer].min()) if k else None
        layers[path] = entry
        total += n
        kept += k
    return {
        "layers": layers,
        "total": total,
        "kept": kept,
        "sparsity": (total - kept) / total if total else 0.0,
        "dead_layers": [p for p, e in layers.items() if e["total"] and e["kept"] == 0],
    }


# --- mask files --------------------------------------------------------------


def save_mask(path, mask, meta):
    """`mask` as a reproducible .npz keyed by weight path, `meta` in its sealed `<stem>.json`."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"mask files end in .npz; got {path}")
    for key in mask:
        if not _SAFE_PATH.match(key) or ".." in key.split("/"):
            raise ValueError(f"weight path {key!r} cannot be a mask file key")
    save_arrays(path, {key: np.asarray(layer, dtype=bool) for key, layer in mask.items()}, meta, compress=True)


load_mask = load_arrays  # (mask, meta) of a `save_mask` file, verified against its record


# --- applying masks ----------------------------------------------------------


class MaskConstraint(keras.constraints.Constraint):
    """Keeps pruned weights at exactly +0.0: Keras 3 optimizers apply `variable.constraint` after
    every update, whatever the optimizer does. Set on the variable, not in the layer's config, so
    it is not serialised: `apply_mask` re-attaches it after loading.

    The mask is state of the compiled step (`self.keep`, a boolean variable that `set` assigns),
    created as an optimizer variable once the model is compiled (on JAX only the optimizer's
    variables are inputs of the step), so tickets switch masks without retracing."""

    def __init__(self, mask, inner=None, keep=None):
        self.inner = inner  # a constraint the variable had before; applied first
        self.mask = np.asarray(mask, dtype=bool)
        self.keep = keep if keep is not None else keras.Variable(self.mask, trainable=False, dtype="bool", name="keep")
        self.keep._lottery_mask_state = True
        self.set(self.mask)

    def set(self, mask):
        """Switch to another mask of the same shape (an assignment: nothing retraces)."""
        self.mask = np.asarray(mask, dtype=bool)
        self.keep.assign(self.mask)

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        w = keras.ops.convert_to_tensor(w)  # optimizers pass the Variable itself
        return keras.ops.where(self.keep.value, w, keras.ops.zeros_like(w))

    def get_config(self):
        raise NotImplementedError("MaskConstraint is attached at run time and not serialised")


def is_mask_state(variable):
    """True for the mask variables of `MaskConstraint` (not part of a checkpoint's training state)."""
    return getattr(variable, "_lottery_mask_state", False)


def _mask_constraint(model, variable, layer):
    """The variable's mask constraint, set to `layer`: the one it had before (even if `remove_mask`
    detached it) or a new one, whose mask variable belongs to the built optimizer when there is one."""
    inner = variable.constraint
    if isinstance(inner, MaskConstraint):
        inner = inner.inner
    constraint = getattr(variable, "_lottery_mask", None)
    if constraint is None:
        optimizer = getattr(model, "optimizer", None)
        keep = None
        if optimizer is not None and optimizer.built:
            keep = optimizer.add_variable(layer.shape, initializer="ones", dtype="bool",
                                          name=variable.path.replace("/", "_") + "_keep")
        constraint = MaskConstraint(layer, inner=inner, keep=keep)
        variable._lottery_mask = constraint
    else:
        constraint.inner = inner
        constraint.set(layer)
    return constraint


def apply_mask(model, mask):
    """Zeroes the pruned weights of `model` and keeps them at 0.0 during training; a later mask
    assigns the same mask variables, so a compiled train step keeps working."""
    variables = prunable_weights(model)
    unknown = sorted(set(mask) - set(variables))
    if unknown:
        raise ValueError(f"mask has weights that {model.name!r} lacks: {unknown}")
    for path, layer in mask.items():
        variable = variables[path]
        layer = np.asarray(layer, dtype=bool)
        if tuple(layer.shape) != tuple(variable.shape):
            raise ValueError(f"mask for {path!r} has shape {layer.shape}, the weight {tuple(variable.shape)}")
        constraint = _mask_constraint(model, variable, layer)
        variable.assign(constraint(variable.value))
        variable.constraint = constraint


def remove_mask(model):
    """Detaches the mask constraints (restoring any earlier constraint); weights are left as they are."""
    for variable in prunable_weights(model).values():
        if isinstance(variable.constraint, MaskConstraint):
            variable.constraint = variable.constraint.inner
