"""Finite-difference gradient checks in float64.

Every hand-written backward in the package is tested against central differences:

    df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)

To check a function with an array output ``y = F(x)`` we reduce it to a scalar with a fixed random
projection ``L = sum(y * G)``; then ``dL/dy = G`` is the upstream gradient fed to the backward, and
``dL/dx`` must match the numerical derivative of ``L``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_gradient(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar ``f()`` with respect to ``x``.

    ``x`` is perturbed in place (and restored), so ``f`` must read it when called.
    """
    if x.dtype != np.float64:
        raise ValueError(f"gradcheck needs float64 arrays, got {x.dtype}")
    grad = np.zeros_like(x)
    flat_x = x.reshape(-1)  # a view: writes go to x
    if not np.shares_memory(flat_x, x):
        raise ValueError("gradcheck needs a contiguous array to perturb in place")
    flat_g = grad.reshape(-1)
    for i in range(flat_x.size):
        old = flat_x[i]
        flat_x[i] = old + eps
        f_plus = float(f())
        flat_x[i] = old - eps
        f_minus = float(f())
        flat_x[i] = old
        flat_g[i] = (f_plus - f_minus) / (2.0 * eps)
    return grad


def assert_close_grad(
    analytic: np.ndarray,
    numeric: np.ndarray,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    name: str = "x",
) -> None:
    """Raise AssertionError naming the worst element when the two gradients disagree."""
    analytic = np.asarray(analytic, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise AssertionError(
            f"grad of {name}: analytic shape {analytic.shape} != numeric shape {numeric.shape}"
        )
    err = np.abs(analytic - numeric)
    tol = atol + rtol * np.abs(numeric)
    if np.any(err > tol) or not np.all(np.isfinite(analytic)):
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(
            f"grad of {name} mismatch at {tuple(int(j) for j in i)}: analytic {analytic[i]:.10g}, "
            f"numeric {numeric[i]:.10g} (max abs err {err.max():.3g})"
        )


def check_function(
    forward: Callable[..., np.ndarray],
    backward: Callable[[np.ndarray], tuple | np.ndarray],
    inputs: list[np.ndarray],
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    names: list[str] | None = None,
) -> None:
    """Gradcheck a pure function pair.

    ``forward(*inputs) -> y`` and ``backward(grad_y) -> grads`` where ``backward`` refers to the
    cache of the *last* forward call (so it is called right after one unperturbed forward).
    ``grads`` is one array per input (a tuple, or a single array for one input).
    """
    rng = np.random.default_rng(seed)
    y = forward(*inputs)
    g = rng.standard_normal(np.shape(y))
    analytic = backward(g)
    if not isinstance(analytic, (tuple, list)):
        analytic = (analytic,)
    names = names or [f"input{i}" for i in range(len(inputs))]
    for x, a, name in zip(inputs, analytic, names, strict=True):
        num = numerical_gradient(lambda: np.sum(forward(*inputs) * g), x, eps)
        assert_close_grad(a, num, rtol, atol, name)


def check_module(
    module,
    x: np.ndarray,
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    check_input: bool = True,
) -> None:
    """Gradcheck a Module's ``backward`` for its input and every parameter (float64)."""
    rng = np.random.default_rng(seed)
    y = module.forward(x)
    g = rng.standard_normal(np.shape(y))
    module.zero_grad()
    gx = module.backward(g)

    def loss() -> float:
        return float(np.sum(module.forward(x) * g))

    if check_input:
        assert_close_grad(gx, numerical_gradient(loss, x, eps), rtol, atol, "input")
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        assert_close_grad(p.grad, numerical_gradient(loss, p.data, eps), rtol, atol, name)


def check_params_sampled(
    loss: Callable[[], float],
    named_params,
    num_entries: int = 3,
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> int:
    """Check a few random entries of every Param against central differences.

    For large models a full finite-difference sweep is too slow; sampling ``num_entries``
    entries of each parameter still catches a wrong backward in any stage. ``loss()`` must
    recompute the scalar loss from scratch; the Params' ``.grad`` must already hold the
    analytic gradient of that loss. Returns the number of entries checked.
    """
    rng = np.random.default_rng(seed)
    checked = 0
    for name, p in named_params:
        if not p.requires_grad:
            continue
        flat = p.data.reshape(-1)
        if not np.shares_memory(flat, p.data):
            raise ValueError(f"{name}: gradcheck needs contiguous parameters")
        picks = rng.choice(flat.size, size=min(num_entries, flat.size), replace=False)
        for k in picks:
            old = flat[k]
            flat[k] = old + eps
            f_plus = float(loss())
            flat[k] = old - eps
            f_minus = float(loss())
            flat[k] = old
            numeric = (f_plus - f_minus) / (2 * eps)
            analytic = float(p.grad.reshape(-1)[k])
            if abs(analytic - numeric) > atol + rtol * abs(numeric):
                raise AssertionError(
                    f"grad of {name}[{np.unravel_index(k, p.shape)}]: analytic {analytic:.10g}, "
                    f"numeric {numeric:.10g}"
                )
            checked += 1
    return checked
