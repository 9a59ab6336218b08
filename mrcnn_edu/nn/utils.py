"""Small helpers every layer, op and stage needs: one home for each, so none is copied.

- ``as_generator(rng)``: a seed (or None) or a ``numpy.random.Generator`` -> a Generator.
- ``pair(v, name)``: ``7 -> (7, 7)``, ``(7, 5) -> (7, 5)``, with an error naming the argument.
- ``check_float_array(a, name)``: refuse anything but a float32/float64 NumPy (or CuPy) array.
- ``add_param_grads(layer, dw, db)``: accumulate a layer's weight and bias gradients.
- ``NonFiniteError``, ``check_finite(what, *arrays)``: the ValueError for values that must be
  finite and are NaN/inf.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp, is_device_array, raise_if

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class NonFiniteError(ValueError):
    """Values an op needs finite hold NaN or inf (RoIAlign's features). Inside a training step
    this means the model diverged, and the Trainer reports it as ``TrainingDiverged``."""


def check_finite(what: str, *arrays) -> None:
    """NonFiniteError naming ``what`` when any of ``arrays`` holds NaN or inf: used where the
    inference path would otherwise drop NaN scores or boxes silently (NaN > t is False) and
    answer "no detections" for a broken model."""
    for a in arrays:
        if a.size:
            raise_if(
                ~get_xp(a).isfinite(a).all(),
                lambda: NonFiniteError(
                    f"{what} hold NaN or inf: the model's weights are broken (NaN weights, or "
                    "a diverged run), or values overflowed"
                ),
            )


def as_generator(rng) -> np.random.Generator:
    """``rng`` itself when it is a ``numpy.random.Generator``, else ``default_rng(rng)`` (a seed
    or None): layers and stages share one generator when they are handed one."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def pair(value, name: str = "value", minimum: int | None = None) -> tuple[int, int]:
    """``7 -> (7, 7)``, ``(7, 5) -> (7, 5)`` (ints, NumPy ints, a tuple or list of two).

    Anything else (a float, a bool, three values) raises a ValueError naming ``name``; with
    ``minimum`` given, so does a value below it (``minimum=1`` for sizes, 0 for paddings)."""

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if is_int(value):
        out = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(map(is_int, value)):
        out = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if minimum is not None and min(out) < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return out


def check_array(a, name: str) -> None:
    """A NumPy or CuPy array, nothing else (lists are not silently converted)."""
    if not (isinstance(a, np.ndarray) or is_device_array(a)):
        raise ValueError(f"{name} must be a NumPy (or CuPy) array, got {type(a).__name__}")


def check_float_array(a, name: str) -> None:
    """A float32 or float64 array (float64 is for gradchecks); no silent casts."""
    check_array(a, name)
    if np.dtype(a.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {a.dtype}; cast it with astype")


def add_param_grads(layer, dw, db) -> None:
    """``layer.weight.grad += dw`` and, when the layer has a bias, ``layer.bias.grad += db``.

    Gradients accumulate: a layer applied several times in one forward (the RPN head over FPN
    levels) receives the sum of its uses."""
    layer.weight.grad += dw
    if getattr(layer, "bias", None) is not None:
        layer.bias.grad += db


def add_named_grads(total: dict, more: dict) -> dict:
    """Sum gradients by name into ``total`` (``{level name: array}``): a feature level read by
    several branches (the RPN, the box and the mask poolers) receives the sum of their
    gradients. ``total`` is updated in place and returned; None entries count as absent."""
    for name, g in more.items():
        if g is not None:
            total[name] = g if total.get(name) is None else total[name] + g
    return total
