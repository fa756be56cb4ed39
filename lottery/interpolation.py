"""The line between two networks of one architecture, and the error along it (linear mode
connectivity: Frankle, Dziugaite, Roy & Carbin 2020).

    a, b = model_weights(model_a), model_weights(model_b)        {variable.path: array}, every variable
    path = interpolation_path(model, a, b, points=11, val=..., train=..., bn_batches=...)
    error_barrier(path)                                           percentage points

Point i of ``points`` is ``alpha = i / (points - 1)``: every variable of ``model`` set to
``(1 - alpha) a + alpha b`` (`lerp`: exactly ``a`` at 0, exactly ``b`` at 1, exactly ``a`` everywhere
when ``a == b``), BatchNorm's moving statistics included; with ``bn_batches`` those statistics are
then recomputed for the interpolated network (`recompute_batchnorm`): interpolated statistics are
not the statistics of the interpolated network. ``model`` is compiled with an ``accuracy`` metric
(`lottery.training.compile_model`) and holds the last point's weights afterwards.

Keras 3 and NumPy only (any backend); Keras is imported inside the functions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

MIN_POINTS = 3


def check_points(points: Any) -> int:
    """``points`` when it is a whole number of at least `MIN_POINTS`, else a ValueError naming it."""
    if isinstance(points, bool) or not isinstance(points, int) or points < MIN_POINTS:
        raise ValueError(f"points {points!r}: the path needs at least {MIN_POINTS} points "
                         "(the two endpoints and one between)")
    return points


def alphas(points: int) -> list[float]:
    """``points`` evenly spaced values from 0.0 to 1.0, both included exactly."""
    check_points(points)
    return [i / (points - 1) for i in range(points)]


def lerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) a + alpha b``, computed from the nearer endpoint, in ``a``'s dtype: exactly
    ``a`` at 0, exactly ``b`` at 1, exactly ``a`` at every alpha when ``a == b``."""
    if alpha <= 0.5:
        value = a + alpha * (b - a)
    else:
        value = b + (1.0 - alpha) * (a - b)
    return np.asarray(value, dtype=a.dtype)


def model_weights(model) -> dict[str, np.ndarray]:
    """Every variable of ``model`` (BatchNorm statistics included), keyed by its path."""
    import keras

    return {v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights}


def interpolate(model, weights_a: Mapping[str, np.ndarray], weights_b: Mapping[str, np.ndarray], alpha: float,
                mask: Mapping[str, np.ndarray] | None = None) -> None:
    """Set every variable of ``model`` to ``lerp(a, b, alpha)``; a variable that is not a float (a
    counter, a seed) must be the same in both. ``mask`` (True = kept): the pruned weights must be
    zero in both endpoints, and are checked to be zero in the result."""
    variables = {v.path: v for v in model.weights}
    for name, weights in (("a", weights_a), ("b", weights_b)):
        if set(weights) != set(variables):
            odd = sorted(set(weights) ^ set(variables))
            raise ValueError(f"endpoint {name} does not have the model's variables: {odd[:3]} ({len(odd)} differ)")
        _check_pruned(weights, mask, f"endpoint {name}", ValueError)
    for path, variable in variables.items():
        a, b = np.asarray(weights_a[path]), np.asarray(weights_b[path])
        if a.shape != b.shape or a.shape != tuple(variable.shape):
            raise ValueError(f"{path}: shapes {a.shape} and {b.shape}, the model expects {tuple(variable.shape)}")
        if np.issubdtype(a.dtype, np.floating):
            variable.assign(lerp(a, b, alpha))
        elif np.array_equal(a, b):
            variable.assign(a)
        else:
            raise ValueError(f"{path}: a {a.dtype} variable that differs between the endpoints cannot be interpolated")
    if mask is not None:
        _check_pruned(model_weights(model), mask, f"the network at alpha {alpha:g}", AssertionError)


def _check_pruned(weights: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray] | None, what: str, error: type) -> None:
    for path, keep in (mask or {}).items():
        if np.any(np.asarray(weights[path])[~np.asarray(keep, bool)] != 0):
            raise error(f"{what}: pruned weights of {path} are not zero")


def recompute_batchnorm(model, batches: Iterable) -> int:
    """Set the moving mean and variance of every BatchNormalization layer of ``model`` to the mean,
    over ``batches``, of each batch's own statistics, from forward passes in training mode (each
    layer normalising with its batch's statistics, as in training; PyTorch's ``update_bn``). No other
    variable changes. Returns the number of batches used (0 when the model has no BatchNorm)."""
    import keras

    from lottery.models import batchnorm_layers

    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums = [[0.0, 0.0] for _ in layers]
    count = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # the moving statistics become each batch's own
        for x, _ in batches:
            model(x, training=True)
            for total, layer in zip(sums, layers):
                total[0] = total[0] + keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float64)
                total[1] = total[1] + keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if not count:
        raise ValueError("no batches to recompute the BatchNorm statistics from")
    for (mean, variance), layer in zip(sums, layers):
        layer.moving_mean.assign((mean / count).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign((variance / count).astype(layer.moving_variance.dtype))
    return count


def evaluate(model, stream) -> tuple[float, float]:
    """(loss, accuracy as a fraction) of the compiled ``model`` on ``stream``."""
    values = model.evaluate(stream, verbose=0, return_dict=True)
    return float(values["loss"]), float(values["accuracy"])


def interpolation_path(model, weights_a: Mapping[str, np.ndarray], weights_b: Mapping[str, np.ndarray], *, points: int,
                       val, train=None, bn_batches=None, mask: Mapping[str, np.ndarray] | None = None,
                       on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per alpha (`alphas`): ``{"alpha", "loss", "accuracy"}`` on ``val`` and, with
    ``train``, ``"train_loss"``, ``"train_accuracy"``. With ``bn_batches`` the BatchNorm statistics
    of every point, the endpoints included, are recomputed from them (`recompute_batchnorm`);
    without, they are interpolated like the other variables. ``on_point``: called with each row."""
    rows = []
    for alpha in alphas(points):
        interpolate(model, weights_a, weights_b, alpha, mask)
        if bn_batches is not None:
            recompute_batchnorm(model, bn_batches)
        loss, accuracy = evaluate(model, val)
        row = {"alpha": alpha, "loss": loss, "accuracy": accuracy}
        if train is not None:
            row["train_loss"], row["train_accuracy"] = evaluate(model, train)
        rows.append(row)
        if on_point is not None:
            on_point(row)
    return rows


def error_barrier(path: list[dict], key: str = "accuracy") -> float:
    """The highest error along ``path`` less the mean of its two endpoints' errors, in percentage
    points (error = 1 - ``row[key]``): never below 0 (the endpoints are on the path), 0.0 when
    every point has the same error."""
    errors = [1.0 - row[key] for row in path]
    return 100.0 * (max(errors) - (errors[0] + errors[-1]) / 2)
