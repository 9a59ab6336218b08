"""The three losses of Mask R-CNN, each returning ``(loss, grad)``.

A loss is the end of the graph, so it needs no upstream gradient: every function here returns
the reduced loss as a Python ``float`` (on a GPU: a 0-d float64 device array, so that a step's
losses reach the host in one transfer) together with ``d loss / d input``, an array with the
input's shape and dtype that the caller feeds to the backward of whatever produced the input.

- ``softmax_cross_entropy``: the box head's classification loss (labels ``-1`` are ignored).
- ``binary_cross_entropy_with_logits``: RPN objectness and the per-pixel mask loss.
- ``smooth_l1``: box regression, with torchvision's ``beta`` (1/9 in Mask R-CNN).

Conventions differ from PyTorch in one deliberate place: a ``"mean"`` over zero counted elements
(every label ignored, an empty batch) is 0 with a zero gradient, not NaN, so an image without
positive RoIs contributes nothing instead of poisoning the step (torchvision gets the same effect
by returning ``logits.sum() * 0`` in that case).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_xp, is_device_array, raise_if

_REDUCTIONS = ("mean", "sum")


def softmax_cross_entropy(
    logits, labels, ignore_index: int = -1, reduction: str = "mean"
) -> tuple[float, object]:
    """Cross-entropy of integer class labels under ``softmax(logits)``.

    Args:
        logits: ``(N, C)`` float, unnormalised class scores.
        labels: ``(N,)`` integer, each in ``[0, C)`` or equal to ``ignore_index``.
        ignore_index: label value whose rows count neither in the loss nor in the mean.
        reduction: ``"mean"`` (over the counted rows) or ``"sum"``.

    Returns:
        ``(loss, grad_logits)``: ``loss = -sum_i log p_i[y_i]`` over counted rows ``i`` (divided
        by their number for ``"mean"``); ``grad_logits: (N, C)`` with ``logits``' dtype, equal to
        ``(softmax(logits_i) - onehot(y_i)) / n`` on counted rows and 0 on ignored rows.
    """
    xp = get_xp(logits)
    labels, valid = _check_cross_entropy_inputs(logits, labels, ignore_index, reduction)
    n = logits.shape[0]

    log_p = log_softmax(logits, axis=1)
    rows = xp.arange(n)
    # Ignored rows pick class 0 (any valid column) and are then masked out, which keeps the
    # indexing branch-free.
    safe_labels = xp.where(valid, labels, 0)
    total = -xp.sum(xp.where(valid, log_p[rows, safe_labels], 0))

    # d(-log p_y)/dz = softmax(z) - onehot(y): the classic softmax-CE gradient.
    grad = xp.exp(log_p)
    grad[rows, safe_labels] -= 1
    grad *= valid[:, None].astype(grad.dtype)
    if reduction == "sum":
        return _as_loss(total.astype(xp.float64)), grad
    # The count stays an array (no host sync on a GPU); dividing by it in float32 / float64
    # gives the bits a Python int would.
    denom = xp.maximum(valid.sum(), 1)
    grad /= denom.astype(grad.dtype)
    return _as_loss(total.astype(xp.float64) / denom), grad


def binary_cross_entropy_with_logits(
    logits, targets, weights=None, reduction: str = "mean"
) -> tuple[float, object]:
    """Binary cross-entropy of ``targets`` under ``sigmoid(logits)``, elementwise.

    Args:
        logits: any shape, float.
        targets: the same shape, values in ``[0, 1]`` (bool and integer masks are accepted and
            cast to ``logits``' dtype).
        weights: optional, broadcastable to ``logits``' shape; multiplies each element's loss.
        reduction: ``"mean"`` (over all ``logits.size`` elements, as PyTorch) or ``"sum"``.

    Returns:
        ``(loss, grad_logits)`` with ``grad_logits = w * (sigmoid(z) - t)`` (divided by the
        element count for ``"mean"``), shaped and typed like ``logits``.

    The per-element loss ``-t log s(z) - (1-t) log(1 - s(z))`` is evaluated as
    ``max(z, 0) - z t + log1p(exp(-|z|))``: the exponent is never positive, so nothing overflows
    and the result stays exact to rounding even at ``|z| = 1e4``.
    """
    xp = get_xp(logits)
    targets, weights = _check_bce_inputs(logits, targets, weights, reduction)

    z, t = logits, targets
    per_element = xp.maximum(z, 0) - z * t + xp.log1p(xp.exp(-xp.abs(z)))
    grad = sigmoid(z) - t
    if weights is not None:
        per_element = per_element * weights
        grad = grad * weights
    total = xp.sum(per_element).astype(xp.float64)
    if reduction == "mean" and logits.size > 0:
        grad /= logits.size
        return _as_loss(total / logits.size), grad
    return _as_loss(total), grad


def smooth_l1(pred, target, beta: float = 1.0, reduction: str = "sum") -> tuple[float, object]:
    """Smooth L1 (Huber-like) loss of ``pred - target``, PyTorch's definition.

    With ``x = pred - target``: ``0.5 x^2 / beta`` where ``|x| < beta``, else
    ``|x| - 0.5 beta``; ``beta = 0`` is plain L1 (``|x|``).

    Args:
        pred: any shape, float (the regression output whose gradient is returned).
        target: the same shape (cast to ``pred``'s dtype).
        beta: the quadratic-to-linear switch point, ``>= 0`` (Mask R-CNN uses 1/9).
        reduction: ``"sum"`` (the detection heads sum, then divide by the sampled count
            themselves) or ``"mean"`` over all elements.

    Returns:
        ``(loss, grad_pred)`` with ``grad_pred = x / beta`` inside the quadratic zone and
        ``sign(x)`` outside (0 at ``x = 0`` for L1), divided by ``pred.size`` for ``"mean"``.
    """
    xp = get_xp(pred)
    target = _check_elementwise_inputs("smooth_l1", pred, "pred", target, "target", reduction)
    beta = float(beta)
    if not beta >= 0:  # also rejects NaN
        raise ValueError(f"smooth_l1: beta must be >= 0, got {beta}")

    x = pred - target.astype(pred.dtype, copy=False)
    abs_x = xp.abs(x)
    if beta == 0:
        # PyTorch turns beta=0 into l1_loss; dividing by beta would give 0/0 here.
        per_element = abs_x
        grad = xp.sign(x)
    else:
        quadratic = abs_x < beta
        per_element = xp.where(quadratic, 0.5 * x * x / beta, abs_x - 0.5 * beta)
        grad = xp.where(quadratic, x / beta, xp.sign(x))
    total = xp.sum(per_element).astype(xp.float64)
    if reduction == "mean" and pred.size > 0:
        grad /= pred.size
        return _as_loss(total / pred.size), grad
    return _as_loss(total), grad


def sigmoid(x):
    """``1 / (1 + exp(-x))`` without overflow: both branches only ever exponentiate ``-|x|``.

    ``x``: any shape, float; returns the same shape and dtype.
    """
    xp = get_xp(x)
    e = xp.exp(-xp.abs(x))  # in (0, 1]
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def log_softmax(x, axis: int = -1):
    """``x - logsumexp(x)`` along ``axis``, shifted by the max so ``exp`` never overflows.

    ``x``: any shape, float; returns the same shape and dtype.
    """
    xp = get_xp(x)
    if x.shape[axis] == 0:
        return x.copy()
    shifted = x - xp.max(x, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def _check_cross_entropy_inputs(logits, labels, ignore_index: int, reduction: str):
    """The argument checks of :func:`softmax_cross_entropy`.

    Returns ``labels`` as an array of the logits' backend and ``valid``, the mask of the rows
    that count (label != ``ignore_index``)."""
    xp = get_xp(logits)
    _check_reduction(reduction)
    _check_floating(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(
            f"softmax_cross_entropy: logits must be 2-D (N, C), got shape {logits.shape}; "
            "flatten extra dimensions into N first"
        )
    n, c = logits.shape
    labels = xp.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"softmax_cross_entropy: labels must have an integer dtype, got {labels.dtype}; "
            "pass class indices (e.g. labels.astype(np.int64)), not one-hot or float labels"
        )
    if labels.shape != (n,):
        raise ValueError(
            f"softmax_cross_entropy: labels must have shape (N,) = ({n},) to match logits "
            f"{logits.shape}, got {labels.shape}"
        )
    valid = labels != ignore_index
    out_of_range = valid & ((labels < 0) | (labels >= c))

    def error():
        bad = labels[out_of_range]
        return ValueError(
            f"softmax_cross_entropy: labels must lie in [0, {c}) or equal ignore_index="
            f"{ignore_index}; got {int(bad.min())}..{int(bad.max())} "
            f"({int(out_of_range.sum())} bad labels)"
        )

    raise_if(xp.any(out_of_range), error)
    return labels, valid


def _check_bce_inputs(logits, targets, weights, reduction: str):
    """The argument checks of :func:`binary_cross_entropy_with_logits`.

    Returns ``targets`` and ``weights`` (or None) as arrays of ``logits``' dtype."""
    xp = get_xp(logits)
    loss = "binary_cross_entropy_with_logits"
    targets = _check_elementwise_inputs(
        loss, logits, "logits", targets, "targets", reduction, kinds="biuf"
    )
    targets = targets.astype(logits.dtype, copy=False)
    if targets.size:
        raise_if(
            xp.any((targets < 0) | (targets > 1) | xp.isnan(targets)),
            lambda: ValueError(
                f"{loss}: targets must lie in [0, 1] (got min {float(xp.nanmin(targets))}, "
                f"max {float(xp.nanmax(targets))}, or NaN); a 0/255 mask must be divided by "
                "255 first"
            ),
        )
    if weights is None:
        return targets, None
    weights = xp.asarray(weights)
    try:
        shape = np.broadcast_shapes(weights.shape, logits.shape)
    except ValueError:
        shape = None
    if shape != logits.shape:
        raise ValueError(
            f"{loss}: weights shape {weights.shape} must broadcast to logits shape {logits.shape}"
        )
    return targets, weights.astype(logits.dtype, copy=False)


def _check_elementwise_inputs(loss, x, x_name, target, target_name, reduction, kinds="iuf"):
    """The checks every elementwise loss shares: a known ``reduction``, a floating-point ``x``
    and a numeric ``target`` (dtype kind in ``kinds``) of ``x``'s shape, returned as an array."""
    _check_reduction(reduction)
    _check_floating(x, x_name)
    target = get_xp(x).asarray(target)
    if target.shape != x.shape:
        raise ValueError(
            f"{loss}: {target_name} shape {target.shape} must equal {x_name} shape {x.shape}"
        )
    if target.dtype.kind not in kinds:
        raise ValueError(f"{loss}: {target_name} must be numeric, got {target.dtype}")
    return target


def _as_loss(value):
    """A reduced loss as returned: a Python float from NumPy; on a device the 0-d array itself
    (reading it would be a host sync per loss; the model fetches all losses at once)."""
    return value if is_device_array(value) else float(value)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_floating(x, name: str) -> None:
    """Any floating-point array (float16 too: a loss is reduced in its input's precision).

    Looser than ``utils.check_float_array`` (float32/float64 only, for the RoI ops' inputs):
    a loss only needs a float dtype, and its message says so."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or dtype.kind != "f":
        raise ValueError(
            f"{name} must be a floating-point array (float32, or float64 for gradchecks), "
            f"got {type(x).__name__} with dtype {dtype}"
        )
