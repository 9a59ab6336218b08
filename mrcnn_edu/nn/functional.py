"""Pure forward/backward pairs: ``op_forward(...) -> (out, cache)``, ``op_backward(dout, cache)``.

Layers in ``layers.py`` are thin wrappers around these; a stage that applies one set of weights
several times (the RPN head over FPN levels) calls the pairs directly and sums the gradients.
A cache of more than three parts is a ``NamedTuple`` (``ConvCache``, ``ConvTransposeCache``,
``MaxPoolCache``, ``GroupNormCache``) whose fields the backward reads by name.
Shapes are NCHW; weights follow PyTorch's layouts so checkpoints line up name by name.

Convolution (im2col + GEMM) lives in ``conv.py``, the transposed convolution in
``conv_transpose.py``; both are re-exported here (``F.conv2d_forward``, ``F.im2col`` ...).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from ..backend import get_xp
from .conv import (  # noqa: F401  (re-exported: F.conv2d_forward, F.im2col, ...)
    ConvCache,
    _from_channel_major,
    _to_channel_major,
    _unpad,
    col2im,
    conv2d_backward,
    conv2d_forward,
    conv2d_geometry,
    conv_output_size,
    im2col,
    pad_channel_major,
)
from .conv_transpose import (  # noqa: F401  (re-exported)
    ConvTransposeCache,
    conv_transpose2d_backward,
    conv_transpose2d_forward,
)
from .utils import pair


class MaxPoolCache(NamedTuple):
    """What :func:`max_pool2d_backward` needs from :func:`max_pool2d_forward`."""

    x_shape: tuple  # (N, C, H, W) of the input
    argmax: object  # (N, C, Ho, Wo) int32: row-major offset i*kw + j of each window's maximum
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


class GroupNormCache(NamedTuple):
    """What :func:`group_norm_backward` needs from :func:`group_norm_forward`."""

    xhat: object  # (N, C, H, W), the normalised input before the affine transform
    inv_std: object  # (N, G, 1), 1 / sqrt(var + eps) per group
    num_groups: int
    weight: object  # (C,) or None without the affine transform


def _pad(x, ph: int, pw: int, value=0.0):
    if ph == 0 and pw == 0:
        return x
    xp = get_xp(x)
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * ph, w + 2 * pw), value, dtype=x.dtype)
    out[:, :, ph : ph + h, pw : pw + w] = x
    return out


# --------------------------------------------------------------------------------------------
# Linear, ReLU
# --------------------------------------------------------------------------------------------
def linear_forward(x, w, b=None):
    """x: (N, in); w: (out, in); b: (out,). y = x @ w.T + b."""
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear expects x (N, {w.shape[1]}), got {x.shape}")
    y = x @ w.T
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    x, w, has_bias = cache
    return dy @ w, dy.T @ x, (dy.sum(axis=0) if has_bias else None)


def relu_forward(x):
    """max(x, 0) that keeps NaN (as PyTorch): only ``x <= 0`` becomes 0, so a NaN input is not
    hidden behind a finite output. Returns ``(y, mask)``, mask True where the gradient passes."""
    xp = get_xp(x)
    # maximum propagates NaN; it is several times faster than where(mask, x, 0)
    return xp.maximum(x, 0), ~(x <= 0)


def relu_backward(dy, mask):
    return dy * mask


# --------------------------------------------------------------------------------------------
# Max pooling
# --------------------------------------------------------------------------------------------
def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """Max pooling with -inf padding; NaN in a window propagates (both as PyTorch). Ties: the
    first maximum in row-major window order wins, so the backward is deterministic. Returns
    y: (N, C, Ho, Wo) and a cache holding the argmax offsets.

    Branch-free: the running maximum of the kh*kw strided views, then the argmax as the first
    view equal to it (``where`` with an unpredictable mask is an order slower than arithmetic
    on masks)."""
    xp = get_xp(x)
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = pair(stride if stride is not None else kernel_size, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
        raise ValueError(f"max_pool2d: padding {p} must be at most half the kernel {k}")
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, k[0], s[0], p[0], 1), conv_output_size(w, k[1], s[1], p[1], 1)
    xpad = _pad(x, *p, value=-np.inf)
    views = [
        xpad[:, :, i : i + s[0] * (ho - 1) + 1 : s[0], j : j + s[1] * (wo - 1) + 1 : s[1]]
        for i in range(k[0])
        for j in range(k[1])
    ]
    y = views[0].copy()
    for v in views[1:]:
        xp.maximum(y, v, out=y)
    arg = xp.zeros((n, c, ho, wo), dtype=np.int32)
    found = views[0] == y
    for offset, v in enumerate(views[1:], start=1):
        hit = v == y
        hit &= ~found
        arg += hit * np.int32(offset)
        found |= hit
    return y, MaxPoolCache(x.shape, arg, k, s, p)


def max_pool2d_backward(dy, cache):
    """Each window's gradient goes to its argmax (the first maximum, as in the forward)."""
    arg, k, s, p = cache.argmax, cache.kernel_size, cache.stride, cache.padding
    xp = get_xp(dy)
    n, c, h, w = cache.x_shape
    ho, wo = dy.shape[2], dy.shape[3]
    dpad = xp.zeros((n, c, h + 2 * p[0], w + 2 * p[1]), dtype=dy.dtype)
    for i in range(k[0]):
        for j in range(k[1]):
            contrib = dy * (arg == i * k[1] + j)  # arithmetic on the mask, not where
            dpad[:, :, i : i + s[0] * (ho - 1) + 1 : s[0], j : j + s[1] * (wo - 1) + 1 : s[1]] += (
                contrib
            )
    return _unpad(dpad, *p)


# --------------------------------------------------------------------------------------------
# Nearest upsampling to a target size
# --------------------------------------------------------------------------------------------
def nearest_indices(in_size: int, out_size: int):
    """Source index of every output index, as PyTorch's 'nearest' mode computes it:
    floor(dst * (in/out)) with the scale in float32, clamped to in - 1."""
    if out_size == in_size:
        return np.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def upsample_nearest_forward(x, size):
    """Nearest-neighbour resize of x: (N, C, H, W) to ``size = (Ho, Wo)`` (any sizes, e.g. the
    odd feature maps of FPN's top-down path)."""
    xp = get_xp(x)
    ho, wo = pair(size, "size", minimum=0)
    iy = xp.asarray(nearest_indices(x.shape[2], ho))
    ix = xp.asarray(nearest_indices(x.shape[3], wo))
    return x[:, :, iy[:, None], ix[None, :]], (x.shape, iy, ix)


@functools.lru_cache(maxsize=256)
def _integer_factor(in_size: int, out_size: int) -> int | None:
    """``f`` when nearest upsampling from ``in_size`` to ``out_size`` copies every input ``f``
    times in a row (``out = f * in`` and source index ``dst // f``, FPN's 2x), else None."""
    f = out_size // in_size if in_size else 0
    if f < 1 or f * in_size != out_size:
        return None
    same = np.array_equal(nearest_indices(in_size, out_size), np.arange(out_size) // f)
    return f if same else None


def _sum_blocks(dy, h: int, w: int, f: int, g: int):
    """``dx[n, c, y, x] = sum_{i<f, j<g} dy[n, c, y*f + i, x*g + j]``: f - 1 and g - 1 plain
    additions of strided views (a reshape-sum over the two short axes is an order slower)."""
    xp = get_xp(dy)
    v = dy.reshape(dy.shape[0], dy.shape[1], h, f, w, g)
    rows = v[:, :, :, 0]
    for i in range(1, f):
        rows = rows + v[:, :, :, i]
    out = rows[..., 0]
    for j in range(1, g):
        out = out + rows[..., j]
    return xp.ascontiguousarray(out)


def upsample_nearest_backward(dy, cache):
    """Every input pixel receives the sum of the gradients of the outputs that copied it."""
    x_shape, iy, ix = cache
    xp = get_xp(dy)
    n, c, h, w = x_shape
    f, g = _integer_factor(h, dy.shape[2]), _integer_factor(w, dy.shape[3])
    if f is not None and g is not None:  # whole blocks of f x g copies (FPN's top-down 2x)
        return _sum_blocks(dy, h, w, f, g)
    # Sum over output columns first (into input columns), then over rows; index_add style.
    dx_cols = xp.zeros((n, c, dy.shape[2], w), dtype=dy.dtype)
    xp.add.at(dx_cols, (slice(None), slice(None), slice(None), ix), dy)
    dx = xp.zeros((n, c, h, w), dtype=dy.dtype)
    xp.add.at(dx, (slice(None), slice(None), iy), dx_cols)
    return dx


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def frozen_batch_norm_forward(x, weight, bias, running_mean, running_var, eps=1e-5):
    """BatchNorm with fixed statistics and affine parameters (how pre-trained backbones are
    fine-tuned with small batches): y = x * scale + shift per channel."""
    scale, shift = frozen_batch_norm_scale_shift(weight, bias, running_mean, running_var, eps)
    c = x.shape[1]
    return x * scale.reshape(1, c, 1, 1) + shift.reshape(1, c, 1, 1), scale


def frozen_batch_norm_scale_shift(weight, bias, running_mean, running_var, eps=1e-5):
    """FrozenBN as a per-channel affine map ``y = x * scale + shift``:
    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``."""
    xp = get_xp(weight)
    scale = weight * (1.0 / xp.sqrt(running_var + eps))
    return scale, bias - running_mean * scale


def frozen_batch_norm_backward(dy, scale):
    return dy * scale.reshape(1, -1, 1, 1)


def group_norm_forward(x, num_groups: int, weight=None, bias=None, eps=1e-5):
    """Group Normalization (Wu & He, 2018): normalise over (C/G, H, W) within each group.

    x: (N, C, H, W); weight, bias: (C,) or None."""
    xp = get_xp(x)
    n, c, h, w = x.shape
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels are not divisible by {num_groups} groups")
    xg = x.reshape(n, num_groups, -1)
    mean = xg.mean(axis=2, keepdims=True)
    var = xg.var(axis=2, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = ((xg - mean) * inv_std).reshape(n, c, h, w)
    y = xhat
    if weight is not None:
        y = y * weight.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1)
    return y, GroupNormCache(xhat, inv_std, num_groups, weight)


def group_norm_backward(dy, cache):
    """Returns (dx, dweight, dbias). With xhat = (x - mu) * r per group of m elements:
    dx = r * (g - mean(g) - xhat * mean(g * xhat)), where g = dy * weight."""
    xhat, inv_std, num_groups, weight = cache.xhat, cache.inv_std, cache.num_groups, cache.weight
    n, c, h, w = xhat.shape
    if weight is not None:
        dweight = (dy * xhat).sum(axis=(0, 2, 3))
        dbias = dy.sum(axis=(0, 2, 3))
        g = dy * weight.reshape(1, c, 1, 1)
    else:
        dweight = dbias = None
        g = dy
    gg = g.reshape(n, num_groups, -1)
    xg = xhat.reshape(n, num_groups, -1)
    dx = inv_std * (
        gg - gg.mean(axis=2, keepdims=True) - xg * (gg * xg).mean(axis=2, keepdims=True)
    )
    return dx.reshape(n, c, h, w), dweight, dbias
